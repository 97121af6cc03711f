"""Strict settings for the whole suite, and the float64 reference every fast path is checked
against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Implicit rank promotion hides broadcasting bugs; the package must never rely on it.
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "jaxattn",
    deadline=None,  # every new shape compiles once; wall time per example is not the point
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # CI runs the same examples every time
)
settings.load_profile("jaxattn")


def reference_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(Q K^T * scale + bias, masked) V in float64 NumPy, straight from the formula.

    q [..., T, N, H], k [..., S, K, H], v [..., S, K, Hv]; query head n reads key head
    n // (N // K). Returns (out [..., T, N, Hv], weights [..., N, T, S]); rows with no
    unmasked key give zeros.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, kh = q.shape[-2], k.shape[-2]
    k = np.repeat(k, n // kh, axis=-2)
    v = np.repeat(v, n // kh, axis=-2)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    logits = np.einsum("...tnh,...snh->...nts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(logits - row_max)
    denom = e.sum(axis=-1, keepdims=True)
    weights = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    out = np.einsum("...nts,...snh->...tnh", weights, v)
    return out, weights


def reference_attention_jnp(q, k, v, mask, bias=0.0, scale=None, keep=None, rate=0.0):
    """The same formula in jnp (run it under float64), differentiable, for gradient checks.

    Rows with no unmasked key are zeroed by a 0/1 factor; ``keep`` (bool, broadcastable to
    ``[..., N, T, S]``) applies dropout at ``rate`` to the weights. Returns (out, weights),
    the weights after dropout.
    """
    g = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, g, axis=-2), jnp.repeat(v, g, axis=-2)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("...tnh,...snh->...nts", q, k) * scale + bias
    mask = jnp.broadcast_to(mask, logits.shape)
    logits = jnp.where(mask, logits, -1e300)
    w = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
    if keep is not None:
        w = w * keep / (1 - rate)
    return jnp.einsum("...nts,...snh->...tnh", w, v), w


def qkv(rng, batch, t, s, n, k, h, hv=None, dtype=np.float32):
    """Random query ``[*batch, T, N, H]``, key ``[*batch, S, K, H]``, value
    ``[*batch, S, K, Hv]``."""
    hv = h if hv is None else hv
    q = rng.standard_normal((*batch, t, n, h)).astype(dtype)
    key = rng.standard_normal((*batch, s, k, h)).astype(dtype)
    v = rng.standard_normal((*batch, s, k, hv)).astype(dtype)
    return q, key, v


@pytest.fixture
def rng():
    return np.random.default_rng(0)
