"""Strict settings for the whole suite, and the float64 reference every fast path is checked
against."""

from __future__ import annotations

import jax
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
