"""The training loop under interruption and faults (issue 9, points 3-5).

- resume: a run stopped by SIGTERM (between two evaluations or at one) and continued writes
  the same metrics.jsonl as a run never stopped, byte for byte;
- signals to a real ``train.py``: SIGTERM / SIGINT exit 143 / 130 with one line naming the
  step and the resume command, which continues the run to the same metrics.jsonl; SIGKILL at
  any moment, during Orbax's finalize of a save included, leaves a run that resumes from its
  last complete checkpoint;
- a non-finite loss stops the run naming the step (the checkpoints kept are finite) or, with
  ``train.on_nonfinite=skip``, skips those updates and says how many in strict JSON;
- ``train_loss`` does not depend on ``train.steps_per_call``;
- a resume with another config, or of a run whose config.yaml was edited, is refused naming
  the key, and changes nothing in the run directory; a config file with a base is compared
  by its resolved values with the whole config.yaml of the run.

Cost: every ``train`` call compiles its steps (seconds on CPU) and every ``train.py``
subprocess imports JAX on top, so runs are short and share one reference: a 140-step run by
``train.py`` whose first two lines are also the reference of the 40-step in-process runs.
The subprocesses share a persistent compilation cache that the reference fills; in-process
runs compile afresh, so each comparison holds runs compiled separately against each other.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, SHORT_RUN, TINY
from flax import nnx

from jaxattn.train import loop, plan, tasks
from jaxattn.train.checkpoints import Checkpoints
from jaxattn.train.config import dump_config, load_config
from jaxattn.train.load import load_run
from jaxattn.train.loop import train
from jaxattn.train.rundir import RunDir, RunError
from jaxattn.train.signals import TrainingInterrupted

# Evaluations every 20 steps, chunks of 10. warmup_constant: the learning rate of a step does
# not depend on train.steps, so a 40-step run is the first 40 steps of a 140-step one and
# both compile to the same programs. Warmup is 100 steps: exact-match stays 0 and every step
# runs (the reference fixture checks it).
BASE = (*SHORT_RUN, "optim.schedule=warmup_constant", "train.eval_every=20")
SHORT = (*BASE, "train.steps=40")  # in-process runs
# Subprocesses that get a signal once a metrics line appears: 120 steps and 6 saves after
# the first evaluation (seconds), so each signal lands while the run is going on.
LONG = (*BASE, "train.steps=140")
# Adam's steps grow with the warmup until the loss overflows, at step 13 on CPU: finite for
# the first checkpoints (every 5 steps here), non-finite well before step 40.
HUGE_LR = "optim.learning_rate=2e6"
BLOW_UP = (HUGE_LR, "train.eval_every=5", "train.steps_per_call=5")


def _quiet(_line):
    pass


def _config(run_dir, *overrides):
    return load_config(TINY, [*SHORT, f"train.run_dir={run_dir}", *overrides])


def _metrics(run_dir) -> bytes:
    return (Path(run_dir) / "metrics.jsonl").read_bytes()


def _summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _checkpoint_steps(run_dir) -> list[int]:
    with Checkpoints(Path(run_dir) / "checkpoints", read_only=True) as ckpts:
        return ckpts.steps()


def _leftovers(run_dir) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its mtime and, for files, its content."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _train_py(*args, cwd, env, program=None):
    return subprocess.Popen(
        [sys.executable, program or str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def jax_cache() -> dict:
    """Environment for subprocesses: the suite's compilation cache (conftest), where
    train.py caches every program it compiles, so the runs here compile them once."""
    return dict(os.environ)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, jax_cache) -> Path:
    """A LONG run never interrupted, by train.py (compiled afresh; it fills the cache).
    Tests read or copy it, never change it."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _train_py(
        "--config", str(TINY), *LONG, f"train.run_dir={run}", cwd=run.parent, env=jax_cache
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = _summary(run)
    # Every step ran: the comparisons cover the whole run, not an early stop.
    assert summary["steps"] == 140 and not summary["reached_target"]
    assert summary["resumed_from"] is None
    return run


@pytest.fixture(scope="module")
def short_reference(long_reference) -> bytes:
    """metrics.jsonl of an uninterrupted SHORT run: the LONG one's first two lines."""
    lines = _metrics(long_reference).splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == list(range(20, 141, 20))
    return b"".join(lines[:2])


def _interrupt_after(monkeypatch, step: int, signum=signal.SIGTERM) -> None:
    """Send ``signum`` to this process (the real handler gets it) when the chunk that ends
    at ``step`` has run."""
    real = plan.Plan.chunk

    def chunk(self):
        compiled = real(self)

        def interrupted(params, opt_state, key, first, n):
            out = compiled(params, opt_state, key, first, n)
            if first + n == step:
                os.kill(os.getpid(), signum)
            return out

        interrupted.memory_analysis = compiled.memory_analysis
        return interrupted

    monkeypatch.setattr(plan.Plan, "chunk", chunk)


# --------------------------------------------------------------------------- resume, in-process


@pytest.mark.processes
def test_sigterm_between_evaluations_and_at_one_then_resume_gives_the_same_metrics(
    tmp_path, monkeypatch, short_reference
):
    run = tmp_path / "run"
    config = _config(run)

    # Stopped at step 10, between two evaluations: the ten train losses since the start are
    # in the checkpoint, not yet in metrics.jsonl.
    _interrupt_after(monkeypatch, 10)
    with pytest.raises(TrainingInterrupted) as stop:
        train(config, log=_quiet)
    assert (stop.value.signum, stop.value.step, stop.value.saved) == (signal.SIGTERM, 10, True)
    assert stop.value.run_dir == run
    assert _metrics(run) == b""
    assert _checkpoint_steps(run) == [10]
    with Checkpoints(run / "checkpoints", read_only=True) as ckpts:
        pending = ckpts.read_meta(10)["progress"]["pending"]
    assert len(pending["loss"]) == len(pending["accuracy"]) == 10
    assert not (run / "summary.json").exists()

    # Resumed, then stopped at step 20, right after an evaluation.
    monkeypatch.undo()
    _interrupt_after(monkeypatch, 20)
    with pytest.raises(TrainingInterrupted) as stop:
        train(config, resume=True, log=_quiet)
    assert (stop.value.signum, stop.value.step, stop.value.saved) == (signal.SIGTERM, 20, True)
    assert _metrics(run) == short_reference.splitlines(keepends=True)[0]
    assert _checkpoint_steps(run) == [10, 20]

    # Resumed to the end: the file an uninterrupted run writes, byte for byte.
    monkeypatch.undo()
    result = train(config, resume=True, log=_quiet)
    assert (result.resumed_from, result.steps) == (20, 40)
    assert _summary(run)["resumed_from"] == 20
    assert _metrics(run) == short_reference


def test_a_signal_during_the_last_chunk_says_the_run_finished(tmp_path, monkeypatch):
    # SIGINT in the last chunk (or the final save) once ended in exit 0 and no line: the
    # user could not tell whether the run had stopped or finished.
    run = tmp_path / "run"
    config = _config(run, "train.steps=20", "train.pictures=true")
    _interrupt_after(monkeypatch, 20, signal.SIGINT)
    logs = []
    with pytest.raises(TrainingInterrupted) as stop:
        train(config, log=logs.append)
    assert (stop.value.signum, stop.value.step, stop.value.finished) == (signal.SIGINT, 20, True)
    assert str(stop.value) == (
        f"SIGINT came as the run finished: it is complete at step 20 in {run} (checkpoint "
        "and summary.json written), nothing to resume; pictures not drawn: python -m "
        f"jaxattn.commands.viz {run} draws them"
    )
    assert stop.value.resumed_by("python train.py --resume").args == stop.value.args
    assert _summary(run)["steps"] == 20 and _checkpoint_steps(run) == [20]
    assert [json.loads(line)["step"] for line in _metrics(run).splitlines()] == [20]
    assert not (run / "attention.png").exists()  # the user asked to stop: no pictures
    assert any(line.startswith("did not reach exact-match target") for line in logs)


@pytest.mark.processes
def test_train_loss_does_not_depend_on_steps_per_call(tmp_path, short_reference):
    """train_loss / train_accuracy are means over the steps since the last evaluation. The
    reference fuses 10 steps per call; 20 (one call per evaluation) gives the same file. The
    old rule (the mean of the last call) gave the mean of steps 11-20 vs 1-20."""
    run = tmp_path / "run"
    train(_config(run, "train.steps_per_call=20"), log=_quiet)
    got = [json.loads(line) for line in _metrics(run).splitlines()]
    want = [json.loads(line) for line in short_reference.splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [20, 40]
    for g, w in zip(got, want, strict=True):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-6, abs=0)
        assert g["train_accuracy"] == pytest.approx(w["train_accuracy"], rel=1e-6, abs=0)
    assert _metrics(run) == short_reference


# ------------------------------------------------------------------- signals to a real train.py


def _wait_for_lines(path: Path, n: int, proc, timeout: float = 180.0) -> None:
    """Until ``path`` holds ``n`` complete lines; fails if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.read_text().count("\n") >= n:
                return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"train.py ended ({proc.returncode}) before {n} metrics lines: {err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {n} lines in {path} after {timeout} s")


TRAIN_PY = ROOT / "train.py"  # the printed command names the script as it was started


def _stopped(proc, signum, run: Path) -> list[str]:
    """Checks the one-line report of a train.py stopped by ``signum``; returns the resume
    command it prints (without ``python``), to run from the directory the run started in."""
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    name = signal.Signals(signum).name
    match = re.fullmatch(
        rf"train\.py: stopped by {name} at step (\d+); checkpoint of step \1 saved in "
        rf"{re.escape(str(run))}; resume with: (python {re.escape(str(TRAIN_PY))} .* --resume)",
        lines[0],
    )
    assert match, lines[0]
    assert int(match.group(1)) in _checkpoint_steps(run)
    command = shlex.split(match.group(2))
    assert command[0] == "python"
    return command[1:]


@pytest.mark.processes
def test_sigterm_sigint_and_sigkill_to_train_py_then_resume_gives_the_same_metrics(
    tmp_path, jax_cache, long_reference
):
    """One run stopped three ways, each continued by the command the last stop printed."""
    run = tmp_path / "run"
    args = ["--config", str(TINY), *LONG, f"train.run_dir={run}"]
    metrics = run / "metrics.jsonl"

    proc = _train_py(*args, cwd=tmp_path, env=jax_cache)
    _wait_for_lines(metrics, 1, proc)
    proc.send_signal(signal.SIGTERM)
    command = _stopped(proc, signal.SIGTERM, run)
    assert command == [str(TRAIN_PY), *args, "--resume"]
    lines = metrics.read_text().count("\n")

    # The printed command, run from the repository root; stopped by SIGINT (Ctrl-C).
    proc = _train_py(*command[1:], cwd=tmp_path, env=jax_cache, program=command[0])
    _wait_for_lines(metrics, lines + 1, proc)
    proc.send_signal(signal.SIGINT)
    command = _stopped(proc, signal.SIGINT, run)
    assert command == [str(TRAIN_PY), *args, "--resume"]
    lines = metrics.read_text().count("\n")
    last_stop = max(_checkpoint_steps(run))

    # Killed at an arbitrary moment: no handler, no last save.
    proc = _train_py(*command[1:], cwd=tmp_path, env=jax_cache, program=command[0])
    _wait_for_lines(metrics, lines + 1, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()

    done = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=jax_cache, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"run directory: {run}"
    # The last complete checkpoint: the SIGINT one, or a later one if its save had finished.
    assert _summary(run)["resumed_from"] >= last_stop
    assert _metrics(run) == _metrics(long_reference)
    assert _leftovers(run) == []


# Kills the process inside Orbax's atomic finalize of the second checkpoint: the step's items
# are written, the rename of <step>.orbax-checkpoint-tmp to <step> has not happened.
# CheckpointManager writes through AtomicRenameTemporaryPath (the default on a local disk);
# if it did not, nothing would kill the process and it would exit 3.
_KILL_IN_SECOND_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
from jaxattn.train.config import load_config
from jaxattn.train.loop import train

real = atomicity.AtomicRenameTemporaryPath.finalize
steps = []

async def finalize(self, *args, **kwargs):
    final = self.get_final()
    if final.parent.name == "checkpoints":  # a step directory, not one of its items
        steps.append(final.name)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
train(load_config(sys.argv[1], sys.argv[2:]), log=lambda _: None)
sys.exit(3)
"""


@pytest.mark.processes
def test_sigkill_during_a_save_leaves_a_run_that_resumes_from_the_last_complete_checkpoint(
    tmp_path, jax_cache, short_reference
):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_IN_SECOND_SAVE, str(TINY), *SHORT, f"train.run_dir={run}"],
        cwd=tmp_path,
        env=jax_cache,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed while saving step 40: its temporary directory is left, step 20 is complete.
    assert _leftovers(run) == ["40.orbax-checkpoint-tmp"]
    assert _checkpoint_steps(run) == [20]
    assert _metrics(run) == short_reference  # step 40's evaluation came before its save

    result = train(_config(run), resume=True, log=_quiet)
    assert result.resumed_from == 20
    assert _leftovers(run) == []
    assert _checkpoint_steps(run) == [20, 40]
    assert _metrics(run) == short_reference


# ------------------------------------------------------------------------------ non-finite loss


def _strict_json(text: str) -> dict:
    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.processes
def test_nonfinite_loss_stops_naming_the_step_and_keeps_only_finite_checkpoints(
    tmp_path, jax_cache
):
    run = tmp_path / "run"
    args = ["--config", str(TINY), *SHORT, *BLOW_UP, f"train.run_dir={run}"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=jax_cache,
        capture_output=True,
        text=True,
    )
    # One line from train.py for the library's RunError, exit 2.
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    match = re.fullmatch(
        r"train\.py: train loss is (nan|inf|-inf) \(or a gradient is not finite\) at step "
        r"(\d+); stopped without saving it; "
        r"the last good checkpoint is step (\d+) in (\S+) \(.*train\.on_nonfinite=skip\)",
        line,
    )
    assert match, line
    bad, good = int(match.group(2)), int(match.group(3))
    assert 10 < bad < 40  # the checkpoints of steps 5 and 10 hold finite losses
    assert match.group(4) == str(run / "checkpoints")
    kept = _checkpoint_steps(run)
    assert max(kept) == good < bad
    assert not (run / "summary.json").exists()
    records = [_strict_json(line) for line in _metrics(run).decode().splitlines()]
    assert [r["step"] for r in records] == list(range(5, good + 1, 5))
    assert all(np.isfinite(r["train_loss"]) for r in records)
    # The latest checkpoint is a usable model.
    model, config = load_run(run, step="latest")
    logits = model(tasks.eval_batch(config.task).inputs[:8])
    assert np.isfinite(np.asarray(logits)).all()


def test_nonfinite_loss_with_skip_finishes_with_finite_params_and_counts_skipped_steps(tmp_path):
    run = tmp_path / "run"
    result = train(_config(run, HUGE_LR, "train.on_nonfinite=skip"), log=_quiet)
    assert result.steps == 40
    records = [_strict_json(line) for line in _metrics(run).decode().splitlines()]
    assert [r["step"] for r in records] == [20, 40]
    assert records[-1]["skipped_steps"] > 0  # the blow-up is before step 40
    assert all(r["train_loss"] is None or np.isfinite(r["train_loss"]) for r in records)
    # summary.json too: its eval_loss is the last evaluation's, non-finite here.
    _strict_json((run / "summary.json").read_text())
    model, _ = load_run(run, step="latest")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


# ----------------------------------------------------------------- resume with another config


def _long_config(run, *overrides):
    return load_config(TINY, [*LONG, f"train.run_dir={run}", *overrides])


@pytest.mark.processes
def test_resume_with_another_config_is_refused_naming_the_key_and_changes_nothing(
    tmp_path, long_reference
):
    run = tmp_path / "run"
    shutil.copytree(long_reference, run)
    before = _snapshot(run)
    with pytest.raises(RunError, match=r"cannot resume .*optim\.learning_rate is 0\.001 here"):
        train(_long_config(run, "optim.learning_rate=1e-3"), resume=True, log=_quiet)
    assert _snapshot(run) == before

    # train.progress may differ (and train.run_dir: this run was trained in another one).
    result = train(_long_config(run, "train.progress=true"), resume=True, log=_quiet)
    assert (result.resumed_from, result.steps) == (140, 140)
    assert _metrics(run) == _metrics(long_reference)


@pytest.mark.processes
def test_resume_of_a_run_whose_config_yaml_was_edited_is_refused_naming_the_key(
    tmp_path, long_reference
):
    run = tmp_path / "run"
    shutil.copytree(long_reference, run)
    path = run / "config.yaml"
    text = path.read_text()
    assert text.count("num_heads: 4\n") == 1
    path.write_text(text.replace("num_heads: 4\n", "num_heads: 2\n"))
    before = _snapshot(run)

    # With the run's original config: config.yaml no longer matches it.
    with pytest.raises(RunError, match=r"model\.num_heads is 4 here but 2 in the run"):
        train(_long_config(run), resume=True, log=_quiet)
    assert _snapshot(run) == before

    # With the edited config.yaml itself: the checkpoint was trained with 4 heads.
    edited = load_config(path, [f"train.run_dir={run}"])
    with pytest.raises(RunError, match=r"model\.num_heads is 2, but checkpoint 140 .*=4"):
        train(edited, resume=True, log=_quiet)
    assert _snapshot(run) == before


def test_resume_compares_a_config_with_a_base_by_its_resolved_values(tmp_path):
    """A run's config.yaml is the whole resolved config, the file it was started from states
    only what differs from its base: resuming from that file again compares equal, and a
    changed value (one the base sets) is named. No training: the check alone."""
    reverse = ROOT / "configs" / "reverse.yaml"
    (tmp_path / "config.yaml").write_text(
        dump_config(load_config(reverse, [f"train.run_dir={tmp_path}"]))
    )
    run = RunDir(tmp_path, existed=True, lock_file=None)
    loop._check_resumable(run, load_config(reverse, [f"train.run_dir={tmp_path}"]))
    with pytest.raises(RunError, match=r"optim\.label_smoothing is 0\.1 here but 0\.0 in the run"):
        loop._check_resumable(run, load_config(reverse, ["optim.label_smoothing=0.1"]))
    with pytest.raises(RunError, match=r"model\.d_model is 32 here but 64 in the run"):
        loop._check_resumable(run, load_config(reverse, ["model.d_model=32"]))
