"""The model's hyper-parameters: what TinyDecoder is built from, nothing about training.

A frozen dataclass; the trainer's config (:mod:`jaxattn.train.config`) holds one as its
``model`` section and validates it, the model only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS",
    "COMPUTE_DTYPES",
    "DECODER_KINDS",
    "KINDS",
    "NORMS",
    "PAD_ID",
    "POSITIONS",
    "ModelConfig",
]

# The token that pads variable-length sequences (at the end, or anywhere): every model hides
# it from attention and pooling, and the tasks' losses skip it (jaxattn.train.tasks.PAD).
PAD_ID = 0

# The values ModelConfig's string fields may take, implemented in jaxattn.nn.layers and
# jaxattn.nn.model; the trainer's config checks a loaded value against these.
# model.kind: the causal decoder (TinyDecoder); the decoder as a prefix-LM (its prompt seen
# both ways); an encoder with a classifier head (Classifier); an encoder-decoder.
KINDS = ("decoder", "prefix_lm", "classifier", "encoder_decoder")
DECODER_KINDS = ("decoder", "prefix_lm")  # the kinds built as a TinyDecoder
POSITIONS = ("sinusoidal", "learned", "rotary")  # model.positions
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}  # model.activation -> function
NORMS = ("pre", "post")  # model.norm: LayerNorm before or after each residual branch
# model.compute_dtype -> the dtype of matmuls and activations. Parameters stay float32 (the
# optimizer updates them there); each layer casts them to this dtype at use. LayerNorm
# statistics, attention logits and softmax, and the loss are float32 whatever it is; the
# output projection runs in this dtype and its logits are cast to float32 after it.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "decoder"  # decoder | prefix_lm | classifier | encoder_decoder
    d_model: int = 64  # residual stream width
    num_layers: int = 2  # blocks (an encoder-decoder: in the encoder and in the decoder)
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
