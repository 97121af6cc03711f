"""Structured masks: a mask given by its rule, evaluated per block, never built at T x S.

The builders of :mod:`jaxattn.masks` return bool arrays, which the reference path needs and
which cost ``T * S`` memory. The classes here describe the same masks by their rule (a causal
offset, a window, a prefix length, per-sequence lengths or segment ids), so that the blockwise
path (:mod:`jaxattn._flash`) can

- classify every (query block, key block) pair as empty, partial or full from a few integer
  comparisons (empty blocks are skipped, full blocks skip the masking), and
- evaluate the mask of one partial block from positions, at ``block_q * block_k`` memory.

Every spec is accepted by :func:`jaxattn.dot_product_attention` as ``mask=`` on every path; the
reference path materialises it with the builder of :mod:`jaxattn.masks` of the same name, so
the two descriptions cannot drift apart. Combine specs with ``&`` and ``|``.

Positions follow :mod:`jaxattn.masks`: query ``t`` sits at ``t + offset``, with
``offset = S - T`` (bottom-right) by default. Per-sequence values (``[B]`` offsets, lengths,
prefix lengths, ``[B, L]`` segment ids) have exactly the leading batch dims of the query
(``[B1, B2]`` lengths for a ``[B1, B2, T, N, H]`` query); anything else is refused.

Classification is exact for each basic mask and conservative for combinations: a block is
called empty only if no pair in it may attend, full only if every pair may; anything else is
partial, which is always correct (the mask is then evaluated elementwise).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import masks as _m

__all__ = [
    "CausalMask",
    "MaskSpec",
    "PaddingMask",
    "PrefixLMMask",
    "SegmentMask",
    "SlidingWindowMask",
]


def _static(*xs) -> bool:
    """True when every value is known at trace time (None, a Python int or a NumPy array)."""
    return all(x is None or isinstance(x, (int, np.integer, np.ndarray)) for x in xs)


def _per_sequence(name: str, x, ndim: int):
    """A per-sequence value as (value, leading batch shape): ints pass through, arrays are
    checked to be integer with ``ndim`` trailing dims beyond the batch."""
    if x is None or (isinstance(x, (int, np.integer)) and not isinstance(x, bool)):
        return x, ()
    if isinstance(x, bool) or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an int or an int array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int array, got dtype {x.dtype}")
    if x.ndim < ndim:
        raise ValueError(f"{name} must have at least {ndim} dims, got shape {tuple(x.shape)}")
    if x.ndim == ndim and ndim == 0:
        return x, ()
    return x, tuple(x.shape[: x.ndim - ndim])


def _flat(x, ndim: int):
    """Flatten the leading batch dims of a per-sequence array: ``[*batch, ...]`` -> ``[B, ...]``."""
    if x is None or isinstance(x, (int, np.integer)) or x.ndim == ndim:
        return x
    return x.reshape((-1, *x.shape[x.ndim - ndim :]))


def _at(x, b):
    """Value of sequence ``b`` of a flattened per-sequence array (a scalar passes through)."""
    if x is None or isinstance(x, (int, np.integer)) or x.ndim == 0:
        return x
    return jnp.asarray(x)[b]  # b may be traced: a NumPy array cannot take it as an index


def _col(x, xp):
    """A flattened ``[B]`` value as ``[B, 1, 1]`` so it broadcasts over ``[nq, nk]`` blocks."""
    if x is None or isinstance(x, (int, np.integer)) or x.ndim == 0:
        return x
    return xp.asarray(x).reshape((-1, 1, 1))


def _is_array(x) -> bool:
    return x is not None and not isinstance(x, (int, np.integer))


class MaskSpec:
    """Base of the structured masks. Combine with ``&`` (both allow) and ``|`` (either).

    Specs are pytrees: per-sequence arrays are leaves (traced under ``jit``), Python ints and
    windows are static, so a spec passes through ``jax.jit`` like an array argument.
    """

    _fields: tuple[str, ...] = ()  # per-sequence values: leaves when arrays, static when ints
    _static_fields: tuple[str, ...] = ("_batch",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node_class(cls)

    def tree_flatten(self):
        dynamic = tuple(f for f in self._fields if _is_array(getattr(self, f)))
        static = tuple(
            (f, getattr(self, f)) for f in (*self._fields, *self._static_fields) if f not in dynamic
        )
        return [getattr(self, f) for f in dynamic], (dynamic, static)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        dynamic, static = aux
        obj = object.__new__(cls)
        for name, value in (*zip(dynamic, leaves, strict=True), *static):
            setattr(obj, name, value)
        return obj

    def materialize(self, q_len: int, kv_len: int):
        """The bool mask, ``[T, S]`` or ``[*batch, 1, T, S]``, built by :mod:`jaxattn.masks`."""
        raise NotImplementedError

    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch shape of the per-sequence values, ``()`` when there are none."""
        return self._batch

    def _unflatten(self, mask):
        """A ``[B, 1, T, S]`` mask built over the flattened batch -> ``[*batch, 1, T, S]``."""
        return mask.reshape((*self._batch, *mask.shape[1:])) if self._batch else mask

    def allowed(self, q_idx, k_idx, b, q_len: int, kv_len: int):
        """bool ``[Tb, Sb]``: may query index ``q_idx[i]`` attend key index ``k_idx[j]``, in
        sequence ``b`` of the flattened batch (a traced scalar)."""
        raise NotImplementedError

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len: int, kv_len: int):
        """``(any, all)`` over the blocks whose query indices are ``q_lo..q_hi`` (
        inclusive; ``[1, nq, 1]``) and key indices ``k_lo..k_hi`` (``[1, 1, nk]``): rank-3 bool
        arrays broadcastable to ``[B, nq, nk]``, NumPy when every value is static, else traced."""
        raise NotImplementedError

    def is_static(self) -> bool:
        """True when the block classification is known at trace time."""
        return _static(*(getattr(self, f) for f in self._fields))

    def __and__(self, other):
        return _Combined("and", (self, _check_spec(other)))

    def __or__(self, other):
        return _Combined("or", (self, _check_spec(other)))


def _joint_batch(name_a: str, a: tuple, name_b: str, b: tuple) -> tuple:
    """The batch shape of two per-sequence values: equal, or one of them has none."""
    if a and b and a != b:
        raise ValueError(f"{name_a} has batch shape {a} but {name_b} has {b}")
    return a or b


def _check_spec(x):
    if not isinstance(x, MaskSpec):
        raise ValueError(
            f"structured masks combine only with structured masks, got {type(x).__name__}; "
            "materialise the spec (spec.materialize(T, S)) to combine it with a bool array"
        )
    return x


def _offset(offset, q_len, kv_len):
    return kv_len - q_len if offset is None else offset


class CausalMask(MaskSpec):
    """Query at position ``p = t + offset`` sees keys ``s <= p`` (see
    :func:`jaxattn.causal_mask`); ``offset`` an int or a per-sequence int array."""

    _fields = ("offset",)

    def __init__(self, *, offset=None):
        self.offset, self._batch = _per_sequence("offset", offset, 0)

    def materialize(self, q_len, kv_len):
        mask = _m.causal_mask(q_len, kv_len, offset=_flat(self.offset, 0))
        return self._unflatten(mask)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        pos = q_idx + _at(_flat(_offset(self.offset, q_len, kv_len), 0), b)
        return k_idx[None, :] <= pos[:, None]

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        off = _col(_flat(_offset(self.offset, q_len, kv_len), 0), xp)
        return k_lo <= q_hi + off, k_hi <= q_lo + off


class SlidingWindowMask(MaskSpec):
    """Query at position ``p`` sees keys ``p - left <= s <= p + right`` (see
    :func:`jaxattn.sliding_window_mask`; one int ``w`` means ``(w, w)``, causal local attention
    is ``(w, 0)``)."""

    _fields = ("offset",)
    _static_fields = ("_batch", "left", "right")

    def __init__(self, window, *, offset=None):
        self.left, self.right = _m._window_pair(window)
        self.offset, self._batch = _per_sequence("offset", offset, 0)

    def materialize(self, q_len, kv_len):
        window = (self.left, self.right)
        mask = _m.sliding_window_mask(q_len, kv_len, window, offset=_flat(self.offset, 0))
        return self._unflatten(mask)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        pos = (q_idx + _at(_flat(_offset(self.offset, q_len, kv_len), 0), b))[:, None]
        k = k_idx[None, :]
        return (k >= pos - self.left) & (k <= pos + self.right)

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        off = _col(_flat(_offset(self.offset, q_len, kv_len), 0), xp)
        lo, hi = q_lo + off, q_hi + off
        any_ = (k_hi >= lo - self.left) & (k_lo <= hi + self.right)
        all_ = (k_lo >= hi - self.left) & (k_hi <= lo + self.right)
        return any_, all_


class PrefixLMMask(MaskSpec):
    """Every query sees keys ``s < prefix_len``; after the prefix, attention is causal (see
    :func:`jaxattn.prefix_lm_mask`). ``prefix_len`` an int or a per-sequence int array."""

    _fields = ("prefix_len", "offset")

    def __init__(self, prefix_len, *, offset=None):
        self.prefix_len, pb = _per_sequence("prefix_len", prefix_len, 0)
        self.offset, ob = _per_sequence("offset", offset, 0)
        self._batch = _joint_batch("prefix_len", pb, "offset", ob)

    def materialize(self, q_len, kv_len):
        prefix = _flat(self.prefix_len, 0)
        mask = _m.prefix_lm_mask(q_len, kv_len, prefix_len=prefix, offset=_flat(self.offset, 0))
        return self._unflatten(mask)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        pos = (q_idx + _at(_flat(_offset(self.offset, q_len, kv_len), 0), b))[:, None]
        k = k_idx[None, :]
        return (k < _at(_flat(self.prefix_len, 0), b)) | (k <= pos)

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        off = _col(_flat(_offset(self.offset, q_len, kv_len), 0), xp)
        prefix = _col(_flat(self.prefix_len, 0), xp)
        any_ = (k_lo < prefix) | (k_lo <= q_hi + off)
        # Every key of the block is either inside the prefix or at or before the first query.
        all_ = k_hi <= xp.maximum(prefix - 1, q_lo + off)
        return any_, all_


class PaddingMask(MaskSpec):
    """The first ``length`` positions of each sequence are real (see
    :func:`jaxattn.padding_mask`): keys at ``s >= kv_lengths[b]`` are hidden and query rows at
    ``t >= q_lengths[b]`` are fully masked (they return zeros)."""

    _fields = ("q_lengths", "kv_lengths")

    def __init__(self, *, q_lengths=None, kv_lengths=None):
        if q_lengths is None and kv_lengths is None:
            raise ValueError("PaddingMask needs q_lengths, kv_lengths or both; got neither")
        self.q_lengths, qb = _per_sequence("q_lengths", q_lengths, 0)
        self.kv_lengths, kb = _per_sequence("kv_lengths", kv_lengths, 0)
        self._batch = _joint_batch("q_lengths", qb, "kv_lengths", kb)

    def materialize(self, q_len, kv_len):
        b = math.prod(self._batch) if self._batch else 1

        def lengths(x):
            if x is None:
                return None
            return jnp.broadcast_to(jnp.asarray(_flat(x, 0), jnp.int32), (b,))

        mask = _m.padding_mask(
            q_lengths=lengths(self.q_lengths),
            kv_lengths=lengths(self.kv_lengths),
            q_len=q_len,
            kv_len=kv_len,
        )
        return mask.reshape((*self._batch, *mask.shape[1:])) if self._batch else mask[0]

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        ok = jnp.ones((q_idx.shape[0], k_idx.shape[0]), jnp.bool_)
        if self.q_lengths is not None:
            ok = ok & (q_idx < _at(_flat(self.q_lengths, 0), b))[:, None]
        if self.kv_lengths is not None:
            ok = ok & (k_idx < _at(_flat(self.kv_lengths, 0), b))[None, :]
        return ok

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        any_, all_ = xp.ones((1, 1, 1), bool), xp.ones((1, 1, 1), bool)
        if self.q_lengths is not None:
            n = _col(_flat(self.q_lengths, 0), xp)
            any_, all_ = any_ & (q_lo < n), all_ & (q_hi < n)
        if self.kv_lengths is not None:
            n = _col(_flat(self.kv_lengths, 0), xp)
            any_, all_ = any_ & (k_lo < n), all_ & (k_hi < n)
        return any_, all_


class SegmentMask(MaskSpec):
    """Packed sequences: attend only where the segment ids are equal (see
    :func:`jaxattn.segment_mask`). Ids ``[*batch, T]`` and ``[*batch, S]``.

    Blocks are classified from the range of ids in each block: a block is empty when the
    query and key id ranges do not overlap and full when both hold one and the same id. This
    is exact when queries and keys share one sorted id sequence (self-attention over packed
    sequences); otherwise (unsorted ids, or different query and key ids) it is correct but
    may visit blocks that turn out empty.
    """

    _fields = ("q_ids", "kv_ids")

    def __init__(self, q_segment_ids, kv_segment_ids=None):
        self.q_ids, qb = _per_sequence("q_segment_ids", q_segment_ids, 1)
        kv = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        self.kv_ids, kb = _per_sequence("kv_segment_ids", kv, 1)
        if qb != kb:
            raise ValueError(f"q_segment_ids has batch shape {qb} but kv_segment_ids has {kb}")
        self._batch = qb

    def materialize(self, q_len, kv_len):
        self._check_lengths(q_len, kv_len)
        q, kv = _flat(self.q_ids, 1), _flat(self.kv_ids, 1)
        if q.ndim == 1:
            return _m.segment_mask(q[None], kv[None])[0, 0]
        mask = _m.segment_mask(q, kv)
        return mask.reshape((*self._batch, *mask.shape[1:]))

    def _check_lengths(self, q_len, kv_len):
        for name, ids, size in (("q_segment_ids", self.q_ids, q_len), ("kv", self.kv_ids, kv_len)):
            if ids.shape[-1] != size:
                name = name if name != "kv" else "kv_segment_ids"
                raise ValueError(f"{name} has length {ids.shape[-1]} but the attention has {size}")

    def _ids(self, ids, b, idx, size):
        row = jnp.asarray(ids if ids.ndim == 1 else jnp.asarray(ids)[b])
        return row[jnp.minimum(idx, size - 1)]  # padded block positions read the last id

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        q, kv = _flat(self.q_ids, 1), _flat(self.kv_ids, 1)
        return self._ids(q, b, q_idx, q_len)[:, None] == self._ids(kv, b, k_idx, kv_len)[None, :]

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        self._check_lengths(q_len, kv_len)
        xp = np if self.is_static() else jnp
        q = xp.asarray(_flat(self.q_ids, 1)).reshape((-1, q_len))
        kv = xp.asarray(_flat(self.kv_ids, 1)).reshape((-1, kv_len))
        q_min, q_max = _block_range(q, q_lo.reshape(-1), q_hi.reshape(-1), xp)  # [B, nq]
        k_min, k_max = _block_range(kv, k_lo.reshape(-1), k_hi.reshape(-1), xp)  # [B, nk]
        q_min, q_max = q_min[:, :, None], q_max[:, :, None]
        k_min, k_max = k_min[:, None, :], k_max[:, None, :]
        any_ = (q_min <= k_max) & (k_min <= q_max)
        all_ = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return any_, all_


def _block_range(ids, lo, hi, xp):
    """Min and max id over positions ``lo[i]..hi[i]`` (inclusive) of every row: ``[B, n]``."""
    size = ids.shape[-1]
    pos = np.arange(size)
    inside = (pos[None, :] >= np.asarray(lo)[:, None]) & (pos[None, :] <= np.asarray(hi)[:, None])
    big = np.iinfo(np.int32).max
    ids = ids.astype(xp.int32)[:, None, :]  # [B, 1, L]
    lo_ids = xp.min(xp.where(inside[None], ids, big), axis=-1)
    hi_ids = xp.max(xp.where(inside[None], ids, -big), axis=-1)
    return lo_ids, hi_ids


class _Combined(MaskSpec):
    """``a & b`` or ``a | b`` of structured masks, with conservative block flags."""

    def tree_flatten(self):
        return list(self.parts), (self.op, self._batch)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        obj = object.__new__(cls)
        obj.op, obj._batch = aux
        obj.parts = tuple(leaves)
        return obj

    def __init__(self, op: str, parts):
        self.op = op
        flat = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, _Combined) and p.op == op else (p,))
        self.parts = tuple(flat)
        shapes = {p.batch_shape() for p in self.parts} - {()}
        if len(shapes) > 1:
            raise ValueError(f"combined masks have different batch shapes: {sorted(shapes)}")
        self._batch = shapes.pop() if shapes else ()

    def is_static(self):
        return all(p.is_static() for p in self.parts)

    def _reduce(self, xs):
        out = xs[0]
        for x in xs[1:]:
            out = (out & x) if self.op == "and" else (out | x)
        return out

    def materialize(self, q_len, kv_len):
        combine = _m.and_masks if self.op == "and" else _m.or_masks
        return combine(*(p.materialize(q_len, kv_len) for p in self.parts))

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        return self._reduce([p.allowed(q_idx, k_idx, b, q_len, kv_len) for p in self.parts])

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        flags = [p.block_flags(q_lo, q_hi, k_lo, k_hi, q_len, kv_len) for p in self.parts]
        anys, alls = [f[0] for f in flags], [f[1] for f in flags]
        # AND: all is exact, any is an upper bound; OR: any is exact, all is a lower bound.
        return self._reduce(anys), self._reduce(alls)

    def __repr__(self):
        return f" {self.op} ".join(repr(p) for p in self.parts).join("()")
