"""jaxattn: attention kernels and masks in JAX that are right to the last masked row.

Public API (everything else is internal)::

    from jaxattn import dot_product_attention, causal_mask, padding_mask, ...
"""

from jaxattn.attention import dot_product_attention as dot_product_attention
from jaxattn.masks import and_masks as and_masks
from jaxattn.masks import causal_mask as causal_mask
from jaxattn.masks import or_masks as or_masks
from jaxattn.masks import padding_mask as padding_mask
from jaxattn.masks import padding_mask_from_tokens as padding_mask_from_tokens
from jaxattn.masks import prefix_lm_mask as prefix_lm_mask
from jaxattn.masks import segment_mask as segment_mask
from jaxattn.masks import sliding_window_mask as sliding_window_mask

__version__ = "0.1.0"
