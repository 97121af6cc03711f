"""Flax NNX layers of the models: attention (self and cross), feed-forward, positions, the
decoder and encoder blocks.

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
from jaxattn.masks import MaskSpec, PaddingMask
from jaxattn.nn.axes import BATCH_AXES, HEAD_AXIS
from jaxattn.nn.cache import LayerCache
from jaxattn.nn.config import ACTIVATIONS, COMPUTE_DTYPES, PAD_ID, ModelConfig
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
    """Attention with N query heads and K key/value heads (GQA when K < N): self-attention
    (causal by default, or under any mask of :mod:`jaxattn.masks`), or, built with
    ``cross=True``, cross-attention: queries from ``x``, keys and values from ``context``.

    Projections: Q ``[D -> N*H]``, K and V ``[D -> K*H]``, output ``[N*H -> D]``, H = D / N.
    Calls :func:`jaxattn.dot_product_attention` (with, when given a key, its attention
    dropout), so long sequences take the blockwise path in training too. Rotary positions
    rotate self-attention's queries and keys only: a query and a key of two different
    sequences have no relative position. For generation, :meth:`prefill` and :meth:`step`
    read and write a :class:`LayerCache`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False):
        d = config.d_model
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.head_dim = d // config.num_heads
        self.cross = cross
        self.rotary = config.positions == "rotary" and not cross
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
        k, v = self._project_kv(x)
        if self.rotary:
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        return q, k, v

    def _project_kv(self, context):
        """``context [B, S, D]`` -> k and v ``[B, S, K, H]`` (no rotary)."""
        b, s, _ = context.shape
        k = self.k_proj(context).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(context).reshape(b, s, self.num_kv_heads, self.head_dim)
        return k, v

    def _merge_heads(self, out):
        b, t = out.shape[:2]
        return self.out_proj(out.reshape(b, t, -1))

    def __call__(
        self,
        x,
        *,
        context=None,
        mask=None,
        is_causal: bool | None = None,
        key=None,
        return_weights: bool = False,
    ):
        """``x [B, T, D]`` -> ``[B, T, D]`` (and weights ``[B, N, T, S]`` if asked).

        Self-attention attends ``x`` to itself (S = T); cross-attention (``cross=True``)
        attends it to ``context [B, S, D]`` (required). ``mask``: a mask of
        :mod:`jaxattn.masks` or a bool array broadcastable to ``[B, N, T, S]`` (True = may
        attend), combined with ``is_causal`` (bottom-right aligned when T != S; None: causal
        self-attention, non-causal cross-attention). A query row that may attend to no key
        gets zeros, never NaN.
        """
        if is_causal is None:
            is_causal = not self.cross
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs context [B, S, D], got None")
            q = self.q_proj(x).reshape(*x.shape[:2], self.num_heads, self.head_dim)
            k, v = self._project_kv(context)
        else:
            q, k, v = self._project(x, jnp.arange(x.shape[1]))
        rate = self.attention_dropout if key is not None else 0.0
        if return_weights:  # the pictures: on the whole arrays
            drop = {"dropout_rate": rate, "dropout_key": key} if rate > 0.0 else {}
            out, weights = dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, return_weights=True, **drop
            )
            return self._merge_heads(out), weights

        def attend(q, k, v, key, shard, mask):
            drop = {}
            if rate > 0.0:  # each shard its own dropout draws
                key = key if shard is None else jax.random.fold_in(key, shard)
                drop = {"dropout_rate": rate, "dropout_key": key}
            return dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, **drop)

        out = per_shard(attend, q, k, v, key if rate > 0.0 else None, mask)
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


def per_shard(attend, q, k, v, key, mask=None):
    """``attend(q, k, v, key, shard, mask)`` on ``q [B, T, N, H]``, ``k, v [B, S, K, H]``: once
    on the whole arrays (``shard`` None), or, under a mesh with the axes :data:`BATCH_AXES`
    and :data:`HEAD_AXIS` in context, once per device on its shard (``jax.shard_map``):
    B split over the batch axes (as the trainer splits every batch), N and K over the head
    axis where they divide (else heads stay whole on each device). ``mask`` (None, a mask of
    :mod:`jaxattn.masks` or a bool array) is split with the batch: each of its arrays whose
    leading dim is B, the rest whole on every device.

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
        return attend(q, k, v, key, None, mask)
    # Every axis named, those of size 1 too: the transpose of shard_map sums the gradients
    # of an input over the axes its spec leaves out (an all-reduce, even over one device).
    if mesh.size == 1 or q.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return attend(q, k, v, key, None, mask)  # nothing to split, or a batch it cannot split
    split, kh = mesh.shape[HEAD_AXIS], k.shape[2]
    heads = None
    if q.shape[2] % split == 0 and (kh % split == 0 or split % kh == 0):
        heads = HEAD_AXIS
        if kh < split:  # fewer key heads than shards (GQA, MQA): each shard gets its copy
            k, v = jnp.repeat(k, split // kh, axis=2), jnp.repeat(v, split // kh, axis=2)
    spec = P(BATCH_AXES, None, heads, None)
    axes = (*BATCH_AXES, *([HEAD_AXIS] if heads else []))
    mask, leaf_specs = _mask_shards(mask, q.shape[0], q.shape[2], heads)
    leaves, treedef = jax.tree.flatten(mask)

    def local(q, k, v, key, leaves):
        return attend(q, k, v, key, jax.lax.axis_index(axes), jax.tree.unflatten(treedef, leaves))

    return jax.shard_map(
        local,
        in_specs=(spec, spec, spec, P(), leaf_specs),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, key, leaves)


def padding_of(tokens):
    """The key padding mask of int ``tokens [B, S]``: a mask of :mod:`jaxattn.masks` that
    hides every key holding :data:`~jaxattn.nn.config.PAD_ID`, wherever it sits (query rows
    stay open: a pad query's output is never read). The kernel also zeroes the values
    there, so whatever a pad position holds (NaN included) never reaches a real one."""
    return PaddingMask.from_tokens(kv_tokens=tokens, pad_id=PAD_ID)


def _mask_shards(mask, b: int, n: int, heads):
    """``(mask, spec of each of its leaves)`` for :func:`per_shard`: what each device takes.

    A mask of :mod:`jaxattn.masks`: the arrays of each of its rules that holds per-sequence
    values of batch ``(B,)`` are split with the sequences; a rule without them (its arrays
    ``[L]`` ids, say) stays whole. A bool array, viewed as ``[B|1, N|1, T, S]`` (leading
    dims of 1 added, as it broadcasts): its batch dim split when it is B, its head dim over
    the head axis when heads are split and it is N."""
    if mask is None:
        return None, []
    if isinstance(mask, MaskSpec):
        rules = jax.tree.leaves(mask, is_leaf=lambda x: isinstance(x, MaskSpec) and x.is_rule())
        specs = []
        for rule in rules:
            split = rule.batch_shape() == (b,)
            specs += [P(BATCH_AXES) if split else P()] * len(jax.tree.leaves(rule))
        return mask, specs
    mask = jnp.asarray(mask)
    if mask.ndim > 4:
        return mask, [P()]  # not a layout this function splits: the kernel will say why
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    batch = BATCH_AXES if mask.shape[0] == b else None
    head = heads if mask.shape[1] == n else None
    return mask, [P(batch, head)]


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
    """Self-attention, optionally cross-attention, and feed-forward, each in a residual
    branch with LayerNorm.

    ``norm="pre"``: x + f(LN(x)) (stable without warmup tricks); ``norm="post"``:
    LN(x + f(x)) as in the original paper. ``causal=False`` makes self-attention
    bidirectional (:class:`EncoderBlock`); ``cross=True`` adds cross-attention over an
    encoder's output between the two (the encoder-decoder's decoder block).
    """

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs, causal: bool = True, cross: bool = False
    ):
        self.pre_norm = config.norm == "pre"
        self.rate = config.dropout
        self.causal = causal
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)
        # Statistics in float32 whatever dtype (Flax promotes them); output in the compute dtype.
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.norm1 = LayerNorm(config.d_model, dtype=dt, rngs=rngs)
        self.norm2 = LayerNorm(config.d_model, dtype=dt, rngs=rngs)
        self.cross = cross
        if cross:
            self.cross_attention = MultiHeadAttention(config, rngs=rngs, cross=True)
            self.norm_cross = LayerNorm(config.d_model, dtype=dt, rngs=rngs)

    def __call__(
        self,
        x,
        *,
        mask=None,
        is_causal: bool | None = None,
        memory=None,
        memory_mask=None,
        key=None,
        return_weights: bool = False,
    ):
        """``x [B, T, D]`` -> (``[B, T, D]``, attention weights or None).

        ``mask``: self-attention's mask (:mod:`jaxattn.masks` or bool), combined with
        causality: the block's own (``is_causal=None``) or the one given (a prefix-LM's
        mask is causal itself: it is given with ``is_causal=False``). A cross block attends
        to ``memory [B, S, D]`` (the encoder's output) under ``memory_mask`` (e.g. the
        source's padding, ``[B, 1, 1, S]`` or a mask). The weights, when asked:
        self-attention's ``[B, N, T, T]``; a cross block's are ``(self [B, N, T, T], cross
        [B, N, T, S])``.
        """
        if not self.cross:
            k_attn, k_drop1, k_ff, k_drop2 = split_keys(key, 4)  # a decoder's draws as before
            k_cross = k_drop_c = None
        else:
            k_attn, k_drop1, k_ff, k_drop2, k_cross, k_drop_c = split_keys(key, 6)
        causal = self.causal if is_causal is None else is_causal

        def attend(h):
            out = self.attention(
                h, mask=mask, is_causal=causal, key=k_attn, return_weights=return_weights
            )
            return out if return_weights else (out, None)

        x, weights = self._branch(x, self.norm1, attend, k_drop1)
        if self.cross:
            if memory is None:
                raise ValueError("a cross-attention block needs memory [B, S, D], got None")

            def cross(h):
                out = self.cross_attention(
                    h,
                    context=memory,
                    mask=memory_mask,
                    is_causal=False,
                    key=k_cross,
                    return_weights=return_weights,
                )
                return out if return_weights else (out, None)

            x, cross_weights = self._branch(x, self.norm_cross, cross, k_drop_c)
            weights = (weights, cross_weights) if return_weights else None
        return self._feed_forward(x, k_ff, k_drop2), weights

    def prefill(self, x, cache: LayerCache):
        """:meth:`MultiHeadAttention.prefill` in the block: (``[B, P, D]``, new cache)."""
        self._no_cross("prefill")
        return self._residuals(x, lambda h: self.attention.prefill(h, cache))

    def step(self, x, cache: LayerCache, lengths):
        """:meth:`MultiHeadAttention.step` in the block: (``[B, 1, D]``, new cache)."""
        self._no_cross("step")
        return self._residuals(x, lambda h: self.attention.step(h, cache, lengths))

    def _no_cross(self, what: str) -> None:
        if self.cross:  # its cross-attention would be skipped: never a silent wrong answer
            raise NotImplementedError(
                f"{what} with a key/value cache is written for blocks without cross-attention"
            )

    def _residuals(self, x, attend):
        """Self-attention's branch ``attend(h) -> (out, extra)`` and the feed-forward's;
        returns (x, extra)."""
        x, extra = self._branch(x, self.norm1, attend, None)
        return self._feed_forward(x, None, None), extra

    def _branch(self, x, norm, f, drop_key):
        """One residual branch around ``f(h) -> (out, extra)``: returns (x, extra)."""
        h = norm(x) if self.pre_norm else x
        out, extra = f(h)
        x = x + dropout(out, self.rate, drop_key)
        return (x if self.pre_norm else norm(x)), extra

    def _feed_forward(self, x, k_ff, k_drop):
        def ff(h):
            return self.feed_forward(h, key=k_ff), None

        return self._branch(x, self.norm2, ff, k_drop)[0]


def remat_block(block: DecoderBlock, x, key, **kwargs):
    """``block(x, key=key, **kwargs)[0]`` under ``jax.checkpoint``: the backward pass
    recomputes the block's activations from its inputs instead of keeping them (memory for
    FLOPs). ``kwargs`` are the block's: masks and memory (arrays or pytrees of arrays) and
    ``is_causal`` (a Python bool, fixed at trace time)."""
    is_causal = kwargs.pop("is_causal", None)

    def run(block, x, key, traced):
        return block(x, key=key, is_causal=is_causal, **traced)[0]

    return nnx.remat(run)(block, x, key, kwargs)


class EncoderBlock(DecoderBlock):
    """The encoder's block: bidirectional self-attention (every token sees every other,
    padding hidden by the ``mask`` it is given) and feed-forward."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs, causal=False)
