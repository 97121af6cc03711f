"""jaxattn: scaled dot-product attention in JAX, right to the last masked row.

The kernels import only jax and numpy. The Flax model (:mod:`jaxattn.nn`) and the trainer
(:mod:`jaxattn.train`) are subpackages beside them, imported only when asked for.

    from jaxattn import dot_product_attention, CausalMask, PaddingMask
    out = dot_product_attention(q, k, v, mask=CausalMask() & PaddingMask(kv_lengths=lengths))

:mod:`jaxattn.reference` is the same attention written as the textbook formula: the
specification every path is tested against.
"""

from jaxattn import reference as reference
from jaxattn._dropout import attention_dropout_mask as attention_dropout_mask
from jaxattn.attention import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxattn.attention import dot_product_attention as dot_product_attention
from jaxattn.masks import CausalMask as CausalMask
from jaxattn.masks import MaskSpec as MaskSpec
from jaxattn.masks import PaddingMask as PaddingMask
from jaxattn.masks import PrefixLMMask as PrefixLMMask
from jaxattn.masks import SegmentMask as SegmentMask
from jaxattn.masks import SlidingWindowMask as SlidingWindowMask

__version__ = "0.1.0"

# Names that moved out of the kernel API in 0.1.0, with where they went (one-line errors).
_MOVED = {
    "causal_mask": "jaxattn.CausalMask(offset=...).materialize(T, S)",
    "sliding_window_mask": "jaxattn.SlidingWindowMask(window).materialize(T, S)",
    "prefix_lm_mask": "jaxattn.PrefixLMMask(prefix_len).materialize(T, S)",
    "padding_mask": "jaxattn.PaddingMask(q_lengths=..., kv_lengths=...).materialize(T, S)",
    "padding_mask_from_tokens": "jaxattn.PaddingMask.from_tokens(...).materialize(T, S)",
    "segment_mask": "jaxattn.SegmentMask(q_ids, kv_ids).materialize(T, S)",
    "and_masks": "mask_a & mask_b (masks of jaxattn.masks)",
    "or_masks": "mask_a | mask_b (masks of jaxattn.masks)",
    "TinyDecoder": "jaxattn.nn.TinyDecoder",
    "ModelConfig": "jaxattn.nn.ModelConfig",
    "generate": "jaxattn.nn.generate",
    "train": "jaxattn.train.train (import jaxattn.train)",
    "load_run": "jaxattn.train.load_run",
    "load_config": "jaxattn.train.load_config",
    "Config": "jaxattn.train.Config",
    "ConfigError": "jaxattn.train.ConfigError",
    "RunError": "jaxattn.train.RunError",
    "TrainingInterrupted": "jaxattn.train.TrainingInterrupted",
}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(f"jaxattn.{name} is not part of the kernel API; use {_MOVED[name]}")
    raise AttributeError(f"module 'jaxattn' has no attribute {name!r}")
