"""Scaled dot-product attention: input checks, then dispatch to one of the paths.

The paths are private modules: ``"xla"`` (:mod:`jaxattn._xla`, one fused dense pass),
``"flash"`` (:mod:`jaxattn._flash`, blockwise) and ``"cudnn"`` (``jax.nn``'s GPU kernel).
Each computes what :mod:`jaxattn.reference` writes as a formula, and is tested against it.

Axis letters (used in every einsum and docstring of the package):
  B batch (any number of leading dims, written ``...``), T queries, S keys/values,
  N query heads, K key/value heads, G = N // K query heads per key head, H head dim,
  Hv value head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxattn import _dropout as dropout
from jaxattn import _flash as flash
from jaxattn._numerics import acc_dtype
from jaxattn._xla import xla_attention
from jaxattn.masks import CausalMask, MaskSpec

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]

IMPLEMENTATIONS = (None, "xla", "flash", "cudnn")

# implementation=None takes the blockwise path from this many (query, key) pairs per head.
# Measured on a 2-core CPU (float32, N = 8, H = 64): at T = S = 64 the two paths tie, at 128
# flash is 2x faster forward and 1.3x forward+backward; below 64 the xla path's
# single fused pass wins (2-3x at T = 10, where the flash loop overhead dominates).
FLASH_MIN_PAIRS = 128 * 128


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_inputs(query, key, value, mask, bias, implementation):
    """Validate static shapes and dtypes; returns (batch, T, S, N, K, G, H, Hv)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim < 3:
            raise ValueError(
                f"{name} must have shape [..., L, heads, head_dim] (rank >= 3), "
                f"got rank {x.ndim} shape {_fmt(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"query, key and value must share one dtype, got query {query.dtype}, "
            f"key {key.dtype}, value {value.dtype}"
        )
    batch = query.shape[:-3]
    *_, t, n, h = query.shape
    for name, x in (("key", key), ("value", value)):
        if x.shape[:-3] != batch:
            raise ValueError(
                f"{name} has batch dims {_fmt(x.shape[:-3])} but query has {_fmt(batch)}; "
                f"they must be equal (shapes: query {_fmt(query.shape)}, "
                f"{name} {_fmt(x.shape)})"
            )
    *_, s, k, kh = key.shape
    if kh != h:
        raise ValueError(
            f"key head dim is {kh} but query head dim is {h}; they must be equal "
            f"(query {_fmt(query.shape)}, key {_fmt(key.shape)})"
        )
    *_, vs, vk, hv = value.shape
    if vs != s:
        raise ValueError(
            f"value has {vs} positions but key has {s}; they must be equal "
            f"(key {_fmt(key.shape)}, value {_fmt(value.shape)})"
        )
    if vk != k:
        raise ValueError(
            f"value has {vk} heads but key has {k}; they must be equal "
            f"(key {_fmt(key.shape)}, value {_fmt(value.shape)})"
        )
    if n % k != 0:
        raise ValueError(
            f"key has {k} heads but query has {n}; query heads must be a multiple of key heads"
        )
    target = (*batch, n, t, s)
    if isinstance(mask, MaskSpec):
        mb = mask.batch_shape()
        if mb not in ((), batch):
            raise ValueError(
                f"mask has per-sequence values of batch shape {_fmt(mb)} but query has batch "
                f"dims {_fmt(batch)}; they must be equal"
            )
    elif mask is not None:
        mask_dtype = getattr(mask, "dtype", None)
        if mask_dtype != jnp.bool_:
            raise ValueError(
                f"mask must be a bool array (True = may attend), got dtype {mask_dtype}; "
                "an additive float mask (0 / -inf) belongs in `bias`"
            )
        _check_broadcast("mask", mask.shape, target)
    if bias is not None:
        bias_dtype = getattr(bias, "dtype", None)
        if bias_dtype is None or not jnp.issubdtype(bias_dtype, jnp.floating):
            raise ValueError(f"bias must be a floating array, got dtype {bias_dtype}")
        _check_broadcast("bias", bias.shape, target)
    if implementation not in IMPLEMENTATIONS:
        hint = ""
        if implementation == "reference":  # the dense path's name before it took jax.nn's
            hint = " (the dense path is now named 'xla', as in jax.nn)"
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}{hint}"
        )
    return batch, t, s, n, k, n // k, h, hv


def _check_broadcast(name, shape, target):
    ok = len(shape) <= len(target) and all(
        d in (1, full) for d, full in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name} has shape {_fmt(shape)}, which does not broadcast to "
            f"[..., N, T, S] = {_fmt(target)}"
        )


def _and(mask, other):
    """``mask & other`` of bool arrays, broadcast explicitly (no implicit rank promotion)."""
    shape = jnp.broadcast_shapes(mask.shape, other.shape)
    return jnp.broadcast_to(mask, shape) & jnp.broadcast_to(other, shape)


def _check_blocks(block_sizes):
    if block_sizes is None:
        return None
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


def _cudnn_refusal(query, value, mask, bias, scale, is_causal, return_weights, rate, dims):
    """Why the cuDNN kernel (through ``jax.nn``) cannot serve this call, or None if it can.

    Only cases whose semantics match ours exactly are sent there: no fully masked row can
    arise (cuDNN's output on such rows is not specified), causal only when T == S (jax.nn
    aligns causal top-left, we align bottom-right).
    """
    batch, t, s, _, _, _, h, hv = dims
    if jax.default_backend() != "gpu":
        return f"needs an NVIDIA GPU backend, this process runs on {jax.default_backend()!r}"
    if query.dtype not in (jnp.float16, jnp.bfloat16):
        return f"needs float16 or bfloat16 inputs, got {query.dtype}"
    if len(batch) != 1:
        return f"needs exactly one batch dim, got {len(batch)}"
    if h != hv or h % 8 or h > 128:
        return f"needs H == Hv, a multiple of 8 and <= 128, got H={h}, Hv={hv}"
    if return_weights:
        return "does not return weights"
    if not isinstance(scale, (int, float)):
        return "takes only the default scale (an explicit scale is traced under jit)"
    if bias is not None:
        return "is not used with a bias here"
    if rate:
        return "is not used with dropout here (its dropout mask is not this package's)"
    if mask is not None and not (type(mask) is CausalMask and mask.offset is None and t == s):
        return "takes no mask here other than CausalMask() with T == S; use is_causal"
    if is_causal and t != s:
        return f"aligns causal masks top-left; needs T == S for is_causal, got T={t}, S={s}"
    return None


@functools.partial(
    jax.jit,
    static_argnames=(
        "is_causal",
        "return_weights",
        "implementation",
        "block_sizes",
        "dropout_rate",
    ),
)
def dot_product_attention(
    query,
    key,
    value,
    mask=None,
    bias=None,
    *,
    scale=None,
    is_causal: bool = False,
    return_weights: bool = False,
    implementation: str | None = None,
    block_sizes: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_key=None,
):
    """Scaled dot-product attention, softmax(Q K^T * scale + bias, masked) V.

    Args:
      query: ``[..., T, N, H]``; any number of leading batch dims, including none.
      key: ``[..., S, K, H]``; ``N`` must be a multiple of ``K`` (``K == N`` multi-head,
        ``1 < K < N`` grouped-query, ``K == 1`` multi-query; each key/value head serves
        ``G = N // K`` consecutive query heads and is never copied).
      value: ``[..., S, K, Hv]``; ``Hv`` may differ from ``H``.
      mask: a mask of :mod:`jaxattn.masks` (:class:`jaxattn.CausalMask`,
        :class:`jaxattn.PaddingMask`, ... combined with ``&`` / ``|``), which the blockwise
        path evaluates per block without building it; or a bool array, True = may attend,
        broadcastable to ``[..., N, T, S]``. Float or int masks are refused: additive masks
        go in ``bias``.
      bias: floating, broadcastable to ``[..., N, T, S]``, added to the scaled logits (ALiBi,
        relative positions, additive masks; ``-inf`` entries are allowed).
      scale: logit multiplier, default ``1 / sqrt(H)``; may be a traced scalar.
      is_causal: AND the mask with a causal mask (bottom-right aligned when ``T != S``: query
        ``t`` sees keys up to ``t + S - T``).
      return_weights: also return the attention weights ``[..., N, T, S]`` (float32; float64
        for float64 inputs). Only the xla path has them.
      implementation: ``None`` picks the fastest path that serves the call: ``"cudnn"`` on an
        NVIDIA GPU where it applies, else ``"flash"`` from ``FLASH_MIN_PAIRS`` (query, key)
        pairs and ``"xla"`` below; ``"xla"`` is one fused dense pass over the
        ``[..., N, T, S]`` logits (:mod:`jaxattn._xla`); ``"flash"`` is blockwise (memory
        O(T), empty blocks skipped, see :mod:`jaxattn._flash`); ``"cudnn"`` is
        ``jax.nn.dot_product_attention``'s fused GPU kernel. Asking for a path that cannot
        serve the call raises ``ValueError``.
      block_sizes: ``(block_q, block_k)`` of the flash path; default by backend
        (``jaxattn._flash.DEFAULT_BLOCKS``).
      dropout_rate: dropout on the attention weights, in [0, 1): each weight is zeroed with
        this probability and the kept ones are scaled by ``1 / (1 - dropout_rate)``.
      dropout_key: PRNG key of the dropout, needed when ``dropout_rate > 0``. The mask is
        a hash of (key, sequence, head, query, key position), so every path and every block
        size drops the same weights (:func:`jaxattn.attention_dropout_mask` returns it).

    Returns:
      ``[..., T, N, Hv]`` in the input dtype, and the weights if asked for (after dropout:
      the weights that multiplied V).

    Numerics and edges: query, key and value share one floating dtype; logits and softmax
    run in float32 and the output is cast back. A query row whose every key is masked
    (including by ``-inf`` bias, or rows ``t < T - S`` under ``is_causal`` with ``T > S``)
    gets output 0, weights 0 and zero gradients, on every path. Every shape, head-count and
    dtype error is a ``ValueError`` raised at trace time that names the argument.
    """
    dims = _check_inputs(query, key, value, mask, bias, implementation)
    block_sizes = _check_blocks(block_sizes)
    rate = dropout.check_rate(dropout_rate)
    seed = None
    if rate:
        if dropout_key is None:
            raise ValueError(f"dropout_rate={rate} needs a dropout_key (a PRNG key), got None")
        seed = dropout.seed_words(dropout_key)
    _, t, s, *_, h, _ = dims
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    impl = implementation
    if return_weights and impl not in (None, "xla"):
        raise ValueError(
            f"return_weights=True needs implementation='xla' (or None), got {impl!r}: "
            "the other paths never build the [..., N, T, S] weights"
        )
    if impl in (None, "cudnn"):
        why = _cudnn_refusal(query, value, mask, bias, scale, is_causal, return_weights, rate, dims)
        if impl == "cudnn" and why is not None:
            raise ValueError(f"implementation='cudnn' cannot serve this call: it {why}")
        if why is None:
            impl = "cudnn"
    if impl is None:
        impl = "flash" if t * s >= FLASH_MIN_PAIRS and not return_weights else "xla"
    if impl == "cudnn":
        causal = is_causal or mask is not None  # the only mask let through is CausalMask()
        return jax.nn.dot_product_attention(
            query, key, value, scale=float(scale), is_causal=causal, implementation="cudnn"
        )
    scale = jnp.asarray(scale, acc_dtype(query.dtype))
    if impl == "flash":
        spec = mask if isinstance(mask, MaskSpec) else None
        dense = None if isinstance(mask, MaskSpec) else mask
        if is_causal:
            spec = CausalMask() if spec is None else spec & CausalMask()
        bq, bk = block_sizes or flash.DEFAULT_BLOCKS.get(jax.default_backend(), (128, 128))
        return flash.flash_attention(
            query,
            key,
            value,
            spec=spec,
            mask=dense,
            bias=bias,
            scale=scale,
            block_q=bq,
            block_k=bk,
            dropout=(rate, seed),
        )
    # Only a user mask, a bias (-inf entries) or causal attention with more queries than keys
    # can leave a query row with no key at all.
    empty_rows = mask is not None or bias is not None or (is_causal and t > s)
    if isinstance(mask, MaskSpec):
        mask = mask.materialize(t, s)
    if is_causal:
        causal = CausalMask().materialize(t, s)
        mask = causal if mask is None else _and(mask, causal)
    drop = (rate, seed)
    return xla_attention(
        query, key, value, mask, bias, scale, return_weights, empty_rows, drop, dims
    )
