"""Generation from a TinyDecoder with a key/value cache: prefill, then one token per step.

The prompts go through the model once (:meth:`TinyDecoder.prefill`, the blockwise kernel
for long prompts), then each new token costs one :meth:`TinyDecoder.decode_step`: O(S) work
per layer instead of rerunning the whole sequence. The loop is one jitted
``lax.while_loop`` that stops early once every sequence has produced its stop token.

Prompts of different lengths share a batch, right-padded: sequence b's tokens go to
positions ``len_b, len_b + 1, ...`` of its own part of the cache, so each row is decoded
exactly as it would be alone.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["GREEDY", "Sampling", "decode", "generate", "sample_next"]

PAD = 0  # what follows a sequence's stop token (the tasks' PAD id)


class Sampling(NamedTuple):
    """How the next token is chosen from the logits (static: each setting compiles once).

    temperature: 0 is greedy (argmax); otherwise logits / temperature are sampled.
    top_k: sample only among the k most likely tokens (None: all).
    top_p: sample only among the most likely tokens whose probabilities sum to at least p
      (nucleus sampling; the most likely token is always kept; None or 1.0: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


GREEDY = Sampling()


def sample_next(logits, key, sampling: Sampling):
    """The next token of each row of float ``logits [B, V]``: int32 ``[B]``.

    Temperature first, then top-k, then top-p on what is left (the order of most
    libraries). Greedy (temperature 0) ignores ``key``. Ties in argmax go to the lowest id.
    """
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    k = v if sampling.top_k is None else min(sampling.top_k, v)
    # The k largest logits, sorted descending (k = V sorts them all), and their ids.
    logits = logits.astype(jnp.float32)
    top, ids = jax.lax.top_k(logits, k)
    # Shifted by the row max before dividing, so a small temperature cannot overflow: the
    # best token scores 0, the others -inf at worst (probability 0), never NaN.
    top = (top - top[:, :1]) / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1.0:
        probs = jax.nn.softmax(top, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        top = jnp.where(before < sampling.top_p, top, -jnp.inf)  # rank 0 always kept
    choice = jax.random.categorical(key, top, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "stop_token")
)
def decode(
    graphdef,
    state,
    prompts,
    lengths,
    key,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_token: int | None = None,
):
    """:func:`generate` on a split model (``nnx.split``), without the checks: jit-able.

    ``prompts`` int32 ``[B, P]`` right-padded, ``lengths`` int32 ``[B]`` (1 <= len <= P),
    ``key`` a PRNG key (None when greedy). Returns int32 ``[B, P + max_new_tokens]``: row b
    is its prompt, its new tokens, then PAD.
    """
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    rows = jnp.arange(b)
    # The prompt of each row, PAD after it, then room for the new tokens.
    tokens = jnp.where(jnp.arange(p)[None] < lengths[:, None], prompts, PAD)
    tokens = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), PAD, jnp.int32)], axis=1)
    if max_new_tokens == 0:
        return tokens
    cache = model.init_cache(b, p + max_new_tokens)
    logits, cache = model.prefill(tokens[:, :p], cache, lengths)  # PAD past each prompt
    logits = logits[rows, lengths - 1]  # [B, V]: what follows each prompt

    def emit(i, tokens, logits, done):
        """Choose token i of every row, write it after the row's prompt; PAD once done."""
        step_key = None if sampling.temperature == 0.0 else jax.random.fold_in(key, i)
        new = sample_next(logits, step_key, sampling)
        new = jnp.where(done, PAD, new)
        tokens = tokens.at[rows, lengths + i].set(new)
        if stop_token is not None:
            done = done | (new == stop_token)
        return tokens, new, done

    tokens, new, done = emit(0, tokens, logits, jnp.zeros((b,), bool))

    def more(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, tokens, new, cache, done = carry
        logits, cache = model.decode_step(new, cache)
        tokens, new, done = emit(i, tokens, logits, done)
        return i + 1, tokens, new, cache, done

    carry = (jnp.int32(1), tokens, new, cache, done)
    return jax.lax.while_loop(more, step, carry)[1]


def _as_prompts(prompts, prompt_lengths):
    """Prompts as int32 ``[B, P]`` (right-padded) and int32 lengths ``[B]``, checked."""
    if (
        isinstance(prompts, (list, tuple))
        and prompts
        and all(
            isinstance(p, (list, tuple, np.ndarray, jax.Array)) and np.ndim(p) == 1 for p in prompts
        )
    ):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is for a padded [B, P] array, not a list of prompts")
        rows = [np.asarray(p) for p in prompts]
        for i, row in enumerate(rows):
            if row.size and not np.issubdtype(row.dtype, np.integer):
                raise ValueError(f"prompt {i} must hold int token ids, got dtype {row.dtype}")
        prompt_lengths = np.array([r.size for r in rows])
        width = int(prompt_lengths.max())
        prompts = np.full((len(rows), width), PAD, np.int64)
        for i, row in enumerate(rows):
            prompts[i, : row.size] = row
    try:
        prompts = np.asarray(prompts)
    except (ValueError, TypeError):  # rows of lists and numbers mixed
        raise ValueError("prompts must be an int array [B, P] or a list of token lists") from None
    if prompts.ndim != 2 or prompts.shape[1] < 1 or prompts.shape[0] < 1:
        raise ValueError(
            f"prompts must be an int array [B, P] with B, P >= 1 (or a list of token lists), "
            f"got shape {prompts.shape}"
        )
    if not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must hold int token ids, got dtype {prompts.dtype}")
    b, p = prompts.shape
    if prompt_lengths is None:
        lengths = np.full((b,), p)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(
                f"prompt_lengths must be {b} ints (one per prompt), got {lengths.dtype} "
                f"of shape {lengths.shape}"
            )
    if lengths.min() < 1 or lengths.max() > p:
        bad = int(np.flatnonzero((lengths < 1) | (lengths > p))[0])
        raise ValueError(
            f"prompt {bad} has length {int(lengths[bad])}; lengths must be in [1, {p}]"
        )
    return prompts, lengths


def _check_vocabulary(prompts, lengths, vocab_size: int) -> None:
    real = np.arange(prompts.shape[1]) < lengths[:, None]
    bad = real & ((prompts < 0) | (prompts >= vocab_size))
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"prompt {row}, position {col}: token {int(prompts[row, col])} is outside the "
            f"model's vocabulary [0, {vocab_size})"
        )


def _int(name: str, value, low: int, high: int | None = None, *, none_ok: bool = False):
    """``value`` as a Python int in ``[low, high)``, or a one-line ValueError: ints and
    integer scalars only (not bools, not floats such as 5.0)."""
    if value is None and none_ok:
        return None
    want = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    try:
        if isinstance(value, bool):
            raise TypeError
        x = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be {want}{' or None' if none_ok else ''}, got {value!r}"
        ) from None
    if x < low or (high is not None and x >= high):
        raise ValueError(f"{name} must be {want}{' or None' if none_ok else ''}, got {x}")
    return x


def _float(name: str, value, ok, want: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not ok(x):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return x


_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def _prng_key(key, sampling: bool):
    """A PRNG key from an int seed or a key (typed, or raw uint32 ``[2]``); None when greedy."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not -(2**63) <= int(key) < 2**63:
            raise ValueError(f"key must be a PRNG key or an int seed in [-2**63, 2**63), got {key}")
        return jax.random.key(int(key)) if sampling else None
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32
    if (typed and key.shape == ()) or (raw and key.shape == (2,)):
        return key if sampling else None
    what = f"{type(key).__name__} {getattr(key, 'dtype', '')}{list(np.shape(key))}"
    raise ValueError(f"key must be a PRNG key (jax.random.key(seed)) or an int seed, got {what}")


def generate(
    model: nnx.Module,
    prompts,
    max_new_tokens: int,
    *,
    prompt_lengths=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    key=0,
) -> jax.Array:
    """Continue each prompt by up to ``max_new_tokens`` tokens, with a key/value cache.

    Args:
      model: a :class:`~jaxattn.nn.TinyDecoder`.
      prompts: int ``[B, P]``, or a list of B token lists of different lengths.
      max_new_tokens: tokens to add to each prompt (>= 0); the longest prompt plus this
        must not exceed the model's ``max_len``.
      prompt_lengths: int ``[B]`` with a ``[B, P]`` array whose rows are right-padded: how
        many tokens of each row are the prompt (default: all P).
      temperature: 0 (the default) decodes greedily; above 0 samples from
        softmax(logits / temperature).
      top_k: sample only among the k most likely tokens (ignored when greedy).
      top_p: sample only among the most likely tokens whose probability sums to top_p
        (ignored when greedy).
      stop_token: a token id that ends a sequence: it is kept, PAD follows it, and the
        loop stops once every sequence has stopped.
      key: a PRNG key or an int seed for sampling (the same key and batch, the same
        tokens; one key serves the whole batch, so a sampled row depends on its place in
        the batch, while greedy rows never depend on the others).

    Returns:
      int32 ``[B, P + max_new_tokens]``: row b holds its prompt, its new tokens, then PAD
      (PAD = 0) up to the end.

    Raises ValueError (one line) for malformed prompts, a token outside ``[0,
    vocab_size)``, a too long generation or a bad sampling setting.
    """
    from jaxattn.nn.model import TinyDecoder

    if not isinstance(model, TinyDecoder):
        raise ValueError(f"model must be a jaxattn.nn.TinyDecoder, got {type(model).__name__}")
    prompts, lengths = _as_prompts(prompts, prompt_lengths)
    max_new_tokens = _int("max_new_tokens", max_new_tokens, 0)
    temperature = _float(
        "temperature",
        temperature,
        lambda x: x == 0 or _F32_TINY <= x <= _F32_MAX,
        f"0 (greedy) or a float32 in [{_F32_TINY:.3g}, {_F32_MAX:.3g}]",
    )
    top_k = _int("top_k", top_k, 1, none_ok=True)
    if top_p is not None:
        top_p = _float("top_p", top_p, lambda x: 0 < x <= 1, "in (0, 1] or None")
    vocab_size = model.vocab_size
    _check_vocabulary(prompts, lengths, vocab_size)
    stop_token = _int("stop_token", stop_token, 0, vocab_size, none_ok=True)
    max_len = model.config.max_len
    if prompts.shape[1] + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_len {max_len}"
        )
    key = _prng_key(key, temperature > 0)
    # Greedy ignores top_k and top_p: one program for every greedy call.
    sampling = Sampling(temperature, top_k, top_p) if temperature > 0 else GREEDY
    graphdef, state = nnx.split(model)
    return decode(
        graphdef,
        state,
        jnp.asarray(prompts, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        key,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_token=stop_token,
    )
