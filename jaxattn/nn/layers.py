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
from jax.sharding import PartitionSpec as P

from jaxattn.attention import dot_product_attention
from jaxattn.nn.axes import BATCH_AXES, HEAD_AXIS
from jaxattn.nn.cache import LayerCache
from jaxattn.nn.config import ACTIVATIONS, COMPUTE_DTYPES, ModelConfig
from jaxattn.nn.linear import LayerNorm, Linear


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
    return sinusoidal_at(jnp.arange(length), d_model)


def sinusoidal_at(positions, d_model: int) -> jax.Array:
    """:func:`sinusoidal_positions` at int ``positions`` of any shape: float32 ``[..., D]``."""
    pos = jnp.asarray(positions, jnp.float32)[..., None]
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angles = pos * inv_freq.reshape((1,) * (pos.ndim - 1) + inv_freq.shape)  # [..., D/2]
    enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., D/2, 2]
    return enc.reshape(*angles.shape[:-1], -1)[..., :d_model]


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
    For generation, :meth:`prefill` and :meth:`step` read and write a :class:`LayerCache`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.head_dim = d // config.num_heads
        self.rotary = config.positions == "rotary"
        self.attention_dropout = config.attention_dropout
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.q_proj = Linear(d, self.num_heads * self.head_dim, dtype=dt, rngs=rngs)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, dtype=dt, rngs=rngs)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, dtype=dt, rngs=rngs)
        self.out_proj = Linear(self.num_heads * self.head_dim, d, dtype=dt, rngs=rngs)

    def _project(self, x, positions):
        """``x [B, T, D]`` at int ``positions`` (``[T]`` or ``[B, T]``) -> q ``[B, T, N, H]``,
        k and v ``[B, T, K, H]``, rotary already applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.rotary:
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        return q, k, v

    def _merge_heads(self, out):
        b, t = out.shape[:2]
        return self.out_proj(out.reshape(b, t, -1))

    def __call__(self, x, *, key=None, return_weights: bool = False):
        """``x [B, T, D]`` -> ``[B, T, D]`` (and weights ``[B, N, T, T]`` if asked)."""
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        rate = self.attention_dropout if key is not None else 0.0
        if return_weights:  # the pictures: on the whole arrays
            drop = {"dropout_rate": rate, "dropout_key": key} if rate > 0.0 else {}
            out, weights = dot_product_attention(
                q, k, v, is_causal=True, return_weights=True, **drop
            )
            return self._merge_heads(out), weights

        def attend(q, k, v, key, shard):
            drop = {}
            if rate > 0.0:  # each shard its own dropout draws
                key = key if shard is None else jax.random.fold_in(key, shard)
                drop = {"dropout_rate": rate, "dropout_key": key}
            return dot_product_attention(q, k, v, is_causal=True, **drop)

        out = per_shard(attend, q, k, v, key if rate > 0.0 else None)
        return self._merge_heads(out)

    def prefill(self, x, cache: LayerCache):
        """Attention of prompts ``x [B, P, D]`` over themselves, their keys and values written
        to ``cache`` slots ``[0, P)``. Returns (``[B, P, D]``, the new cache).

        Causal attention within the prompts only (a long prompt takes the blockwise path),
        not over the whole cache. Prompts shorter than P are right-padded: causality keeps
        the padding out of every real token's row, and the padding's keys are written but
        never read (:meth:`step` masks slots at or beyond each sequence's length).
        """
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        out = dot_product_attention(q, k, v, is_causal=True)
        return self._merge_heads(out), LayerCache(_write(cache.keys, k), _write(cache.values, v))

    def step(self, x, cache: LayerCache, lengths):
        """One new token per sequence, ``x [B, 1, D]``, sequence b's at position
        ``lengths[b]`` (int32 ``[B]``, the tokens already in the cache).

        Its key and value go to slot ``lengths[b]``, then it attends over slots
        ``[0, lengths[b]]``: the causal mask aligned bottom-right to each sequence's part
        of the cache, the slots after it (padding, or not yet written) masked. Returns
        (``[B, 1, D]``, the new cache). A ``lengths[b]`` outside the cache writes nothing
        (the caller keeps lengths below the cache size).
        """
        q, k, v = self._project(x, lengths[:, None])
        rows = jnp.arange(x.shape[0])
        keys = cache.keys.at[rows, :, lengths].set(k[:, 0].astype(cache.keys.dtype), mode="drop")
        values = cache.values.at[rows, :, lengths].set(
            v[:, 0].astype(cache.values.dtype), mode="drop"
        )
        # A bool mask, not key_value_seq_lengths: padding lengths make the kernel zero K and
        # V first (a guard against NaN in unwritten slots), one more pass over the cache
        # per step (measured: 10-25% of a step). Here the slots past a length hold zeros or
        # keys of the prompt's padding, always finite, and a masked weight is exactly 0.
        visible = jnp.arange(keys.shape[2])[None] <= lengths[:, None]  # [B, S]
        out = dot_product_attention(
            q, keys.swapaxes(1, 2), values.swapaxes(1, 2), mask=visible[:, None, None, :]
        )
        return self._merge_heads(out), LayerCache(keys, values)


def per_shard(attend, q, k, v, key):
    """``attend(q, k, v, key, shard)`` on ``q [B, T, N, H]``, ``k, v [B, S, K, H]``: once on
    the whole arrays (``shard`` None), or, under a mesh with the axes :data:`BATCH_AXES` and
    :data:`HEAD_AXIS` in context, once per device on its shard (``jax.shard_map``):
    B split over the batch axes (as the trainer splits every batch), N and K over the head
    axis where they divide (else heads stay whole on each device).

    Attention mixes nothing across sequences or heads, so no shard needs another's data:
    left to the partitioner, the blockwise kernel's loops (dynamic slices along B) made XLA
    gather the whole batch onto every device. ``shard`` (the device's index in the mesh, a
    traced int) lets dropout draw differently on each shard (so with dropout the draws
    depend on the mesh). With fewer key heads than head shards (K < tensor, GQA or MQA),
    each shard gets a copy of its group's keys and values; heads stay whole on every device
    only when neither K nor the shard count divides the other.
    """
    mesh = jax.sharding.get_abstract_mesh()
    names = set(getattr(mesh, "axis_names", ()))
    if mesh.empty or not names >= {*BATCH_AXES, HEAD_AXIS}:
        return attend(q, k, v, key, None)
    # Every axis named, those of size 1 too: the transpose of shard_map sums the gradients
    # of an input over the axes its spec leaves out (an all-reduce, even over one device).
    if mesh.size == 1 or q.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return attend(q, k, v, key, None)  # nothing to split, or a batch the mesh cannot split
    split, kh = mesh.shape[HEAD_AXIS], k.shape[2]
    heads = None
    if q.shape[2] % split == 0 and (kh % split == 0 or split % kh == 0):
        heads = HEAD_AXIS
        if kh < split:  # fewer key heads than shards (GQA, MQA): each shard gets its copy
            k, v = jnp.repeat(k, split // kh, axis=2), jnp.repeat(v, split // kh, axis=2)
    spec = P(BATCH_AXES, None, heads, None)
    axes = (*BATCH_AXES, *([HEAD_AXIS] if heads else []))

    def local(q, k, v, key):
        return attend(q, k, v, key, jax.lax.axis_index(axes))

    return jax.shard_map(local, in_specs=(spec, spec, spec, P()), out_specs=spec, check_vma=False)(
        q, k, v, key
    )


def _write(cache, x):
    """``x [B, T, K, H]`` into slots ``[0, T)`` of a head-major cache ``[B, K, S, H]``."""
    return jax.lax.dynamic_update_slice_in_dim(cache, x.swapaxes(1, 2).astype(cache.dtype), 0, 2)


class FeedForward(nnx.Module):
    """Position-wise ``D -> d_ff -> D`` with ReLU or GELU."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.up = Linear(config.d_model, config.d_ff, dtype=dt, rngs=rngs)
        self.down = Linear(config.d_ff, config.d_model, dtype=dt, rngs=rngs)
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
        # Statistics in float32 whatever dtype (Flax promotes them); output in the compute dtype.
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.norm1 = LayerNorm(config.d_model, dtype=dt, rngs=rngs)
        self.norm2 = LayerNorm(config.d_model, dtype=dt, rngs=rngs)

    def __call__(self, x, *, key=None, return_weights: bool = False):
        """``x [B, T, D]`` -> (``[B, T, D]``, attention weights ``[B, N, T, T]`` or None)."""
        k_attn, k_drop1, k_ff, k_drop2 = split_keys(key, 4)

        def attend(h):
            out = self.attention(h, key=k_attn, return_weights=return_weights)
            return out if return_weights else (out, None)

        return self._residuals(x, attend, k_drop1, k_ff, k_drop2)

    def prefill(self, x, cache: LayerCache):
        """:meth:`MultiHeadAttention.prefill` in the block: (``[B, P, D]``, new cache)."""
        return self._residuals(x, lambda h: self.attention.prefill(h, cache))

    def step(self, x, cache: LayerCache, lengths):
        """:meth:`MultiHeadAttention.step` in the block: (``[B, 1, D]``, new cache)."""
        return self._residuals(x, lambda h: self.attention.step(h, cache, lengths))

    def _residuals(self, x, attend, k_drop1=None, k_ff=None, k_drop2=None):
        """The two residual branches around ``attend(h) -> (out, extra)``; returns
        (x, extra)."""
        h = self.norm1(x) if self.pre_norm else x
        attn, extra = attend(h)
        x = x + dropout(attn, self.rate, k_drop1)
        if not self.pre_norm:
            x = self.norm1(x)
        h = self.norm2(x) if self.pre_norm else x
        x = x + dropout(self.feed_forward(h, key=k_ff), self.rate, k_drop2)
        if not self.pre_norm:
            x = self.norm2(x)
        return x, extra
