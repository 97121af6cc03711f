"""Scaled dot-product attention: input checks, the reference path, dispatch.

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
from jaxattn.mask_spec import CausalMask, MaskSpec
from jaxattn.masks import and_masks, causal_mask

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]

IMPLEMENTATIONS = (None, "reference", "flash", "cudnn")

# implementation=None takes the blockwise path from this many (query, key) pairs per head.
# Measured on a 2-core CPU (float32, N = 8, H = 64): at T = S = 64 the two paths tie, at 128
# flash is 2x faster forward and 1.3x forward+backward; below 64 the reference path's
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
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
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


# Fill value for masked logits, as a fraction of the most negative finite number of the
# softmax dtype: far below any real logit, with headroom so that `fill - max` cannot overflow.
_FILL_FRACTION = 0.7


def _acc(dtype):
    """Accumulation and softmax dtype: float32 for 16-bit inputs, else the input's own."""
    return jnp.promote_types(dtype, jnp.float32)


def _weights(qf, key, mask_g, bias_g, scale, t, empty_rows):
    acc = _acc(qf.dtype)
    *batch, k, gt, _ = qf.shape
    s = key.shape[-3]
    logits = jnp.einsum("...KTH,...SKH->...KTS", qf, key, preferred_element_type=acc)
    logits = logits.reshape((*batch, k, gt // t, t, s)) * scale
    # Masked keys get a finite fill, far below any real logit, so that the row max is always
    # finite and exp(fill - max) is exactly 0 for a masked key in a row with a real one. A
    # -inf in the bias is clamped to the same fill: it masks like a False in `mask`. (A finite
    # max also keeps XLA's fused max-exp kernel; a -inf fill needs a guard that breaks it.)
    fill = jnp.asarray(_FILL_FRACTION * jnp.finfo(acc).min, acc)
    if bias_g is not None:
        logits = jnp.maximum(logits + jnp.broadcast_to(bias_g.astype(acc), logits.shape), fill)
    if mask_g is not None:
        logits = jnp.where(jnp.broadcast_to(mask_g, logits.shape), logits, fill)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - row_max)
    inv = 1.0 / jnp.sum(p, axis=-1, keepdims=True)  # the sum is >= 1: exp(max - max) = 1
    if empty_rows:
        # A row whose every key is masked has max == fill: its weights are set to 0 (not
        # the uniform 1/S that exp(fill - fill) would give), so its output is 0 and its
        # gradients are 0: never NaN, never a silent mean of V.
        inv = jnp.where(row_max > fill, inv, 0.0)
    return p * inv


def _weighted_sum(weights, value, t):
    """``[..., K, G, T, S]`` weights times ``[..., S, K, Hv]`` -> folded ``[..., K, G*T, Hv]``.

    The weights are read in the value dtype (as fused kernels do); accumulation is float32.
    """
    *batch, k, g, _, s = weights.shape
    w = weights.reshape((*batch, k, g * t, s)).astype(value.dtype)
    return jnp.einsum("...KTS,...SKH->...KTH", w, value, preferred_element_type=_acc(value.dtype))


def _dropout_scale(seed, rate: float, shape, dtype):
    """The dropout factors (:func:`jaxattn._dropout.scale_factor`) of weights in the grouped
    ``[..., K, G, T, S]`` layout: head ``k * G + g`` of ``[..., N, T, S]``."""
    *batch, k, g, t, s = shape
    pos = dropout.positions(batch, k * g, t, s)
    return dropout.scale_factor(seed, rate, *pos, dtype).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _core(t, return_weights, empty_rows, rate, qf, key, value, mask_g, bias_g, scale, seed):
    """Folded attention with the analytic backward.

    Static: ``t`` (T), ``return_weights``, ``empty_rows`` (False when no row can be fully
    masked, which skips the guard that zeroes such rows), ``rate`` (dropout on the weights,
    with ``seed`` the two words of :func:`jaxattn._dropout.seed_words`; 0 for none).
    """
    args = (qf, key, value, mask_g, bias_g, scale, seed)
    return _core_fwd(t, return_weights, empty_rows, rate, *args)[0]


def _core_fwd(t, return_weights, empty_rows, rate, qf, key, value, mask_g, bias_g, scale, seed):
    weights = _weights(qf, key, mask_g, bias_g, scale, t, empty_rows)
    used = weights  # the weights that multiply V: dropped and rescaled under dropout
    if rate:
        used = weights * _dropout_scale(seed, rate, weights.shape, weights.dtype)
    out = _weighted_sum(used, value, t)  # accumulation dtype
    primal = (out, used) if return_weights else out
    return primal, (qf, key, value, bias_g, scale, weights, out, seed)


def _transposed(x):
    """``x`` with its last two axes swapped in memory, not only in the dot's dimension numbers.

    The barrier keeps XLA from folding the transpose into the matmul, which then has its
    contracting axis last on both sides: XLA:CPU runs that through its fast matmul path,
    where a transposed-operand dot falls back to a generic one (measured 1.3x slower for the
    whole backward at T = 10).
    """
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _core_bwd(t, return_weights, empty_rows, rate, residuals, cotangent):
    # The analytic softmax backward (written out, not autodiff'd): it reuses the saved
    # weights and costs four matmuls, where autodiff of the forward costs about twice as much
    # on CPU. Weights are 0 at masked keys and on fully masked rows, so dS is 0 there too.
    # Under dropout, U = W * D (D: 0 or 1 / (1 - rate), regenerated) multiplies V, so
    # dW = dU * D and rowsum(dW * W) = rowsum(dU * U).
    qf, key, value, bias_g, scale, weights, out, seed = residuals
    d_out, d_weights = cotangent if return_weights else (cotangent, None)
    *batch, k, g, _, s = weights.shape
    w_f = weights.reshape((*batch, k, g * t, s))
    drop = None
    if rate:
        drop = _dropout_scale(seed, rate, weights.shape, weights.dtype).reshape(w_f.shape)
    used_f = w_f if drop is None else w_f * drop
    acc = _acc(qf.dtype)
    d_out = d_out.astype(acc)
    # Key-side gradients come out as [..., K, S, H] (a plain batched matmul, which XLA:CPU
    # runs through its fast path; asking for [..., S, K, H] directly was measured to fall
    # back to a slower generic dot) and are transposed afterwards.
    d_value = jnp.einsum(
        "...KST,...KTH->...KSH",
        _transposed(used_f.astype(value.dtype)),
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
    d_logits = w_f * (d_w - delta)  # [..., K, G*T, S], accumulation dtype
    d_qk = d_logits.astype(qf.dtype)
    d_q_unscaled = jnp.einsum("...KTS,...SKH->...KTH", d_qk, key, preferred_element_type=acc)
    d_key = jnp.einsum("...KST,...KTH->...KSH", _transposed(d_qk), qf, preferred_element_type=acc)
    d_qf = (d_q_unscaled * scale).astype(qf.dtype)
    d_key = jnp.swapaxes(d_key * scale, -3, -2).astype(key.dtype)
    d_scale = jnp.sum(d_q_unscaled * qf.astype(acc)).astype(scale.dtype)
    d_bias = None
    if bias_g is not None:
        d_l = d_logits.reshape(weights.shape)
        axes = tuple(
            i for i, (a, b) in enumerate(zip(bias_g.shape, d_l.shape, strict=True)) if a != b
        )
        d_bias = jnp.sum(d_l, axis=axes, keepdims=True).astype(bias_g.dtype)
    return d_qf, d_key, d_value, None, d_bias, d_scale, None


_core.defvjp(_core_fwd, _core_bwd)


def _reference(query, key, value, mask, bias, scale, return_weights, empty_rows, drop, dims):
    batch, t, s, n, k, g, _, _ = dims
    nb = len(batch)
    qf = _fold_queries(query, k, g)
    mask_g = None if mask is None else _grouped(mask, nb, k, g)
    bias_g = None if bias is None else _grouped(bias, nb, k, g)
    rate, seed = drop
    args = (qf, key, value, mask_g, bias_g, scale, seed)
    result = _core(t, return_weights, empty_rows, rate, *args)
    out, weights = result if return_weights else (result, None)
    out = _unfold_queries(out, t).astype(query.dtype)
    if not return_weights:
        return out
    return out, weights.reshape((*batch, n, t, s))


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
      mask: bool array, True = may attend, broadcastable to ``[..., N, T, S]`` (see
        :mod:`jaxattn.masks`); or a structured mask (:class:`jaxattn.CausalMask`,
        :class:`jaxattn.PaddingMask`, ... combined with ``&`` / ``|``), which the blockwise
        path evaluates per block without building it. Float or int masks are refused:
        additive masks go in ``bias``.
      bias: floating, broadcastable to ``[..., N, T, S]``, added to the scaled logits (ALiBi,
        relative positions, additive masks; ``-inf`` entries are allowed).
      scale: logit multiplier, default ``1 / sqrt(H)``; may be a traced scalar.
      is_causal: AND the mask with a causal mask (bottom-right aligned when ``T != S``: query
        ``t`` sees keys up to ``t + S - T``).
      return_weights: also return the attention weights ``[..., N, T, S]`` (float32; float64
        for float64 inputs). Only the reference path has them.
      implementation: ``None`` picks the fastest path that serves the call: ``"cudnn"`` on an
        NVIDIA GPU where it applies, else ``"flash"`` from ``FLASH_MIN_PAIRS`` (query, key)
        pairs and ``"reference"`` below; ``"reference"`` materialises ``[..., N, T, S]``
        weights; ``"flash"`` is blockwise (memory O(T), empty blocks skipped, see
        :mod:`jaxattn._flash`); ``"cudnn"`` is ``jax.nn.dot_product_attention``'s fused GPU
        kernel. Asking for a path that cannot serve the call raises ``ValueError``.
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
    if return_weights and impl not in (None, "reference"):
        raise ValueError(
            f"return_weights=True needs implementation='reference' (or None), got {impl!r}: "
            "the other paths never build the [..., N, T, S] weights"
        )
    if impl in (None, "cudnn"):
        why = _cudnn_refusal(query, value, mask, bias, scale, is_causal, return_weights, rate, dims)
        if impl == "cudnn" and why is not None:
            raise ValueError(f"implementation='cudnn' cannot serve this call: it {why}")
        if why is None:
            impl = "cudnn"
    if impl is None:
        impl = "flash" if t * s >= FLASH_MIN_PAIRS and not return_weights else "reference"
    if impl == "cudnn":
        causal = is_causal or mask is not None  # the only mask let through is CausalMask()
        return jax.nn.dot_product_attention(
            query, key, value, scale=float(scale), is_causal=causal, implementation="cudnn"
        )
    scale = jnp.asarray(scale, _acc(query.dtype))
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
        causal = causal_mask(t, s)
        mask = causal if mask is None else and_masks(mask, causal)
    drop = (rate, seed)
    return _reference(query, key, value, mask, bias, scale, return_weights, empty_rows, drop, dims)
