"""Many hosts (jax.distributed), for real on this machine: two processes on 127.0.0.1, each
with 2 forced CPU devices, train on one 4-device mesh and get the losses of one process with
4 devices; process 0 writes the run, which loads on one device."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHORT_RUN, TINY, xla_flags

from jaxattn.train import load_run
from jaxattn.train.config import ConfigError, load_config

SMALL = [
    *SHORT_RUN,
    "mesh.data=2",
    "mesh.fsdp=2",  # batch over all 4 devices, weights split across the two processes
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_py(devices: int, *overrides: str, env=None) -> subprocess.Popen:
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}"),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", str(TINY), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def _step_losses(run: Path) -> np.ndarray:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return np.concatenate([json.loads(line)["step_losses"] for line in lines])


@pytest.mark.processes
def test_two_processes_of_two_devices_train_as_one_process_of_four(tmp_path):
    port = _free_port()
    several, one = tmp_path / "two_hosts", tmp_path / "one_host"
    procs = [
        _train_py(
            2,
            *SMALL,
            f"train.run_dir={several}",
            f"mesh.coordinator=127.0.0.1:{port}",
            "mesh.num_processes=2",
            f"mesh.process_id={i}",
        )
        for i in (0, 1)
    ]
    results = [_finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "process 1 of 2: done" in results[1][1]
    reference = _finish(_train_py(4, *SMALL, f"train.run_dir={one}"))
    assert reference[0] == 0, reference[2][-3000:]

    # Collectives over gloo add in another order than within one process: float32 rounding.
    got, expected = _step_losses(several), _step_losses(one)
    assert got.shape == expected.shape == (20,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (several, one)]
    assert summaries[0]["exact_match"] == summaries[1]["exact_match"]

    # Process 0 wrote the run (its checkpoints hold whole arrays); process 1 wrote nothing
    # there, and its scratch directory is gone.
    assert sorted(p.name for p in (several / "checkpoints").iterdir()) == ["10", "20"]
    model, config = load_run(several)  # this process: one device
    assert config.mesh.num_processes == 2
    assert model.embed.embedding[...].shape == (16, 64)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("jaxattn-follower-*/run"))


@pytest.mark.processes
def test_resume_over_several_processes_is_refused_in_one_line(tmp_path):
    port = _free_port()
    args = [*SMALL, f"train.run_dir={tmp_path / 'run'}", f"mesh.coordinator=127.0.0.1:{port}"]
    procs = [
        _train_py(2, *args, "--resume", env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in (0, 1)
    ]
    for code, _, err in map(_finish, procs):
        assert code == 2, err[-2000:]
        assert "--resume of a run over several processes is not supported" in err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
def test_a_bad_process_count_in_the_environment_is_one_line(tmp_path):
    code, _, err = _finish(
        _train_py(
            1,
            f"train.run_dir={tmp_path / 'run'}",
            env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two"},
        )
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "train.py: environment variable JAX_NUM_PROCESSES='two' is not an int"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("mesh.coordinator=localhost", "mesh.coordinator must be host:port"),
        ("mesh.coordinator=localhost:0", "mesh.coordinator must be host:port"),
        ("mesh.coordinator=localhost:70000", "mesh.coordinator must be host:port"),
        ("mesh.coordinator='[::1:1234'", "mesh.coordinator must be host:port"),
        ("mesh.num_processes=0", "mesh.num_processes must be >= 1"),
        ("mesh.process_id=-1", "mesh.process_id must be >= 0"),
    ],
)
def test_bad_process_settings_are_config_errors(override, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(TINY, [override])


def test_a_process_id_beyond_the_process_count_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mesh\.process_id must be below mesh\.num_processes"):
        load_config(TINY, ["mesh.num_processes=2", "mesh.process_id=2"])


@pytest.mark.processes
def test_a_run_directory_process_0_refuses_stops_every_process(tmp_path):
    """Process 0 cannot open the run (a file is in its way): the other process learns it at
    once and stops too, rather than waiting at the first collective."""
    (tmp_path / "run").write_text("a user's file\n")
    port = _free_port()
    procs = [
        _train_py(
            2,
            *SMALL,
            f"train.run_dir={tmp_path / 'run'}",
            f"mesh.coordinator=127.0.0.1:{port}",
            "mesh.num_processes=2",
            f"mesh.process_id={i}",
        )
        for i in (0, 1)
    ]
    (code0, _, err0), (code1, _, err1) = map(_finish, procs)
    assert (code0, code1) == (2, 2), (err0[-1500:], err1[-1500:])
    assert "is not a directory" in err0 or "not a run" in err0, err0[-1500:]
    assert "another process of the run could not open its directory" in err1
    assert (tmp_path / "run").read_text() == "a user's file\n"


def test_a_process_count_without_a_coordinator_is_refused(tmp_path):
    from jaxattn.train.loop import train
    from jaxattn.train.rundir import RunError

    config = load_config(TINY, [f"train.run_dir={tmp_path / 'run'}", "mesh.num_processes=2"])
    with pytest.raises(RunError, match="num_processes=2, process_id=None but no coordinator"):
        train(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
def test_ctrl_c_to_one_process_stops_all_at_one_step_and_process_0_saves(tmp_path):
    import signal
    import time

    run, port = tmp_path / "run", _free_port()
    args = [
        *SMALL,
        "train.steps=5000",
        "train.eval_every=10",
        f"train.run_dir={run}",
        f"mesh.coordinator=127.0.0.1:{port}",
        "mesh.num_processes=2",
    ]
    procs = [_train_py(2, *args, f"mesh.process_id={i}") for i in (0, 1)]
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, "training never began"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)  # the follower only
    (code0, _, err0), (code1, _, err1) = map(_finish, procs)
    assert (code0, code1) == (130, 130), (err0[-1500:], err1[-1500:])
    step = int(err0.split("at step ")[1].split()[0].rstrip(";,"))
    assert f"at step {step}" in err1  # both stopped at the same boundary
    assert (run / "checkpoints" / str(step)).is_dir()  # process 0 saved it
    # The command it prints resumes on one host.
    assert "mesh.coordinator=null" in err0 and "JAX_COORDINATOR_ADDRESS unset" in err0


@pytest.mark.processes
def test_processes_started_with_different_configs_stop_in_one_line_before_writing(tmp_path):
    port = _free_port()
    args = [
        *SMALL,
        f"train.run_dir={tmp_path / 'run'}",
        f"mesh.coordinator=127.0.0.1:{port}",
        "mesh.num_processes=2",
    ]
    procs = [
        _train_py(2, *args, "mesh.process_id=0"),
        _train_py(2, *args, "mesh.process_id=1", "train.steps=40"),  # a different command
    ]
    for code, _, err in map(_finish, procs):
        assert code == 2, err[-1500:]
        assert "process 1 started with another config or flags than process 0" in err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_coordinator_settings_are_refused_in_one_line_before_joining(tmp_path, monkeypatch):
    import socket

    from jaxattn.train.loop import train
    from jaxattn.train.rundir import RunError

    run = f"train.run_dir={tmp_path / 'run'}"
    # From the environment, the same check as the config key's.
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "garbage")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(RunError, match=r"JAX_COORDINATOR_ADDRESS='garbage' is not host:port"):
        train(load_config(TINY, [run]), log=lambda _: None)
    # --resume with a coordinator named: refused at once, not after waiting for the others.
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(RunError, match="--resume of a run over several processes"):
        train(load_config(TINY, [run]), resume=True, log=lambda _: None)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    # Process 0 finds its coordinator port taken (JAX's server would crash on it).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(TINY, [run, f"mesh.coordinator=127.0.0.1:{port}"])
        with pytest.raises(RunError, match=f"coordinator port {port} is not free on this host"):
            train(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()
