"""Layers: positions in closed form, causality, options that must change the output."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import attention_dropout_mask
from jaxattn.nn.config import ModelConfig
from jaxattn.nn.layers import (
    DecoderBlock,
    FeedForward,
    MultiHeadAttention,
    apply_rotary,
    dropout,
    sinusoidal_positions,
)

CFG = ModelConfig(d_model=16, num_heads=4, d_ff=32, max_len=16)


def test_sinusoidal_closed_form():
    enc = np.asarray(sinusoidal_positions(5, 8))
    assert enc.shape == (5, 8)
    np.testing.assert_allclose(enc[0], [0, 1] * 4, atol=1e-7)  # sin(0), cos(0)
    pos, i = 3, 1  # channel pair 2i, 2i+1
    angle = pos / 10000 ** (2 * i / 8)
    np.testing.assert_allclose(
        enc[pos, 2 * i : 2 * i + 2], [np.sin(angle), np.cos(angle)], rtol=1e-6
    )


def test_rotary_preserves_norm_and_depends_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)

    def score(m, n):
        return float(jnp.sum(apply_rotary(q, jnp.array([m])) * apply_rotary(k, jnp.array([n]))))

    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rotary(q, jnp.array([7]))), jnp.linalg.norm(q), rtol=1e-6
    )
    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-4


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_attention_is_causal(positions, kv_heads):
    cfg = dataclasses.replace(CFG, positions=positions, num_kv_heads=kv_heads)
    mha = MultiHeadAttention(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    y = x.at[:, 4:].set(jax.random.normal(jax.random.key(2), (2, 2, 16)))
    np.testing.assert_allclose(mha(x)[:, :4], mha(y)[:, :4], atol=1e-6)
    assert not np.allclose(mha(x)[:, 4:], mha(y)[:, 4:], atol=1e-4)
    assert mha.k_proj.kernel.shape == (16, (kv_heads or 4) * 4)


def test_attention_weights_are_causal_distributions():
    mha = MultiHeadAttention(CFG, rngs=nnx.Rngs(0))
    _, w = mha(jax.random.normal(jax.random.key(1), (2, 5, 16)), return_weights=True)
    assert w.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(w, k=1)).max()) == 0.0


def test_attention_dropout_only_with_a_key():
    cfg = dataclasses.replace(CFG, attention_dropout=0.5, num_kv_heads=2)
    mha = MultiHeadAttention(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    np.testing.assert_array_equal(mha(x), mha(x))
    assert not np.allclose(mha(x), mha(x, key=jax.random.key(3)), atol=1e-4)


def test_attention_dropout_gradient_matches_the_formula():
    # With attention dropout the layer differentiates through the returned weights; its
    # gradient must equal autodiff of the formula with the same dropout mask.
    cfg = dataclasses.replace(CFG, attention_dropout=0.3, num_kv_heads=2)
    mha = MultiHeadAttention(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    key = jax.random.key(7)
    keep = attention_dropout_mask(key, 0.3, (2,), 4, 5, 5) / 0.7  # 0 or 1 / 0.7

    def formula(x):
        q = mha.q_proj(x).reshape(2, 5, 4, 4)
        k = jnp.repeat(mha.k_proj(x).reshape(2, 5, 2, 4), 2, axis=2)
        v = jnp.repeat(mha.v_proj(x).reshape(2, 5, 2, 4), 2, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / 2.0
        logits = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), logits, -jnp.inf)
        w = jax.nn.softmax(logits, axis=-1) * keep
        return mha.out_proj(jnp.einsum("bnts,bsnh->btnh", w, v).reshape(2, 5, 16))

    ct = jax.random.normal(jax.random.key(2), (2, 5, 16))
    ours = jax.grad(lambda x: jnp.sum(mha(x, key=key) * ct))(x)
    ref = jax.grad(lambda x: jnp.sum(formula(x) * ct))(x)
    np.testing.assert_allclose(mha(x, key=key), formula(x), atol=1e-5)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_dropout_keeps_the_mean_and_is_identity_without_key():
    x = jnp.ones((20000,))
    np.testing.assert_array_equal(dropout(x, 0.5, None), x)
    y = dropout(x, 0.25, jax.random.key(0))
    assert abs(float(y.mean()) - 1.0) < 0.03
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75], rtol=1e-6)


def test_feed_forward_activation_changes_output():
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    relu = FeedForward(CFG, rngs=nnx.Rngs(0))(x)
    gelu = FeedForward(dataclasses.replace(CFG, activation="gelu"), rngs=nnx.Rngs(0))(x)
    assert not np.allclose(relu, gelu, atol=1e-4)


def test_pre_and_post_norm_differ_and_post_output_is_normalised():
    x = 3.0 * jax.random.normal(jax.random.key(1), (2, 4, 16)) + 1.0
    pre, _ = DecoderBlock(CFG, rngs=nnx.Rngs(0))(x)
    post, _ = DecoderBlock(dataclasses.replace(CFG, norm="post"), rngs=nnx.Rngs(0))(x)
    assert not np.allclose(pre, post, atol=1e-3)
    np.testing.assert_allclose(post.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(post.std(-1), 1.0, atol=1e-2)


@pytest.mark.parametrize(("t", "path"), [(16, "reference"), (128, "flash")])
def test_attention_layer_takes_the_dispatchers_path(t, path):
    # The decoder's attention calls dot_product_attention with implementation=None: from
    # 128 x 128 (query, key) pairs the dispatcher takes the blockwise path, whose custom VJP
    # shows up in the program; both paths give the same layer output.
    cfg = dataclasses.replace(CFG, max_len=t, attention_dropout=0.25)
    layer = MultiHeadAttention(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, t, 16)), jnp.float32)
    key = jax.random.key(5)
    for k in (None, key):  # with attention dropout too
        program = str(jax.make_jaxpr(lambda x, k=k: layer(x, key=k))(x))
        assert ("_flash" in program) == (path == "flash")
    # Asking for the weights always takes the reference path; it drops the same weights.
    out_reference, weights = layer(x, return_weights=True)
    assert weights.shape == (2, 4, t, t)
    np.testing.assert_allclose(layer(x), out_reference, atol=2e-5)
    dropped_reference, _ = layer(x, key=key, return_weights=True)
    np.testing.assert_allclose(layer(x, key=key), dropped_reference, atol=2e-5)
    assert not np.allclose(dropped_reference, out_reference, atol=1e-3)
