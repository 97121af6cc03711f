"""TinyDecoder: a decoder-only transformer in Flax NNX, built from a frozen ModelConfig:
causal, or a prefix-LM (the prompt sees itself both ways)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.masks import PrefixLMMask
from jaxattn.nn.cache import KVCache
from jaxattn.nn.config import COMPUTE_DTYPES, ModelConfig
from jaxattn.nn.embedding import embed_tokens, logits_of, position_table, token_table
from jaxattn.nn.layers import (
    DecoderBlock,
    LayerNorm,
    Linear,
    padding_of,
    remat_block,
    split_keys,
)

__all__ = ["TinyDecoder"]


class TinyDecoder(nnx.Module):
    """Token embedding, positions, ``num_layers`` decoder blocks, final LayerNorm, logits.

    Call with int tokens ``[B, T]`` (T <= ``max_len``) to get float32 logits ``[B, T, V]``;
    with ``return_attention=True`` also the weights of every layer, ``[L, B, N, T, T]``.
    ``key`` (a PRNG key) turns dropout on; None is evaluation. ``prefix_lengths`` (int or
    int ``[B]``) makes it a prefix-LM: the first ``prefix_lengths[b]`` tokens of row b (its
    prompt) see each other both ways, every later token sees the prompt and the tokens up
    to itself (:class:`jaxattn.masks.PrefixLMMask`), PAD tokens hidden; None is causal
    throughout. Cached generation (:meth:`prefill`, :func:`jaxattn.nn.generate`) is causal:
    a prefix-LM's is not written yet.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.config = config
        self.vocab_size = vocab_size
        d = config.d_model
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.embed = token_table(config, vocab_size, rngs=rngs)
        if config.positions == "learned":
            self.position_embed = position_table(config, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = LayerNorm(d, dtype=dt, rngs=rngs)
        if not config.tie_embeddings:
            self.unembed = Linear(d, vocab_size, dtype=dt, rngs=rngs)

    def __call__(self, tokens, *, prefix_lengths=None, key=None, return_attention: bool = False):
        t = tokens.shape[1]
        keys = split_keys(key, len(self.blocks) + 1)
        x = self._embed(tokens, jnp.arange(t), keys[-1])
        mask, causal = None, True
        if prefix_lengths is not None:  # the prefix-LM mask is causal after the prompt;
            # a pad inside the prefix would be read both ways: hidden
            mask, causal = PrefixLMMask(prefix_lengths) & padding_of(tokens), False
        weights = []
        for block, k in zip(self.blocks, keys[:-1], strict=False):
            if self.config.remat and not return_attention:
                # jax.checkpoint per block: the backward pass recomputes the block's
                # activations from its input instead of keeping them (memory for FLOPs).
                x = remat_block(block, x, k, mask=mask, is_causal=causal)
                continue
            x, w = block(x, mask=mask, is_causal=causal, key=k, return_weights=return_attention)
            weights.append(w)
        logits = self._logits(x)
        if return_attention:
            return logits, jnp.stack(weights)
        return logits

    # ------------------------------------------------------------------ generation, cached

    def init_cache(self, batch_size: int, size: int) -> KVCache:
        """An empty :class:`KVCache` of ``size`` slots (1 <= size <= ``max_len``) for
        ``batch_size`` sequences: per layer ``2 * B * K * size * H`` numbers of
        ``model.compute_dtype``, the dtype of the keys and values (the kernel takes q, k
        and v of one dtype)."""
        if not 1 <= size <= self.config.max_len:
            raise ValueError(
                f"cache size must be in [1, model.max_len={self.config.max_len}], got {size}"
            )
        attention = self.blocks[0].attention
        return KVCache.zeros(
            len(self.blocks),
            batch_size,
            size,
            attention.num_kv_heads,
            attention.head_dim,
            dtype=COMPUTE_DTYPES[self.config.compute_dtype],
        )

    def prefill(self, tokens, cache: KVCache, lengths=None):
        """Run prompts ``tokens`` (int ``[B, P]``, right-padded) into an empty ``cache``.

        ``lengths`` (int ``[B]``, default all P) says how many tokens of each row are the
        prompt. Returns (float32 logits ``[B, P, V]``, the cache holding them): the logits
        of row b at ``lengths[b] - 1`` predict its first new token; those at padding are
        meaningless. One call, causal attention within the prompts (the blockwise path for
        long ones); slots [0, P) are overwritten, and what later slots held is masked until
        a step writes them.
        """
        b, p = tokens.shape
        if p > cache.size:
            raise ValueError(f"prompts of length {p} do not fit a cache of {cache.size} slots")
        x = self._embed(tokens, jnp.arange(p))
        layers = []
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x, layer = block.prefill(x, layer)
            layers.append(layer)
        lengths = (
            jnp.full((b,), p, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        )
        return self._logits(x), KVCache(tuple(layers), lengths)

    def decode_step(self, tokens, cache: KVCache):
        """Append one token per sequence (int ``[B]``, sequence b's at position
        ``cache.lengths[b]``) and return (float32 logits ``[B, V]`` of the next one, the
        cache with every length one longer). The caller keeps lengths below
        ``cache.size`` (a token past the end is not stored)."""
        lengths = cache.lengths
        x = self._embed(tokens[:, None], lengths[:, None])
        layers = []
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x, layer = block.step(x, layer, lengths)
            layers.append(layer)
        return self._logits(x)[:, 0], KVCache(tuple(layers), lengths + 1)

    # ------------------------------------------------------------------ shared

    def _embed(self, tokens, positions, key=None):
        """:func:`~jaxattn.nn.embedding.embed_tokens` with this model's tables."""
        table = getattr(self, "position_embed", None)
        return embed_tokens(self.config, self.embed, table, tokens, positions, key)

    def _logits(self, x):
        unembed = None if self.config.tie_embeddings else self.unembed
        return logits_of(x, self.final_norm, self.embed, unembed)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
