"""jaxattn: attention kernels and masks in JAX that are right to the last masked row, and a
tiny Flax NNX decoder that learns synthetic sequence tasks with them.

Public API (everything else is internal)::

    from jaxattn import dot_product_attention, causal_mask, padding_mask, ...
    from jaxattn import CausalMask, PaddingMask, ...  # structured masks for the flash path
    from jaxattn import TinyDecoder, ModelConfig, generate, load_run
"""

from jaxattn._dropout import attention_dropout_mask as attention_dropout_mask
from jaxattn.attention import dot_product_attention as dot_product_attention
from jaxattn.mask_spec import CausalMask as CausalMask
from jaxattn.mask_spec import MaskSpec as MaskSpec
from jaxattn.mask_spec import PaddingMask as PaddingMask
from jaxattn.mask_spec import PrefixLMMask as PrefixLMMask
from jaxattn.mask_spec import SegmentMask as SegmentMask
from jaxattn.mask_spec import SlidingWindowMask as SlidingWindowMask
from jaxattn.masks import and_masks as and_masks
from jaxattn.masks import causal_mask as causal_mask
from jaxattn.masks import or_masks as or_masks
from jaxattn.masks import padding_mask as padding_mask
from jaxattn.masks import padding_mask_from_tokens as padding_mask_from_tokens
from jaxattn.masks import prefix_lm_mask as prefix_lm_mask
from jaxattn.masks import segment_mask as segment_mask
from jaxattn.masks import sliding_window_mask as sliding_window_mask

__version__ = "0.1.0"
