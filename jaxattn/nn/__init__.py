"""Flax NNX layers built on the kernels: attention, feed-forward, decoder block, TinyDecoder,
and generation. Imports flax; knows nothing of training or config files.

    from jaxattn.nn import ModelConfig, TinyDecoder, generate
"""

from jaxattn.nn.config import ModelConfig as ModelConfig
from jaxattn.nn.decoding import generate as generate
from jaxattn.nn.layers import DecoderBlock as DecoderBlock
from jaxattn.nn.layers import FeedForward as FeedForward
from jaxattn.nn.layers import MultiHeadAttention as MultiHeadAttention
from jaxattn.nn.model import TinyDecoder as TinyDecoder
from jaxattn.nn.model import count_params as count_params
