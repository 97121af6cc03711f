"""Attention masks: each rule written once, as a predicate on query and key positions.

A mask says which keys each query may attend to (True = may attend). Each class here is one
rule:

==========================================  ===============================================
``CausalMask(offset=None)``                  key ``s <= p`` (``p`` the query's position)
``SlidingWindowMask(window, offset=None)``   ``p - left <= s <= p + right``
``PrefixLMMask(prefix_len, offset=None)``    ``s < prefix_len`` or ``s <= p``
``PaddingMask(q_lengths=, kv_lengths=)``     ``t < q_lengths[b]`` and ``s < kv_lengths[b]``
``PaddingMask.from_tokens(q_tokens=, ...)``  neither the query's nor the key's token is pad
``SegmentMask(q_segment_ids, kv_ids=None)``  ``q_ids[b, t] == kv_ids[b, s]``
``a & b``, ``a | b``                         both allow, either allows
==========================================  ===============================================

:meth:`MaskSpec.allowed` is that predicate, evaluated on arrays of positions; everything else
derives from it:

- ``mask.materialize(T, S)`` is the predicate over every (query, key) pair: the bool array,
  ``[T, S]``, or ``[*batch, 1, T|1, S|1]`` when the mask holds per-sequence values;
- :func:`jaxattn.dot_product_attention` takes a mask as ``mask=`` on every path: the dense
  path materialises it, the blockwise path evaluates the predicate one block at a time and
  classifies each (query block, key block) pair as empty, partial or full with
  :meth:`MaskSpec.block_flags`, the only other place a rule is written, so empty blocks are
  skipped and full ones skip the masking. A plain bool array stays accepted as ``mask=``.

Positions: query ``t`` sits at ``p = t + offset``, with ``offset = S - T`` by default
(bottom-right alignment: the last T tokens of a sequence of S, which is where a KV cache puts
them); ``offset=0`` aligns top-left. Per-sequence values (offsets, lengths, prefix lengths,
``[..., L]`` ids or tokens) may be traced arrays; their leading dims are the batch dims and
must equal the query's (``[B1, B2]`` lengths for a ``[B1, B2, T, N, H]`` query). Python ints
and windows are static. A mask is a pytree (arrays are its leaves), so it passes through
``jax.jit`` like an array. A mask whose values are all static is built with NumPy at trace
time and enters the graph as a constant, which XLA folds into the select.

Block classification is exact for each basic mask and conservative for combinations: a
block is called empty only if no pair in it may attend, full only if every pair may.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CausalMask",
    "MaskSpec",
    "PaddingMask",
    "PrefixLMMask",
    "SegmentMask",
    "SlidingWindowMask",
]

# A mask with only static values is built with NumPy (a compile-time constant) up to this
# many elements; an in-graph iota comparison was measured to cost half of a whole attention
# call at T = S = 10 on CPU. Larger masks are computed in the graph (no big constant).
_CONSTANT_MAX_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Per-sequence values


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int (a static size), got {value!r}")
    return int(value)


def _per_sequence(name: str, x, ndim: int):
    """A per-sequence value as (value, batch shape): ints pass through, arrays must be integer
    with ``ndim`` trailing dims beyond the batch dims."""
    if x is None or (isinstance(x, (int, np.integer)) and not isinstance(x, bool)):
        return x, ()
    if isinstance(x, bool) or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an int or an int array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int array, got dtype {x.dtype}")
    if x.ndim < ndim:
        raise ValueError(f"{name} must have at least {ndim} dims, got shape {tuple(x.shape)}")
    return x, tuple(x.shape[: x.ndim - ndim])


def _is_array(x) -> bool:
    return x is not None and not isinstance(x, (int, np.integer))


def _static(*xs) -> bool:
    """True when every value is known at trace time (None, a Python int or a NumPy array)."""
    return all(x is None or isinstance(x, (int, np.integer, np.ndarray)) for x in xs)


def _flat(x, ndim: int):
    """``[*batch, ...]`` -> ``[B, ...]`` (ints and values without batch dims pass through)."""
    if not _is_array(x) or x.ndim == ndim:
        return x
    return x.reshape((-1, *x.shape[x.ndim - ndim :]))


def _at(x, b):
    """The value of sequence ``b`` of a flattened per-sequence value.

    ``b`` is None (no batch), a traced scalar (one sequence of the blockwise path) or a
    ``[B, 1, 1]`` index array (every sequence, when materialising)."""
    if not _is_array(x) or x.ndim == 0 or b is None:
        return x
    if isinstance(x, np.ndarray) and isinstance(b, np.ndarray):
        return x[b]
    return jnp.asarray(x)[b]  # a NumPy array cannot be indexed by a traced b


def _row(x, b, idx, size: int):
    """``x[b, idx]`` of flattened ``[B, L]`` (or ``[L]``) ids, positions clamped to ``L - 1``
    (the blockwise path asks for padded positions beyond the end; their value is unused)."""
    numpy = all(isinstance(a, np.ndarray) for a in (x, idx)) and not isinstance(b, jax.Array)
    xp = np if numpy else jnp
    x, idx = xp.asarray(x), xp.minimum(idx, size - 1)
    return x[idx] if x.ndim == 1 else x[b, idx]


def _col(x, xp):
    """A flattened ``[B]`` value as ``[B, 1, 1]``, to broadcast over ``[nq, nk]`` blocks."""
    if not _is_array(x) or x.ndim == 0:
        return x
    return xp.asarray(x).reshape((-1, 1, 1))


def _offset(offset, q_len: int, kv_len: int):
    return kv_len - q_len if offset is None else offset


# Static values decide what is compiled; a traced one cannot.
_STATIC = "a static argument: it decides what is compiled, so it cannot be a traced value"


def _what(value) -> str:
    """A value as an error message shows it: a traced value or an array by what it is (never
    its contents), anything else by its repr."""
    if isinstance(value, jax.core.Tracer):
        return "a traced value (an argument of an enclosing jax.jit, vmap or grad)"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {list(value.shape)} and dtype {value.dtype}"
    return repr(value)


def _window_pair(window, name: str = "window") -> tuple[int, int]:
    """``w`` (meaning ``(w, w)``) or ``(left, right)``, ints in [0, 2**31) (Python or NumPy
    ints, the pair a tuple or a list), as a pair of Python ints; else a ValueError naming
    ``name``. :class:`SlidingWindowMask` and ``dot_product_attention(local_window_size=...)``
    both parse their window here."""
    pair = tuple(window) if isinstance(window, Sequence) and len(window) == 2 else (window, window)
    if not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in pair):
        raise ValueError(
            f"{name} must be an int or a (left, right) pair of ints >= 0 ({_STATIC}), "
            f"got {_what(window)}"
        )
    # The graph computes positions and windows in int32.
    if min(pair) < 0 or max(pair) >= 2**31:
        raise ValueError(f"{name} must be in [0, 2**31), got {window!r}")
    return int(pair[0]), int(pair[1])


def _joint_batch(name_a: str, a: tuple, name_b: str, b: tuple) -> tuple:
    """The batch shape of two per-sequence values: equal, or one of them has none."""
    if a and b and a != b:
        raise ValueError(f"{name_a} has batch shape {a} but {name_b} has {b}")
    return a or b


def _batch_of(stored: tuple, fields, cls) -> tuple:
    """The batch shape of a mask rebuilt from its pytree leaves: that of the arrays it now
    holds, when each is an array (inside ``jax.shard_map`` a per-sequence array holds the
    device's sequences only; inside ``jax.vmap``, one sequence's values), else ``stored``
    (JAX rebuilds trees with placeholders too)."""
    shapes = []
    for name, value in fields:
        if not hasattr(value, "shape") or not hasattr(value, "ndim"):
            return stored
        trailing = 1 if name in cls._per_position else 0
        shapes.append(tuple(value.shape[: max(value.ndim - trailing, 0)]))
    shapes = set(shapes) - {()}
    if len(shapes) > 1:
        return stored
    return shapes.pop() if shapes else ()


# --------------------------------------------------------------------------------------------
# The base class


class MaskSpec:
    """A mask given by its rule. Combine with ``&`` (both allow) and ``|`` (either allows).

    Subclasses write the rule twice: :meth:`allowed` (per pair) and :meth:`block_flags`
    (per block, for the blockwise path). Everything else is derived here.
    """

    _fields: tuple[str, ...] = ()  # per-sequence values: leaves when arrays, static when ints
    _static_fields: tuple[str, ...] = ("_batch",)
    _per_position: tuple[str, ...] = ()  # fields with a trailing position axis ([..., L])
    __array_ufunc__ = None  # `np_array & mask` defers to __rand__ (the one-line error)

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
        obj._batch = _batch_of(obj._batch, [(f, getattr(obj, f)) for f in dynamic], cls)
        return obj

    def allowed(self, q_idx, k_idx, b, q_len: int, kv_len: int):
        """The rule: may query index ``q_idx`` attend key index ``k_idx`` in sequence ``b``?

        ``q_idx`` ``[..., Tq, 1]`` and ``k_idx`` ``[..., 1, Sk]`` are int arrays of equal rank
        (NumPy or jnp); ``b`` indexes the flattened batch of the per-sequence values (None,
        a traced scalar, or a ``[B, 1, 1]`` array of the same rank as the indices);
        ``q_len``, ``kv_len`` are T and S (for the default offset). Returns a bool array
        broadcastable to the indices' broadcast shape.
        """
        raise NotImplementedError

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len: int, kv_len: int):
        """``(any, all)`` over the blocks whose query indices are ``q_lo..q_hi`` (inclusive;
        ``[1, nq, 1]``) and key indices ``k_lo..k_hi`` (``[1, 1, nk]``): rank-3 bool arrays
        broadcastable to ``[B, nq, nk]``, NumPy when every value is static, else traced."""
        raise NotImplementedError

    def key_valid(self, kv_len: int):
        """bool ``[*batch, S]``: False at keys that are padding for every query (a length or
        a pad token says so), or None when the mask has no key padding. Attention zeroes the
        values there, so a NaN in an unwritten cache slot or a pad position never leaks."""
        return None

    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch shape of the per-sequence values, ``()`` when there are none."""
        return self._batch

    def is_rule(self) -> bool:
        """True for a single rule, False for a combination of rules (``a & b``, ``a | b``)."""
        return True

    def is_static(self) -> bool:
        """True when every value is known at trace time (the mask is then a constant)."""
        return _static(*(getattr(self, f) for f in self._fields))

    def materialize(self, q_len: int, kv_len: int):
        """The bool mask over every (query, key) pair.

        Returns ``[T, S]`` when the mask has no per-sequence values, else
        ``[*batch, 1, T|1, S|1]`` (a dim is 1 where the rule does not depend on it, e.g. key
        lengths only), broadcastable to ``dot_product_attention``'s ``[..., N, T, S]``.
        """
        q_len, kv_len = _check_size("q_len", q_len), _check_size("kv_len", kv_len)
        n = math.prod(self._batch)
        small = n * q_len * kv_len <= _CONSTANT_MAX_ELEMENTS
        xp = np if self.is_static() and small else jnp
        # Every index has rank 3 (b, t, s): one rank throughout, no implicit rank promotion.
        q_idx = xp.arange(q_len, dtype=np.int32).reshape(1, q_len, 1)
        k_idx = xp.arange(kv_len, dtype=np.int32).reshape(1, 1, kv_len)
        b = xp.arange(n, dtype=np.int32).reshape(n, 1, 1) if self._batch else None
        mask = self.allowed(q_idx, k_idx, b, q_len, kv_len)
        mask = xp.asarray(mask).reshape((1,) * (3 - np.ndim(mask)) + np.shape(mask))
        if not self._batch:
            return jnp.asarray(xp.broadcast_to(mask[0], (q_len, kv_len)))
        mask = xp.broadcast_to(mask, (n, *mask.shape[1:]))
        return jnp.asarray(mask.reshape((*self._batch, 1, *mask.shape[1:])))

    def __and__(self, other):
        return _Combined("and", (self, _check_spec(other)))

    def __or__(self, other):
        return _Combined("or", (self, _check_spec(other)))

    def __rand__(self, other):
        return _check_spec(other) & self

    def __ror__(self, other):
        return _check_spec(other) | self

    def _arguments(self) -> dict:
        """The constructor's arguments, for ``repr``."""
        names = [f for f in (*self._fields, *self._static_fields) if not f.startswith("_")]
        return {f: getattr(self, f) for f in names}

    def __repr__(self):
        def show(value):
            if hasattr(value, "dtype") and hasattr(value, "shape"):  # never the contents
                return f"<{value.dtype} {list(value.shape)}>"
            return repr(value)

        args = ", ".join(f"{k}={show(v)}" for k, v in self._arguments().items())
        return f"{type(self).__name__}({args})"


def _check_spec(x):
    if not isinstance(x, MaskSpec):
        raise ValueError(
            f"masks combine only with masks, got {type(x).__name__}; "
            "materialise the mask (mask.materialize(T, S)) to combine it with a bool array"
        )
    return x


# --------------------------------------------------------------------------------------------
# The rules


class CausalMask(MaskSpec):
    """Look-ahead mask: the query at position ``p = t + offset`` sees keys ``s <= p``.

    ``offset``: None (``S - T``, bottom-right: the last query sees every key), an int (0 is
    top-left), or an int array of per-sequence offsets (e.g. decode positions). With ``T > S``
    and the default offset, the first ``T - S`` query rows see no key (attention returns
    zeros there).
    """

    _fields = ("offset",)

    def __init__(self, *, offset=None):
        self.offset, self._batch = _per_sequence("offset", offset, 0)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        pos = q_idx + _at(_flat(_offset(self.offset, q_len, kv_len), 0), b)
        return k_idx <= pos

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        off = _col(_flat(_offset(self.offset, q_len, kv_len), 0), xp)
        return k_lo <= q_hi + off, k_hi <= q_lo + off


class SlidingWindowMask(MaskSpec):
    """Local attention: the query at position ``p`` sees keys ``p - left <= s <= p + right``.

    ``window``: ``(left, right)`` ints in [0, 2**31), or one int ``w`` meaning ``(w, w)`` (as
    ``jax.nn.dot_product_attention(local_window_size=...)``); causal local attention is
    ``(w, 0)``: each query sees itself and ``w`` keys before it. ``offset`` as in
    :class:`CausalMask`.
    """

    _fields = ("offset",)
    _static_fields = ("_batch", "left", "right")

    def __init__(self, window, *, offset=None):
        self.left, self.right = _window_pair(window)
        self.offset, self._batch = _per_sequence("offset", offset, 0)

    def _arguments(self):
        return {"window": (self.left, self.right), "offset": self.offset}

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        pos = q_idx + _at(_flat(_offset(self.offset, q_len, kv_len), 0), b)
        return (k_idx >= pos - self.left) & (k_idx <= pos + self.right)

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        off = _col(_flat(_offset(self.offset, q_len, kv_len), 0), xp)
        lo, hi = q_lo + off, q_hi + off
        any_ = (k_hi >= lo - self.left) & (k_lo <= hi + self.right)
        all_ = (k_lo >= hi - self.left) & (k_hi <= lo + self.right)
        return any_, all_


class PrefixLMMask(MaskSpec):
    """Prefix-LM: every query sees the keys ``s < prefix_len``; after them, attention is
    causal (``s <= p``). ``prefix_len`` an int or per-sequence int array (0: plain causal;
    ``>= S``: full attention); ``offset`` as in :class:`CausalMask`."""

    _fields = ("prefix_len", "offset")

    def __init__(self, prefix_len, *, offset=None):
        self.prefix_len, pb = _per_sequence("prefix_len", prefix_len, 0)
        self.offset, ob = _per_sequence("offset", offset, 0)
        self._batch = _joint_batch("prefix_len", pb, "offset", ob)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        pos = q_idx + _at(_flat(_offset(self.offset, q_len, kv_len), 0), b)
        return (k_idx < _at(_flat(self.prefix_len, 0), b)) | (k_idx <= pos)

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        xp = np if self.is_static() else jnp
        off = _col(_flat(_offset(self.offset, q_len, kv_len), 0), xp)
        prefix = _col(_flat(self.prefix_len, 0), xp)
        any_ = (k_lo < prefix) | (k_lo <= q_hi + off)
        # Every key of the block is either inside the prefix or at or before the first query.
        all_ = k_hi <= xp.maximum(prefix - 1, q_lo + off)
        return any_, all_


class PaddingMask(MaskSpec):
    """Padding by per-sequence lengths: the first ``length`` positions are real.

    Keys at ``s >= kv_lengths[b]`` are hidden; query rows at ``t >= q_lengths[b]`` are fully
    masked (attention returns zeros there). Give either or both; a length of 0 masks the
    whole sequence, lengths beyond the padded size mask nothing. For pads that may sit
    anywhere (left padding), use :meth:`PaddingMask.from_tokens`.
    """

    _fields = ("q_lengths", "kv_lengths")

    def __init__(self, *, q_lengths=None, kv_lengths=None):
        if q_lengths is None and kv_lengths is None:
            raise ValueError("PaddingMask needs q_lengths, kv_lengths or both; got neither")
        self.q_lengths, qb = _per_sequence("q_lengths", q_lengths, 0)
        self.kv_lengths, kb = _per_sequence("kv_lengths", kv_lengths, 0)
        self._batch = _joint_batch("q_lengths", qb, "kv_lengths", kb)

    @staticmethod
    def from_tokens(*, q_tokens=None, kv_tokens=None, pad_id: int = 0) -> MaskSpec:
        """Padding by token ids: positions holding ``pad_id`` are padding, wherever they sit.

        ``q_tokens`` ``[..., T]`` and/or ``kv_tokens`` ``[..., S]`` (int): a pad query's row
        is fully masked, a pad key is hidden from every query.
        """
        return _TokenPadding(q_tokens, kv_tokens, pad_id)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        ok = None
        if self.q_lengths is not None:
            ok = q_idx < _at(_flat(self.q_lengths, 0), b)
        if self.kv_lengths is not None:
            k_ok = k_idx < _at(_flat(self.kv_lengths, 0), b)
            ok = k_ok if ok is None else ok & k_ok
        return ok

    def key_valid(self, kv_len):
        if self.kv_lengths is None:
            return None
        lengths = jnp.asarray(self.kv_lengths)[..., None]
        return jnp.arange(kv_len).reshape((1,) * (lengths.ndim - 1) + (kv_len,)) < lengths

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


def _check_length(name: str, ids, size: int):
    if ids is not None and ids.shape[-1] != size:
        raise ValueError(f"{name} has length {ids.shape[-1]} but the attention has {size}")


class _TokenPadding(MaskSpec):
    """:meth:`PaddingMask.from_tokens`: a query or key whose token is ``pad_id`` is padding."""

    _fields = ("q_tokens", "kv_tokens")
    _static_fields = ("_batch", "pad_id")
    _per_position = ("q_tokens", "kv_tokens")

    def __init__(self, q_tokens, kv_tokens, pad_id):
        if q_tokens is None and kv_tokens is None:
            raise ValueError("PaddingMask.from_tokens needs q_tokens, kv_tokens or both")
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
            raise ValueError(f"pad_id must be an int, got {pad_id!r}")
        for name, x in (("q_tokens", q_tokens), ("kv_tokens", kv_tokens)):
            if x is not None and not hasattr(x, "dtype"):
                raise ValueError(f"{name} must be an int array [..., L], got {type(x).__name__}")
        self.q_tokens, qb = _per_sequence("q_tokens", q_tokens, 1)
        self.kv_tokens, kb = _per_sequence("kv_tokens", kv_tokens, 1)
        self._batch = _joint_batch("q_tokens", qb, "kv_tokens", kb)
        self.pad_id = int(pad_id)

    def __repr__(self):
        return super().__repr__().replace("_TokenPadding(", "PaddingMask.from_tokens(", 1)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        _check_length("q_tokens", self.q_tokens, q_len)
        _check_length("kv_tokens", self.kv_tokens, kv_len)
        ok = None
        if self.q_tokens is not None:
            ok = _row(_flat(self.q_tokens, 1), b, q_idx, q_len) != self.pad_id
        if self.kv_tokens is not None:
            k_ok = _row(_flat(self.kv_tokens, 1), b, k_idx, kv_len) != self.pad_id
            ok = k_ok if ok is None else ok & k_ok
        return ok

    def key_valid(self, kv_len):
        if self.kv_tokens is None:
            return None
        _check_length("kv_tokens", self.kv_tokens, kv_len)
        return jnp.asarray(self.kv_tokens) != self.pad_id

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        _check_length("q_tokens", self.q_tokens, q_len)
        _check_length("kv_tokens", self.kv_tokens, kv_len)
        xp = np if self.is_static() else jnp
        any_, all_ = xp.ones((1, 1, 1), bool), xp.ones((1, 1, 1), bool)
        for tokens, lo, hi, size, axis in (
            (self.q_tokens, q_lo, q_hi, q_len, 2),
            (self.kv_tokens, k_lo, k_hi, kv_len, 1),
        ):
            if tokens is None:
                continue
            real = (xp.asarray(_flat(tokens, 1)).reshape((-1, size)) != self.pad_id).astype(
                np.int32
            )
            fewest, most = _block_range(real, lo.reshape(-1), hi.reshape(-1), xp)  # [B, n]
            any_ = any_ & xp.expand_dims(most == 1, axis)
            all_ = all_ & xp.expand_dims(fewest == 1, axis)
        return any_, all_


class SegmentMask(MaskSpec):
    """Packed sequences: attend only where the segment ids are equal.

    ``q_segment_ids`` ``[..., T]`` and ``kv_segment_ids`` ``[..., S]`` (int; the keys default
    to the queries' ids, for self-attention). Ids are plain labels: to hide padding, give it
    an id no real query has, or add a :class:`PaddingMask`.

    Blocks are classified from the range of ids in each block: empty when the query and key
    ranges do not overlap, full when both hold one and the same id. This is exact when
    queries and keys share one sorted id sequence (self-attention over packed sequences);
    otherwise it is correct but may visit blocks that turn out empty.
    """

    _fields = ("q_ids", "kv_ids")
    _per_position = ("q_ids", "kv_ids")

    def __init__(self, q_segment_ids, kv_segment_ids=None):
        self.q_ids, qb = _per_sequence("q_segment_ids", q_segment_ids, 1)
        kv = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        self.kv_ids, kb = _per_sequence("kv_segment_ids", kv, 1)
        for name, ids in (("q_segment_ids", self.q_ids), ("kv_segment_ids", self.kv_ids)):
            if not _is_array(ids):
                raise ValueError(f"{name} must be an int array [..., L], got an int")
        if qb != kb:
            raise ValueError(f"q_segment_ids has batch shape {qb} but kv_segment_ids has {kb}")
        self._batch = qb

    def _arguments(self):
        return {"q_segment_ids": self.q_ids, "kv_segment_ids": self.kv_ids}

    def _check_lengths(self, q_len, kv_len):
        _check_length("q_segment_ids", self.q_ids, q_len)
        _check_length("kv_segment_ids", self.kv_ids, kv_len)

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        self._check_lengths(q_len, kv_len)
        q = _row(_flat(self.q_ids, 1), b, q_idx, q_len)
        return q == _row(_flat(self.kv_ids, 1), b, k_idx, kv_len)

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


def _block_range(values, lo, hi, xp):
    """Min and max over positions ``lo[i]..hi[i]`` (inclusive) of each row of int ``[B, L]``
    values: two ``[B, n]`` arrays."""
    size = values.shape[-1]
    pos = np.arange(size)
    inside = (pos[None, :] >= np.asarray(lo)[:, None]) & (pos[None, :] <= np.asarray(hi)[:, None])
    big = np.iinfo(np.int32).max
    values = values.astype(xp.int32)[:, None, :]  # [B, 1, L]
    lowest = xp.min(xp.where(inside[None], values, big), axis=-1)
    highest = xp.max(xp.where(inside[None], values, -big), axis=-1)
    return lowest, highest


class _Combined(MaskSpec):
    """``a & b`` or ``a | b``, with conservative block flags."""

    def tree_flatten(self):
        return list(self.parts), (self.op, self._batch)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        obj = object.__new__(cls)
        obj.op, obj._batch = aux
        obj.parts = tuple(leaves)
        if all(isinstance(p, MaskSpec) for p in obj.parts):  # the parts' own, rebuilt first
            shapes = {p.batch_shape() for p in obj.parts} - {()}
            if len(shapes) <= 1:
                obj._batch = shapes.pop() if shapes else ()
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

    def is_rule(self) -> bool:
        return False

    def _reduce(self, xs):
        out = xs[0]
        for x in xs[1:]:
            out = (out & x) if self.op == "and" else (out | x)
        return out

    def allowed(self, q_idx, k_idx, b, q_len, kv_len):
        return self._reduce([p.allowed(q_idx, k_idx, b, q_len, kv_len) for p in self.parts])

    def key_valid(self, kv_len):
        valid = [p.key_valid(kv_len) for p in self.parts]
        known = [v for v in valid if v is not None]
        if not known or (self.op == "or" and len(known) < len(valid)):
            return None  # "or" with a part that pads nothing: every key may be read
        out = known[0]
        for v in known[1:]:
            shape = jnp.broadcast_shapes(out.shape, v.shape)
            out = self._reduce([jnp.broadcast_to(out, shape), jnp.broadcast_to(v, shape)])
        return out

    def block_flags(self, q_lo, q_hi, k_lo, k_hi, q_len, kv_len):
        flags = [p.block_flags(q_lo, q_hi, k_lo, k_hi, q_len, kv_len) for p in self.parts]
        anys, alls = [f[0] for f in flags], [f[1] for f in flags]
        # AND: all is exact, any is an upper bound; OR: any is exact, all is a lower bound.
        return self._reduce(anys), self._reduce(alls)

    def __repr__(self):
        return f" {'&' if self.op == 'and' else '|'} ".join(repr(p) for p in self.parts).join("()")
