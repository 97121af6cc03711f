"""Attention as the textbook writes it: the specification of every path of this package.

    weights = softmax(Q K^T * scale + bias, masked keys excluded)     [..., N, T, S]
    out     = weights V                                                [..., T, N, Hv]

Read this first: :func:`jaxattn.dot_product_attention` computes the same thing faster (fused,
blockwise, with hand-written backward passes), and the tests check every path against this
function run in float64, values and gradients. It is plain ``jax.numpy``, differentiated by
autodiff, and works in any floating dtype (the logits and softmax in at least float32). It
builds the whole ``[..., N, T, S]`` weights and checks nothing: wrong shapes fail inside
``jnp.einsum``, where :func:`jaxattn.dot_product_attention` names the argument.

The details the formula alone leaves open, decided here once:

- ``mask`` is True where a query may attend (a :mod:`jaxattn.masks` mask or a bool array);
  a ``-inf`` bias masks too.
- A query whose every key is masked gets weights 0, so output 0 and zero gradients: not the
  NaN of 0/0, not a uniform average of V.
- Query head ``n`` reads key/value head ``n // G`` with ``G = N // K`` (grouped-query).
- Under dropout, weights are multiplied by ``keep / (1 - rate)`` with ``keep`` from
  :func:`jaxattn.attention_dropout_mask`, after the softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxattn._dropout import attention_dropout_mask
from jaxattn.masks import CausalMask, MaskSpec

__all__ = ["dot_product_attention"]


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal: bool = False,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key=None,
    return_residual: bool = False,
    return_weights: bool = False,
):
    """softmax(Q K^T * scale + bias, masked) V, straight from the formula.

    Arguments as :func:`jaxattn.dot_product_attention`: query ``[..., T, N, H]``, key
    ``[..., S, K, H]``, value ``[..., S, K, Hv]``; mask and bias broadcastable to
    ``[..., N, T, S]``; ``scale`` defaults to ``1 / sqrt(H)``; causal masks align
    bottom-right when ``T != S``; ``logits_soft_cap`` ``c`` maps the scaled logits ``x`` to
    ``c * tanh(x / c)`` before the bias. Returns ``[..., T, N, Hv]`` in the input dtype, then
    with ``return_residual`` the log-sum-exp of each row ``[..., T, N]`` (-inf for a row with
    no key) and with ``return_weights`` the weights ``[..., N, T, S]`` (float32, float64 for
    float64).
    """
    *batch, t, n, h = query.shape
    s, k = key.shape[-3:-1]
    dtype = jnp.promote_types(query.dtype, jnp.float32)  # logits and softmax: >= float32
    q = query.astype(dtype)
    kk = jnp.repeat(key.astype(dtype), n // k, axis=-2)  # [..., S, N, H]: head n reads n // G
    v = jnp.repeat(value.astype(dtype), n // k, axis=-2)  # [..., S, N, Hv]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    logits = jnp.einsum("...tnh,...snh->...nts", q, kk) * scale  # [..., N, T, S]
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    if bias is not None:
        logits = logits + jnp.broadcast_to(bias, logits.shape)
    if isinstance(mask, MaskSpec):
        mask = mask.materialize(t, s)
    if mask is not None:  # a masked key gets logit -inf, so weight exp(-inf) = 0
        logits = jnp.where(jnp.broadcast_to(mask, logits.shape), logits, -jnp.inf)
    if is_causal:
        causal = jnp.broadcast_to(CausalMask().materialize(t, s), logits.shape)
        logits = jnp.where(causal, logits, -jnp.inf)
    seen = jnp.any(logits != -jnp.inf, axis=-1, keepdims=True)  # rows with a key (or a NaN)
    weights = jax.nn.softmax(jnp.where(seen, logits, 0.0), axis=-1) * seen
    if dropout_rate:
        keep = attention_dropout_mask(dropout_key, dropout_rate, batch, n, t, s)
        weights = weights * keep / (1.0 - dropout_rate)
    out = jnp.einsum("...nts,...snh->...tnh", weights, v).astype(query.dtype)
    # [..., T, N]; -inf for a row with no key, with zero gradients there (not logsumexp's NaN)
    lse = jnp.where(
        seen, jax.nn.logsumexp(jnp.where(seen, logits, 0.0), axis=-1, keepdims=True), -jnp.inf
    )
    lse = jnp.moveaxis(lse[..., 0], -1, -2)
    result = (out,) + ((lse,) if return_residual else ()) + ((weights,) if return_weights else ())
    return result if len(result) > 1 else out
