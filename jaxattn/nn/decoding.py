"""Greedy generation from a TinyDecoder, one jitted loop per (model, shape)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy_tokens(graphdef, state, prompts, max_new_tokens: int):
    """:func:`generate` on a split model (``nnx.split``): usable inside a jitted function."""
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    total = p + max_new_tokens
    tokens = jnp.concatenate([prompts, jnp.zeros((b, max_new_tokens), prompts.dtype)], axis=1)

    def step(i, tokens):
        # The whole (fixed-size) buffer is run every step: causal attention keeps the
        # not-yet-written tail from reaching position p + i - 1, so its logits are exact.
        # Recomputing costs O(total^2) per step, nothing at these lengths; a KV cache is
        # the way for long generations.
        logits = model(tokens)
        pos = p + i - 1
        next_token = jnp.argmax(logits[:, pos], axis=-1).astype(tokens.dtype)
        return tokens.at[:, pos + 1].set(next_token)

    return jax.lax.fori_loop(0, total - p, step, tokens)


def generate(model: nnx.Module, prompts, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: the prompts followed by ``max_new_tokens`` argmax tokens.

    Args:
      model: a TinyDecoder (or any NNX module mapping int ``[B, T]`` to logits ``[B, T, V]``).
      prompts: int ``[B, P]``, P >= 1, all of the same length.
      max_new_tokens: how many tokens to append (>= 0); P + max_new_tokens must not exceed the
        model's ``max_len``.

    Returns:
      int32 ``[B, P + max_new_tokens]``.
    """
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be an int array [B, P] with P >= 1, got {prompts.shape}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must hold int token ids, got dtype {prompts.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if max_len is not None and prompts.shape[1] + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_len {max_len}"
        )
    graphdef, state = nnx.split(model)
    return greedy_tokens(graphdef, state, prompts.astype(jnp.int32), max_new_tokens)
