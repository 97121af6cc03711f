"""Flax NNX layers built on the kernels: attention (self and cross), feed-forward, the
decoder and encoder blocks; the models (TinyDecoder, causal or prefix-LM; Encoder and a
Classifier on it; EncoderDecoder); generation with a key/value cache; and
:func:`attention_fn` (our kernel as ``nnx.MultiHeadAttention``'s ``attention_fn``). Imports
flax; knows nothing of training or config files.

    from jaxattn.nn import ModelConfig, TinyDecoder, KVCache, attention_fn, generate
    from jaxattn.nn import Classifier, EncoderDecoder
"""

from jaxattn.nn.cache import KVCache as KVCache
from jaxattn.nn.cache import LayerCache as LayerCache
from jaxattn.nn.config import PAD_ID as PAD_ID
from jaxattn.nn.config import ModelConfig as ModelConfig
from jaxattn.nn.decoding import generate as generate
from jaxattn.nn.encoder import Classifier as Classifier
from jaxattn.nn.encoder import Encoder as Encoder
from jaxattn.nn.flax_attention import attention_fn as attention_fn
from jaxattn.nn.layers import DecoderBlock as DecoderBlock
from jaxattn.nn.layers import EncoderBlock as EncoderBlock
from jaxattn.nn.layers import FeedForward as FeedForward
from jaxattn.nn.layers import MultiHeadAttention as MultiHeadAttention
from jaxattn.nn.model import TinyDecoder as TinyDecoder
from jaxattn.nn.model import count_params as count_params
from jaxattn.nn.seq2seq import EncoderDecoder as EncoderDecoder

__all__ = [
    "PAD_ID",
    "Classifier",
    "DecoderBlock",
    "Encoder",
    "EncoderBlock",
    "EncoderDecoder",
    "FeedForward",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "MultiHeadAttention",
    "TinyDecoder",
    "attention_fn",
    "count_params",
    "generate",
]
