"""Flax's ``attention_fn`` interface on top of :func:`jaxattn.dot_product_attention`.

    from flax import nnx
    import jaxattn.nn

    layer = nnx.MultiHeadAttention(
        num_heads=8, in_features=64, attention_fn=jaxattn.nn.attention_fn, rngs=nnx.Rngs(0)
    )

:func:`attention_fn` takes exactly the arguments of :func:`flax.nnx.dot_product_attention`
(the function ``nnx.MultiHeadAttention`` calls by default), translates them, and runs our
kernel. Where the two differ (fully masked rows, dropout masks, the dtype of the softmax),
:func:`attention_fn`'s docstring says so.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

from jaxattn.attention import dot_product_attention
from jaxattn.masks import CausalMask

__all__ = ["attention_fn"]


def _full_rank(x, rank: int):
    """``x`` with leading 1s up to ``rank`` dims (explicit: no implicit rank promotion)."""
    if x is None or x.ndim >= rank:
        return x
    return x.reshape((1,) * (rank - x.ndim) + x.shape)


def _and(a, b):
    """``a & b`` of bool arrays, broadcast explicitly to equal rank and shape."""
    rank = max(a.ndim, b.ndim)
    a, b = _full_rank(a, rank), _full_rank(b, rank)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    return jnp.broadcast_to(a, shape) & jnp.broadcast_to(b, shape)


def _precision_scope(precision):
    """A ``jax.default_matmul_precision`` scope standing for Flax's ``precision`` argument.

    Our kernel's matmuls carry no precision of their own, so the scope's default reaches
    them (and only them: nothing else runs inside it). A ``(lhs, rhs)`` pair takes the
    higher of the two.
    """
    if precision is None:
        return contextlib.nullcontext()
    pair = precision if isinstance(precision, (tuple, list)) else (precision,)
    try:
        levels = [lax.Precision(p) for p in pair]
    except (TypeError, ValueError):
        levels = []
    if not 1 <= len(pair) <= 2 or len(levels) != len(pair):
        raise ValueError(
            "precision must be None, a jax.lax.Precision, its name, or a pair of them, "
            f"got {precision!r}"
        )
    return jax.default_matmul_precision(max(levels, key=lambda p: p.value).name.lower())


def attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=dtypes.promote_dtype,
    is_causal: bool = False,
):
    """:func:`flax.nnx.dot_product_attention`'s signature, computed by
    :func:`jaxattn.dot_product_attention`; pass it as ``attention_fn=`` to
    ``nnx.MultiHeadAttention``.

    Args:
      query: ``[..., T, N, H]`` (Flax's ``[batch..., q_length, num_heads, depth]``); any
        number of batch dims, including none.
      key: ``[..., S, K, H]``; ``N`` a multiple of ``K`` (grouped-query attention, as Flax).
      value: ``[..., S, K, Hv]``.
      bias: floating, broadcastable to ``[..., N, T, S]``, added to the scaled logits.
      mask: broadcastable to ``[..., N, T, S]``, nonzero / True = may attend. Any dtype:
        ``nnx.MultiHeadAttention``'s decode path and ``nnx.combine_masks`` build float32
        0/1 masks, which are converted to bool as Flax does (``mask.astype(bool)``).
      broadcast_dropout: accepted, but see *Dropout*: our masks are never shared across
        batch and heads.
      dropout_rng: PRNG key of the dropout (typed ``jax.random.key`` or raw ``uint32[2]``),
        needed when dropout is on.
      dropout_rate: dropout on the attention weights, in [0, 1) (1.0 is refused: Flax
        returns NaN there).
      deterministic: True turns dropout off whatever ``dropout_rate`` is.
      dtype: the dtype q, k, v are promoted to (None: their common dtype), as in Flax.
      precision: ``jax.lax.Precision`` (or its name, or an ``(lhs, rhs)`` pair, which takes
        the higher) of the kernel's two matmuls, applied as a
        ``jax.default_matmul_precision`` scope around the call. Accumulation is float32
        (float64 for float64 inputs) whatever the precision; on CPU it changes nothing.
      module: when given, the attention weights are sown as Flax does:
        ``module.sow(nnx.Intermediate, 'attention_weights', w)`` with ``w``
        ``[..., N, T, S]`` in the promoted dtype, taken before dropout.
      promote_dtype: Flax's promotion function, called as ``promote_dtype((query, key,
        value), dtype=dtype)``; it must return one dtype for all three.
      is_causal: AND the mask with a causal mask aligned top-left (query ``t`` sees keys
        ``s <= t``), as Flax and ``jax.nn`` do, not our kernel's bottom-right ``is_causal``.

    Returns:
      ``[..., T, N, Hv]`` in the promoted dtype.

    Differences from Flax:
      *Fully masked rows* (a query that may attend no key): output 0, sown weights 0, zero
      gradients; Flax returns the mean of V there and sows uniform weights ``1 / S``.
      *Dropout*: each weight is kept with probability ``1 - dropout_rate`` and scaled by
      ``1 / (1 - dropout_rate)``, as in Flax, so the expected output is the same; but the
      keep mask is a hash of (sequence, head, query, key) (:func:`jaxattn.attention_dropout_mask`),
      independent per sequence and head even with ``broadcast_dropout=True`` (Flax then
      shares one ``[T, S]`` mask across batch and heads), and it differs from Flax's
      ``jax.random.bernoulli`` draw for the same key.
      *Numerics*: logits and softmax run in float32 (float64 for float64 inputs) for every
      input dtype, and the weights are cast to the input dtype before multiplying V;
      Flax's weights path (taken with dropout or ``module``) runs the softmax in the input
      dtype. Masked logits are filled with 0.7 times the most negative float32 (float64)
      rather than ``finfo(dtype).min``; both give weight exactly 0 in a row with an
      unmasked key.
      *Sowing under dropout* costs a second, dropout-free pass that returns the weights
      (Flax sows the pre-dropout weights; our kernel only returns post-dropout ones).
      *Errors*: ``ValueError`` for mismatched ranks, batch dims, lengths, head dims or head
      counts (wording ours, naming the arguments), for dropout without ``dropout_rng``, and
      for a ``promote_dtype`` that leaves q, k, v in different dtypes. Refused where Flax
      accepts: a ``jax.lax.DotAlgorithmPreset`` as ``precision`` (only ``Precision`` levels
      map onto our matmuls) and an integer ``bias`` (cast it to a float dtype).
    """
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            "query, key and value must have the same rank (the same batch dims), got "
            f"shapes {list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
        )
    rank = query.ndim  # [..., N, T, S] has as many dims as [..., T, N, H]
    if mask is not None:
        mask = _full_rank(jnp.asarray(mask).astype(jnp.bool_), rank)
    bias = _full_rank(None if bias is None else jnp.asarray(bias), rank)
    if is_causal:
        t, s = query.shape[-3], key.shape[-3]
        causal = CausalMask(offset=0)  # top-left, as Flax's tril and jax.nn
        mask = causal if mask is None else _and(mask, causal.materialize(t, s))

    rate = float(dropout_rate) if not deterministic and dropout_rate > 0.0 else 0.0
    if rate and dropout_rng is None:
        raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng, got None")
    kwargs = {"dropout_rate": rate, "dropout_key": dropout_rng if rate else None}

    with _precision_scope(precision):
        if module is None:
            return dot_product_attention(query, key, value, bias, mask, **kwargs)
        if rate:
            out = dot_product_attention(query, key, value, bias, mask, **kwargs)
            _, weights = dot_product_attention(query, key, value, bias, mask, return_weights=True)
        else:
            out, weights = dot_product_attention(query, key, value, bias, mask, return_weights=True)
    module.sow(nnx.Intermediate, "attention_weights", weights.astype(query.dtype))
    return out
