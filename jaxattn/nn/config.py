"""The model's hyper-parameters: what TinyDecoder is built from, nothing about training.

A frozen dataclass; the trainer's config (:mod:`jaxattn.train.config`) holds one as its
``model`` section and validates it, the model only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64  # residual stream width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # query heads N
    num_kv_heads: int | None = None  # key/value heads K (None = num_heads; 1 = multi-query)
    d_ff: int = 256  # hidden width of the feed-forward block
    max_len: int = 32  # longest sequence the positions support
    positions: str = "sinusoidal"  # sinusoidal | learned | rotary
    activation: str = "relu"  # relu | gelu
    norm: str = "pre"  # pre | post (LayerNorm before or after each residual branch)
    dropout: float = 0.0  # on residual branches and embeddings
    attention_dropout: float = 0.0  # on attention weights
    tie_embeddings: bool = True  # output projection = embedding matrix transposed
    compute_dtype: str = "float32"  # float32 | bfloat16: matmuls and activations (params f32)
    remat: bool = False  # recompute each block's activations in the backward pass (jax.checkpoint)
