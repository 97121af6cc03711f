"""The key/value cache of generation: what each layer has computed for the tokens so far.

A plain pytree (NamedTuples of arrays), passed in and returned by
:meth:`TinyDecoder.prefill` and :meth:`TinyDecoder.decode_step`, so it lives in the carry of
a ``lax.while_loop`` and XLA updates it in place. Nothing is hidden in the modules.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["KVCache", "LayerCache"]


class LayerCache(NamedTuple):
    """One layer's keys and values, ``[B, S, K, H]`` each (S slots; rotary already
    applied to the keys, so a slot never needs its position again)."""

    keys: jax.Array
    values: jax.Array


class KVCache(NamedTuple):
    """Every layer's :class:`LayerCache`, and ``lengths`` (int32 ``[B]``): how many tokens
    of each sequence are in the cache, which is also the position of its next token.

    Slots at or beyond ``lengths[b]`` are never read for sequence b (they are masked as
    padding, and the attention kernel zeroes them before any matmul), whatever they hold.
    """

    layers: tuple[LayerCache, ...]
    lengths: jax.Array

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        batch_size: int,
        size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=jnp.float32,
    ) -> KVCache:
        """An empty cache of ``size`` slots for ``batch_size`` sequences."""
        shape = (batch_size, size, num_kv_heads, head_dim)
        layers = tuple(
            LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)
        )
        return cls(layers, jnp.zeros((batch_size,), jnp.int32))

    @property
    def size(self) -> int:
        """Slots per sequence (S)."""
        return self.layers[0].keys.shape[1]
