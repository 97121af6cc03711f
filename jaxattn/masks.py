"""Attention masks: pure builders and combinators.

Every mask here is a bool array, True = the query may attend to the key. Shapes broadcast
(numpy rules, aligned on the right) to ``[B, N, T, S]``:

- masks that depend only on positions are ``[T, S]``;
- masks that depend on per-sequence data (lengths, token ids, segment ids, a per-sequence
  offset) are ``[B, 1, T, S]``, or ``[B, 1, T, 1]`` / ``[B, 1, 1, S]`` when only queries or
  only keys are involved.

Positions with T != S are aligned bottom-right: query ``t`` sits at absolute position
``t + offset`` with ``offset = S - T`` by default, which is where the last T tokens of a
sequence of S tokens sit when a KV cache holds the first S - T of them. Pass ``offset=0`` for
top-left alignment.

Sizes (``q_len``, ``kv_len``, ``window``) are static Python ints; offsets, lengths, ids and
prefix lengths may be traced arrays, so every builder works inside ``jax.jit`` and
``jax.vmap``. The builders are plain functions, not jitted themselves: they are meant to be
called inside the caller's jitted step, where a mask with static sizes and offset becomes a
compile-time constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "and_masks",
    "causal_mask",
    "or_masks",
    "padding_mask",
    "padding_mask_from_tokens",
    "prefix_lm_mask",
    "segment_mask",
    "sliding_window_mask",
]


def _check_len(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (a static size), got {value!r}")
    return value


# Masks up to this many elements whose offset is a Python int are built with NumPy at trace
# time and enter the graph as constants: XLA then folds them into the select, where an
# in-graph iota comparison was measured to cost half the time of a whole attention call at
# T = S = 10 on CPU. Larger masks are computed in the graph so no big constant is embedded.
_CONSTANT_MASK_MAX_ELEMENTS = 1 << 22


def _positions(q_len: int, kv_len: int, offset):
    """Absolute query positions ``[..., T, 1]`` and key positions ``[T?, S]`` as int32.

    ``offset`` is a scalar or a ``[B]`` array; a ``[B]`` offset yields ``[B, 1, T, 1]``.
    """
    if offset is None:
        offset = kv_len - q_len
    if isinstance(offset, int) and q_len * kv_len <= _CONSTANT_MASK_MAX_ELEMENTS:
        q_pos = np.arange(q_len, dtype=np.int32)[:, None] + np.int32(offset)
        return q_pos, np.arange(kv_len, dtype=np.int32)[None, :]
    offset = jnp.asarray(offset, dtype=jnp.int32)
    if offset.ndim > 1:
        raise ValueError(f"offset must be a scalar or a [B] array, got shape {offset.shape}")
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None]  # [T, 1]
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]  # [1, S]
    if offset.ndim == 1:
        q_pos = q_pos[None, None] + offset[:, None, None, None]  # [B, 1, T, 1]
        k_pos = k_pos[None, None]  # [1, 1, 1, S]
    else:
        q_pos = q_pos + offset
    return q_pos, k_pos


def causal_mask(q_len: int, kv_len: int | None = None, *, offset=None) -> jax.Array:
    """Look-ahead mask: query ``t`` sees keys ``s <= t + offset``.

    Args:
      q_len: T, number of queries (static int).
      kv_len: S, number of keys (static int); defaults to ``q_len``.
      offset: absolute position of query 0; defaults to ``S - T`` (bottom-right alignment,
        the one a KV cache needs: the last query sees every key). A scalar or a ``[B]``
        array (one offset per sequence, e.g. per-sequence decode positions).

    Returns:
      bool ``[T, S]``, or ``[B, 1, T, S]`` for a ``[B]`` offset. With ``T > S`` and the
      default offset, the first ``T - S`` query rows see no key at all (fully masked rows;
      attention returns zeros there).
    """
    q_len = _check_len("q_len", q_len)
    kv_len = q_len if kv_len is None else _check_len("kv_len", kv_len)
    q_pos, k_pos = _positions(q_len, kv_len, offset)
    return jnp.asarray(k_pos <= q_pos)


def _window_pair(window) -> tuple[int, int]:
    if isinstance(window, int) and not isinstance(window, bool):
        left = right = window
    elif (
        isinstance(window, Sequence)
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        left, right = window
    else:
        raise ValueError(f"window must be an int or a (left, right) pair of ints, got {window!r}")
    if left < 0 or right < 0:
        raise ValueError(f"window sizes must be >= 0, got {window!r}")
    return left, right


def sliding_window_mask(q_len: int, kv_len: int, window, *, offset=None) -> jax.Array:
    """Local attention: query at position ``p`` sees keys ``p - left <= s <= p + right``.

    Args:
      q_len: T (static int).
      kv_len: S (static int).
      window: ``(left, right)`` ints >= 0, or one int ``w`` meaning ``(w, w)`` (the same
        convention as ``jax.nn.dot_product_attention(local_window_size=...)``). For causal
        local attention pass ``(w, 0)``: each query sees itself and ``w`` keys before it.
      offset: absolute position of query 0, default ``S - T`` (bottom-right, as in
        :func:`causal_mask`); a scalar or a ``[B]`` array.

    Returns:
      bool ``[T, S]``, or ``[B, 1, T, S]`` for a ``[B]`` offset.
    """
    q_len = _check_len("q_len", q_len)
    kv_len = _check_len("kv_len", kv_len)
    left, right = _window_pair(window)
    q_pos, k_pos = _positions(q_len, kv_len, offset)
    return jnp.asarray((k_pos >= q_pos - left) & (k_pos <= q_pos + right))


def prefix_lm_mask(q_len: int, kv_len: int | None = None, *, prefix_len, offset=None) -> jax.Array:
    """Prefix-LM mask: every query sees the whole prefix; after it, attention is causal.

    Key ``s`` is visible to the query at position ``p`` when ``s < prefix_len`` or
    ``s <= p``.

    Args:
      q_len: T (static int).
      kv_len: S (static int); defaults to ``q_len``.
      prefix_len: length of the bidirectional prefix, an int or a ``[B]`` array (one per
        sequence). 0 gives a plain causal mask; ``>= S`` gives full attention.
      offset: absolute position of query 0, default ``S - T`` (bottom-right).

    Returns:
      bool ``[T, S]`` for scalar ``prefix_len`` and ``offset``, else ``[B, 1, T, S]``.
    """
    q_len = _check_len("q_len", q_len)
    kv_len = q_len if kv_len is None else _check_len("kv_len", kv_len)
    prefix_len = jnp.asarray(prefix_len, dtype=jnp.int32)
    if prefix_len.ndim > 1:
        raise ValueError(f"prefix_len must be an int or a [B] array, got shape {prefix_len.shape}")
    q_pos, k_pos = _positions(q_len, kv_len, offset)
    causal = jnp.asarray(k_pos <= q_pos)
    if prefix_len.ndim == 1:
        in_prefix = jnp.arange(kv_len, dtype=jnp.int32)[None, :] < prefix_len[:, None]  # [B, S]
        in_prefix = in_prefix[:, None, None, :]  # [B, 1, 1, S]
        if causal.ndim == 2:
            causal = causal[None, None]
        return in_prefix | causal
    return (k_pos < prefix_len) | causal


def _lengths_valid(name: str, lengths, size_name: str, size) -> jax.Array:
    """``[B, L]`` bool: position < length."""
    if size is None:
        raise ValueError(f"{name} needs {size_name} (the padded length), got {size_name}=None")
    size = _check_len(size_name, size)
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an int array of shape [B], got {lengths.dtype} {lengths.shape}"
        )
    return jnp.arange(size, dtype=jnp.int32)[None, :] < lengths[:, None].astype(jnp.int32)


def _outer(q_valid, kv_valid) -> jax.Array:
    """``[B, 1, T|1, S|1]`` from per-position validity ``[B, T]`` and/or ``[B, S]``."""
    if q_valid is not None and kv_valid is not None:
        if q_valid.shape[0] != kv_valid.shape[0]:
            raise ValueError(
                f"query and key batch sizes differ: {q_valid.shape[0]} vs {kv_valid.shape[0]}"
            )
        return q_valid[:, None, :, None] & kv_valid[:, None, None, :]
    if q_valid is not None:
        return q_valid[:, None, :, None]
    return kv_valid[:, None, None, :]


def padding_mask(
    *, q_lengths=None, kv_lengths=None, q_len: int | None = None, kv_len: int | None = None
) -> jax.Array:
    """Padding mask from per-sequence lengths (the first ``length`` positions are real).

    Give key lengths, query lengths or both:

    - keys only (``kv_lengths [B]``, ``kv_len``): ``[B, 1, 1, S]``, padded keys are hidden;
    - queries only (``q_lengths [B]``, ``q_len``): ``[B, 1, T, 1]``, padded query rows are
      fully masked (attention returns zeros there);
    - both: ``[B, 1, T, S]``.

    A length of 0 masks the whole sequence; lengths above the padded size are clipped.
    """
    if q_lengths is None and kv_lengths is None:
        raise ValueError("padding_mask needs q_lengths, kv_lengths or both; got neither")
    q_valid = None if q_lengths is None else _lengths_valid("q_lengths", q_lengths, "q_len", q_len)
    kv_valid = (
        None if kv_lengths is None else _lengths_valid("kv_lengths", kv_lengths, "kv_len", kv_len)
    )
    return _outer(q_valid, kv_valid)


def _tokens_valid(name: str, tokens, pad_id) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an int array of shape [B, L], got {tokens.dtype} {tokens.shape}"
        )
    return tokens != pad_id


def padding_mask_from_tokens(*, q_tokens=None, kv_tokens=None, pad_id=0) -> jax.Array:
    """Padding mask from token ids: positions holding ``pad_id`` are padding.

    ``q_tokens [B, T]`` and/or ``kv_tokens [B, S]`` (int). Shapes as in
    :func:`padding_mask`: ``[B, 1, 1, S]``, ``[B, 1, T, 1]`` or ``[B, 1, T, S]``. Unlike
    lengths, pads may sit anywhere (left padding works).
    """
    if q_tokens is None and kv_tokens is None:
        raise ValueError("padding_mask_from_tokens needs q_tokens, kv_tokens or both; got neither")
    q_valid = None if q_tokens is None else _tokens_valid("q_tokens", q_tokens, pad_id)
    kv_valid = None if kv_tokens is None else _tokens_valid("kv_tokens", kv_tokens, pad_id)
    return _outer(q_valid, kv_valid)


def segment_mask(q_segment_ids, kv_segment_ids=None) -> jax.Array:
    """Block-diagonal mask for packed sequences: attend only within the same segment.

    Args:
      q_segment_ids: int ``[B, T]``.
      kv_segment_ids: int ``[B, S]``; defaults to ``q_segment_ids`` (self attention).

    Returns:
      bool ``[B, 1, T, S]``, True where the ids are equal. Ids are plain labels: to hide
      padding, give it an id of its own and add :func:`padding_mask`, or rely on no real
      query sharing its id.
    """
    q_ids = jnp.asarray(q_segment_ids)
    kv_ids = q_ids if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
    for name, ids in (("q_segment_ids", q_ids), ("kv_segment_ids", kv_ids)):
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an int array of shape [B, L], got {ids.dtype} {ids.shape}"
            )
    if q_ids.shape[0] != kv_ids.shape[0]:
        raise ValueError(
            f"q_segment_ids has batch {q_ids.shape[0]} but kv_segment_ids has {kv_ids.shape[0]}"
        )
    return q_ids[:, None, :, None] == kv_ids[:, None, None, :]


def _combine(op_name: str, op, masks) -> jax.Array:
    if not masks:
        raise ValueError(f"{op_name} needs at least one mask")
    arrays = [jnp.asarray(m) for m in masks]
    for i, m in enumerate(arrays):
        if m.dtype != jnp.bool_:
            raise ValueError(f"{op_name}: mask {i} has dtype {m.dtype}; masks must be bool")
    try:
        shape = jnp.broadcast_shapes(*(m.shape for m in arrays))
    except ValueError:
        shapes = ", ".join(str(m.shape) for m in arrays)
        raise ValueError(f"{op_name}: mask shapes do not broadcast together: {shapes}") from None
    # Broadcast explicitly: implicit rank promotion is an error in our test settings.
    out = jnp.broadcast_to(arrays[0], shape)
    for m in arrays[1:]:
        out = op(out, jnp.broadcast_to(m, shape))
    return out


def and_masks(*masks) -> jax.Array:
    """Logical AND of bool masks (a key is visible only if every mask allows it).

    Shapes broadcast to their common shape, e.g. ``[T, S]`` and ``[B, 1, 1, S]`` give
    ``[B, 1, T, S]``.
    """
    return _combine("and_masks", jnp.logical_and, masks)


def or_masks(*masks) -> jax.Array:
    """Logical OR of bool masks (a key is visible if any mask allows it). Shapes broadcast."""
    return _combine("or_masks", jnp.logical_or, masks)
