"""Training: the step lowers the loss, runs are reproducible, train.py end to end, load_run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, TINY
from flax import nnx

from jaxattn.nn.decoding import generate
from jaxattn.train import tasks
from jaxattn.train.config import load_config
from jaxattn.train.load import load_run
from jaxattn.train.loop import train
from jaxattn.train.plan import make_plan
from jaxattn.train.rundir import MARK, RunError
from jaxattn.train.steps import build_model, loss_fn


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
    plan = make_plan(config, None)
    params, opt_state = plan.init_state()
    chunk = plan.train_chunk
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


@pytest.mark.processes
def test_train_py_learns_the_copy_task(trained_tiny):
    """End to end: the README's command (run once per session by the fixture) reaches its
    target on 1000 held-out sequences."""
    run_dir, printed = trained_tiny
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reached_target"] is True
    assert summary["exact_match"] == 1.0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["exact_match"] == 1.0
    assert any(line.startswith("reached exact-match target 1.000") for line in printed)
    assert printed[-1] == f"run directory: {run_dir}"


@pytest.mark.processes
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
    from jaxattn.train.steps import make_eval_fn

    config = small_config(tmp_path, "task.eval_size=200")
    plan = make_plan(config, None)
    params, opt_state = plan.init_state()
    params, opt_state, _ = plan.train_chunk(params, opt_state, jax.random.key(0), 0, 150)
    fast = plan.evaluate(params)
    slow = make_eval_fn(config, plan.graphdef, decode=True)(params)
    assert 0.0 < float(slow["exact_match"]) < 1.0  # partly trained: the comparison has teeth
    np.testing.assert_array_equal(fast["correct"], slow["correct"])


def test_accumulating_k_micro_batches_is_one_update_on_their_union(tmp_path):
    """optim.accumulate_steps=k on micro-batches of b == one update on the k*b sequences.

    Holds exactly (up to float32 summation order) because every copy sequence has the same
    number of scored tokens, so the mean of k micro-batch means is the mean over the union.
    Two updates, so Adam's moments and the schedule's count are compared too. Adam's eps is
    1 here: with the default 1e-9 its first update is lr * sign(g), and a gradient of 1e-10
    that float32 summation order flips would flip an update of lr; with eps = 1 the update
    is close to lr * g, and comparing updates compares the gradients."""
    k, b = 4, 8
    overrides = [
        "model.num_layers=1",  # compiles faster; accumulation does not depend on depth
        "optim.schedule=warmup_constant",
        "optim.warmup_steps=0",
        "optim.clip_norm=0.5",
        "optim.eps=1.0",
    ]
    accumulating = small_config(
        tmp_path, f"task.batch_size={b}", f"optim.accumulate_steps={k}", *overrides
    )
    whole = small_config(tmp_path, f"task.batch_size={k * b}", *overrides)
    plan_k = make_plan(accumulating, None)
    tx_k, tx_1 = plan_k.optimizer, make_plan(whole, None).optimizer
    graphdef, params = nnx.split(build_model(whole), nnx.Param)
    base_key = tasks.seed_key(0)

    # The trainer's path: 2k micro-steps fused in one call.
    chunk = plan_k.train_chunk
    params_k, state_k, metrics = chunk(
        jax.tree.map(jnp.copy, params), tx_k.init(params), base_key, 0, 2 * k
    )

    # By hand: each update on the union of the k micro-batches the trainer drew.
    def union(update):
        batches = [
            tasks.make_batch(whole.task, jax.random.split(jax.random.fold_in(base_key, step))[0], b)
            for step in range(update * k, (update + 1) * k)
        ]
        return jax.tree.map(lambda *parts: jnp.concatenate(parts), *batches)

    @jax.jit  # one program for both updates (eagerly, every op would compile on its own)
    def update_on(params, state, batch):
        grads = jax.grad(lambda p: loss_fn(p, graphdef, batch, None, 0.1)[0])(params)
        updates, state = tx_1.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start, state_1 = params, tx_1.init(params)
    for update in range(2):
        params, state_1 = update_on(params, state_1, union(update))

    got = jax.tree.leaves(jax.tree.map(jnp.subtract, params_k, start))
    expected = jax.tree.leaves(jax.tree.map(jnp.subtract, params, start))
    # One scale for all: some gradients are 0 in exact arithmetic (the key projection's bias:
    # softmax ignores a shift shared by a whole row) and float32 noise of 1e-13 in practice.
    scale = max(float(jnp.abs(e).max()) for e in expected)
    assert scale > 1e-4
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4 * scale)
    # optax.MultiSteps keeps the plain optimizer's state: chain(clip, adamw) -> adam's state.
    adam_k, adam_1 = state_k.inner_opt_state[1][0], state_1[1][0]
    assert int(adam_k.count) == int(adam_1.count) == 2
    for moment in ("mu", "nu"):
        got, expected = getattr(adam_k, moment), getattr(adam_1, moment)
        # One scale per moment, for the same reason.
        scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected))
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4 * scale)
    assert np.isfinite(metrics["loss"]).all()


def test_mixed_precision_and_remat_train_the_tiny_config_to_its_target(tmp_path):
    """bfloat16 compute (float32 parameters, softmax and loss) with remat on every block."""
    config = small_config(
        tmp_path,
        "model.compute_dtype=bfloat16",
        "model.remat=true",
        "task.eval_size=1000",
        "train.steps=600",
    )
    result = train(config, log=lambda _: None)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["reached_target"] is True and summary["exact_match"] == 1.0
    assert summary["steps"] <= 250  # float32 takes 200 (evaluations every 50)
    model, loaded = load_run(result.run_dir)
    assert loaded.model.compute_dtype == "bfloat16"
    params = nnx.state(model, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
