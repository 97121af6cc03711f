"""Typed, frozen run configuration: one dataclass per concern, passed whole.

The YAML loader, dotted command-line overrides and validation live below the dataclasses.
Every field has a comment; ``configs/tiny.yaml`` documents the same fields for users.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64  # residual stream width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # query heads N
    num_kv_heads: int | None = None  # key/value heads K (None = num_heads; 1 = multi-query)
    d_ff: int = 256  # hidden width of the feed-forward block
    max_len: int = 64  # longest sequence the positions support
    positions: str = "sinusoidal"  # sinusoidal | learned | rotary
    activation: str = "relu"  # relu | gelu
    norm: str = "pre"  # pre | post (LayerNorm before or after each residual branch)
    dropout: float = 0.0  # on residual branches and embeddings
    attention_dropout: float = 0.0  # on attention weights
    tie_embeddings: bool = True  # output projection = embedding matrix transposed


@dataclass(frozen=True)
class TaskConfig:
    name: str = "copy"  # copy | reverse | sort | next_token
    length: int = 10  # L, symbols per sequence
    vocab_size: int = 16  # PAD=0, BOS=1, SEP=2, symbols 3..vocab_size-1
    batch_size: int = 64  # training sequences per step
    eval_size: int = 1000  # held-out sequences for exact-match
    eval_seed: int = 1_000_003  # held-out set seed, never used for training batches


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3  # peak learning rate (noam: multiplier of its formula)
    schedule: str = "warmup_cosine"  # noam | warmup_cosine | warmup_rsqrt | warmup_constant
    warmup_steps: int = 100  # linear warmup length
    b1: float = 0.9  # Adam beta1
    b2: float = 0.98  # Adam beta2
    eps: float = 1e-9  # Adam epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    clip_norm: float | None = 1.0  # global gradient-norm clip (None = off)
    label_smoothing: float = 0.0  # optax smooth_labels alpha
    accumulate_steps: int = 1  # micro-batches per update (optax.MultiSteps)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # most optimizer steps
    eval_every: int = 100  # steps between held-out evaluations
    target_exact_match: float = 1.0  # stop once held-out exact-match reaches this
    run_dir: str | None = None  # default runs/<config name>
    seed: int = 0  # parameters, dropout and training batches
    steps_per_call: int = 50  # steps fused in one jitted lax.scan
    progress: bool = True  # show a progress bar


@dataclass(frozen=True)
class Config:
    name: str = "tiny"  # run name: default run directory runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(config) -> dict:
    """Plain nested dict of a config (for YAML and JSON)."""
    return dataclasses.asdict(config)
