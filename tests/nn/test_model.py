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
