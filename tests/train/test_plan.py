"""What a run builds once (jaxattn.train.plan): the learning rate a run logs is the one the
optimizer applies, under gradient accumulation and a schedule that depends on the run's
length; the plan derives its pieces from one schedule."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHORT_RUN, TINY

from jaxattn.train import tasks
from jaxattn.train.config import ConfigError, load_config
from jaxattn.train.loop import train
from jaxattn.train.optim import SCHEDULES
from jaxattn.train.plan import make_plan
from jaxattn.train.steps import updates

# The rate is what these tests check, not what is learnt: a model that compiles fast.
SMALL_MODEL = ("model.d_model=16", "model.num_heads=2", "model.d_ff=32", "task.length=3")


def applied_rates(optimizer, k: int, n_updates: int) -> np.ndarray:
    """The learning rate of each update ``optimizer`` applies, read from its updates
    themselves: with a constant gradient Adam's bias-corrected moments are exactly the
    (clipped) gradient and its square, so each applied update is ``-lr * c / (c + eps)``,
    ``-lr`` to 1e-6 for eps 1e-9. With accumulation every ``k``-th call applies one."""
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.ones(3)}
    state = optimizer.init(params)
    update_fn = jax.jit(optimizer.update)  # one program (eagerly, each op compiles alone)
    rates = []
    for _ in range(n_updates):
        for _ in range(k):
            update, state = update_fn(grads, state, params)
        rates.append(-float(update["w"][0]))
    return np.asarray(rates)


def test_the_logged_learning_rate_is_the_one_the_optimizer_applies(tmp_path):
    # 40 micro-batches of 4 per update: 10 updates, so warmup_cosine decays over 10 updates,
    # not 40 (the trainer once logged a schedule built for train.steps while Optax applied
    # one built for the updates).
    k = 4
    config = load_config(
        TINY,
        [
            *SHORT_RUN,
            *SMALL_MODEL,
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=40",
            "train.eval_every=20",
            "train.steps_per_call=20",
            f"optim.accumulate_steps={k}",
            "optim.schedule=warmup_cosine",
            "optim.warmup_steps=3",
            "task.batch_size=8",
        ],
    )
    assert updates(config) == 10
    run = train(config, log=lambda _: None).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = np.asarray([lr for record in records for lr in record["step_lrs"]])
    assert logged.shape == (40,)
    rates = applied_rates(make_plan(config, None).optimizer, k, updates(config))
    # Warmup, then a cosine that ends at 0 after the 10th update: each micro-batch logs the
    # rate of the update its gradient goes into.
    assert rates[0] == 0.0 and rates.max() > 0 and rates[-1] < 0.05 * rates.max()
    np.testing.assert_allclose(logged, np.repeat(rates, k), rtol=1e-5, atol=1e-9)
    assert records[-1]["lr"] == pytest.approx(logged[-1], rel=1e-5)  # 6 digits in step_lrs


def test_the_plan_builds_every_program_on_its_one_schedule():
    config = load_config(TINY, [*SHORT_RUN, "optim.accumulate_steps=2"])
    plan = make_plan(config, None)
    # Shapes only: the abstract state is what init_state makes, byte for byte in size.
    params, opt_state = plan.init_state()
    real = sum(x.size * x.dtype.itemsize for x in _leaves((params, opt_state)))
    assert plan.state_bytes == real > 0
    assert plan.mesh is None and plan.shardings is None
    # The optimizer's rate at its count 5 is the plan's schedule at 5 (one schedule object).
    rates = applied_rates(plan.optimizer, 2, 6)
    np.testing.assert_allclose(rates[5], float(plan.schedule(5)), rtol=1e-5)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k", [1, 3])
def test_every_schedule_logs_the_rate_it_applies(schedule, k):
    """The train chunk's per-step ``lr`` against the rates the plan's optimizer applies, for
    every schedule, with and without accumulation (a small model: the chunk is what is
    tested, not the learning)."""
    config = load_config(
        TINY,
        [
            *SHORT_RUN,
            *SMALL_MODEL,
            "task.batch_size=4",
            "train.steps=12",
            "train.eval_every=12",
            "train.steps_per_call=12",
            f"optim.accumulate_steps={k}",
            f"optim.schedule={schedule}",
            "optim.warmup_steps=2",
        ],
    )
    plan = make_plan(config, None)
    params, opt_state = plan.init_state()
    _, _, metrics = plan.train_chunk(params, opt_state, tasks.seed_key(0), 0, 12)
    rates = applied_rates(make_plan(config, None).optimizer, k, 12 // k)
    np.testing.assert_allclose(metrics["lr"], np.repeat(rates, k), rtol=1e-5, atol=1e-9)


def test_steps_that_end_inside_an_accumulation_are_refused_naming_the_steps_that_fit():
    # 10 micro-batches of 4 per update: the last 2 would be computed and thrown away, and
    # the schedule would count 3 updates of which 2 happen.
    with pytest.raises(ConfigError) as refused:
        load_config(TINY, ["train.steps=10", "optim.accumulate_steps=4"])
    assert str(refused.value) == (
        "train.steps=10 is not a multiple of optim.accumulate_steps=4: its last 2 "
        "micro-batches would make no update; use train.steps=8 or train.steps=12"
    )
    with pytest.raises(ConfigError, match=r"last 3 micro-batches .* use train.steps=4$"):
        load_config(TINY, ["train.steps=3", "optim.accumulate_steps=4"])
    config = load_config(TINY, ["train.steps=12", "optim.accumulate_steps=4"])
    assert updates(config) == 3
