"""Training: the step lowers the loss, runs are reproducible, train.py end to end, load_run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.nn.decoding import generate
from jaxattn.train import tasks
from jaxattn.train.checkpoints import load_run
from jaxattn.train.config import load_config
from jaxattn.train.loop import train
from jaxattn.train.optim import make_optimizer
from jaxattn.train.rundir import MARK, RunError
from jaxattn.train.steps import build_model, make_train_chunk

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def small_config(tmp_path, *overrides):
    return load_config(
        TINY,
        [
            f"train.run_dir={tmp_path / 'run'}",
            "train.progress=false",
            "train.pictures=false",
            "task.eval_size=64",
            *overrides,
        ],
    )


def test_train_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    config = small_config(tmp_path, "optim.warmup_steps=0", "optim.schedule=warmup_constant")
    model = build_model(config)
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(config.optim, d_model=config.model.d_model, total_steps=100)
    opt_state = optimizer.init(params)
    chunk = make_train_chunk(config, graphdef, optimizer)
    # The same base key and start step replay the same batches: a fixed batch sequence.
    key = jax.random.key(0)
    # The chunk donates its inputs: the first call gets copies.
    _, _, first = chunk(*jax.tree.map(jnp.copy, (params, opt_state)), key, 0, 1)
    params, opt_state, m = chunk(params, opt_state, key, 0, 30)
    assert m["loss"].shape == (30,)
    assert float(m["loss"][-5:].mean()) < 0.8 * float(first["loss"][0])


def test_same_seed_gives_the_same_metrics(tmp_path):
    lines = []
    for name in ("a", "b"):
        config = small_config(
            tmp_path,
            "train.steps=20",
            "train.eval_every=10",
            "train.steps_per_call=10",
            f"train.run_dir={tmp_path / name}",
        )
        result = train(config, log=lambda _: None)
        lines.append((result.run_dir / "metrics.jsonl").read_text())
    assert lines[0] == lines[1]
    assert len(lines[0].splitlines()) == 2


def test_run_directory_contents_and_load_run_round_trip(tmp_path):
    config = small_config(tmp_path, "train.steps=10", "train.eval_every=10")
    result = train(config, log=lambda _: None)
    run = result.run_dir
    assert {p.name for p in run.iterdir()} == {
        MARK,
        "config.yaml",
        "metrics.jsonl",
        "checkpoints",
        "summary.json",
    }
    assert [p.name for p in run.parent.iterdir()] == ["run"]  # nothing beside it
    model, loaded_config = load_run(run)
    assert loaded_config == config
    # The restored model is the trained one: same logits as the state the run ended with.
    prompts = tasks.eval_batch(config.task).inputs[:4, : tasks.prompt_length(config.task)]
    out = generate(model, prompts, tasks.answer_length(config.task))
    assert out.shape == (4, tasks.sequence_length(config.task))
    fresh = build_model(config)
    assert not np.allclose(
        nnx.state(model, nnx.Param)["final_norm"]["scale"].get_value(),
        nnx.state(fresh, nnx.Param)["final_norm"]["scale"].get_value(),
    )


def test_load_run_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(RunError, match="is not a run directory of jaxattn"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="no such directory"):
        load_run(tmp_path / "absent")


def _run_train_py(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_py_learns_the_copy_task(tmp_path):
    """End to end: the default config reaches its target on 1000 held-out sequences."""
    proc = _run_train_py("--config", str(TINY), f"train.run_dir={tmp_path / 'tiny'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert summary["reached_target"] is True
    assert summary["exact_match"] == 1.0
    records = [
        json.loads(x) for x in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["exact_match"] == 1.0
    assert "reached exact-match target" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.setps=5", "train.setps"),
        ("train.steps=ten", "train.steps"),
        ("model.positions=rope", "model.positions"),
    ],
)
def test_train_py_config_errors_exit_2_without_traceback_or_run_dir(tmp_path, override, message):
    proc = _run_train_py(
        "--config", str(TINY), override, f"train.run_dir={tmp_path / 'x'}", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_dataclass_configs_are_frozen(tmp_path):
    config = small_config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = 3  # type: ignore[misc]


def test_exact_match_shortcut_equals_real_greedy_decoding(tmp_path):
    """The one-pass exact-match agrees sequence by sequence with running generate()."""
    from jaxattn.train.steps import init_state, make_eval_fn

    config = small_config(tmp_path, "task.eval_size=200")
    optimizer = make_optimizer(config.optim, d_model=config.model.d_model, total_steps=1500)
    graphdef, params, opt_state = init_state(config, optimizer)
    chunk = make_train_chunk(config, graphdef, optimizer)
    params, opt_state, _ = chunk(params, opt_state, jax.random.key(0), 0, 150)
    fast = make_eval_fn(config, graphdef)(params)
    slow = make_eval_fn(config, graphdef, decode=True)(params)
    assert 0.0 < float(slow["exact_match"]) < 1.0  # partly trained: the comparison has teeth
    np.testing.assert_array_equal(fast["correct"], slow["correct"])
