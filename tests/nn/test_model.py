"""TinyDecoder (its generation: test_decoding.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.nn.config import ModelConfig
from jaxattn.nn.model import TinyDecoder, count_params
from jaxattn.train.optim import cross_entropy

CFG = ModelConfig(d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=16)
TOKENS = jax.random.randint(jax.random.key(0), (3, 7), 0, 11)


def model(**changes):
    return TinyDecoder(dataclasses.replace(CFG, **changes), 11, rngs=nnx.Rngs(0))


def test_logits_and_attention_shapes():
    logits, attn = model()(TOKENS, return_attention=True)
    assert logits.shape == (3, 7, 11) and logits.dtype == jnp.float32
    assert attn.shape == (2, 3, 4, 7, 7)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(attn, k=1)).max()) == 0.0


def test_decoder_is_causal():
    m = model()
    changed = TOKENS.at[:, 5:].set(1)
    np.testing.assert_allclose(m(TOKENS)[:, :5], m(changed)[:, :5], atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        {"positions": "learned"},
        {"positions": "rotary"},
        {"norm": "post"},
        {"activation": "gelu"},
        {"num_kv_heads": 1},
    ],
)
def test_each_option_changes_the_output(change):
    assert not np.allclose(model()(TOKENS), model(**change)(TOKENS), atol=1e-4)


def test_positions_matter():
    # Without positions a causal decoder still sees order through the mask, but the same
    # token at different positions must get different representations with positions on.
    tokens = jnp.full((1, 6), 4)
    logits = model()(tokens)
    assert not np.allclose(logits[0, 1], logits[0, 4], atol=1e-4)


def test_tied_embeddings_share_the_matrix():
    tied, untied = model(), model(tie_embeddings=False)
    assert count_params(untied) - count_params(tied) == 16 * 11 + 11
    assert not hasattr(tied, "unembed")


def test_dropout_needs_a_key():
    m = model(dropout=0.3)
    np.testing.assert_array_equal(m(TOKENS), m(TOKENS))
    assert not np.allclose(m(TOKENS), m(TOKENS, key=jax.random.key(1)), atol=1e-4)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match=r"tokens have length 17 but model\.max_len is 16"):
        model()(jnp.zeros((1, 17), jnp.int32))


def _loss_grads_and_residual_bytes(m, key=None):
    """(loss, gradients, bytes the backward pass keeps from the forward pass)."""
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(TOKENS, key=key)
        return cross_entropy(logits, TOKENS, jnp.ones(TOKENS.shape), 0.0)

    value, vjp = jax.vjp(loss, params)
    (grads,) = vjp(jnp.ones_like(value))
    # vjp's closure holds exactly the residuals saved for the backward pass (and the params).
    return value, grads, sum(x.nbytes for x in jax.tree.leaves(vjp))


@pytest.mark.parametrize("key", [None, jax.random.key(3)], ids=["eval", "dropout"])
def test_remat_gives_the_same_loss_and_gradients_and_keeps_fewer_residuals(key):
    plain, plain_grads, plain_bytes = _loss_grads_and_residual_bytes(
        model(num_layers=4, dropout=0.1), key
    )
    remat, remat_grads, remat_bytes = _loss_grads_and_residual_bytes(
        model(num_layers=4, dropout=0.1, remat=True), key
    )
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Only each block's input survives to the backward pass, not its activations.
    assert remat_bytes < 0.5 * plain_bytes, (remat_bytes, plain_bytes)


def test_remat_still_returns_attention_weights():
    logits, weights = model(remat=True)(TOKENS, return_attention=True)
    np.testing.assert_allclose(logits, model()(TOKENS), rtol=1e-6)
    assert weights.shape == (2, 3, 4, 7, 7)


def test_bfloat16_compute_keeps_float32_parameters_logits_and_gradients():
    full, mixed = model(), model(compute_dtype="bfloat16")
    for leaf in jax.tree.leaves(nnx.state(mixed, nnx.Param)):
        assert leaf.dtype == jnp.float32
    # Same seed, same float32 parameters: only the arithmetic differs.
    for a, b in zip(
        jax.tree.leaves(nnx.state(full, nnx.Param)),
        jax.tree.leaves(nnx.state(mixed, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    x = jnp.ones((1, 2, 16))
    assert mixed.blocks[0].feed_forward.up(x).dtype == jnp.bfloat16
    assert mixed.blocks[0].norm1(x).dtype == jnp.bfloat16
    assert mixed.embed(TOKENS).dtype == jnp.bfloat16

    loss32, grads32, _ = _loss_grads_and_residual_bytes(full)
    loss16, grads16, _ = _loss_grads_and_residual_bytes(mixed)
    assert mixed(TOKENS).dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    # bfloat16 keeps 8 bits of mantissa: agreement to a few percent of the gradients' scale
    # (some leaves, e.g. q_proj's bias, have gradients near 0 in float32 and noise in bf16).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads32))
    for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=0.03 * scale)
    assert mixed.init_cache(3, 8).layers[0].keys.dtype == jnp.bfloat16
