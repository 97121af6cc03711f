"""The block grid of the flash path: which (query block, key block) pairs hold work, and
the order a loop visits them in.

Each pair is classified empty, partial or full from the mask's structure
(:meth:`jaxattn.masks.MaskSpec.block_flags`) or, for a bool array, by reducing it per
block. Each row of the table (a query block in the forward, a key block in the backward)
becomes a compacted list of its non-empty columns, walked by a ``while`` loop whose trip count
is data, so per-sequence (traced) lengths skip blocks too; a run of consecutive full blocks is
visited as one wider block (one wider matmul).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["WIDTHS", "Geo", "Schedule", "branches", "classify", "schedule", "walk", "widths"]

# Widths (in key or query blocks) a run of full blocks may be merged into, widest first.
WIDTHS = (4, 2, 1)


class Geo(NamedTuple):
    """Static geometry: flattened batch, true lengths T and S (the arrays are padded to
    ``nq * bq`` and ``nk * bk``), key heads, group size, head dims, block sizes and counts,
    the dropout rate (0 for none) and the logit soft cap (None for none)."""

    b: int
    t: int
    s: int
    k: int
    g: int
    h: int
    hv: int
    bq: int
    bk: int
    nq: int
    nk: int
    rate: float = 0.0
    cap: float | None = None


def classify(geo: Geo, spec, dense_mask):
    """int32 ``[Bm, nq, nk]``: 0 empty, 1 partial, 2 full (``Bm`` is 1 or B)."""
    q_lo = (np.arange(geo.nq) * geo.bq).reshape(1, -1, 1)
    q_hi = np.minimum(q_lo + geo.bq, geo.t) - 1
    k_lo = (np.arange(geo.nk) * geo.bk).reshape(1, 1, -1)
    k_hi_pad = k_lo + geo.bk - 1
    k_hi = np.minimum(k_hi_pad, geo.s - 1)
    any_ = np.ones((1, 1, 1), bool)
    all_ = k_hi_pad < geo.s  # a block holding padded keys must be masked
    if spec is not None:
        a, f = spec.block_flags(q_lo, q_hi, k_lo, k_hi, geo.t, geo.s)
        any_, all_ = any_ & a, all_ & f
    if dense_mask is not None:
        a, f = _dense_flags(geo, dense_mask)
        any_, all_ = any_ & a, all_ & f
    xp = np if isinstance(any_, np.ndarray) and isinstance(all_, np.ndarray) else jnp
    cls = xp.where(all_, 2, xp.where(any_, 1, 0)).astype(np.int32)
    return xp.broadcast_to(cls, (cls.shape[0], geo.nq, geo.nk))


def _dense_flags(geo: Geo, mask):
    """Per-block any/all of a bool ``[Bx, Nx, Tx, Sx]`` mask (dims of size 1 broadcast)."""
    bx, _, tx, sx = mask.shape
    nq, bq = (geo.nq, geo.bq) if tx > 1 else (1, 1)
    nk, bk = (geo.nk, geo.bk) if sx > 1 else (1, 1)
    blocks = mask.reshape(bx, -1, nq, bq, nk, bk)
    any_ = jnp.any(blocks, axis=(1, 3, 5))
    all_ = jnp.all(blocks, axis=(1, 3, 5))
    return any_, all_


class Schedule(NamedTuple):
    order: jax.Array  # [Bm, rows, cols] int32: non-empty columns first, ascending
    count: jax.Array  # [Bm, rows] int32: how many columns are non-empty
    kind: jax.Array  # [Bm, rows, cols] int32: 0 partial, else 1 + index into WIDTHS


def widths(cols: int) -> tuple[int, ...]:
    """The run widths of :data:`WIDTHS` that fit in a row of ``cols`` blocks."""
    return tuple(w for w in WIDTHS if w <= cols)


def schedule(cls) -> Schedule:
    """The walk of each row of a classification table: which columns, and how."""
    cls = jnp.asarray(cls)
    fits = widths(cls.shape[-1])
    empty = (cls == 0).astype(jnp.int32)
    order = jnp.argsort(empty, axis=-1, stable=True).astype(jnp.int32)
    count = jnp.sum(1 - empty, axis=-1).astype(jnp.int32)
    sorted_cls = jnp.take_along_axis(cls, order, axis=-1)
    cols = cls.shape[-1]
    idx = jnp.arange(cols, dtype=jnp.int32).reshape(1, 1, cols)
    pad = max(fits)
    pad_width = ((0, 0), (0, 0), (0, pad))
    cls_p = jnp.pad(sorted_cls, pad_width)
    order_p = jnp.pad(order, pad_width, constant_values=-(2 * pad))
    kind = jnp.zeros_like(cls)
    # Narrowest first, so the widest run that fits wins.
    for w_index in reversed(range(len(fits))):
        w = fits[w_index]
        ok = sorted_cls == 2
        for r in range(1, w):
            ok = ok & (cls_p[..., r : r + cols] == 2) & (order_p[..., r : r + cols] == order + r)
        ok = ok & (idx + w <= count[..., None])
        kind = jnp.where(ok, w_index + 1, kind)
    return Schedule(order, count, kind)


def _step_sizes(cols: int):
    return jnp.asarray((1, *widths(cols)), jnp.int32)


def branches(visit, cols: int):
    """One partial branch, then one full branch per run width that fits in ``cols`` blocks."""
    full = [functools.partial(visit, width=w, partial=False) for w in widths(cols)]
    return [functools.partial(visit, width=1, partial=True), *full]


def walk(sched, bm, row, visits, carry):
    """Run the ``visits`` (from :func:`branches`) over the non-empty columns of one schedule
    row, threading ``carry`` through them."""
    steps = _step_sizes(sched.order.shape[-1])

    def body(state):
        idx, c = state
        col, kind = sched.order[bm, row, idx], sched.kind[bm, row, idx]
        return idx + steps[kind], lax.switch(kind, visits, col, c)

    count = sched.count[bm, row]
    return lax.while_loop(lambda state: state[0] < count, body, (jnp.int32(0), carry))[1]
