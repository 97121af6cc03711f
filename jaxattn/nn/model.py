"""TinyDecoder: a decoder-only transformer in Flax NNX, built from a frozen ModelConfig."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.nn.config import ModelConfig
from jaxattn.nn.layers import DecoderBlock, dropout, sinusoidal_positions, split_keys

__all__ = ["TinyDecoder"]


class TinyDecoder(nnx.Module):
    """Token embedding, positions, ``num_layers`` decoder blocks, final LayerNorm, logits.

    Call with int tokens ``[B, T]`` (T <= ``max_len``) to get float32 logits ``[B, T, V]``;
    with ``return_attention=True`` also the weights of every layer, ``[L, B, N, T, T]``.
    ``key`` (a PRNG key) turns dropout on; None is evaluation.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.config = config
        self.vocab_size = vocab_size
        d = config.d_model
        # Embeddings scaled by sqrt(D) at use, so the N(0, 1/D)-initialised table and the
        # unit-scale sinusoids start at comparable sizes (the paper's sec. 3.4).
        self.embed = nnx.Embed(
            vocab_size, d, embedding_init=nnx.initializers.normal(1.0 / math.sqrt(d)), rngs=rngs
        )
        if config.positions == "learned":
            self.position_embed = nnx.Embed(
                config.max_len, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
            )
        self.blocks = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        if not config.tie_embeddings:
            self.unembed = nnx.Linear(d, vocab_size, rngs=rngs)

    def __call__(self, tokens, *, key=None, return_attention: bool = False):
        cfg = self.config
        t = tokens.shape[1]
        if t > cfg.max_len:
            raise ValueError(f"tokens have length {t} but model.max_len is {cfg.max_len}")
        x = self.embed(tokens) * math.sqrt(cfg.d_model)
        if cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(t, cfg.d_model)[None]
        elif cfg.positions == "learned":
            x = x + self.position_embed(jnp.arange(t))[None]
        keys = split_keys(key, len(self.blocks) + 1)
        x = dropout(x, cfg.dropout, keys[-1])
        weights = []
        for block, k in zip(self.blocks, keys[:-1], strict=False):
            x, w = block(x, key=k, return_weights=return_attention)
            weights.append(w)
        x = self.final_norm(x)
        if cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.unembed(x)
        logits = logits.astype(jnp.float32)
        if return_attention:
            return logits, jnp.stack(weights)
        return logits


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
