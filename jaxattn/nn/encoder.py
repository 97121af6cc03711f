"""The encoder (bidirectional self-attention over padded token sequences) and a classifier
on it (the seed tutorials' ``EncoderBlock`` and ``DocumentClassifier``, padding handled).

Padding comes from the tokens: a position holding :data:`~jaxattn.nn.config.PAD_ID` is
hidden from every query (:meth:`jaxattn.masks.PaddingMask.from_tokens`), wherever it sits,
and the classifier pools over real tokens only, so extra padding, or what the padding holds,
changes no output at a real position and no class.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxattn.nn.config import COMPUTE_DTYPES, PAD_ID, ModelConfig
from jaxattn.nn.embedding import embed_tokens, position_table, token_table
from jaxattn.nn.layers import (
    EncoderBlock,
    LayerNorm,
    Linear,
    padding_of,
    remat_block,
    split_keys,
)

__all__ = ["Classifier", "Encoder", "padding_of"]


class Encoder(nnx.Module):
    """Token embedding, positions, ``num_layers`` :class:`EncoderBlock` s (every real token
    sees every real token, before and after it), final LayerNorm.

    Call with int tokens ``[B, S]`` (S <= ``max_len``, PAD anywhere) to get the stream
    ``[B, S, D]`` in the compute dtype; with ``return_attention=True`` also every layer's
    weights ``[L, B, N, S, S]`` (0 at pad keys). A row of only padding gives finite
    outputs (its attention rows are empty: zeros). ``key`` turns dropout on.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.config = config
        self.vocab_size = vocab_size
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.embed = token_table(config, vocab_size, rngs=rngs)
        if config.positions == "learned":
            self.position_embed = position_table(config, rngs=rngs)
        self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = LayerNorm(config.d_model, dtype=dt, rngs=rngs)

    def __call__(self, tokens, *, key=None, return_attention: bool = False):
        keys = split_keys(key, len(self.blocks) + 1)
        table = getattr(self, "position_embed", None)
        x = embed_tokens(
            self.config, self.embed, table, tokens, jnp.arange(tokens.shape[1]), keys[-1]
        )
        mask = padding_of(tokens)
        weights = []
        for block, k in zip(self.blocks, keys[:-1], strict=False):
            if self.config.remat and not return_attention:
                x = remat_block(block, x, k, mask=mask)
                continue
            x, w = block(x, mask=mask, key=k, return_weights=return_attention)
            weights.append(w)
        x = self.final_norm(x)
        return (x, jnp.stack(weights)) if return_attention else x


class Classifier(nnx.Module):
    """An :class:`Encoder`, the mean of its outputs over each sequence's real tokens, and a
    linear head: int tokens ``[B, S]`` -> float32 class logits ``[B, C]`` (and, with
    ``return_attention=True``, the encoder's weights ``[L, B, N, S, S]``).

    A sequence of only padding pools to zeros: its logits are the head's bias.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, num_classes: int, *, rngs):
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.encoder = Encoder(config, vocab_size, rngs=rngs)
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.head = Linear(config.d_model, num_classes, dtype=dt, rngs=rngs)

    def __call__(self, tokens, *, key=None, return_attention: bool = False):
        out = self.encoder(tokens, key=key, return_attention=return_attention)
        x, weights = out if return_attention else (out, None)
        real = (tokens != PAD_ID)[..., None]  # [B, S, 1]
        # Sum in float32 over real tokens only, divided by their count (at least 1: a row of
        # padding sums to 0, never 0 / 0).
        total = jnp.sum(jnp.where(real, x.astype(jnp.float32), 0.0), axis=1)
        count = jnp.maximum(jnp.sum(real, axis=1), 1).astype(jnp.float32)
        logits = self.head((total / count).astype(x.dtype)).astype(jnp.float32)
        return (logits, weights) if return_attention else logits
