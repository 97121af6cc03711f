"""Derivatives of the flash path beyond the first, computed densely.

The blockwise forward and backward are ``while`` loops whose trip counts are data (empty
blocks are skipped), and JAX cannot transpose such loops: reverse mode through them fails.
First derivatives never need to (the backward is written by hand, :mod:`jaxattn._flash`),
but a derivative of that backward does (``grad`` of ``grad``, Hessians, meta-learning).

So the two loops are wrapped in ``jax.custom_jvp`` here: their values still come from the
loops, and their tangents from the same computation written densely in plain ``jax.numpy``
(the ``[B, N, T, S]`` weights exist again, memory O(T * S)), which JAX differentiates and
transposes to any order. Only second and higher derivatives pay for it; a first ``grad``
runs the loops alone.

The tangent of the backward ignores the tangents of its ``out`` and ``lse`` inputs and
recomputes both from Q, K, V instead: inside the flash custom VJP they are always the
forward's outputs for the same Q, K, V, so the total derivative is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn import _dropout as dropout_lib
from jaxattn._numerics import acc_dtype, fill_value

__all__ = ["dense_attention", "with_dense_tangents"]


def _unpadded(x, axis: int, size: int):
    """``x[..., :size, ...]`` along ``axis`` unless that axis is broadcast (size 1)."""
    return x if x is None or x.shape[axis] == 1 else jax.lax.slice_in_dim(x, 0, size, axis=axis)


def dense_attention(geo, spec, mask, seed, q, k, v, bias, scale):
    """The flash forward, densely, on the unpadded region: ``q [B, T, N, H]``,
    ``k [B, S, K, H]``, ``v [B, S, K, Hv]``, mask and bias ``[Bx, Nx, Tx, Sx]`` (padded,
    sliced here) -> ``(out [B, T, N, Hv], lse [B, N, T])``, lse +inf on rows with no key
    (the flash forward's convention)."""
    acc = acc_dtype(q.dtype)
    fill = fill_value(acc)
    t, s = geo.t, geo.s
    q, k, v = q[:, :t], k[:, :s], v[:, :s]
    mask = _unpadded(_unpadded(mask, 2, t), 3, s)
    bias = _unpadded(_unpadded(bias, 2, t), 3, s)
    kk = jnp.repeat(k, geo.g, axis=2)  # head n reads key head n // G
    vv = jnp.repeat(v, geo.g, axis=2)
    qs = (q.astype(acc) * scale).astype(q.dtype)  # rounded once, as the loops do
    logits = jnp.einsum("btnh,bsnh->bnts", qs, kk, preferred_element_type=acc)
    if geo.cap:
        logits = geo.cap * jnp.tanh(logits / geo.cap)
    if bias is not None:
        logits = jnp.maximum(logits + bias.astype(acc), fill)
    ok = None
    if spec is not None:
        q_idx = jnp.arange(t, dtype=jnp.int32).reshape(1, t, 1)
        k_idx = jnp.arange(s, dtype=jnp.int32).reshape(1, 1, s)
        b = jnp.arange(geo.b, dtype=jnp.int32).reshape(geo.b, 1, 1) if spec.batch_shape() else None
        allowed = jnp.asarray(spec.allowed(q_idx, k_idx, b, t, s))
        ok = allowed.reshape((1,) * (3 - allowed.ndim) + allowed.shape)[:, None]
    if mask is not None:
        ok = mask if ok is None else ok & mask
    if ok is not None:
        logits = jnp.where(jnp.broadcast_to(ok, logits.shape), logits, fill)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jax.lax.stop_gradient(row_max))
    total = jnp.sum(p, axis=-1, keepdims=True)
    seen = (row_max != fill) | jnp.isnan(total)
    weights = jnp.where(seen, p / total, 0.0)
    lse = jnp.where(seen, jax.lax.stop_gradient(row_max) + jnp.log(total), jnp.inf)[..., 0]
    if geo.rate:
        pos = dropout_lib.positions((geo.b,), geo.k * geo.g, t, s)
        weights = weights * dropout_lib.scale_factor(seed, geo.rate, *pos, acc)
    out = jnp.einsum("bnts,bsnh->btnh", weights.astype(v.dtype), vv, preferred_element_type=acc)
    return out.astype(q.dtype), lse


def _pad_to(x, like):
    """Zero-pad ``x`` up to the shape of ``like`` (the padded block grid)."""
    return jnp.pad(x, [(0, b - a) for a, b in zip(x.shape, like.shape, strict=True)])


def with_dense_tangents(forward, backward):
    """``(forward, backward)``, the flash loops, as ``jax.custom_jvp`` functions whose
    tangents come from :func:`dense_attention` and its VJP.

    ``forward(geo, q, k, v, spec, mask, bias, scale, seed) -> (out, lse)`` and
    ``backward(geo, q, k, v, spec, mask, bias, scale, seed, out, lse, d_out, d_lse) ->
    (dq, dk, dv, d_bias, d_scale)`` on padded arrays.
    """
    fwd = jax.custom_jvp(forward, nondiff_argnums=(0,))
    bwd = jax.custom_jvp(backward, nondiff_argnums=(0,))

    def dense(geo, spec, mask, seed):
        return lambda q, k, v, bias, scale: dense_attention(
            geo, spec, mask, seed, q, k, v, bias, scale
        )

    @fwd.defjvp
    def _fwd_jvp(geo, primals, tangents):
        q, k, v, spec, mask, bias, scale, seed = primals
        dq, dk, dv, _, _, d_bias, d_scale, _ = tangents
        out, lse = fwd(geo, *primals)
        # Tangents arrive instantiated (custom_jvp's default): zeros, never symbolic.
        args, dots = (q, k, v, bias, scale), (dq, dk, dv, d_bias, d_scale)
        _, (t_out, t_lse) = jax.jvp(dense(geo, spec, mask, seed), args, dots)
        return (out, lse), (_pad_to(t_out, out), _pad_to(t_lse, lse))

    def dense_grads(geo, spec, mask, seed, q, k, v, bias, scale, d_out, d_lse):
        (out, lse), vjp = jax.vjp(dense(geo, spec, mask, seed), q, k, v, bias, scale)
        d_lse = jnp.where(lse == jnp.inf, 0.0, d_lse[:, :, : geo.t])
        grads = vjp((d_out[:, : geo.t].astype(out.dtype), d_lse.astype(lse.dtype)))
        return grads

    @bwd.defjvp
    def _bwd_jvp(geo, primals, tangents):
        q, k, v, spec, mask, bias, scale, seed, _out, _lse, d_out, d_lse = primals  # see above
        dq, dk, dv, _, _, t_bias, t_scale, _, _, _, t_dout, t_dlse = tangents
        result = bwd(geo, *primals)

        def grads(q, k, v, bias, scale, d_out, d_lse):
            return dense_grads(geo, spec, mask, seed, q, k, v, bias, scale, d_out, d_lse)

        args = (q, k, v, bias, scale, d_out, d_lse)
        dots = (dq, dk, dv, t_bias, t_scale, t_dout, t_dlse)
        _, t_grads = jax.jvp(grads, args, dots)
        t_q, t_k, t_v, t_b, t_s = t_grads
        padded = (
            _pad_to(t_q, result[0]),
            _pad_to(t_k, result[1]),
            _pad_to(t_v, result[2]),
            None if t_b is None else _pad_to(t_b.astype(result[3].dtype), result[3]),
            t_s.astype(result[4].dtype),
        )
        return result, padded

    return fwd, bwd
