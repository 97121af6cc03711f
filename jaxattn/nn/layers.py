"""Flax NNX layers of the decoder: attention, feed-forward, positions, the decoder block.

The maths lives in pure functions (``jaxattn.attention``, the position functions here); the
modules only hold parameters and call them. Arrays are ``[B, T, D]`` between layers and
``[B, T, N, H]`` inside attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.attention import dot_product_attention
from jaxattn.nn.config import ModelConfig

# The values ModelConfig's string fields may take, implemented here and in jaxattn.nn.model.
POSITIONS = ("sinusoidal", "learned", "rotary")  # model.positions
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}  # model.activation -> function
NORMS = ("pre", "post")  # model.norm: LayerNorm before or after each residual branch


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when ``key`` is None (evaluation) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_keys(key, n: int):
    """``n`` keys from ``key``, or ``n`` Nones when ``key`` is None (evaluation)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def sinusoidal_positions(length: int, d_model: int) -> jax.Array:
    """The fixed encodings of "Attention Is All You Need" (sec. 3.5), float32 ``[T, D]``.

    Even channels 2i hold sin(pos / 10000^(2i/D)), odd channels cos of the same angle.
    """
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angles = pos * inv_freq[None, :]  # [T, D/2]
    enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [T, D/2, 2]
    return enc.reshape(length, -1)[:, :d_model]


def apply_rotary(x, positions):
    """Rotary position embedding (Su et al. 2021, RoFormer) on ``x [B, T, N|K, H]``.

    ``positions`` int ``[T]`` or ``[B, T]``; H must be even. Channel pairs (i, i + H/2) are
    rotated by angle pos / 10000^(2i/H) (the "rotate half" layout), in float32.
    """
    h = x.shape[-1]
    half = h // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    pos = jnp.asarray(positions, jnp.float32)
    angles = pos[..., None] * inv_freq.reshape((1,) * pos.ndim + (half,))  # [(B,) T, H/2]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]  # [B|1, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class MultiHeadAttention(nnx.Module):
    """Causal self-attention with N query heads and K key/value heads (GQA when K < N).

    Projections: Q ``[D -> N*H]``, K and V ``[D -> K*H]``, output ``[N*H -> D]``, H = D / N.
    Calls :func:`jaxattn.dot_product_attention` with ``is_causal=True`` (and, when given a
    key, its attention dropout), so long sequences take the blockwise path in training too.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.head_dim = d // config.num_heads
        self.rotary = config.positions == "rotary"
        self.attention_dropout = config.attention_dropout
        self.q_proj = nnx.Linear(d, self.num_heads * self.head_dim, rngs=rngs)
        self.k_proj = nnx.Linear(d, self.num_kv_heads * self.head_dim, rngs=rngs)
        self.v_proj = nnx.Linear(d, self.num_kv_heads * self.head_dim, rngs=rngs)
        self.out_proj = nnx.Linear(self.num_heads * self.head_dim, d, rngs=rngs)

    def __call__(self, x, *, key=None, return_weights: bool = False):
        """``x [B, T, D]`` -> ``[B, T, D]`` (and weights ``[B, N, T, T]`` if asked)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.rotary:
            positions = jnp.arange(t)
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        drop = {}
        if key is not None and self.attention_dropout > 0.0:
            drop = {"dropout_rate": self.attention_dropout, "dropout_key": key}
        result = dot_product_attention(
            q, k, v, is_causal=True, return_weights=return_weights, **drop
        )
        out, weights = result if return_weights else (result, None)
        out = self.out_proj(out.reshape(b, t, -1))
        return (out, weights) if return_weights else out


class FeedForward(nnx.Module):
    """Position-wise ``D -> d_ff -> D`` with ReLU or GELU."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(config.d_model, config.d_ff, rngs=rngs)
        self.down = nnx.Linear(config.d_ff, config.d_model, rngs=rngs)
        self.activation = ACTIVATIONS[config.activation]
        self.rate = config.dropout

    def __call__(self, x, *, key=None):
        return self.down(dropout(self.activation(self.up(x)), self.rate, key))


class DecoderBlock(nnx.Module):
    """Attention and feed-forward, each in a residual branch with LayerNorm.

    ``norm="pre"``: x + f(LN(x)) (stable without warmup tricks); ``norm="post"``:
    LN(x + f(x)) as in the original paper.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.pre_norm = config.norm == "pre"
        self.rate = config.dropout
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)
        self.norm1 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.norm2 = nnx.LayerNorm(config.d_model, rngs=rngs)

    def __call__(self, x, *, key=None, return_weights: bool = False):
        k_attn, k_drop1, k_ff, k_drop2 = split_keys(key, 4)
        h = self.norm1(x) if self.pre_norm else x
        attn = self.attention(h, key=k_attn, return_weights=return_weights)
        attn, weights = attn if return_weights else (attn, None)
        x = x + dropout(attn, self.rate, k_drop1)
        if not self.pre_norm:
            x = self.norm1(x)
        h = self.norm2(x) if self.pre_norm else x
        x = x + dropout(self.feed_forward(h, key=k_ff), self.rate, k_drop2)
        if not self.pre_norm:
            x = self.norm2(x)
        return x, weights
