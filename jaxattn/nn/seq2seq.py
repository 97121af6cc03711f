"""The encoder-decoder (the seed tutorials' ``NMTTransformer``, padding handled): an
:class:`~jaxattn.nn.encoder.Encoder` reads the source; a decoder of causal self-attention,
cross-attention over the encoder's output and feed-forward writes the target.

Cross-attention never reads the source's padding: every source position holding
:data:`~jaxattn.nn.config.PAD_ID` is hidden from every target query (the mask of
:func:`~jaxattn.nn.encoder.padding_of`), so extra source padding, or what it holds, changes
no logit. The target's padding is hidden from its self-attention as well (and causality
keeps right padding out of every real row); the tasks' losses skip it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxattn.nn.config import COMPUTE_DTYPES, ModelConfig
from jaxattn.nn.embedding import embed_tokens, logits_of, token_table
from jaxattn.nn.encoder import Encoder
from jaxattn.nn.layers import (
    DecoderBlock,
    LayerNorm,
    Linear,
    padding_of,
    remat_block,
    split_keys,
)

__all__ = ["EncoderDecoder"]


class EncoderDecoder(nnx.Module):
    """Source tokens ``[B, S]`` and target input tokens ``[B, T]`` (int, S and T <=
    ``max_len``, one vocabulary) -> float32 logits ``[B, T, V]`` of each next target token.

    ``num_layers`` blocks in the encoder and as many in the decoder. With
    ``tie_embeddings`` one table embeds the source and the target and (transposed) makes the
    logits; without, the source, the target and the output each have their own. Learned
    positions, when chosen, share one table (positions count from 0 in both).

    ``return_attention=True`` also returns a dict of every layer's weights: ``"encoder"``
    ``[L, B, N, S, S]``, ``"self"`` ``[L, B, N, T, T]`` and ``"cross"`` ``[L, B, N, T, S]``
    (the alignment: 0 at source padding). ``key`` turns dropout on.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.config = config
        self.vocab_size = vocab_size
        dt = COMPUTE_DTYPES[config.compute_dtype]
        self.encoder = Encoder(config, vocab_size, rngs=rngs)
        if not config.tie_embeddings:
            self.target_embed = token_table(config, vocab_size, rngs=rngs)
            self.unembed = Linear(config.d_model, vocab_size, dtype=dt, rngs=rngs)
        self.blocks = nnx.List(
            [DecoderBlock(config, rngs=rngs, cross=True) for _ in range(config.num_layers)]
        )
        self.final_norm = LayerNorm(config.d_model, dtype=dt, rngs=rngs)

    def __call__(self, source, target, *, key=None, return_attention: bool = False):
        k_enc, k_dec = split_keys(key, 2)
        encoded = self.encoder(source, key=k_enc, return_attention=return_attention)
        memory, enc_weights = encoded if return_attention else (encoded, None)
        out = self.decode(memory, source, target, key=k_dec, return_attention=return_attention)
        if not return_attention:
            return out
        logits, weights = out
        return logits, {"encoder": enc_weights, **weights}

    def encode(self, source, *, key=None):
        """The encoder's output ``[B, S, D]`` for source tokens ``[B, S]``: computed once,
        read by every decoding step."""
        return self.encoder(source, key=key)

    def decode(self, memory, source, target, *, key=None, return_attention: bool = False):
        """Logits ``[B, T, V]`` of target input tokens ``[B, T]`` attending to ``memory``
        (:meth:`encode` of ``source [B, S]``, whose padding it hides); with
        ``return_attention`` also ``{"self": [L, B, N, T, T], "cross": [L, B, N, T, S]}``."""
        keys = split_keys(key, len(self.blocks) + 1)
        x = self._embed(target, jnp.arange(target.shape[1]), keys[-1])
        memory_mask = padding_of(source)
        # The target's own padding is hidden too: causality keeps right padding out of real
        # rows, and the mask makes the kernel zero what pad positions hold (never 0 * NaN).
        mask = padding_of(target)
        self_weights, cross_weights = [], []
        for block, k in zip(self.blocks, keys[:-1], strict=False):
            if self.config.remat and not return_attention:
                x = remat_block(block, x, k, mask=mask, memory=memory, memory_mask=memory_mask)
                continue
            x, w = block(
                x,
                mask=mask,
                memory=memory,
                memory_mask=memory_mask,
                key=k,
                return_weights=return_attention,
            )
            if return_attention:
                self_weights.append(w[0])
                cross_weights.append(w[1])
        logits = self._logits(x)
        if return_attention:
            return logits, {"self": jnp.stack(self_weights), "cross": jnp.stack(cross_weights)}
        return logits

    def _embed(self, tokens, positions, key=None):
        table = self.encoder.embed if self.config.tie_embeddings else self.target_embed
        positions_table = getattr(self.encoder, "position_embed", None)
        return embed_tokens(self.config, table, positions_table, tokens, positions, key)

    def _logits(self, x):
        if self.config.tie_embeddings:
            return logits_of(x, self.final_norm, self.encoder.embed)
        return logits_of(x, self.final_norm, None, self.unembed)
