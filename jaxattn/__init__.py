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
