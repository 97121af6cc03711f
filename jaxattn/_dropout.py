"""Attention dropout masks from a counter-based hash of (seed, sequence, head, query, key).

Whether the weight of query ``t`` on key ``s`` in head ``n`` of sequence ``b`` is kept depends
on those four positions and on two 32-bit words drawn once from the PRNG key, nothing else:
not on block sizes, on the order blocks are visited in, or on the implementation. The
blockwise path regenerates exactly the mask the xla path builds, block by block, in its
forward and again in its backward, and never stores one.

The hash is the 32-bit finaliser of MurmurHash3 (a bijection with full avalanche), chained
over the row coordinates (b, n, t) and applied once more per key ``s``: about ten integer
operations per weight, far cheaper than the ``exp`` the softmax already pays there. It is a
statistical mixer, not a cryptographic one; the tests check the kept fraction and that
neighbouring rows, columns and heads are uncorrelated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "attention_dropout_mask",
    "check_rate",
    "keep",
    "positions",
    "scale_factor",
    "seed_words",
]

_U32 = jnp.uint32
# Odd multipliers (golden ratio and MurmurHash3 / xxHash primes), one per coordinate.
_B, _N, _T, _S = (np.uint32(c) for c in (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F))


def _fmix(h):
    """MurmurHash3's 32-bit finaliser (uint32 -> uint32, a bijection)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def check_rate(rate) -> float:
    """``rate`` as a float in [0, 1), or a ValueError naming ``dropout_rate``."""
    ok = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not ok or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout_rate must be a float in [0, 1), got {rate!r}")
    return float(rate)


def seed_words(key) -> jax.Array:
    """Two uint32 words drawn from a PRNG key (typed, or a raw ``uint32[2]`` key)."""
    typed = hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed and key.shape == ()) and not raw:
        shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", type(key).__name__)
        raise ValueError(
            "dropout_key must be one PRNG key (jax.random.key(...) or a uint32[2] key), "
            f"got {dtype} with shape {shape}"
        )
    return jax.random.bits(key, (2,), _U32)


def keep(seed, rate: float, b, n, t, s):
    """bool: which weights survive dropout at ``rate``. ``b, n, t, s`` are integer index
    arrays of equal rank that broadcast together (flattened sequence, query head, query
    position, key position); the result has their broadcast shape."""
    b, n, t, s = (jnp.asarray(x).astype(_U32) for x in (b, n, t, s))
    row = _fmix(seed[0] + b * _B)
    row = _fmix(row ^ (n * _N + seed[1]))
    row = _fmix(row ^ (t * _T))
    threshold = np.uint32(min(round(rate * 2.0**32), 2**32 - 1))
    return _fmix(row ^ (s * _S)) >= threshold  # P(keep) = 1 - rate


def scale_factor(seed, rate: float, b, n, t, s, dtype):
    """``1 / (1 - rate)`` where :func:`keep` keeps the weight, 0 where it drops it: the
    factor every path multiplies its weights by (indices as in :func:`keep`)."""
    return jnp.where(keep(seed, rate, b, n, t, s), 1.0 / (1.0 - rate), 0.0).astype(dtype)


def positions(batch_shape, n: int, t: int, s: int):
    """Index arrays (flattened sequence, head, query, key) that broadcast to
    ``[*batch_shape, N, T, S]``, for :func:`keep` over a whole weights array."""
    batch_shape = tuple(batch_shape)
    lead = (1,) * len(batch_shape)
    flat = int(np.prod(batch_shape)) if batch_shape else 1
    b = jnp.arange(flat, dtype=jnp.int32).reshape((*batch_shape, 1, 1, 1))
    n_idx = jnp.arange(n, dtype=jnp.int32).reshape((*lead, n, 1, 1))
    t_idx = jnp.arange(t, dtype=jnp.int32).reshape((*lead, 1, t, 1))
    s_idx = jnp.arange(s, dtype=jnp.int32).reshape((*lead, 1, 1, s))
    return b, n_idx, t_idx, s_idx


def attention_dropout_mask(dropout_key, dropout_rate: float, batch_shape, n: int, t: int, s: int):
    """The keep mask ``dot_product_attention`` applies for ``dropout_key`` and
    ``dropout_rate``: bool ``[*batch_shape, N, T, S]``, True where the weight is kept (and
    scaled by ``1 / (1 - dropout_rate)``). For inspecting or reproducing a training step."""
    rate = check_rate(dropout_rate)
    return keep(seed_words(dropout_key), rate, *positions(batch_shape, n, t, s))
