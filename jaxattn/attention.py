"""Scaled dot-product attention: every input checked once, at the public entry, then one
jitted core that computes one of the paths.

The paths are private modules: ``"xla"`` (:mod:`jaxattn._xla`, one fused dense pass),
``"flash"`` (:mod:`jaxattn._flash`, blockwise) and ``"cudnn"`` (``jax.nn``'s GPU kernel).
Each computes what :mod:`jaxattn.reference` writes as a formula, and is tested against it.

Axis letters (used in every einsum and docstring of the package):
  B batch (any number of leading dims, written ``...``), T queries, S keys/values,
  N query heads, K key/value heads, G = N // K query heads per key head, H head dim,
  Hv value head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _dropout as dropout
from jaxattn import _flash as flash
from jaxattn._numerics import acc_dtype
from jaxattn._xla import xla_attention
from jaxattn.masks import (
    _STATIC,
    CausalMask,
    MaskSpec,
    PaddingMask,
    SlidingWindowMask,
    _what,
    _window_pair,
)

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]

IMPLEMENTATIONS = (None, "xla", "flash", "cudnn")

# implementation=None takes the blockwise path from this many (query, key) pairs per head.
# Measured on a 2-core CPU (float32, N = 8, H = 64): at T = S = 64 the two paths tie, at 128
# flash is 2x faster forward and 1.3x forward+backward; below 64 the xla path's
# single fused pass wins (2-3x at T = 10, where the flash loop overhead dominates).
FLASH_MIN_PAIRS = 128 * 128


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call, checked: its static arguments normalised, and what its arrays' shapes decide.

    The jitted core takes it whole, as its one static argument (hashable and compared by value:
    ``jax.jit`` keys its cache on it), and checks none of it. :func:`_check` builds it, at the
    public entry, from static arguments already checked one by one there (before ``jax.jit``
    sees them: its own error on a traced static argument names none); ``__post_init__`` checks
    them against each other. ``path`` and ``dims`` are derived from the arrays.
    """

    is_causal: bool
    return_residual: bool
    return_weights: bool
    implementation: str | None  # as asked, one of IMPLEMENTATIONS
    block_sizes: tuple[int, int] | None
    dropout_rate: float
    local_window_size: tuple[int, int] | None  # (left, right)
    logits_soft_cap: float | None
    path: str | None = None  # the path that runs: "xla", "flash" or "cudnn"
    dims: tuple | None = None  # (batch, T, S, N, K, G, H, Hv)

    def __post_init__(self):
        if self.implementation == "xla" and self.block_sizes is not None:
            raise ValueError("block_sizes are the flash path's; implementation='xla' has no blocks")
        if self.return_weights and self.implementation not in (None, "xla"):
            raise ValueError(
                f"return_weights=True needs implementation='xla' (or None), got "
                f"{self.implementation!r}: the other paths never build the [..., N, T, S] weights"
            )


# --------------------------------------------------------------------------------------------
# Static arguments, one by one


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a Python bool ({_STATIC}), got {_what(value)}")
    return bool(value)


def _check_implementation(implementation):
    if not isinstance(implementation, (str, type(None))) or implementation not in IMPLEMENTATIONS:
        hint = ""
        if implementation == "reference":  # the dense path's name before it took jax.nn's
            hint = " (the dense path is now named 'xla', as in jax.nn)"
        shown = repr(implementation) if isinstance(implementation, str) else _what(implementation)
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {shown}{hint}")
    return implementation


def _check_blocks(block_sizes):
    if block_sizes is None:
        return None
    traced = (
        [b for b in block_sizes if isinstance(b, jax.core.Tracer)]
        if isinstance(block_sizes, tuple)
        else []
    )
    if traced:
        raise ValueError(f"block_sizes must be a tuple of ints ({_STATIC}), got {_what(traced[0])}")
    ok = (
        isinstance(block_sizes, tuple)
        and len(block_sizes) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_sizes)
    )
    if not ok:
        raise ValueError(
            f"block_sizes must be a (block_q, block_k) tuple of positive ints, got {block_sizes!r}"
        )
    return block_sizes


def _check_rate(rate) -> float:
    if isinstance(rate, jax.core.Tracer):
        raise ValueError(f"dropout_rate must be a float in [0, 1) ({_STATIC}), got {_what(rate)}")
    return dropout.check_rate(rate)


def _check_cap(cap):
    if cap is None:
        return None
    ok = isinstance(cap, (int, float, np.integer, np.floating)) and not isinstance(cap, bool)
    if not ok or not (math.isfinite(cap) and cap > 0):
        raise ValueError(
            f"logits_soft_cap must be None or a positive finite float ({_STATIC}), got {_what(cap)}"
        )
    return float(cap)


# --------------------------------------------------------------------------------------------
# Arrays, by their static shapes and dtypes


def _sig(x):
    """What the checks read of an array argument: ``(shape, dtype)`` (a Python scalar has the
    shape ``()`` and its type as dtype: ``jax.jit`` makes it a 0-d array), None, or the type of
    a value that is no array. Hashable, so :func:`_check` runs once per signature, as a trace
    does, and not per call."""
    if x is None:
        return None
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return shape, dtype
    return ((), type(x)) if isinstance(x, (bool, int, float, complex)) else type(x)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@functools.lru_cache(maxsize=4096)
def _check(x64, sigs, spec, keyed, **static) -> _Call:
    """Every check of a call that reads its arrays, and its record.

    ``static``: the static arguments, each already checked by itself and normalised (so that
    equal values mean equal calls); ``sigs``: the :func:`_sig` of query, key, value, bias, mask
    (a bool array's), query_seq_lengths, key_value_seq_lengths and scale; ``spec``, for a mask
    of :mod:`jaxattn.masks`, ``(its batch shape, whether it is CausalMask())``; ``keyed``,
    whether a dropout key was given; ``x64`` (``jax_enable_x64``) keys the cache on what
    decides the canonical dtypes (``jax.jit`` makes float64 inputs float32 without it). The
    backend, which decides the path too, is fixed in a process.
    """
    call = _Call(**static)
    query, key, value, bias, mask, q_lengths, kv_lengths, scale = (
        (x[0], jax.dtypes.canonicalize_dtype(x[1])) if isinstance(x, tuple) else x for x in sigs
    )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, tuple):
            raise ValueError(f"{name} must be an array, got {x.__name__}")
        shape, dtype = x
        if len(shape) < 3:
            raise ValueError(
                f"{name} must have shape [..., L, heads, head_dim] (rank >= 3), "
                f"got rank {len(shape)} shape {_fmt(shape)}"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {dtype}")
    (q_shape, dtype), (k_shape, k_dtype), (v_shape, v_dtype) = query, key, value
    if k_dtype != dtype or v_dtype != dtype:
        raise ValueError(
            f"query, key and value must share one dtype, got query {dtype}, "
            f"key {k_dtype}, value {v_dtype}"
        )
    batch = q_shape[:-3]
    *_, t, n, h = q_shape
    for name, shape in (("key", k_shape), ("value", v_shape)):
        if shape[:-3] != batch:
            raise ValueError(
                f"{name} has batch dims {_fmt(shape[:-3])} but query has {_fmt(batch)}; "
                f"they must be equal (shapes: query {_fmt(q_shape)}, {name} {_fmt(shape)})"
            )
    *_, s, k, kh = k_shape
    if kh != h:
        raise ValueError(
            f"key head dim is {kh} but query head dim is {h}; they must be equal "
            f"(query {_fmt(q_shape)}, key {_fmt(k_shape)})"
        )
    *_, vs, vk, hv = v_shape
    if vs != s:
        raise ValueError(
            f"value has {vs} positions but key has {s}; they must be equal "
            f"(key {_fmt(k_shape)}, value {_fmt(v_shape)})"
        )
    if vk != k:
        raise ValueError(
            f"value has {vk} heads but key has {k}; they must be equal "
            f"(key {_fmt(k_shape)}, value {_fmt(v_shape)})"
        )
    sizes = (("query", "T", t), ("key", "S", s), ("query", "N", n), ("key", "K", k))
    sizes += (("query", "H", h), ("value", "Hv", hv))
    sizes += tuple(("query", f"batch dim {i}", d) for i, d in enumerate(batch))
    for name, letter, size in sizes:
        if size == 0:
            shape = {"query": q_shape, "key": k_shape, "value": v_shape}[name]
            raise ValueError(
                f"{name} has a zero-size {letter} (shape {_fmt(shape)}); attention needs "
                "at least one position, head and feature"
            )
    if n % k != 0:
        raise ValueError(
            f"key has {k} heads but query has {n}; query heads must be a multiple of key heads"
        )
    target = (*batch, n, t, s)
    if spec is not None and spec[0] not in ((), batch):
        raise ValueError(
            f"mask has per-sequence values of batch shape {_fmt(spec[0])} but query has batch "
            f"dims {_fmt(batch)}; they must be equal (a mask keeps the batch shape it was "
            "built with: under jax.vmap, pass it as an argument or build it inside)"
        )
    if mask is not None:
        mask_dtype = mask[1] if isinstance(mask, tuple) else None
        if mask_dtype != jnp.bool_:
            raise ValueError(
                f"mask must be a bool array (True = may attend), got dtype {mask_dtype}; "
                "an additive float mask (0 / -inf) belongs in `bias`"
            )
        _check_broadcast("mask", mask[0], target)
    if bias is not None:
        bias_dtype = bias[1] if isinstance(bias, tuple) else None
        if bias_dtype is None or not jnp.issubdtype(bias_dtype, jnp.floating):
            hint = ""
            if bias_dtype == jnp.bool_:
                hint = " (a bool mask goes in mask=: the positional order is jax.nn's (bias, mask))"
            raise ValueError(f"bias must be a floating array, got dtype {bias_dtype}{hint}")
        _check_broadcast("bias", bias[0], target)
    for name, x in zip(_LENGTHS, (q_lengths, kv_lengths), strict=True):
        if x is not None:
            if not jnp.issubdtype(x[1], jnp.integer):
                raise ValueError(f"{name} must be an int array, got dtype {x[1]}")
            if x[0] not in (batch, ()):
                raise ValueError(
                    f"{name} must have the query's batch shape {_fmt(batch)} (or be one "
                    f"int for every sequence), got shape {_fmt(x[0])}"
                )
    if call.dropout_rate and not keyed:
        raise ValueError(
            f"dropout_rate={call.dropout_rate} needs a dropout_key (a PRNG key), got None"
        )
    cap = call.logits_soft_cap
    if cap is not None and cap >= float(jnp.finfo(acc_dtype(dtype)).max):
        raise ValueError(
            f"logits_soft_cap={cap} overflows {acc_dtype(dtype)}, the dtype the logits are "
            "computed in"
        )
    if isinstance(scale, tuple) and scale[0] != ():
        raise ValueError(f"scale must be a scalar, got shape {_fmt(scale[0])}")
    dims = (batch, t, s, n, k, n // k, h, hv)
    path = call.implementation
    if path in (None, "cudnn"):
        lengths = q_lengths is not None or kv_lengths is not None
        masks = sum((spec is not None, call.is_causal, call.local_window_size is not None, lengths))
        why = _cudnn_refusal(call, dtype, dims, mask, bias, spec, masks, scale is not None)
        if path == "cudnn" and why is not None:
            raise ValueError(f"implementation='cudnn' cannot serve this call: it {why}")
        # cuDNN's backward pass refused odd T and S: "Unsupported sequence length Q 21, KV
        # 21" at the first training step of tiny.yaml in bfloat16 (causal, no bias), on an
        # H200 with jax 0.11.2 (jax's own check names only the with-bias case). Its forward
        # takes them, but the dispatcher cannot know whether the call will be
        # differentiated, so odd lengths stay here. An explicit "cudnn" still goes.
        if why is None and (path == "cudnn" or (t % 2 == 0 and s % 2 == 0)):
            path = "cudnn"
    if path is None:
        path = "flash" if t * s >= FLASH_MIN_PAIRS and not call.return_weights else "xla"
    return dataclasses.replace(call, path=path, dims=dims)


def _check_broadcast(name, shape, target):
    ok = len(shape) <= len(target) and all(
        d in (1, full) for d, full in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name} has shape {_fmt(shape)}, which does not broadcast to "
            f"[..., N, T, S] = {_fmt(target)}"
        )


def _cudnn_refusal(call, dtype, dims, mask, bias, spec, masks, scaled):
    """Why the cuDNN kernel (through ``jax.nn``) cannot serve this call, or None if it can
    (arguments as in :func:`_check`; ``masks`` counts the masks the call ANDs together,
    ``scaled`` says a scale was given).

    Only cases whose semantics match ours exactly are sent there: no fully masked row can
    arise (cuDNN's output on such rows is not specified), causal only when T == S (jax.nn
    aligns causal top-left, we align bottom-right).
    """
    batch, t, s, _, _, _, h, hv = dims
    if jax.default_backend() != "gpu":
        return f"needs an NVIDIA GPU backend, this process runs on {jax.default_backend()!r}"
    if dtype not in (jnp.float16, jnp.bfloat16):
        return f"needs float16 or bfloat16 inputs, got {dtype}"
    if len(batch) != 1:
        return f"needs exactly one batch dim, got {len(batch)}"
    if h != hv or h % 8 or h > 128:
        return f"needs H == Hv, a multiple of 8 and <= 128, got H={h}, Hv={hv}"
    if call.return_weights or call.return_residual:
        return "returns neither weights nor our residual here"
    if scaled:
        return "takes only the default scale (an explicit scale is traced under jit)"
    if bias is not None or mask is not None:
        return "is not used with a bias or a bool-array mask here"
    if call.dropout_rate or call.logits_soft_cap:
        return "is not used with dropout or a soft cap here"
    # The one mask cuDNN takes: CausalMask(), from is_causal or as mask= (two ANDed masks
    # are not one CausalMask).
    causal = masks == 1 and (call.is_causal or (spec is not None and spec[1]))
    if masks and not (causal and t == s):
        return "takes no mask here other than CausalMask() with T == S; use is_causal"
    return None


# --------------------------------------------------------------------------------------------
# The public entry: every check, then the jitted core


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    return_weights: bool = False,
    logits_soft_cap: float | None = None,
    block_sizes: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_key=None,
):
    """Scaled dot-product attention, softmax(Q K^T * scale + bias, masked) V.

    A superset of :func:`jax.nn.dot_product_attention`: the same positional order and
    keywords with the same meanings, and keyword-only extras (``return_weights``,
    ``logits_soft_cap``, ``block_sizes``, ``dropout_rate``, ``dropout_key``).

    Args:
      query: ``[..., T, N, H]``; any number of leading batch dims, including none.
      key: ``[..., S, K, H]``; ``N`` must be a multiple of ``K`` (``K == N`` multi-head,
        ``1 < K < N`` grouped-query, ``K == 1`` multi-query; each key/value head serves
        ``G = N // K`` consecutive query heads and is never copied).
      value: ``[..., S, K, Hv]``; ``Hv`` may differ from ``H``.
      bias: floating, broadcastable to ``[..., N, T, S]``, added to the logits after the
        scale and the soft cap (ALiBi, relative positions, additive masks; ``-inf`` entries
        mask like False in ``mask``, and so does any biased logit at or below 0.7 times the
        most negative finite float32, about -2.4e38).
      mask: a mask of :mod:`jaxattn.masks` (:class:`jaxattn.CausalMask`,
        :class:`jaxattn.PaddingMask`, ... combined with ``&`` / ``|``), which the blockwise
        path evaluates per block without building it; or a bool array, True = may attend,
        broadcastable to ``[..., N, T, S]``. Float or int masks are refused: additive masks
        go in ``bias``. With unbatched ``[T, N, H]`` inputs, jax.nn's 4-D ``[1, N, T, S]``
        mask and bias are accepted too.
      scale: logit multiplier, default ``1 / sqrt(H)``; may be a traced scalar.
      is_causal: AND the mask with a causal mask, bottom-right aligned when ``T != S``
        (query ``t`` sees keys up to ``t + S - T``; jax.nn aligns top-left: for that, pass
        ``mask=CausalMask(offset=0)``). Same as jax.nn when ``T == S``.
      query_seq_lengths: int ``[...]`` (the batch dims): query rows ``t >= length`` are
        padding and get output 0 (as in jax.nn).
      key_value_seq_lengths: int ``[...]``: keys ``s >= length`` are padding, hidden from
        every query; what they hold reaches neither the output nor a gradient (a NaN there
        does not leak).
      local_window_size: ``w`` or ``(left, right)``: query at position ``p`` sees keys
        ``p - left <= s <= p + right`` (jax.nn's meaning when ``T == S``; positions align
        bottom-right as for ``is_causal``, :class:`jaxattn.SlidingWindowMask`).
      implementation: ``None`` picks the fastest path that serves the call: ``"cudnn"`` on an
        NVIDIA GPU where it applies, else ``"flash"`` from ``FLASH_MIN_PAIRS`` (query, key)
        pairs and ``"xla"`` below; ``"xla"`` is one fused dense pass over the
        ``[..., N, T, S]`` logits (:mod:`jaxattn._xla`); ``"flash"`` is blockwise (memory
        O(T), empty blocks skipped, see :mod:`jaxattn._flash`); ``"cudnn"`` is
        ``jax.nn.dot_product_attention``'s fused GPU kernel. Asking for a path that cannot
        serve the call raises ``ValueError``.
      return_residual: also return the log-sum-exp of each query row's logits (after scale,
        soft cap, bias and mask), ``[..., T, N]``: jax.nn's residual, but float32 (float64 for
        float64 inputs; jax.nn casts it to the input dtype), differentiable (jax.nn stops its
        gradient), and ``-inf`` for a row that sees no key (the log of an empty sum).
        Partial attentions over two key shards merge exactly: ``lse = logaddexp(lse1,
        lse2)``, ``out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2`` (guard rows where
        ``lse == -inf``, empty in both shards). Exact when the masks of the shards are the
        shards of the mask: give each shard its own lengths or an explicit offset
        (the default bottom-right offset is ``S_shard - T``), and no dropout (its hash uses
        positions within the call).
      return_weights: also return the attention weights ``[..., N, T, S]`` (float32; float64
        for float64 inputs), after dropout (the weights that multiplied V). Only the xla path
        has them.
      logits_soft_cap: ``c`` replaces the scaled logits ``x`` by ``c * tanh(x / c)`` (Gemma 2,
        Grok-1) before the bias and the mask (tokamax caps after adding the bias), forward and
        backward, on the xla and flash paths (the cuDNN kernel is not used with it).
      block_sizes: ``(block_q, block_k)`` of the flash path, used when it runs (refused with
        ``implementation="xla"``); default by backend (``jaxattn._flash.DEFAULT_BLOCKS``).
      dropout_rate: dropout on the attention weights, in [0, 1): each weight is zeroed with
        this probability and the kept ones are scaled by ``1 / (1 - dropout_rate)``.
      dropout_key: PRNG key of the dropout, needed when ``dropout_rate > 0``. The mask is
        a hash of (key, sequence, head, query, key position), so every path and every block
        size drops the same weights (:func:`jaxattn.attention_dropout_mask` returns it).

    Returns:
      ``[..., T, N, Hv]`` in the input dtype; with ``return_residual`` and/or
      ``return_weights``, a tuple ``(out, residual, weights)`` of those asked for, in that
      order.

    Numerics and edges: query, key and value share one floating dtype; logits and softmax run in
    float32 and the output is cast back. A query row whose every key is masked (including by
    ``-inf`` bias, or rows ``t < T - S`` under ``is_causal`` with ``T > S``) gets output 0,
    weights 0 and zero gradients, on every path (jax.nn returns the mean of V there). A NaN or
    Inf in the query, key, value or bias of a pair that is not masked reaches the output of its
    row as in the formula, on every path; one in a masked-out key or bias never reaches the
    output. Keys and values that are padding (lengths, pad tokens, and ``&`` combinations of
    masks with them) are zeroed first, so a NaN there reaches neither the output nor any
    gradient. At other masked keys, the weight is exactly 0 but 0 * NaN = NaN in a matmul, so a
    non-finite value there (or, in the backward, a key) may reach the rows that cannot see it
    wherever a path reads it (the xla path always, the blockwise path in the blocks it visits):
    keep such entries finite, or express them as padding.

    Shape, dtype and static-argument errors are ``ValueError`` raised by the call (at trace
    time under ``jax.jit``) before any attention is computed, naming the argument. Transforms:
    ``jax.jit``, ``jax.vmap`` over any argument (build a mask with per-sequence values inside
    the vmapped function: its batch shape is checked against the query's; an unmapped
    ``dropout_key`` drops the same weights in every example, since each sees itself as sequence
    0), ``jax.grad`` to any order (second and higher orders of the flash path are computed
    densely), and forward-over-reverse (Hessian-vector products). Forward mode on its own
    (``jax.jvp``, ``jax.jacfwd``) is refused by JAX on the xla and flash paths, whose backward
    passes are written by hand; use :func:`jaxattn.reference.dot_product_attention` for it.
    """
    # Every check is here, before jax.jit (under a caller's jit, at its trace): the static
    # arguments one by one, the values that are no arrays, then _check on the arrays' shapes
    # and dtypes (once per signature: it is cached).
    static = {
        "is_causal": _check_flag("is_causal", is_causal),
        "return_residual": _check_flag("return_residual", return_residual),
        "return_weights": _check_flag("return_weights", return_weights),
        "implementation": _check_implementation(implementation),
        "block_sizes": _check_blocks(block_sizes),
        "dropout_rate": _check_rate(dropout_rate),
        "local_window_size": (
            None
            if local_window_size is None
            else _window_pair(local_window_size, "local_window_size")
        ),
        "logits_soft_cap": _check_cap(logits_soft_cap),
    }
    for name, x in (("bias", bias), ("mask", mask), ("scale", scale), ("dropout_key", dropout_key)):
        if isinstance(x, (str, bytes)):
            raise ValueError(f"{name} must be an array, got the string {x!r}")
    if scale is not None and (isinstance(scale, (list, tuple)) or np.iscomplexobj(scale)):
        raise ValueError(f"scale must be a real scalar, got {_what(scale)}")
    q_lengths = _lengths("query_seq_lengths", query_seq_lengths)
    kv_lengths = _lengths("key_value_seq_lengths", key_value_seq_lengths)
    unbatched = _unbatched_as_4d(query, key, bias, mask, q_lengths, kv_lengths)
    if unbatched:  # jax.nn's unbatched call: a batch of one, as jax.nn does it, dropped after
        query, key, value, bias, mask = (_one(x) for x in (query, key, value, bias, mask))
        q_lengths, kv_lengths = (
            _one_length(n, x) for n, x in zip(_LENGTHS, (q_lengths, kv_lengths), strict=True)
        )
    if isinstance(mask, MaskSpec):  # what the checks read of a mask of jaxattn.masks
        spec, dense = (mask.batch_shape(), type(mask) is CausalMask and mask.offset is None), None
    else:
        spec, dense = None, mask
    call = _check(
        jax.config.jax_enable_x64,
        tuple(map(_sig, (query, key, value, bias, dense, q_lengths, kv_lengths, scale))),
        spec,
        dropout_key is not None,
        **static,
    )
    result = _attention(
        query, key, value, bias, mask, scale, q_lengths, kv_lengths, dropout_key, call
    )
    return jax.tree_util.tree_map(lambda x: x[0], result) if unbatched else result


_LENGTHS = ("query_seq_lengths", "key_value_seq_lengths")


def _one(x):
    """A batch of one: ``x[None]``, except for None, masks of :mod:`jaxattn.masks` and 4-D
    arrays (jax.nn's ``[1, N, T, S]`` masks and biases, already batched)."""
    if x is None or isinstance(x, MaskSpec) or jnp.ndim(x) == 4:
        return x
    return jnp.asarray(x)[None]


def _one_length(name: str, x):
    """Lengths of an unbatched call: ``[]`` or ``[1]``, as ``[1]``."""
    if x is None:
        return None
    if x.shape not in ((), (1,)):
        raise ValueError(
            f"{name} must have shape [] or [1] for unbatched [T, N, H] inputs, "
            f"got shape {_fmt(x.shape)}"
        )
    return jnp.reshape(x, (1,))


def _lengths(name: str, x):
    """Sequence lengths as an array (lists and ints accepted), or a ValueError naming them."""
    if x is None:
        return None
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an int array [...], got {_what(x)}") from e


def _unbatched_as_4d(query, key, bias, mask, q_lengths, kv_lengths) -> bool:
    """True for jax.nn's unbatched call with a 4-D mask/bias or ``[1]`` lengths."""
    if getattr(query, "ndim", None) != 3 or getattr(key, "ndim", None) != 3:
        return False
    four_d = any(getattr(x, "ndim", 0) == 4 for x in (bias, mask) if not isinstance(x, MaskSpec))
    lengths = any(getattr(x, "ndim", 0) == 1 for x in (q_lengths, kv_lengths))
    return four_d or lengths


@functools.partial(jax.jit, static_argnames="call")
def _attention(query, key, value, bias, mask, scale, q_lengths, kv_lengths, dropout_key, call):
    """The attention of a call that the entry has checked (``call``, :class:`_Call`): only
    computation here. (The dropout key's format is checked where it is read, by
    :func:`jaxattn._dropout.seed_words`.)"""
    batch, t, s, *_, h, _ = dims = call.dims
    rules = _rules(call, q_lengths, kv_lengths, batch)
    rate = call.dropout_rate
    seed = dropout.seed_words(dropout_key) if rate else None
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    spec = mask if isinstance(mask, MaskSpec) else None
    dense = None if isinstance(mask, MaskSpec) else mask
    for rule in rules:
        spec = rule if spec is None else spec & rule
    if call.path == "cudnn":
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            scale=float(scale),
            is_causal=spec is not None,
            implementation="cudnn",
        )
    if spec is not None:
        # Padding keys and values are never read: zeroed here, one pass over K and V, so a
        # NaN in an unwritten cache slot reaches neither the output nor the gradients (a
        # masked weight is exactly 0, but 0 * NaN is NaN in a matmul).
        valid = spec.key_valid(s)
        if valid is not None:
            valid = valid.reshape((1,) * (value.ndim - valid.ndim - 2) + valid.shape + (1, 1))
            key = jnp.where(valid, key, jnp.zeros((), key.dtype))
            value = jnp.where(valid, value, jnp.zeros((), value.dtype))
    scale = jnp.asarray(scale, acc_dtype(query.dtype))
    common = {"cap": call.logits_soft_cap, "drop": (rate, seed)}
    if call.path == "flash":
        bq, bk = call.block_sizes or flash.DEFAULT_BLOCKS.get(jax.default_backend(), (128, 128))
        out, lse = flash.flash_attention(
            query,
            key,
            value,
            spec=spec,
            mask=dense,
            bias=bias,
            scale=scale,
            block_q=bq,
            block_k=bk,
            **common,
        )
        return (out, lse) if call.return_residual else out
    # Only a mask, a bias (-inf entries) or causal attention with more queries than keys can
    # leave a query row with no key at all.
    plain_causal = type(spec) is CausalMask and spec.offset is None and t <= s
    empty_rows = dense is not None or bias is not None or (spec is not None and not plain_causal)
    if spec is not None:
        m = spec.materialize(t, s)
        dense = m if dense is None else _and(dense, m)
    out, lse, weights = xla_attention(
        query, key, value, dense, bias, scale, call.return_weights, empty_rows, dims=dims, **common
    )
    result = (out,) + ((lse,) if call.return_residual else ())
    result += (weights,) if call.return_weights else ()
    return result if len(result) > 1 else out


def _rules(call, q_lengths, kv_lengths, batch):
    """The masks that jax.nn's keywords stand for, as :mod:`jaxattn.masks` rules."""
    rules = []
    if call.is_causal:
        rules.append(CausalMask())
    if call.local_window_size is not None:
        rules.append(SlidingWindowMask(call.local_window_size))
    if q_lengths is not None or kv_lengths is not None:
        lengths = [x if x is None else jnp.broadcast_to(x, batch) for x in (q_lengths, kv_lengths)]
        rules.append(PaddingMask(q_lengths=lengths[0], kv_lengths=lengths[1]))
    return rules


def _and(mask, other):
    """``mask & other`` of bool arrays, broadcast explicitly (no implicit rank promotion)."""
    shape = jnp.broadcast_shapes(mask.shape, other.shape)
    return jnp.broadcast_to(mask, shape) & jnp.broadcast_to(other, shape)
