"""Attention dropout: the hashed keep mask, and dot_product_attention with it on both paths
against the float64 reference (jaxattn.reference), which applies the same mask (values and
gradients)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxattn as ja
from jaxattn import _dropout as dropout

KEY = jax.random.key(11)


# --------------------------------------------------------------------------------------------
# The mask


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_rate(rate):
    keep = np.asarray(ja.attention_dropout_mask(KEY, rate, (4,), 8, 64, 64))  # 131072 draws
    assert keep.shape == (4, 8, 64, 64) and keep.dtype == bool
    assert abs(keep.mean() - (1 - rate)) < 0.01  # 7 standard deviations at rate 0.5
    # Every row and every column keeps about its share too (no stuck rows or columns).
    assert np.all(np.abs(keep.mean(-1) - (1 - rate)) < 0.3)
    assert np.all(np.abs(keep.mean(-2) - (1 - rate)) < 0.3)


def test_rate_zero_keeps_everything():
    assert bool(jnp.all(ja.attention_dropout_mask(KEY, 0.0, (2,), 2, 5, 7)))


@pytest.mark.parametrize(
    "shift",
    [
        (0, 0, 0, 1),  # next key
        (0, 0, 1, 0),  # next query
        (0, 0, 1, 1),  # diagonal neighbour
        (0, 1, 0, 0),  # next head
        (1, 0, 0, 0),  # next sequence
    ],
)
def test_neighbouring_weights_are_independent(shift):
    p = 0.5
    keep = np.asarray(ja.attention_dropout_mask(KEY, p, (4,), 8, 64, 64))
    a = keep[: 4 - shift[0], : 8 - shift[1], : 64 - shift[2], : 64 - shift[3]]
    b = keep[shift[0] :, shift[1] :, shift[2] :, shift[3] :]
    # Independent Bernoulli(1/2) pairs agree half the time; a shared bit pattern would not.
    assert abs((a == b).mean() - 0.5) < 0.02


def test_same_key_same_mask_other_key_other_mask():
    a = ja.attention_dropout_mask(KEY, 0.5, (2,), 4, 16, 16)
    np.testing.assert_array_equal(a, ja.attention_dropout_mask(KEY, 0.5, (2,), 4, 16, 16))
    jitted = jax.jit(ja.attention_dropout_mask, static_argnums=(1, 2, 3, 4, 5))
    np.testing.assert_array_equal(a, jitted(KEY, 0.5, (2,), 4, 16, 16))
    b = ja.attention_dropout_mask(jax.random.key(12), 0.5, (2,), 4, 16, 16)
    assert abs(float(jnp.mean(a == b)) - 0.5) < 0.05
    raw = ja.attention_dropout_mask(jax.random.PRNGKey(11), 0.5, (2,), 4, 16, 16)  # uint32[2]
    assert raw.shape == a.shape


def test_mask_does_not_depend_on_the_lengths_around_a_position():
    # The mask at (b, n, t, s) is a function of those positions only: a longer sequence
    # contains the shorter one's mask as its top-left corner.
    small = ja.attention_dropout_mask(KEY, 0.3, (2,), 4, 5, 6)
    large = ja.attention_dropout_mask(KEY, 0.3, (2,), 4, 9, 13)
    np.testing.assert_array_equal(small, large[..., :5, :6])


# --------------------------------------------------------------------------------------------
# dot_product_attention with dropout

IMPLS = {
    "xla": {"implementation": "xla"},
    "flash_2x3": {"implementation": "flash", "block_sizes": (2, 3)},
    "flash_4x2": {"implementation": "flash", "block_sizes": (4, 2)},
}


# (batch, T, S, N, K, H, Hv, mask kind)
CASES = {
    "causal_t_gt_s_gqa": ((2,), 7, 5, 4, 2, 8, 6, "causal"),
    "padding_mqa": ((3,), 6, 9, 4, 1, 8, 8, "padding"),
    "no_mask_two_batch_dims": ((2, 2), 5, 5, 2, 2, 4, 4, None),
}


def _mask(kind, batch, t, s):
    if kind == "causal":
        return ja.CausalMask()
    if kind == "padding":
        lengths = (jnp.arange(int(np.prod(batch))) * 4).reshape(batch)  # 0: no key at all
        return ja.PaddingMask(kv_lengths=lengths)
    return jnp.ones((t, s), bool)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_values_and_gradients_match_float64_oracle(case, impl):
    batch, t, s, n, k, h, hv, kind = CASES[case]
    rate = 0.3
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        q, key, v = (jnp.asarray(x) for x in qkv(rng, batch, t, s, n, k, h, hv, np.float64))
        mask = _mask(kind, batch, t, s)
        ct = jnp.asarray(rng.standard_normal((*batch, t, n, hv)))

        def ours(q, key, v):
            return ja.dot_product_attention(
                q, key, v, mask=mask, dropout_rate=rate, dropout_key=KEY, **IMPLS[impl]
            )

        def ref(q, key, v):
            return ja.reference.dot_product_attention(
                q, key, v, mask=mask, dropout_rate=rate, dropout_key=KEY
            )

        @functools.partial(jax.jit, static_argnums=0)  # values and gradients: one compile
        def value_and_grads(fn, q, key, v):
            out, vjp = jax.vjp(fn, q, key, v)
            return out, vjp(ct)

        out, g_ours = value_and_grads(ours, q, key, v)
        ref_out, g_ref = value_and_grads(ref, q, key, v)
        np.testing.assert_allclose(out, ref_out, atol=1e-12)
        for name, a, b in zip(("query", "key", "value"), g_ours, g_ref, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-11, err_msg=name)
        if kind == "padding":  # the first sequence sees no key: zeros, zero gradients
            np.testing.assert_array_equal(out[0], 0.0)
            np.testing.assert_array_equal(g_ours[0][0], 0.0)


def test_returned_weights_are_the_dropped_ones():
    rng = np.random.default_rng(1)
    q, key, v = qkv(rng, (2,), 5, 6, 4, 2, 8)
    rate = 0.4
    out, w = ja.dot_product_attention(
        q, key, v, is_causal=True, return_weights=True, dropout_rate=rate, dropout_key=KEY
    )
    _, w_plain = ja.dot_product_attention(q, key, v, is_causal=True, return_weights=True)
    keep = ja.attention_dropout_mask(KEY, rate, (2,), 4, 5, 6)
    np.testing.assert_allclose(w, np.where(keep, w_plain / (1 - rate), 0.0), rtol=1e-6)
    # out is exactly those weights times V.
    v_rep = jnp.repeat(v, 2, axis=2)
    np.testing.assert_allclose(out, jnp.einsum("bnts,bsnh->btnh", w, v_rep), atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 7), st.integers(1, 9))
def test_flash_drops_the_same_weights_for_any_block_sizes(bq, bk):
    rng = np.random.default_rng(2)
    q, key, v = qkv(rng, (2,), 7, 9, 4, 2, 8)
    kw = {"is_causal": True, "dropout_rate": 0.5, "dropout_key": KEY}
    ref = ja.dot_product_attention(q, key, v, implementation="xla", **kw)
    out = ja.dot_product_attention(q, key, v, implementation="flash", block_sizes=(bq, bk), **kw)
    np.testing.assert_allclose(out, ref, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_with_dropout(dtype):
    rng = np.random.default_rng(3)
    q, key, v = (x.astype(dtype) for x in qkv(rng, (2,), 16, 16, 4, 2, 8))
    kw = {"is_causal": True, "dropout_rate": 0.2, "dropout_key": KEY}
    ref = ja.dot_product_attention(q, key, v, implementation="xla", **kw)
    out = ja.dot_product_attention(q, key, v, implementation="flash", block_sizes=(4, 4), **kw)
    assert out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2, rtol=3e-2
    )


def test_no_key_no_dropout_and_other_keys_other_outputs():
    rng = np.random.default_rng(4)
    q, key, v = qkv(rng, (2,), 6, 6, 2, 2, 8)
    plain = ja.dot_product_attention(q, key, v)
    np.testing.assert_array_equal(ja.dot_product_attention(q, key, v, dropout_rate=0.0), plain)
    a = ja.dot_product_attention(q, key, v, dropout_rate=0.5, dropout_key=KEY)
    b = ja.dot_product_attention(q, key, v, dropout_rate=0.5, dropout_key=jax.random.key(3))
    assert not np.allclose(a, plain, atol=1e-3) and not np.allclose(a, b, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.1", True, None])
def test_bad_rate_is_refused(rate):
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match=r"dropout_rate must be a float in \[0, 1\)"):
        ja.dot_product_attention(q, q, q, dropout_rate=rate, dropout_key=KEY)


def test_rate_without_key_is_refused():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match=r"dropout_rate=0\.1 needs a dropout_key"):
        ja.dot_product_attention(q, q, q, dropout_rate=0.1)


@pytest.mark.parametrize(
    "bad", [jax.random.split(KEY, 2), jnp.zeros((3,), jnp.uint32), jnp.zeros((2,), jnp.float32)]
)
def test_bad_key_is_refused(bad):
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="dropout_key must be one PRNG key"):
        ja.dot_product_attention(q, q, q, dropout_rate=0.1, dropout_key=bad)


def test_seed_words_are_two_uint32():
    words = dropout.seed_words(KEY)
    assert words.shape == (2,) and words.dtype == jnp.uint32
