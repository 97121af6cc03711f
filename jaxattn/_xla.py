"""The dense path (``implementation="xla"``): one fused pass over ``[..., N, T, S]`` logits.

The fastest path for short sequences: XLA fuses the mask, the softmax and both matmuls, and
the backward is the analytic softmax backward written out (:func:`_core_bwd`), four matmuls
over the saved weights. The ``G`` query heads that share a key head are stacked along the
query axis (:func:`_fold_queries`), so each key head is one plain batched matmul and K/V are
never repeated. Its inputs are validated by :func:`jaxattn.dot_product_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxattn import _dropout as dropout
from jaxattn._numerics import acc_dtype, fill_value, transposed

__all__ = ["xla_attention"]


def _grouped(x, batch_rank: int, k: int, g: int):
    """View a ``[..., N|1, T|1, S|1]`` mask or bias as ``[..., K|1, G|1, T|1, S|1]``.

    Pads missing leading dims with 1 and splits the head axis without materialising the
    broadcast when it has size 1.
    """
    x = x.reshape((1,) * (batch_rank + 3 - x.ndim) + x.shape)
    *lead, nx, tx, sx = x.shape
    if nx == 1:
        return x.reshape((*lead, 1, 1, tx, sx))
    return x.reshape((*lead, k, g, tx, sx))


def _fold_queries(query, k: int, g: int):
    """``[..., T, N, H]`` -> ``[..., K, G*T, H]``: the G query heads that share a key head are
    stacked along the query axis, so each key head is one plain batched matmul and K/V are
    read once, never repeated (measured 2-3x faster on CPU than a 5-D einsum)."""
    *batch, t, _, h = query.shape
    q = query.reshape((*batch, t, k, g, h))
    return jnp.moveaxis(q, -4, -2).reshape((*batch, k, g * t, h))


def _unfold_queries(x, t: int):
    """``[..., K, G*T, Hx]`` -> ``[..., T, N, Hx]``, the inverse of :func:`_fold_queries`."""
    *batch, k, gt, hx = x.shape
    x = jnp.moveaxis(x.reshape((*batch, k, gt // t, t, hx)), -2, -4)
    return x.reshape((*batch, t, k * (gt // t), hx))


def _weights(qf, key, mask_g, bias_g, scale, t, empty_rows, cap):
    """Weights ``[..., K, G, T, S]``, the log-sum-exp ``[..., K, G, T, 1]`` and, under a soft
    cap, its derivative ``1 - tanh^2`` (else None)."""
    acc = acc_dtype(qf.dtype)
    *batch, k, gt, _ = qf.shape
    s = key.shape[-3]
    logits = jnp.einsum("...KTH,...SKH->...KTS", qf, key, preferred_element_type=acc)
    logits = logits.reshape((*batch, k, gt // t, t, s)) * scale
    d_cap = None
    if cap:
        th = jnp.tanh(logits / cap)
        logits, d_cap = cap * th, 1.0 - th * th
    # Masked keys get a finite fill, far below any real logit, so that the row max is always
    # finite and exp(fill - max) is exactly 0 for a masked key in a row with a real one. A
    # -inf in the bias is clamped to the same fill: it masks like a False in `mask`. (A finite
    # max also keeps XLA's fused max-exp kernel; a -inf fill needs a guard that breaks it.)
    fill = fill_value(acc)
    if bias_g is not None:
        logits = jnp.maximum(logits + jnp.broadcast_to(bias_g.astype(acc), logits.shape), fill)
    if mask_g is not None:
        logits = jnp.where(jnp.broadcast_to(mask_g, logits.shape), logits, fill)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - row_max)
    total = jnp.sum(p, axis=-1, keepdims=True)  # >= 1: exp(max - max) = 1 is in it
    inv = 1.0 / total
    lse = row_max + jnp.log(total)
    if empty_rows:
        # A row whose every key is masked has max == fill: its weights are set to 0 (not
        # the uniform 1/S that exp(fill - fill) would give), so its output is 0 and its
        # gradients are 0: never NaN, never a silent mean of V. Its log-sum-exp is -inf (the
        # log of an empty sum). A NaN max is not == fill: NaN rows stay NaN.
        seen = row_max != fill
        inv = jnp.where(seen, inv, 0.0)
        lse = jnp.where(seen, lse, -jnp.inf)
    return p * inv, lse, d_cap


def _weighted_sum(weights, value, t):
    """``[..., K, G, T, S]`` weights times ``[..., S, K, Hv]`` -> folded ``[..., K, G*T, Hv]``.

    The weights are read in the value dtype (as fused kernels do); accumulation is float32.
    """
    *batch, k, g, _, s = weights.shape
    w = weights.reshape((*batch, k, g * t, s)).astype(value.dtype)
    return jnp.einsum(
        "...KTS,...SKH->...KTH", w, value, preferred_element_type=acc_dtype(value.dtype)
    )


def _dropout_scale(seed, rate: float, shape, dtype):
    """The dropout factors (:func:`jaxattn._dropout.scale_factor`) of weights in the grouped
    ``[..., K, G, T, S]`` layout: head ``k * G + g`` of ``[..., N, T, S]``."""
    *batch, k, g, t, s = shape
    pos = dropout.positions(batch, k * g, t, s)
    return dropout.scale_factor(seed, rate, *pos, dtype).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _core(t, return_weights, empty_rows, rate, cap, qf, key, value, mask_g, bias_g, scale, seed):
    """Folded attention with the analytic backward: ``(out, lse)`` or ``(out, lse, weights)``.

    Static: ``t`` (T), ``return_weights``, ``empty_rows`` (False when no row can be fully
    masked, which skips the guard that zeroes such rows), ``rate`` (dropout on the weights,
    with ``seed`` the two words of :func:`jaxattn._dropout.seed_words`; 0 for none), ``cap``
    (the logit soft cap, None for none).
    """
    args = (qf, key, value, mask_g, bias_g, scale, seed)
    return _core_fwd(t, return_weights, empty_rows, rate, cap, *args)[0]


def _core_fwd(
    t, return_weights, empty_rows, rate, cap, qf, key, value, mask_g, bias_g, scale, seed
):
    weights, lse, d_cap = _weights(qf, key, mask_g, bias_g, scale, t, empty_rows, cap)
    used = weights  # the weights that multiply V: dropped and rescaled under dropout
    if rate:
        used = weights * _dropout_scale(seed, rate, weights.shape, weights.dtype)
    out = _weighted_sum(used, value, t)  # accumulation dtype
    primal = (out, lse, used) if return_weights else (out, lse)
    return primal, (qf, key, value, bias_g, scale, weights, out, seed, d_cap)


def _core_bwd(t, return_weights, empty_rows, rate, cap, residuals, cotangent):
    # The analytic softmax backward (written out, not autodiff'd): it reuses the saved
    # weights and costs four matmuls, where autodiff of the forward costs about twice as much
    # on CPU. Weights are 0 at masked keys and on fully masked rows, so dS is 0 there too.
    # Under dropout, U = W * D (D: 0 or 1 / (1 - rate), regenerated) multiplies V, so
    # dW = dU * D and rowsum(dW * W) = rowsum(dU * U). The log-sum-exp's cotangent adds
    # d_lse * W to d logits (d lse / d logits = W).
    qf, key, value, bias_g, scale, weights, out, seed, d_cap = residuals
    d_out, d_lse = cotangent[:2]
    d_weights = cotangent[2] if return_weights else None
    *batch, k, g, _, s = weights.shape
    w_f = weights.reshape((*batch, k, g * t, s))
    drop = None
    if rate:
        drop = _dropout_scale(seed, rate, weights.shape, weights.dtype).reshape(w_f.shape)
    used_f = w_f if drop is None else w_f * drop
    acc = acc_dtype(qf.dtype)
    d_out = d_out.astype(acc)
    # Key-side gradients come out as [..., K, S, H] (a plain batched matmul, which XLA:CPU
    # runs through its fast path; asking for [..., S, K, H] directly was measured to fall
    # back to a slower generic dot) and are transposed afterwards.
    d_value = jnp.einsum(
        "...KST,...KTH->...KSH",
        transposed(used_f.astype(value.dtype)),
        d_out.astype(value.dtype),
        preferred_element_type=acc,
    )
    d_value = jnp.swapaxes(d_value, -3, -2).astype(value.dtype)
    d_w = jnp.einsum(
        "...KTH,...SKH->...KTS",
        d_out.astype(value.dtype),
        value,
        preferred_element_type=acc,
    )
    # delta = rowsum(dU * U): the dU that comes through O gives rowsum(dO * O) (one pass over
    # O instead of one over the [T, S] weights); a cotangent of the returned weights adds
    # its own term.
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)
    if d_weights is not None:
        d_weights = d_weights.reshape(d_w.shape).astype(acc)
        d_w = d_w + d_weights
        delta = delta + jnp.sum(d_weights * used_f, axis=-1, keepdims=True)
    if drop is not None:
        d_w = d_w * drop
    delta = delta - d_lse.reshape(delta.shape).astype(acc)
    d_logits = w_f * (d_w - delta)  # [..., K, G*T, S], accumulation dtype
    d_biased = d_logits  # what the bias receives: it is added after the soft cap
    if d_cap is not None:
        d_logits = d_logits * d_cap.reshape(d_logits.shape)
    d_qk = d_logits.astype(qf.dtype)
    d_q_unscaled = jnp.einsum("...KTS,...SKH->...KTH", d_qk, key, preferred_element_type=acc)
    d_key = jnp.einsum("...KST,...KTH->...KSH", transposed(d_qk), qf, preferred_element_type=acc)
    d_qf = (d_q_unscaled * scale).astype(qf.dtype)
    d_key = jnp.swapaxes(d_key * scale, -3, -2).astype(key.dtype)
    d_scale = jnp.sum(d_q_unscaled * qf.astype(acc)).astype(scale.dtype)
    d_bias = None
    if bias_g is not None:
        d_l = d_biased.reshape(weights.shape)
        axes = tuple(
            i for i, (a, b) in enumerate(zip(bias_g.shape, d_l.shape, strict=True)) if a != b
        )
        d_bias = jnp.sum(d_l, axis=axes, keepdims=True).astype(bias_g.dtype)
    return d_qf, d_key, d_value, None, d_bias, d_scale, None


_core.defvjp(_core_fwd, _core_bwd)


def xla_attention(
    query, key, value, mask, bias, scale, return_weights, empty_rows, *, dims, cap, drop
):
    """Dense attention on validated inputs (see :func:`jaxattn.dot_product_attention`).

    ``mask`` is a bool array or None (masks of :mod:`jaxattn.masks` are materialised by the
    caller), ``bias`` a float array or None, both broadcastable to ``[..., N, T, S]``;
    ``scale`` a scalar of the accumulation dtype; ``empty_rows`` False when no row can be
    fully masked (skips the guard that zeroes such rows); ``dims`` the
    ``(batch, T, S, N, K, G, H, Hv)`` of the input checks; ``cap`` the logit soft cap or
    None; ``drop`` is ``(rate, seed words)``. Returns ``(out, lse, weights)``: out
    ``[..., T, N, Hv]`` in the input dtype, the log-sum-exp ``[..., T, N]`` in the
    accumulation dtype (-inf on rows with no key), the weights ``[..., N, T, S]`` or None.
    """
    batch, t, s, n, k, g, _, _ = dims
    nb = len(batch)
    qf = _fold_queries(query, k, g)
    mask_g = None if mask is None else _grouped(mask, nb, k, g)
    bias_g = None if bias is None else _grouped(bias, nb, k, g)
    rate, seed = drop
    args = (qf, key, value, mask_g, bias_g, scale, seed)
    result = _core(t, return_weights, empty_rows, rate, cap, *args)
    out, lse = result[:2]
    out = _unfold_queries(out, t).astype(query.dtype)
    lse = _unfold_queries(lse.reshape((*batch, k, g * t, 1)), t)[..., 0]  # [..., T, N]
    weights = result[2].reshape((*batch, n, t, s)) if return_weights else None
    return out, lse, weights
