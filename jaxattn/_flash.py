"""Blockwise (FlashAttention-style) attention in pure JAX: memory O(T), empty blocks skipped.

The forward keeps, per query row, the running max ``m``, the running sum ``l`` and the
unnormalised output over key blocks (online softmax, Milakov & Gimelshein 2018; Dao et al.
2022), and saves only the log-sum-exp ``lse = m + log l``. The backward (``jax.custom_vjp``)
recomputes each block's probabilities from ``lse`` as FlashAttention-2 does (Dao 2023): an
outer loop over key blocks carries dK and dV, dQ is accumulated in place. No ``T x S`` tensor
exists in either pass.

Work is cut into steps of one (sequence, key heads, query block): the ``G`` query heads that
share a key head are stacked along the query axis (``[G * block_q, H]``), so K and V are read
once per group and never copied; a step takes up to four key heads
(:func:`_heads_per_step`). Each (query block, key block) pair is classified
(:mod:`jaxattn._blocks`) from the mask's structure (:mod:`jaxattn.masks`) or, for a
bool array, by reducing it per block:

- empty blocks are not visited: each query block walks a compacted list of its non-empty key
  blocks (a ``while`` loop with a data-dependent trip count, so traced lengths work too);
- full blocks skip the mask, and a run of consecutive full blocks is done as one wider
  matmul (up to ``max(WIDTHS) * block_k`` keys), which runs nearer the machine's matmul rate;
- partial blocks evaluate the mask from positions, at ``block_q x block_k`` memory.

Loops are ``lax`` loops over a schedule table, so compile time does not grow with T.

Numerics (:mod:`jaxattn._numerics`, shared with the dense path): logits, max, sum and
accumulators in float32 (float64 for float64 inputs); masked logits get the finite fill, so
the running max stays finite; the probabilities are cast to the value dtype for the P V
matmul (as fused kernels do). A row that sees no key ends with ``m == fill``: its output is 0
and its ``lse`` is ``+inf``, which makes its recomputed probabilities, and so all its
gradients, exactly 0.

Dropout (:mod:`jaxattn._dropout`) scales each block's probabilities by a keep factor hashed
from their global positions after the running sum has taken them (the sum is of the weights
before dropout); the backward hashes the same factors again, so no mask is ever stored.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn import _dropout as dropout_lib
from jaxattn._blocks import Geo, branches, classify, schedule, walk
from jaxattn._numerics import acc_dtype, fill_value, transposed
from jaxattn._second_order import with_dense_tangents

__all__ = ["DEFAULT_BLOCKS", "flash_attention"]

# (block_q, block_k) by backend. On CPU a 512 x 512 float32 block of logits (1 MiB) stays in
# cache through the max, exp and sum passes, and full-block runs widen to 2048 keys; measured
# in benchmarks/attention.py. GPU/TPU values are the usual sizes of blockwise kernels.
DEFAULT_BLOCKS = {"cpu": (512, 512), "gpu": (128, 128), "tpu": (512, 512)}

# --------------------------------------------------------------------------------------------
# Slicing helpers (inputs stay in their [B, T, N, H] layout: no full-size transposed copies)


def _start(*xs):
    """Slice start indices, all int32 (literal 0s would be int64 under x64)."""
    return tuple(jnp.asarray(x, jnp.int32) for x in xs)


def _rows(x, b, start, size, head0, heads):
    """``x[b, start:start+size, head0:head0+heads, :]`` as ``[heads * size, D]``."""
    blk = lax.dynamic_slice(x, _start(b, start, head0, 0), (1, size, heads, x.shape[-1]))[0]
    return jnp.swapaxes(blk, 0, 1).reshape(heads * size, x.shape[-1])


def _unrows(x, size, heads):
    """``[heads * size, D]`` -> ``[1, size, heads, D]`` for a dynamic_update_slice."""
    return jnp.swapaxes(x.reshape(heads, size, x.shape[-1]), 0, 1)[None]


def _keys(x, b, start, size, head0, heads):
    """``x[b, start:start+size, head0:head0+heads, :]`` as ``[heads, size, D]``."""
    blk = lax.dynamic_slice(x, _start(b, start, head0, 0), (1, size, heads, x.shape[-1]))[0]
    return jnp.swapaxes(blk, 0, 1)


def _block_of(x, b, head0, heads, q0, rows, k0, cols):
    """Block of a ``[Bx, Nx, Tx, Sx]`` mask or bias as ``[heads|1, rows|1, cols|1]``."""
    bx, nx, tx, sx = x.shape
    start = (b if bx > 1 else 0, head0 if nx > 1 else 0, q0 if tx > 1 else 0, k0 if sx > 1 else 0)
    size = (1, heads if nx > 1 else 1, rows if tx > 1 else 1, cols if sx > 1 else 1)
    return lax.dynamic_slice(x, _start(*start), size)[0]


def _fold(x, g, rows, cols):
    """``[G|1, rows|1, cols|1]`` -> ``[G * rows, cols]`` (explicit broadcast)."""
    return jnp.broadcast_to(x, (g, rows, cols)).reshape(g * rows, cols)


class _Masking(NamedTuple):
    """What a block needs besides Q, K, V: the structured spec, a dense mask and a bias (for
    partial blocks), the dropout seed (every block under dropout); any may be None."""

    spec: object
    mask: object
    bias: object
    seed: object = None


def _logits_mask(geo, masking, b, head0, heads, q0, rows, k0, cols):
    """bool ``[heads * rows, cols]`` of a partial block (query heads ``head0..``): spec,
    dense mask and key padding."""
    q_idx = q0 + jnp.arange(rows, dtype=jnp.int32)[:, None]
    k_idx = k0 + jnp.arange(cols, dtype=jnp.int32)[None, :]
    ok = jnp.broadcast_to(k_idx < geo.s, (rows, cols))
    if masking.spec is not None:
        ok = ok & masking.spec.allowed(q_idx, k_idx, b, geo.t, geo.s)
    ok = _fold(ok[None], heads, rows, cols)
    if masking.mask is not None:
        blk = _block_of(masking.mask, b, head0, heads, q0, rows, k0, cols)
        ok = ok & _fold(blk, heads, rows, cols)
    return ok


def _bias_block(bias, b, head0, heads, q0, rows, k0, cols):
    """The bias of one block as ``[heads * rows, cols]``."""
    return _fold(_block_of(bias, b, head0, heads, q0, rows, k0, cols), heads, rows, cols)


def _masked_logits(s, geo, masking, b, head0, heads, q0, rows, k0, cols, partial, key_major=False):
    """Add the bias and apply the mask to the float32 logits of one block: ``s`` holds query
    heads ``head0..head0+heads`` head-major, as ``[..., heads * rows / ..., cols]`` (or
    ``[cols, heads * rows]`` when ``key_major``)."""
    acc = s.dtype
    fill = fill_value(acc)
    if masking.bias is not None:
        bias = _bias_block(masking.bias, b, head0, heads, q0, rows, k0, cols).astype(acc)
        s = jnp.maximum(s + _orient(bias, s.shape, key_major), fill)  # -inf masks as False
    if partial:
        ok = _logits_mask(geo, masking, b, head0, heads, q0, rows, k0, cols)
        s = jnp.where(_orient(ok, s.shape, key_major), s, fill)
    return s


def _orient(x, shape, key_major: bool):
    """``[heads * rows, cols]`` -> a block's ``shape``: query-major ``[..., rows', cols]``
    or key-major ``[..., cols, rows']``."""
    if key_major:
        return jnp.swapaxes(x.reshape(*shape[:-2], shape[-1], shape[-2]), -1, -2)
    return x.reshape(shape)


def _dropout_block(geo, seed, b, head0, hb, q0, rows, k0, cols, dtype, key_major=False):
    """``1 / (1 - rate)`` where a weight is kept, 0 where it is dropped (the mask of
    :mod:`jaxattn._dropout` at these global positions), generated directly in the block's
    layout: ``[Z, G * rows, cols]``, or ``[Z, cols, G * rows]`` when ``key_major`` (a
    transposed copy would cost a pass)."""
    r_idx = jnp.arange(geo.g * rows, dtype=jnp.int32)  # query heads of a key head, then rows
    z = jnp.arange(hb, dtype=jnp.int32).reshape(hb, 1, 1)
    r_axis, c_axis = ((1, -1, 1), (1, 1, -1)) if not key_major else ((1, 1, -1), (1, -1, 1))
    n = head0 + z * geo.g + (r_idx // rows).reshape(r_axis)
    t = q0 + (r_idx % rows).reshape(r_axis)
    s = k0 + jnp.arange(cols, dtype=jnp.int32).reshape(c_axis)
    return dropout_lib.scale_factor(seed, geo.rate, b, n, t, s, dtype)


def _q_scale(geo: Geo, scale):
    """What the query rows are multiplied by: ``scale``, or ``scale / cap`` under a soft cap
    (the logits then come out of the matmul divided by the cap, ready for the ``tanh``: one
    elementwise pass less per block, measured 4% of a block's softmax work)."""
    return scale / geo.cap if geo.cap else scale


def _scaled_rows(q, b, q0, rows, head0, heads, scale, acc):
    """Query rows times ``scale``, rounded once to the input dtype (saves a pass per block)."""
    qs = _rows(q, b, q0, rows, head0, heads)
    return (qs.astype(acc) * scale).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Forward


def _capped_without_bias(s, geo, masking, b, head0, heads, q0, k0, cols, partial):
    """Soft-capped, masked logits of a forward block and their row max, from ``s`` = logits /
    cap. ``tanh`` is monotone, so the max is taken over ``s`` and capped once per row: the
    ``tanh`` then has one consumer, the ``exp``, and XLA fuses it there instead of writing the
    capped block out for the max and the ``exp`` to read back. Measured at (2, 2048, 8, 64),
    non-causal, interleaved in one run: the soft cap added 31% to the forward with the
    separate pass, 12% with this one."""
    fill = fill_value(s.dtype)
    # tanh is flat beyond |x| = 20: clamping there changes no capped value, keeps NaN, and
    # keeps an unmasked -inf (an Inf in Q or K) apart from the fill of masked keys.
    s = jnp.maximum(s, -20.0)
    s = _masked_logits(s, geo, masking, b, head0, heads, q0, geo.bq, k0, cols, partial)
    s_max = jnp.max(s, axis=-1)
    m_blk = jnp.where(s_max == fill, fill, geo.cap * jnp.tanh(s_max))
    capped = geo.cap * jnp.tanh(s)
    if partial:  # masked logits keep the fill (tanh would map it to -cap)
        capped = jnp.where(s == fill, fill, capped)
    return capped, m_blk


def _heads_per_step(geo: Geo) -> int:
    """Key heads per step (forward and backward): up to four, while ``heads * G * block_q``
    stays at most 2048. More work per op and fewer loop trips: at (2, 2048, 8, 64) causal on
    CPU, the forward took 101 ms with one head per step, 100 ms with two, 78 ms with four,
    79 ms with eight (15 interleaved rounds, one run); the forward+backward 393 ms with one
    head per backward step, 359 ms with four (non-causal: 638 ms and 574 ms)."""
    for hb in (4, 2):
        if geo.k % hb == 0 and hb * geo.g * geo.bq <= 2048:
            return hb
    return 1


def _forward(geo: Geo, masking: _Masking, q, k, v, scale):
    """Padded ``[B, Tp, N, H]`` inputs -> (out ``[B, Tp, N, Hv]``, lse ``[B, N, Tp]``)."""
    acc, fill = acc_dtype(q.dtype), fill_value(acc_dtype(q.dtype))
    sched = schedule(classify(geo, masking.spec, masking.mask))
    per_batch = sched.count.shape[0] > 1
    hb = _heads_per_step(geo)  # Z: key heads per step, each with its G query heads
    groups = geo.k // hb
    rows = geo.g * geo.bq

    def query_block(r, carry):
        out, lse = carry
        r = jnp.asarray(r, jnp.int32)  # int64 under x64: every slice index must be int32
        b, z, i = r // (groups * geo.nq), (r // geo.nq) % groups, r % geo.nq
        q0, head0 = i * geo.bq, z * hb * geo.g
        qs = _scaled_rows(q, b, q0, geo.bq, head0, hb * geo.g, _q_scale(geo, scale), acc)
        qs = qs.reshape(hb, rows, geo.h)

        def visit(j, c, width, partial):
            m, run_sum, o = c
            k0, cols = j * geo.bk, width * geo.bk
            kb, vb = _keys(k, b, k0, cols, z * hb, hb), _keys(v, b, k0, cols, z * hb, hb)
            s = jnp.einsum("ZRH,ZCH->ZRC", qs, kb, preferred_element_type=acc)  # logits
            heads = hb * geo.g
            if geo.cap and masking.bias is None:
                s, m_blk = _capped_without_bias(
                    s, geo, masking, b, head0, heads, q0, k0, cols, partial
                )
            else:
                if geo.cap:  # the queries carry 1 / cap: s is logits / cap
                    s = geo.cap * jnp.tanh(s)
                s = _masked_logits(s, geo, masking, b, head0, heads, q0, geo.bq, k0, cols, partial)
                m_blk = jnp.max(s, axis=-1)
            m_new = jnp.maximum(m, m_blk)
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)  # rescales what was summed under the old max
            run_sum = run_sum * alpha + jnp.sum(p, axis=-1)  # the sum before dropout
            if geo.rate:
                p = p * _dropout_block(geo, masking.seed, b, head0, hb, q0, geo.bq, k0, cols, acc)
            pv = jnp.einsum("ZRC,ZCH->ZRH", p.astype(v.dtype), vb, preferred_element_type=acc)
            return m_new, run_sum, o * alpha[..., None] + pv

        init = (
            jnp.full((hb, rows), fill, acc),
            jnp.zeros((hb, rows), acc),
            jnp.zeros((hb, rows, geo.hv), acc),
        )
        m, run_sum, o = walk(sched, b if per_batch else 0, i, branches(visit, geo.nk), init)
        # m == fill: the row saw no key (the sum is >= 1 otherwise: exp(m - m) = 1 is in it).
        # Unless the sum is NaN: XLA:CPU's max reduction skips NaN, so a row of NaN logits
        # (a NaN in the query) keeps m == fill, but its sum is NaN and so is its output.
        seen = (m != fill) | jnp.isnan(run_sum)
        o = jnp.where(seen[..., None], o / run_sum[..., None], 0.0)
        row_lse = jnp.where(seen, m + jnp.log(run_sum), jnp.inf)
        o = o.astype(out.dtype).reshape(hb * rows, geo.hv)
        out = lax.dynamic_update_slice(out, _unrows(o, geo.bq, hb * geo.g), _start(b, q0, head0, 0))
        lse = lax.dynamic_update_slice(
            lse, row_lse.reshape(1, hb * geo.g, geo.bq), _start(b, head0, q0)
        )
        return out, lse

    n = geo.k * geo.g
    out = jnp.zeros((geo.b, geo.nq * geo.bq, n, geo.hv), q.dtype)
    lse = jnp.zeros((geo.b, n, geo.nq * geo.bq), acc)
    return lax.fori_loop(0, geo.b * groups * geo.nq, query_block, (out, lse))


# --------------------------------------------------------------------------------------------
# Backward


def _add_block(buf, upd, start):
    """``buf[start...] += upd`` for a block at ``start`` (read, add, write in place)."""
    start = _start(*start)
    cur = lax.dynamic_slice(buf, start, upd.shape)
    return lax.dynamic_update_slice(buf, cur + upd.astype(buf.dtype), start)


def _bias_cotangent(d_bias, ds, geo, b, head0, heads, q0, rows, k0):
    """Sum ``ds [Z, G * rows, bk]`` (query heads ``head0..head0+heads``) onto the broadcast
    dims of the bias and add it in place."""
    bx, nx, tx, sx = d_bias.shape
    blk = ds.reshape(heads, rows, geo.bk)
    axes = tuple(a for a, size in enumerate((nx, tx, sx)) if size == 1)
    blk = jnp.sum(blk, axis=axes, keepdims=True)[None]
    start = (b if bx > 1 else 0, head0 if nx > 1 else 0, q0 if tx > 1 else 0)
    return _add_block(d_bias, blk, (*start, k0 if sx > 1 else 0))


def _backward(geo: Geo, masking: _Masking, q, k, v, out, lse, d_out, d_lse, scale):
    """Gradients of the padded inputs: (dq, dk, dv, d_bias or None, d_scale). ``d_lse`` is
    the cotangent of the log-sum-exp (``d lse / d logits = P``, so it shifts ``delta``)."""
    acc = acc_dtype(q.dtype)
    cls = classify(geo, masking.spec, masking.mask)
    sched = schedule(jnp.swapaxes(jnp.asarray(cls), -1, -2))  # per key block: query blocks
    per_batch = sched.count.shape[0] > 1
    hb = _heads_per_step(geo)  # Z: key heads per step, each with its G query heads
    groups, heads = geo.k // hb, hb * geo.g
    # rowsum(dP * P) = rowsum(dO * O): one pass over O instead of one per block.
    delta = jnp.swapaxes(jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1), 1, 2)
    delta = delta - d_lse.astype(acc)

    def key_block(r, carry):
        dq, dk, dv, d_bias = carry
        r = jnp.asarray(r, jnp.int32)  # int64 under x64: every slice index must be int32
        b, z, j = r // (groups * geo.nk), (r // geo.nk) % groups, r % geo.nk
        k0, head0 = j * geo.bk, z * heads
        kb, vb = _keys(k, b, k0, geo.bk, z * hb, hb), _keys(v, b, k0, geo.bk, z * hb, hb)

        def visit(i, c, width, partial):
            dq, dkj, dvj, d_bias = c
            q0, rows = i * geo.bq, width * geo.bq
            qs = _scaled_rows(q, b, q0, rows, head0, heads, _q_scale(geo, scale), acc)
            qs = qs.reshape(hb, -1, geo.h)
            do = _rows(d_out, b, q0, rows, head0, heads).astype(v.dtype).reshape(hb, -1, geo.hv)
            lse_r, delta_r = (
                lax.dynamic_slice(x, _start(b, head0, q0), (1, heads, rows)).reshape(hb, 1, -1)
                for x in (lse, delta)
            )
            # Key-major [Z, C, R] blocks: every matmul but one then contracts over the last
            # axis of its left operand, XLA:CPU's fast form (a transposed left operand was
            # measured 2.5x slower); the one left, for dQ, gets an explicit transpose.
            s_t = jnp.einsum("ZCH,ZRH->ZCR", kb, qs, preferred_element_type=acc)  # logits^T
            th = None
            if geo.cap:  # the queries carry 1 / cap: s_t is logits / cap
                th = jnp.tanh(s_t)
                s_t = geo.cap * th
            s_t = _masked_logits(
                s_t, geo, masking, b, head0, heads, q0, rows, k0, geo.bk, partial, True
            )
            p_t = jnp.exp(s_t - lse_r)  # exactly 0 where masked and on rows with no key
            # Under dropout U = P * D multiplies V: dV = U^T dO, dP = dU * D, and
            # rowsum(dP * P) = rowsum(dO * O) still (delta).
            drop_t = None
            if geo.rate:
                drop_t = _dropout_block(
                    geo, masking.seed, b, head0, hb, q0, rows, k0, geo.bk, acc, key_major=True
                )
            u_t = p_t if drop_t is None else p_t * drop_t
            dvj = dvj + jnp.einsum(
                "ZCR,ZRH->ZCH", u_t.astype(v.dtype), do, preferred_element_type=acc
            )
            dp_t = jnp.einsum("ZCH,ZRH->ZCR", vb, do, preferred_element_type=acc)
            if drop_t is not None:
                dp_t = dp_t * drop_t
            ds_t = p_t * (dp_t - delta_r)  # d logits^T
            if d_bias is not None:
                ds = jnp.swapaxes(ds_t, -1, -2)
                d_bias = _bias_cotangent(d_bias, ds, geo, b, head0, heads, q0, rows, k0)
            if th is not None:  # through the soft cap: d(c tanh(x / c)) / dx = 1 - tanh^2
                ds_t = ds_t * (1.0 - th * th)
            ds_t = ds_t.astype(q.dtype)
            dkj = dkj + jnp.einsum("ZCR,ZRH->ZCH", ds_t, qs, preferred_element_type=acc)
            dq_blk = jnp.einsum("ZRC,ZCH->ZRH", transposed(ds_t), kb, preferred_element_type=acc)
            dq_blk = _unrows(dq_blk.reshape(heads * rows, geo.h), rows, heads)
            dq = _add_block(dq, dq_blk, _start(b, q0, head0, 0))
            return dq, dkj, dvj, d_bias

        init = (
            dq,
            jnp.zeros((hb, geo.bk, geo.h), acc),
            jnp.zeros((hb, geo.bk, geo.hv), acc),
            d_bias,
        )
        dq, dkj, dvj, d_bias = walk(sched, b if per_batch else 0, j, branches(visit, geo.nq), init)
        start = _start(b, k0, z * hb, 0)
        if geo.cap:  # dK summed dS against queries that carried 1 / cap
            dkj = dkj * geo.cap
        dk = lax.dynamic_update_slice(dk, jnp.swapaxes(dkj, 0, 1)[None].astype(dk.dtype), start)
        dv = lax.dynamic_update_slice(dv, jnp.swapaxes(dvj, 0, 1)[None].astype(dv.dtype), start)
        return dq, dk, dv, d_bias

    d_bias = None if masking.bias is None else jnp.zeros(masking.bias.shape, acc)
    init = (jnp.zeros(q.shape, acc), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    steps = geo.b * groups * geo.nk
    dq, dk, dv, d_bias = lax.fori_loop(0, steps, key_block, (*init, d_bias))
    d_scale = jnp.sum(dq * q.astype(acc))  # d/d scale of scale * (q . k) summed over rows
    return (dq * scale).astype(q.dtype), dk, dv, d_bias, d_scale


# --------------------------------------------------------------------------------------------
# Custom VJP and the entry point


def _forward_loops(geo, q, k, v, spec, mask, bias, scale, seed):
    return _forward(geo, _Masking(spec, mask, bias, seed), q, k, v, scale)


def _backward_loops(geo, q, k, v, spec, mask, bias, scale, seed, out, lse, d_out, d_lse):
    masking = _Masking(spec, mask, bias, seed)
    return _backward(geo, masking, q, k, v, out, lse, d_out, d_lse, scale)


# The loops, with tangents from their dense twin (second and higher derivatives only).
_forward_op, _backward_op = with_dense_tangents(_forward_loops, _backward_loops)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(geo, q, k, v, spec, mask, bias, scale, seed):
    """``(out [B, Tp, N, Hv], lse [B, N, Tp])``; lse is +inf on rows with no key."""
    return _forward_op(geo, q, k, v, spec, mask, bias, scale, seed)


def _flash_fwd(geo, q, k, v, spec, mask, bias, scale, seed):
    out, lse = _forward_op(geo, q, k, v, spec, mask, bias, scale, seed)
    return (out, lse), (q, k, v, spec, mask, bias, scale, seed, out, lse)


def _flash_bwd(geo, residuals, cotangents):
    q, k, v, spec, mask, bias, scale, seed, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, d_bias, d_scale = _backward_op(
        geo, q, k, v, spec, mask, bias, scale, seed, out, lse, d_out, d_lse
    )
    d_spec = jax.tree_util.tree_map(_zero_cotangent, spec)
    d_mask = None if mask is None else _zero_cotangent(mask)
    d_bias = None if bias is None else d_bias.astype(bias.dtype)
    d_seed = None if seed is None else _zero_cotangent(seed)
    return dq, dk, dv, d_spec, d_mask, d_bias, d_scale.astype(scale.dtype), d_seed


_flash.defvjp(_flash_fwd, _flash_bwd)


def _zero_cotangent(x):
    """The cotangent of an integer or bool input (a float0 zero)."""
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _pad_axis(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _as_4d(x, batch, b: int, tp: int, sp: int, fill):
    """A mask or bias broadcastable to ``[*batch, N, T, S]`` as ``[Bx, Nx, Tx, Sx]`` with
    ``Bx`` in (1, B), padded to the block grid where it is not broadcast."""
    x = x.reshape((1,) * (len(batch) + 3 - x.ndim) + x.shape)
    lead = x.shape[: len(batch)]
    if all(d == 1 for d in lead):
        x = x.reshape(x.shape[len(batch) :])[None]
    else:
        x = jnp.broadcast_to(x, (*batch, *x.shape[len(batch) :])).reshape((b, *x.shape[-3:]))
    if x.shape[-2] > 1:
        x = _pad_axis(x, 2, tp, fill)
    if x.shape[-1] > 1:
        x = _pad_axis(x, 3, sp, fill)
    return x


def flash_attention(
    query,
    key,
    value,
    *,
    spec,
    mask,
    bias,
    scale,
    block_q: int,
    block_k: int,
    cap=None,
    drop=(0.0, None),
):
    """Blockwise attention on validated inputs (see :func:`jaxattn.dot_product_attention`).

    Args:
      query, key, value: ``[..., T, N, H]``, ``[..., S, K, H]``, ``[..., S, K, Hv]``.
      spec: a :class:`jaxattn.masks.MaskSpec` (causal is folded in here) or None.
      mask: bool array broadcastable to ``[..., N, T, S]``, or None.
      bias: float array broadcastable to ``[..., N, T, S]``, or None.
      scale: scalar in the accumulation dtype.
      block_q, block_k: block sizes (clipped to T and S).
      cap: the logit soft cap, or None.
      drop: ``(rate, seed)``: dropout on the weights (:mod:`jaxattn._dropout`), seed the
        two words of :func:`jaxattn._dropout.seed_words`; ``(0.0, None)`` for none.

    Returns ``(out, lse)``: ``[..., T, N, Hv]`` in the input dtype and the log-sum-exp
    ``[..., T, N]`` in the accumulation dtype (-inf on rows with no key). Lengths that are
    not a multiple of the block size are padded (a copy of the inputs); padded keys are
    masked.
    """
    batch = query.shape[:-3]
    t, n, h = query.shape[-3:]
    s, kh, hv = value.shape[-3:]
    q = query.reshape((-1, t, n, h))
    k = key.reshape((-1, s, kh, h))
    v = value.reshape((-1, s, kh, hv))
    b = q.shape[0]
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    rate, seed = drop
    geo = Geo(
        b=b, t=t, s=s, k=kh, g=n // kh, h=h, hv=hv, bq=bq, bk=bk, nq=nq, nk=nk, rate=rate, cap=cap
    )
    q = _pad_axis(q, 1, nq * bq)
    k, v = _pad_axis(k, 1, nk * bk), _pad_axis(v, 1, nk * bk)
    if mask is not None:
        mask = _as_4d(mask, batch, b, nq * bq, nk * bk, False)
    if bias is not None:
        bias = _as_4d(bias, batch, b, nq * bq, nk * bk, 0)
    out, lse = _flash(geo, q, k, v, spec, mask, bias, scale, seed)
    lse = jnp.swapaxes(lse[:, :, :t], 1, 2)
    lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)  # no key: the log of an empty sum
    return out[:, :t].reshape((*batch, t, n, hv)), lse.reshape((*batch, t, n))
