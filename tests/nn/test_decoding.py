"""Cached generation: the cache against the full forward pass, ragged batches, sampling,
the stop token and the errors of :func:`jaxattn.nn.generate`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.nn.config import ModelConfig
from jaxattn.nn.decoding import Sampling, generate, sample_next
from jaxattn.nn.model import TinyDecoder

V = 13
CFG = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=24)
MODELS = {
    "sinusoidal": {},
    "learned": {"positions": "learned"},
    "rotary": {"positions": "rotary"},
    "gqa": {"num_kv_heads": 2, "positions": "rotary"},
    "mqa": {"num_kv_heads": 1},
    "post-norm, untied": {"norm": "post", "tie_embeddings": False, "activation": "gelu"},
}
PROMPTS = [[1, 5, 6, 7, 8], [1, 3], [1, 4, 4, 9, 10, 11, 12]]  # ragged on purpose


def model(seed=1, **changes):
    return TinyDecoder(dataclasses.replace(CFG, **changes), V, rngs=nnx.Rngs(seed))


def generated_positions(out, prompts, n):
    """(row, position) of every new token of ``generate``'s output."""
    return [(b, len(p) + i) for b, p in enumerate(prompts) for i in range(n)]


@pytest.mark.parametrize("kind", list(MODELS))
def test_cache_logits_equal_the_full_forward_pass(kind):
    """Prompts of lengths 4, 2, 3 prefilled, then the rest of each row fed one token per
    step: every logit equals the uncached forward pass over the whole row (positions, the
    masks and the cache writes of each row are its own)."""
    m = model(**MODELS[kind])
    tokens = jax.random.randint(jax.random.key(3), (3, 11), 0, V)
    full = np.asarray(m(tokens))  # [B, T, V]
    lengths = np.array([4, 2, 3])
    cache = m.init_cache(3, 11)
    logits, cache = m.prefill(tokens, cache, jnp.asarray(lengths))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)
    for i in range(11 - lengths.max()):
        step_logits, cache = m.decode_step(tokens[np.arange(3), lengths + i], cache)
        np.testing.assert_allclose(
            step_logits, full[np.arange(3), lengths + i], atol=1e-5, rtol=1e-5
        )
    np.testing.assert_array_equal(cache.lengths, lengths + 11 - lengths.max())


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_generation_is_the_argmax_of_the_uncached_model(kind):
    """Each new token is the argmax of the uncached model over the row so far. One forward
    pass checks them all: while the output is right, the row it saw is the row given."""
    m = model(**MODELS[kind])
    n = 9
    out = np.asarray(generate(m, PROMPTS, n))
    assert out.shape == (3, 7 + n) and out.dtype == np.int32
    full = np.asarray(m(jnp.asarray(out)))
    for b, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(out[b, : len(p)], p)
        np.testing.assert_array_equal(out[b, len(p) + n :], 0)  # PAD after the row
        new = out[b, len(p) : len(p) + n]
        np.testing.assert_array_equal(new, full[b, len(p) - 1 : len(p) + n - 1].argmax(-1))


def test_a_ragged_batch_decodes_each_row_as_alone():
    m = model(positions="rotary", num_kv_heads=2)
    together = np.asarray(generate(m, PROMPTS, 6, temperature=0.0))
    for b, p in enumerate(PROMPTS):
        alone = np.asarray(generate(m, [p], 6))[0]
        np.testing.assert_array_equal(together[b, : len(alone)], alone)
    # The same batch as a padded array with lengths.
    padded = np.zeros((3, 7), np.int32)
    for b, p in enumerate(PROMPTS):
        padded[b, : len(p)] = p
    again = generate(m, padded + 3 * (padded == 0), 6, prompt_lengths=[5, 2, 7])
    np.testing.assert_array_equal(again, together)  # what lies beyond a length is never read


def test_a_plain_loop_agrees():
    """The obvious uncached loop (rerun the model on the row so far, append the argmax)."""
    m = model(positions="learned")
    out = np.asarray(generate(m, [PROMPTS[2]], 3))[0]
    seq = list(PROMPTS[2])
    for _ in range(3):
        seq.append(int(jnp.argmax(m(jnp.asarray([seq]))[0, -1])))
    np.testing.assert_array_equal(out, seq)


def test_no_new_tokens_gives_the_prompts():
    out = generate(model(), PROMPTS, 0)
    assert out.shape == (3, 7)
    np.testing.assert_array_equal(out[1], [1, 3, 0, 0, 0, 0, 0])


# ------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seed():
    m = model()
    a = generate(m, PROMPTS, 8, temperature=1.5, key=7)
    b = generate(m, PROMPTS, 8, temperature=1.5, key=jax.random.key(7))
    c = generate(m, PROMPTS, 8, temperature=1.5, key=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_never_leaves_the_top_k():
    m = model()
    k, n = 3, 10
    for seed in range(2):
        out = np.asarray(generate(m, PROMPTS, n, temperature=10.0, top_k=k, key=seed))
        full = np.asarray(m(jnp.asarray(out)))
        for b, pos in generated_positions(out, PROMPTS, n):
            top = np.argsort(full[b, pos - 1])[-k:]
            assert out[b, pos] in top, (seed, b, pos)
    # A high temperature with all tokens allowed does leave them.
    out = np.asarray(generate(m, PROMPTS, n, temperature=10.0, key=0))
    full = np.asarray(m(jnp.asarray(out)))
    outside = [
        out[b, pos] not in np.argsort(full[b, pos - 1])[-k:]
        for b, pos in generated_positions(out, PROMPTS, n)
    ]
    assert any(outside)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    m = model(positions="rotary")
    greedy = generate(m, PROMPTS, 8)
    np.testing.assert_array_equal(generate(m, PROMPTS, 8, temperature=3.0, top_k=1), greedy)
    np.testing.assert_array_equal(generate(m, PROMPTS, 8, temperature=3.0, top_p=1e-6), greedy)


def _frequencies(logits, sampling, n=20_000):
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda key: sample_next(logits[None], key, sampling)[0]))
    return np.bincount(np.asarray(draw(keys)), minlength=logits.shape[0]) / n


def test_temperature_samples_the_softmax():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
    for t in (0.5, 1.0, 2.0):
        want = np.asarray(jax.nn.softmax(logits / t))
        got = _frequencies(logits, Sampling(temperature=t))
        tolerance = 4 * np.sqrt(want * (1 - want) / 20_000) + 1e-3  # 4 standard errors
        assert np.all(np.abs(got - want) <= tolerance), (t, got, want)


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    logits = jnp.log(jnp.array([0.5, 0.05, 0.3, 0.1, 0.05]))
    # Sorted: 0.5, 0.3, 0.1, ... ; p = 0.75 needs 0.5 + 0.3 (0.5 alone is not enough).
    got = _frequencies(logits, Sampling(temperature=1.0, top_p=0.75))
    assert got[1] == got[3] == got[4] == 0.0
    np.testing.assert_allclose(got[[0, 2]], [0.5 / 0.8, 0.3 / 0.8], atol=0.015)
    got = _frequencies(logits, Sampling(temperature=1.0, top_k=2, top_p=0.5))
    np.testing.assert_array_equal(got, [1.0, 0, 0, 0, 0])


# ------------------------------------------------------------------------------ stop token


def test_the_stop_token_ends_a_row_and_pads_after_it():
    m = model()
    n = 10
    free = np.asarray(generate(m, PROMPTS, n))
    stop = int(free[0, len(PROMPTS[0]) + 2])  # row 0's third new token
    out = np.asarray(generate(m, PROMPTS, n, stop_token=stop))
    for b, p in enumerate(PROMPTS):
        new = list(free[b, len(p) : len(p) + n])
        if stop in new:
            new = new[: new.index(stop) + 1]
        want = list(p) + new
        np.testing.assert_array_equal(out[b, : len(want)], want)
        np.testing.assert_array_equal(out[b, len(want) :], 0)


def test_all_rows_stopping_ends_the_loop_with_pads():
    m = model()
    free = np.asarray(generate(m, [PROMPTS[0]], 6))[0]
    stop = int(free[5])  # the first new token: the loop ends after one step
    out = np.asarray(generate(m, [PROMPTS[0], PROMPTS[0]], 6, stop_token=stop))
    np.testing.assert_array_equal(out, [list(free[:6]) + [0] * 5] * 2)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        (np.zeros((3,), np.int32), {}, "prompts must be an int array [B, P] with B, P >= 1"),
        (np.zeros((0, 3), np.int32), {}, "prompts must be an int array [B, P] with B, P >= 1"),
        (np.zeros((2, 3), np.float32), {}, "prompts must hold int token ids"),
        ([[1, 2], [1.5]], {}, "prompt 1 must hold int token ids"),
        (
            [[1, 2, 13]],
            {},
            "prompt 0, position 2: token 13 is outside the model's vocabulary [0, 13)",
        ),
        ([[1, -1]], {}, "token -1 is outside the model's vocabulary"),
        ([[1, 2]], {"max_new_tokens": -1}, "max_new_tokens must be an int >= 0, got -1"),
        ([[1, 2]], {"max_new_tokens": 2.5}, "max_new_tokens must be an int >= 0"),
        (
            [[1] * 20],
            {"max_new_tokens": 5},
            "prompt length 20 + max_new_tokens 5 exceeds model.max_len 24",
        ),
        ([[1, 2]], {"temperature": -1.0}, "temperature must be 0 (greedy) or a float32 in"),
        ([[1, 2]], {"temperature": float("nan")}, "temperature must be 0 (greedy) or a float32 in"),
        ([[1, 2]], {"top_k": 0}, "top_k must be an int >= 1 or None, got 0"),
        ([[1, 2]], {"top_p": 0.0}, "top_p must be in (0, 1] or None"),
        ([[1, 2]], {"stop_token": 13}, "stop_token must be an int in [0, 13) or None, got 13"),
        (np.ones((2, 3), np.int32), {"prompt_lengths": [3, 4]}, "prompt 1 has length 4"),
        (np.ones((2, 3), np.int32), {"prompt_lengths": [3]}, "prompt_lengths must be 2 ints"),
    ],
)
def test_generate_errors(prompts, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError) as info:
        generate(model(), prompts, n, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 1e-40}, "temperature must be 0 (greedy) or a float32 in"),
        ({"temperature": 1e39}, "temperature must be 0 (greedy) or a float32 in"),
        ({"temperature": 1.0, "key": 1.5}, "key must be a PRNG key"),
        ({"temperature": 1.0, "key": np.zeros(3, np.uint32)}, "key must be a PRNG key"),
        ({"key": 2**70}, "key must be a PRNG key or an int seed in [-2**63, 2**63)"),
        ({"top_k": 2.0}, "top_k must be an int >= 1 or None, got 2.0"),
        ({"stop_token": True}, "stop_token must be an int in [0, 13) or None, got True"),
    ],
)
def test_sampling_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError) as info:
        generate(model(), [[1, 2]], 2, **kwargs)
    assert message in str(info.value)


def test_only_a_tiny_decoder_generates():
    with pytest.raises(ValueError, match=r"model must be a jaxattn\.nn\.TinyDecoder, got Linear"):
        generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [[1, 2]], 2)


def test_a_small_temperature_is_nearly_greedy_not_nan():
    m = model()
    greedy = generate(m, PROMPTS, 6)
    np.testing.assert_array_equal(generate(m, PROMPTS, 6, temperature=1e-30, key=3), greedy)


def test_what_pads_a_prompt_array_is_never_read():
    """Padding past ``prompt_lengths`` may hold anything, even ids outside the vocabulary."""
    m = model()
    padded = np.array([[1, 5, 6, 7, 8], [1, 3, 999, -5, 12]])
    out = generate(m, padded, 4, prompt_lengths=[5, 2])
    np.testing.assert_array_equal(
        out[1], np.asarray(generate(m, [[1, 3]], 4))[0].tolist() + [0] * 3
    )


def test_one_new_token_and_pad_as_the_stop_token():
    m = model()
    greedy = np.asarray(generate(m, PROMPTS, 3))
    one = np.asarray(generate(m, PROMPTS, 1, stop_token=0))  # no decode step at all
    for b, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(one[b, : len(p) + 1], greedy[b, : len(p) + 1])
        np.testing.assert_array_equal(one[b, len(p) + 1 :], 0)
