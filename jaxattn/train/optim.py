"""Loss, accuracy, learning-rate schedules and the optimizer, all built from Optax pieces.

Schedules are Optax schedules: callables from the optimizer's step count (0 on the first
update, an int or an int32 array) to a float32 learning rate. Under gradient accumulation
the count is the number of *updates*, not of micro-batches.

The ``optim`` config is validated where it is loaded (:mod:`jaxattn.train.config`, which
takes the schedule names from :data:`SCHEDULES`); the functions here check only the plain
arguments a caller passes them directly (shapes, step counts, fractions).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "SCHEDULES",
    "OptimConfig",
    "cross_entropy",
    "make_optimizer",
    "make_schedule",
    "noam_schedule",
    "schedule_count",
    "token_accuracy",
    "warmup_constant_schedule",
    "warmup_cosine_schedule",
    "warmup_rsqrt_schedule",
]


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-3  # peak learning rate (noam: multiplier of its formula)
    schedule: str = "warmup_cosine"  # noam | warmup_cosine | warmup_rsqrt | warmup_constant
    warmup_steps: int = 100  # linear warmup length
    b1: float = 0.9  # Adam beta1
    b2: float = 0.98  # Adam beta2
    eps: float = 1e-9  # Adam epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    clip_norm: float | None = 1.0  # global gradient-norm clip (None = off)
    label_smoothing: float = 0.1  # optax smooth_labels alpha
    accumulate_steps: int = 1  # micro-batches per update (optax.MultiSteps)


# --------------------------------------------------------------------------------------------
# Loss and accuracy


def _check_shapes(logits, targets, mask) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V] (3 dims), got shape {logits.shape}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets must have shape [B, T] = {logits.shape[:2]} to match logits "
            f"{logits.shape}, got {targets.shape}"
        )
    if mask.shape != targets.shape:
        raise ValueError(f"mask must have the shape of targets {targets.shape}, got {mask.shape}")


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(mask * values) / max(sum(mask), 1) in float32; values at mask == 0 never count."""
    mask = mask.astype(jnp.float32)
    # where, not a product: a NaN or inf at an unscored position must not leak into the sum.
    total = jnp.sum(jnp.where(mask != 0, mask * values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean label-smoothed cross-entropy over the scored tokens, a float32 scalar.

    logits: float ``[B, T, V]`` (any float dtype; computed in float32).
    targets: int ``[B, T]`` in ``[0, V)``.
    mask: float (or bool) ``[B, T]``, weight of each token; 0 = not scored.
    label_smoothing: ``alpha`` in ``[0, 1]``, Optax's ``smooth_labels`` convention.

    With ``p = log_softmax(logits)`` and soft targets
    ``q = (1 - alpha) * one_hot(targets, V) + alpha / V``::

        loss_bt = -sum_v q_btv * p_btv
                = (1 - alpha) * (-p_bt[targets_bt]) + alpha * (-mean_v p_btv)
        loss    = sum_bt mask_bt * loss_bt / max(sum_bt mask_bt, 1)

    so an all-zero mask gives 0, not NaN. Logits at unscored positions never affect the
    value, even if they are not finite.
    """
    _check_shapes(logits, targets, mask)
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # Gather instead of a [B, T, V] one-hot product: same value, one less full-size temporary.
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        # Skip the smoothing term outright: 0 * mean(logp) is NaN where a logit is -inf.
        per_token = nll
    else:
        per_token = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    return _masked_mean(per_token, mask)


def token_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Fraction of scored tokens whose argmax logit is the target, a float32 scalar.

    logits: float ``[B, T, V]``; targets: int ``[B, T]``; mask: float (or bool) ``[B, T]``
    token weights. Weighted mean ``sum(mask * correct) / max(sum(mask), 1)`` (0 for an
    all-zero mask).
    """
    _check_shapes(logits, targets, mask)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return _masked_mean(correct, mask)


# --------------------------------------------------------------------------------------------
# Schedules


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def noam_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """The Transformer ("Attention Is All You Need") schedule.

    ``lr(s) = scale * d_model**-0.5 * min(s**-0.5, s * warmup_steps**-1.5)`` with
    ``s = count + 1``: steps are counted from 1, so the first update (Optax count 0) gets the
    value at step 1 rather than 0 or inf. It rises linearly to its peak
    ``scale * (d_model * warmup_steps)**-0.5`` at ``s = warmup_steps`` and then decays as
    ``s**-0.5``. ``warmup_steps = 0`` means no warmup: ``scale * (d_model * s)**-0.5``.
    """
    _check_int("d_model", d_model, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    factor = scale * d_model**-0.5

    # Optax has no rsqrt schedule, and the closed form is clearer than a join of two pieces.
    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        if warmup_steps == 0:
            return factor * jax.lax.rsqrt(s)
        return factor * jnp.minimum(jax.lax.rsqrt(s), s * float(warmup_steps) ** -1.5)

    return schedule


def warmup_cosine_schedule(
    peak: float, warmup_steps: int, total_steps: int, end_fraction: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then a cosine decay that reaches
    ``peak * end_fraction`` at ``total_steps`` and stays there.

    ``lr(c) = peak * c / warmup_steps`` for ``c < warmup_steps``, then
    ``peak * (f + (1 - f) * (1 + cos(pi * (c - w) / (total_steps - w))) / 2)`` with
    ``f = end_fraction``, ``w = warmup_steps``. When ``total_steps <= warmup_steps`` the
    decay has nothing left to run over and happens within one step after the warmup.
    """
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("total_steps", total_steps, 1)
    if not 0.0 <= end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in [0, 1], got {end_fraction!r}")
    # Optax needs a positive decay length; a short run (steps <= warmup) must still build.
    decay_steps = max(total_steps, warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        end_value=peak * end_fraction,
    )


def warmup_rsqrt_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then inverse square-root decay.

    ``lr(c) = peak * c / w`` for ``c < w``, then ``peak * sqrt(w / c)`` (``w =
    warmup_steps``), so ``lr`` is ``peak`` at ``c = w`` and halves each time ``c``
    quadruples. With ``w = 0`` there is no warmup and ``w`` is taken as 1 in the decay:
    ``peak`` at counts 0 and 1, then ``peak / sqrt(c)``.
    """
    _check_int("warmup_steps", warmup_steps, 0)
    w = float(max(warmup_steps, 1))

    def decay(count_after_warmup):
        # join_schedules passes the count since the boundary; add the warmup back.
        c = jnp.asarray(count_after_warmup, jnp.float32) + float(warmup_steps)
        return peak * jnp.sqrt(w / jnp.maximum(c, w))

    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def warmup_constant_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then ``peak`` for good."""
    _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps == 0:
        # optax.linear_schedule with no transition would hold its *initial* value, 0.
        return optax.constant_schedule(peak)
    return optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)


def make_schedule(optim: OptimConfig, *, d_model: int, total_steps: int) -> optax.Schedule:
    """The schedule named by ``optim.schedule``.

    ``optim.learning_rate`` is the peak, except for ``noam`` where it multiplies the formula
    (its peak is ``learning_rate * (d_model * warmup_steps)**-0.5``). ``total_steps`` counts
    optimizer updates (micro-batches / ``accumulate_steps``); only ``warmup_cosine`` uses it.
    """
    build = _SCHEDULE_BUILDERS.get(optim.schedule)
    if build is None:  # an OptimConfig built by hand, not loaded
        raise ValueError(
            f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {optim.schedule!r}"
        )
    return build(optim.learning_rate, optim.warmup_steps, d_model, total_steps)


# optim.schedule -> its builder from (learning_rate, warmup_steps, d_model, total_steps).
_SCHEDULE_BUILDERS = {
    "noam": lambda lr, warmup, d_model, _total: noam_schedule(d_model, warmup, scale=lr),
    "warmup_cosine": lambda lr, warmup, _d, total: warmup_cosine_schedule(lr, warmup, total),
    "warmup_rsqrt": lambda lr, warmup, _d, _total: warmup_rsqrt_schedule(lr, warmup),
    "warmup_constant": lambda lr, warmup, _d, _total: warmup_constant_schedule(lr, warmup),
}
SCHEDULES = tuple(_SCHEDULE_BUILDERS)


# --------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(optim: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW on ``schedule`` (:func:`make_schedule`), after optional global-norm clipping.

    ``chain(clip_by_global_norm(clip_norm) or identity, adamw(schedule, b1, b2, eps,
    weight_decay))``; with ``accumulate_steps = k > 1`` it is wrapped in
    ``optax.MultiSteps(every_k_schedule=k)``, which averages the gradients of ``k``
    consecutive ``update`` calls, returns zero updates on the first ``k - 1`` and applies
    the inner optimizer on the ``k``-th (so the schedule advances once per ``k`` calls).
    The schedule is taken, not built, so that the rate a run logs is computed by the very
    function the optimizer applies (:func:`schedule_count`).
    """
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity()
    tx = optax.chain(
        clip,
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        ),
    )
    if optim.accumulate_steps > 1:
        # .gradient_transformation() so callers get the same (init, update) type either way.
        tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulate_steps).gradient_transformation()
    return tx


def schedule_count(opt_state) -> jax.Array:
    """The count at which the optimizer evaluates its schedule for its next update: the
    ``count`` of the (one) ``optax.ScaleByScheduleState`` in ``opt_state``. It advances
    only when an update is applied (once per ``accumulate_steps`` micro-batches, never for
    a step skipped as non-finite), so ``schedule(schedule_count(state))`` is the rate the
    next applied update uses."""
    found = [
        s.count
        for s in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold one scheduled learning rate, found {len(found)}")
    return found[0]
