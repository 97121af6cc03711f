"""Loss and accuracy against float64 NumPy, schedules against closed forms, the optimizer."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn.train import optim
from jaxattn.train.optim import OptimConfig

# --------------------------------------------------------------------------------------------
# Cross-entropy and accuracy


def _optimizer(config: OptimConfig):
    """The optimizer of ``config`` on its schedule (d_model 8, 10 updates)."""
    return optim.make_optimizer(config, optim.make_schedule(config, d_model=8, total_steps=10))


def reference_cross_entropy(logits, targets, mask, alpha=0.0):
    """Float64 NumPy straight from the formula with a full soft-target matrix."""
    logits = np.asarray(logits, np.float64)
    v = logits.shape[-1]
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    soft = (1 - alpha) * np.eye(v)[np.asarray(targets)] + alpha / v
    per_token = -(soft * logp).sum(axis=-1)
    mask = np.asarray(mask, np.float64)
    return (mask * per_token).sum() / max(mask.sum(), 1.0)


def example(rng, b=2, t=5, v=7):
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0  # at least one scored token
    return logits, targets, mask


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_cross_entropy_matches_float64_formula(rng, alpha):
    logits, targets, mask = example(rng)
    got = optim.cross_entropy(logits, targets, mask, alpha)
    assert got.shape == ()
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference_cross_entropy(logits, targets, mask, alpha), 1e-5)


def test_smoothing_matches_optax_smooth_labels(rng):
    logits, targets, mask = example(rng)
    soft = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), 0.2)
    per_token = optax.softmax_cross_entropy(logits, soft)
    expected = np.sum(np.asarray(per_token) * mask) / mask.sum()
    np.testing.assert_allclose(optim.cross_entropy(logits, targets, mask, 0.2), expected, 1e-5)


def test_no_smoothing_equals_optax_integer_labels(rng):
    logits, targets, mask = example(rng)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    expected = np.asarray(per_token)[mask.astype(bool)].mean()
    np.testing.assert_allclose(optim.cross_entropy(logits, targets, mask), expected, 1e-6)


def test_bfloat16_logits_are_computed_in_float32(rng):
    logits, targets, mask = example(rng)
    low = jnp.asarray(logits, jnp.bfloat16)
    got = optim.cross_entropy(low, targets, mask, 0.1)
    assert got.dtype == jnp.float32
    ref = reference_cross_entropy(np.asarray(low.astype(jnp.float32)), targets, mask, 0.1)
    np.testing.assert_allclose(got, ref, 1e-5)


def test_unscored_logits_do_not_matter(rng):
    logits, targets, mask = example(rng)
    base = optim.cross_entropy(logits, targets, mask, 0.1)
    changed = np.where(mask[..., None] == 0, rng.normal(size=logits.shape) * 100, logits)
    np.testing.assert_allclose(optim.cross_entropy(changed, targets, mask, 0.1), base, 1e-6)
    # Even non-finite garbage at unscored positions (e.g. logits of padding) stays out.
    bad = np.where(mask[..., None] == 0, np.nan, logits).astype(np.float32)
    np.testing.assert_allclose(optim.cross_entropy(bad, targets, mask, 0.1), base, 1e-6)
    np.testing.assert_allclose(
        optim.token_accuracy(changed, targets, mask), optim.token_accuracy(logits, targets, mask)
    )


def test_all_zero_mask_gives_zero_not_nan(rng):
    logits, targets, _ = example(rng)
    zero = np.zeros(targets.shape, np.float32)
    assert float(optim.cross_entropy(logits, targets, zero, 0.1)) == 0.0
    assert float(optim.token_accuracy(logits, targets, zero)) == 0.0
    grads = jax.grad(optim.cross_entropy)(jnp.asarray(logits), targets, zero)
    assert np.isfinite(grads).all()
    assert not np.asarray(grads).any()


def test_bool_mask_equals_float_mask(rng):
    logits, targets, mask = example(rng)
    np.testing.assert_allclose(
        optim.cross_entropy(logits, targets, mask.astype(bool)),
        optim.cross_entropy(logits, targets, mask),
    )


def test_cross_entropy_gradient_matches_softmax_minus_soft_targets(rng):
    logits, targets, mask = example(rng)
    alpha, v = 0.1, logits.shape[-1]
    grads = jax.grad(optim.cross_entropy)(jnp.asarray(logits), targets, mask, alpha)
    p = np.asarray(jax.nn.softmax(logits.astype(np.float64), axis=-1))
    soft = (1 - alpha) * np.eye(v)[targets] + alpha / v
    expected = (p - soft) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grads, expected, atol=1e-6)


def test_cross_entropy_under_jit(rng):
    logits, targets, mask = example(rng)
    got = jax.jit(optim.cross_entropy)(logits, targets, mask, 0.1)
    np.testing.assert_allclose(got, reference_cross_entropy(logits, targets, mask, 0.1), 1e-5)


def test_token_accuracy():
    # Two sequences, three positions, three classes; argmax is [[0, 1, 2], [2, 2, 0]].
    logits = np.zeros((2, 3, 3), np.float32)
    for (b, t), c in np.ndenumerate(np.array([[0, 1, 2], [2, 2, 0]])):
        logits[b, t, c] = 1.0
    targets = np.array([[0, 1, 0], [2, 1, 1]], np.int32)  # correct: [[1, 1, 0], [1, 0, 0]]
    np.testing.assert_allclose(optim.token_accuracy(logits, targets, np.ones((2, 3))), 3 / 6)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)  # only the correct ones
    np.testing.assert_allclose(optim.token_accuracy(logits, targets, mask), 1.0)
    mask = np.array([[0, 0, 1], [0, 1, 1]], np.float32)  # only the wrong ones
    np.testing.assert_allclose(optim.token_accuracy(logits, targets, mask), 0.0)


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape", "mask_shape", "pattern"),
    [
        ((2, 3), (2, 3), (2, 3), r"logits must be \[B, T, V\]"),
        ((2, 3, 4), (2, 4), (2, 4), r"targets must have shape"),
        ((2, 3, 4), (2, 3), (3,), r"mask must have the shape of targets"),
    ],
)
def test_shape_errors(logits_shape, targets_shape, mask_shape, pattern):
    args = (np.zeros(logits_shape), np.zeros(targets_shape, np.int32), np.ones(mask_shape))
    with pytest.raises(ValueError, match=pattern):
        optim.cross_entropy(*args)
    with pytest.raises(ValueError, match=pattern):
        optim.token_accuracy(*args)


def test_bad_label_smoothing():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        optim.cross_entropy(np.zeros((1, 1, 3)), np.zeros((1, 1), np.int32), np.ones((1, 1)), 1.5)


# --------------------------------------------------------------------------------------------
# Schedules

STEPS = [0, 1, 2, 5, 9, 10, 11, 17, 40, 99, 100, 150]


def values(schedule, steps=STEPS):
    return np.array([float(schedule(s)) for s in steps])


def test_noam_closed_form():
    d, w, scale = 64, 10, 2.0
    expected = [scale * d**-0.5 * min((s + 1) ** -0.5, (s + 1) * w**-1.5) for s in STEPS]
    np.testing.assert_allclose(values(optim.noam_schedule(d, w, scale)), expected, rtol=1e-6)


def test_noam_endpoints():
    d, w = 16, 4
    sched = optim.noam_schedule(d, w)
    # Count 0 is step 1: finite and positive, the first point of the linear ramp.
    np.testing.assert_allclose(float(sched(0)), d**-0.5 * w**-1.5, rtol=1e-6)
    # The peak is at step w (count w - 1), where both branches meet.
    peak = (d * w) ** -0.5
    np.testing.assert_allclose(float(sched(w - 1)), peak, rtol=1e-6)
    assert values(sched, range(12)).argmax() == w - 1
    # No warmup: pure inverse square root from step 1.
    np.testing.assert_allclose(values(optim.noam_schedule(d, 0), [0, 3]), [d**-0.5, d**-0.5 / 2])


def test_warmup_cosine_closed_form():
    peak, w, total, f = 0.5, 10, 100, 0.1

    def lr(c):
        if c < w:
            return peak * c / w
        progress = min((c - w) / (total - w), 1.0)
        return peak * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)))

    got = values(optim.warmup_cosine_schedule(peak, w, total, end_fraction=f))
    np.testing.assert_allclose(got, [lr(s) for s in STEPS], rtol=1e-5, atol=1e-7)


def test_warmup_cosine_endpoints():
    sched = optim.warmup_cosine_schedule(1.0, 10, 50)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(30)), 0.5, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(values(sched, [50, 51, 500]), 0.0, atol=1e-7)
    # No warmup starts at the peak; a run shorter than the warmup still builds.
    np.testing.assert_allclose(float(optim.warmup_cosine_schedule(1.0, 0, 50)(0)), 1.0)
    np.testing.assert_allclose(float(optim.warmup_cosine_schedule(1.0, 10, 5)(5)), 0.5)


def test_warmup_rsqrt_closed_form():
    peak, w = 0.3, 10
    expected = [peak * s / w if s < w else peak * math.sqrt(w / s) for s in STEPS]
    np.testing.assert_allclose(values(optim.warmup_rsqrt_schedule(peak, w)), expected, rtol=1e-6)


def test_warmup_rsqrt_endpoints():
    sched = optim.warmup_rsqrt_schedule(1.0, 4)
    np.testing.assert_allclose(values(sched, [0, 2, 4, 16, 64]), [0, 0.5, 1, 0.5, 0.25])
    # No warmup: peak at counts 0 and 1 (no division by zero), then peak / sqrt(count).
    np.testing.assert_allclose(
        values(optim.warmup_rsqrt_schedule(1.0, 0), [0, 1, 4, 100]), [1, 1, 0.5, 0.1]
    )


def test_warmup_constant_closed_form_and_endpoints():
    peak, w = 0.2, 10
    expected = [peak * min(s / w, 1.0) for s in STEPS]
    np.testing.assert_allclose(values(optim.warmup_constant_schedule(peak, w)), expected, 1e-6)
    # With no warmup the first update already gets the peak (not linear_schedule's init, 0).
    np.testing.assert_allclose(values(optim.warmup_constant_schedule(peak, 0), [0, 7]), peak)


def test_schedules_accept_traced_int32_counts():
    for sched in (
        optim.noam_schedule(32, 5),
        optim.warmup_cosine_schedule(1.0, 5, 20),
        optim.warmup_rsqrt_schedule(1.0, 5),
        optim.warmup_constant_schedule(1.0, 5),
    ):
        counts = jnp.arange(12, dtype=jnp.int32)
        got = jax.jit(jax.vmap(sched))(counts)
        np.testing.assert_allclose(got, values(sched, range(12)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("noam", lambda: optim.noam_schedule(64, 10, scale=0.5)),
        ("warmup_cosine", lambda: optim.warmup_cosine_schedule(0.5, 10, 100)),
        ("warmup_rsqrt", lambda: optim.warmup_rsqrt_schedule(0.5, 10)),
        ("warmup_constant", lambda: optim.warmup_constant_schedule(0.5, 10)),
    ],
)
def test_make_schedule_dispatches(name, reference):
    config = OptimConfig(schedule=name, learning_rate=0.5, warmup_steps=10)
    sched = optim.make_schedule(config, d_model=64, total_steps=100)
    np.testing.assert_allclose(values(sched), values(reference()), rtol=1e-6)


def test_schedule_names():
    assert optim.SCHEDULES == ("noam", "warmup_cosine", "warmup_rsqrt", "warmup_constant")


def test_unknown_schedule_lists_allowed_names():
    # Loaded configs are validated (tests/train/test_config.py); this is an OptimConfig
    # built by hand.
    config = OptimConfig(schedule="cosine")
    pattern = (
        r"optim\.schedule must be one of noam, warmup_cosine, warmup_rsqrt, warmup_constant; "
        r"got 'cosine'"
    )
    with pytest.raises(ValueError, match=pattern):
        optim.make_schedule(config, d_model=8, total_steps=10)


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match=r"warmup_steps must be an int >= 0, got -1"):
        optim.warmup_rsqrt_schedule(1.0, -1)
    with pytest.raises(ValueError, match=r"d_model must be an int >= 1, got 0"):
        optim.noam_schedule(0, 10)
    with pytest.raises(ValueError, match=r"total_steps must be an int >= 1, got 0"):
        optim.warmup_cosine_schedule(1.0, 10, 0)
    with pytest.raises(ValueError, match=r"end_fraction must be in \[0, 1\], got 2"):
        optim.warmup_cosine_schedule(1.0, 10, 100, end_fraction=2)


# --------------------------------------------------------------------------------------------
# Optimizer


def constant_config(**kw):
    """No warmup, constant lr 0.1, no weight decay: the Adam step size is easy to bound."""
    base = dict(schedule="warmup_constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.0)
    return OptimConfig(**{**base, **kw})


def global_norm(tree):
    return float(optax.tree.norm(tree))


def test_make_optimizer_matches_hand_built_chain(rng):
    config = constant_config(clip_norm=1.0, b2=0.99, eps=1e-8, weight_decay=0.01)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 3.0, params)
    tx = _optimizer(config)
    ref = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01),
    )
    got, _ = tx.update(grads, tx.init(params), params)
    want, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_clipping_bounds_a_huge_gradient():
    # SGD-like check through Adam is weak (Adam normalises), so read the clipped gradient
    # from Adam's first moment: mu = (1 - b1) * clipped grad after one update.
    params = {"w": jnp.zeros(8)}
    grads = {"w": jnp.full(8, 1e6)}
    clip = 0.5
    tx = _optimizer(constant_config(clip_norm=clip))
    updates, state = tx.update(grads, tx.init(params), params)
    adam_state = state[1][0]
    np.testing.assert_allclose(global_norm(adam_state.mu), (1 - 0.9) * clip, rtol=1e-5)
    # The update itself is bounded by the learning rate per coordinate (Adam, step 1).
    assert np.isfinite(updates["w"]).all()
    assert float(jnp.max(jnp.abs(updates["w"]))) <= 0.1 * (1 + 1e-5)

    unclipped = _optimizer(constant_config(clip_norm=None))
    _, state = unclipped.update(grads, unclipped.init(params), params)
    np.testing.assert_allclose(global_norm(state[1][0].mu), 0.1 * 1e6 * math.sqrt(8), rtol=1e-5)


def test_clipping_leaves_small_gradients_alone():
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 0.1)}  # norm 0.2 < 1
    tx = _optimizer(constant_config(clip_norm=1.0))
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(state[1][0].mu["w"], 0.1 * grads["w"], rtol=1e-6)


def test_multisteps_accumulates_k_micro_steps():
    params = {"w": jnp.ones(3)}
    tx = _optimizer(constant_config(accumulate_steps=2))
    assert isinstance(tx, optax.GradientTransformation)
    state = tx.init(params)
    g1, g2 = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([3.0, 2.0, 1.0])}

    updates, state = tx.update(g1, state, params)
    assert not np.asarray(updates["w"]).any()  # first micro-step: nothing applied

    updates, state = tx.update(g2, state, params)
    assert np.asarray(updates["w"]).all()  # second: the update is applied
    # It equals one plain step on the mean gradient.
    plain = _optimizer(constant_config())
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = plain.update(mean, plain.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)

    updates, _ = tx.update(g1, state, params)
    assert not np.asarray(updates["w"]).any()  # third: a new accumulation begins


def test_no_multisteps_when_accumulate_is_one():
    params = {"w": jnp.ones(3)}
    tx = _optimizer(constant_config())
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-5)  # Adam's first step: -lr * sign


def test_optimizer_follows_its_schedule():
    # warmup_constant over 2 steps: the first update has lr 0, the second lr peak / 2.
    config = dataclasses.replace(constant_config(), warmup_steps=2, learning_rate=0.2)
    params = {"w": jnp.zeros(2)}
    tx = _optimizer(config)
    state = tx.init(params)
    grads = {"w": jnp.ones(2)}
    u0, state = tx.update(grads, state, params)
    u1, state = tx.update(grads, state, params)
    np.testing.assert_allclose(u0["w"], 0.0)
    np.testing.assert_allclose(u1["w"], -0.1, rtol=1e-5)


def test_optimizer_steps_under_jit():
    params = {"w": jnp.ones(3)}
    tx = _optimizer(OptimConfig(schedule="noam", warmup_steps=4, accumulate_steps=2))

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(4):
        params, state = step(params, state)
    assert np.isfinite(params["w"]).all()
    assert (np.asarray(params["w"]) < 1).all()
