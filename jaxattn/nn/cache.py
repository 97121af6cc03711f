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
    """One layer's keys and values, ``[B, K, S, H]`` each: S slots per head (rotary
    already applied to the keys, so a slot never needs its position again).

    Head-major, not the kernels' ``[B, S, K, H]``: a decode step's two matmuls contract
    over S per (sequence, head), and XLA:CPU wants those batch dims leading. Stored
    ``[B, S, K, H]``, every step copied the whole cache into that order first (measured:
    2.7x slower steps at S = 1024); the kernel is called on a swapaxes view, which XLA
    folds into the matmuls."""

    keys: jax.Array
    values: jax.Array


class KVCache(NamedTuple):
    """Every layer's :class:`LayerCache`, and ``lengths`` (int32 ``[B]``): how many tokens
    of each sequence are in the cache, which is also the position of its next token.

    Slots at or beyond ``lengths[b]`` are masked for sequence b (weight exactly 0). They
    hold zeros or the keys and values of its prompt's padding, always finite, so they add
    exactly nothing; a step overwrites slot ``lengths[b]`` before reading it.
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
        shape = (batch_size, num_kv_heads, size, head_dim)
        layers = tuple(
            LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)
        )
        return cls(layers, jnp.zeros((batch_size,), jnp.int32))

    @property
    def size(self) -> int:
        """Slots per sequence (S)."""
        return self.layers[0].keys.shape[2]
