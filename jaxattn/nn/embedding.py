"""What every model does at its two ends: token embeddings and positions in, logits out.

The decoder, the encoder and the encoder-decoder build their tables here and call the same
two functions, so a position or a scale is computed one way in all of them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxattn.nn.config import COMPUTE_DTYPES, ModelConfig
from jaxattn.nn.layers import dropout, sinusoidal_at

__all__ = ["embed_tokens", "logits_of", "position_table", "token_table"]


def token_table(config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    """A ``[V, D]`` embedding table, initialised N(0, 1/D): scaled by sqrt(D) at use (the
    paper's sec. 3.4), it starts at the size of the unit-scale sinusoids."""
    d = config.d_model
    return nnx.Embed(
        vocab_size,
        d,
        embedding_init=nnx.initializers.normal(1.0 / math.sqrt(d)),
        dtype=COMPUTE_DTYPES[config.compute_dtype],
        rngs=rngs,
    )


def position_table(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Embed | None:
    """The learned ``[max_len, D]`` position table, or None (sinusoidal and rotary positions
    have no parameters)."""
    if config.positions != "learned":
        return None
    return nnx.Embed(
        config.max_len,
        config.d_model,
        embedding_init=nnx.initializers.normal(0.02),
        dtype=COMPUTE_DTYPES[config.compute_dtype],
        rngs=rngs,
    )


def embed_tokens(config: ModelConfig, table, positions_table, tokens, positions, key=None):
    """Token embeddings ``table(tokens) * sqrt(D)`` plus the position encodings at int
    ``positions`` (``[T]``, every row's, or ``[B, T]``), then dropout (``key`` None: none).
    Rotary positions are applied in attention instead; nothing is added here for them.

    Raises ValueError when ``tokens [B, T]`` is longer than ``model.max_len``.
    """
    t = tokens.shape[-1]
    if t > config.max_len:
        raise ValueError(f"tokens have length {t} but model.max_len is {config.max_len}")
    x = table(tokens) * math.sqrt(config.d_model)
    if config.positions in ("sinusoidal", "learned"):
        if config.positions == "sinusoidal":
            enc = sinusoidal_at(positions, config.d_model)
        else:
            enc = positions_table(positions)
        enc = enc.astype(x.dtype)  # float32 sinusoids must not promote a bfloat16 stream
        x = x + (enc[None] if enc.ndim == 2 else enc)  # [T, D] is every row's
    return dropout(x, config.dropout, key)


def logits_of(x, final_norm, table, unembed=None):
    """float32 logits ``[..., V]`` of the stream ``x [..., D]``: the final LayerNorm, then
    the transposed embedding ``table`` (tied) or the ``unembed`` projection."""
    x = final_norm(x)
    logits = table.attend(x) if unembed is None else unembed(x)
    return logits.astype(jnp.float32)
