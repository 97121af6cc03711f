"""Encoder and Classifier: bidirectional, blind to padding (values, classes and gradients)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxattn.nn import PAD_ID, Classifier, Encoder, ModelConfig, TinyDecoder

CFG = ModelConfig(d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=16)
VOCAB, CLASSES = 11, 3
# Two documents of 6 and 4 real tokens, right-padded to 8.
DOCS = jnp.array([[3, 4, 5, 6, 7, 8, 0, 0], [9, 3, 10, 4, 0, 0, 0, 0]])
LENGTHS = np.array([6, 4])


def jitted(module):
    """``(state, *args, **static) -> module(*args, **static)``, jitted, and the module's state:
    one compile per shape (eager NNX compiles every operation on its own)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return run, state


def classifier(**changes):
    return Classifier(dataclasses.replace(CFG, **changes), VOCAB, CLASSES, rngs=nnx.Rngs(0))


def encoder(**changes):
    return Encoder(dataclasses.replace(CFG, **changes), VOCAB, rngs=nnx.Rngs(0))


def test_shapes_and_weights_hide_padding():
    x, weights = encoder()(DOCS, return_attention=True)
    assert x.shape == (2, 8, 16) and weights.shape == (2, 2, 4, 8, 8)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    for b, n in enumerate(LENGTHS):
        assert float(jnp.abs(weights[:, b, :, :, n:]).max()) == 0.0  # no query reads a pad
        assert float(jnp.abs(weights[:, b, :, :n, :n]).min()) > 0.0  # every real pair is read
    logits, enc_weights = classifier()(DOCS, return_attention=True)
    assert logits.shape == (2, CLASSES) and logits.dtype == jnp.float32
    assert enc_weights.shape == (2, 2, 4, 8, 8)


def test_the_encoder_is_bidirectional_and_the_decoder_is_not():
    """Changing the last real token changes the encoder's first output; a causal decoder's
    first output cannot see it."""
    changed = DOCS.at[0, 5].set(3)
    run, state = jitted(encoder())
    assert not np.allclose(run(state, DOCS)[0, 0], run(state, changed)[0, 0], atol=1e-4)
    np.testing.assert_array_equal(run(state, DOCS)[1], run(state, changed)[1])  # other row
    decoder = TinyDecoder(CFG, VOCAB, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(decoder(DOCS)[0, :5], decoder(changed)[0, :5], atol=1e-6)


def _pad_to(tokens, width):
    return jnp.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=PAD_ID)


@pytest.mark.parametrize(
    "changes", [{"positions": "learned"}, {"positions": "rotary", "norm": "post"}]
)
def test_extra_padding_changes_no_real_output_no_class_and_no_gradient(changes):
    model = classifier(**changes)
    graphdef, state = nnx.split(model)
    labels = jnp.array([0, 2])

    def loss(state, docs):
        logits = nnx.merge(graphdef, state)(docs)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels]), logits

    grad = jax.jit(jax.grad(loss, has_aux=True))
    encode = jax.jit(lambda state, docs: nnx.merge(graphdef, state).encoder(docs))
    g8, logits8 = grad(state, DOCS)
    g14, logits14 = grad(state, _pad_to(DOCS, 14))
    np.testing.assert_allclose(logits8, logits14, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g14)
    x8, x14 = encode(state, DOCS), encode(state, _pad_to(DOCS, 14))
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(x8[b, :n], x14[b, :n], rtol=1e-5, atol=1e-5)


def test_what_the_pad_embedding_holds_changes_nothing_real():
    """The pad token's own embedding row (what the padding positions carry into the model)
    may hold anything, NaN included: no real output, no class and no gradient of another
    parameter changes."""
    model = classifier()
    graphdef, state = nnx.split(model)
    poisoned = jax.tree.map(lambda x: x, state)
    table = poisoned["encoder"]["embed"]["embedding"]
    table[...] = table[...].at[PAD_ID].set(jnp.nan)
    assert not np.isnan(state["encoder"]["embed"]["embedding"][...]).any()  # a copy poisoned

    @jax.jit
    def outputs(state):
        m = nnx.merge(graphdef, state)
        return m.encoder(DOCS), m(DOCS)

    (x, logits), (x_p, logits_p) = outputs(state), outputs(poisoned)
    np.testing.assert_array_equal(logits, logits_p)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(x[b, :n], x_p[b, :n])


def test_a_document_of_only_padding_gives_the_heads_bias_not_nan():
    model = classifier()
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits[0], model.head.bias[...], rtol=1e-6)


_POOLED = classifier()
_POOLED_GRAPH = nnx.split(_POOLED)[0]


@jax.jit  # one program for every example below (a jit made inside an example compiles each)
def _logits_and_encoding(state, docs):
    m = nnx.merge(_POOLED_GRAPH, state)
    return m(docs), m.encoder(docs)


@given(lengths=st.lists(st.integers(0, 8), min_size=3, max_size=3), seed=st.integers(0, 99))
def test_pooling_is_the_mean_over_real_tokens(lengths, seed):
    """Property: the classifier's logits are the head applied to the mean of the encoder's
    outputs over each row's real tokens (pads anywhere after them, any contents)."""
    model = _POOLED
    rng = np.random.default_rng(seed)
    docs = rng.integers(3, VOCAB, (3, 8))
    docs = np.where(np.arange(8)[None] < np.array(lengths)[:, None], docs, PAD_ID)
    logits, x = _logits_and_encoding(nnx.state(model), jnp.asarray(docs))
    x = np.asarray(x, np.float64)
    w, bias = (np.asarray(p[...], np.float64) for p in (model.head.kernel, model.head.bias))
    for b, n in enumerate(lengths):
        pooled = x[b, :n].mean(0) if n else np.zeros(x.shape[-1])
        np.testing.assert_allclose(logits[b], pooled @ w + bias, rtol=1e-4, atol=1e-5)


def test_remat_and_dropout():
    """remat gives the same values and gradients; a dropout key changes the output and no
    key is the evaluation (deterministic)."""
    # One layer and the trainer's rbg keys: threefry's dropout draws compile for seconds.
    plain = classifier(dropout=0.1, num_layers=1)
    remat = classifier(dropout=0.1, num_layers=1, remat=True)
    key = jax.random.key(1, impl="rbg")
    graphdef, state = nnx.split(plain)
    graphdef_r, _ = nnx.split(remat)

    def loss(graphdef):
        return lambda state: jnp.sum(nnx.merge(graphdef, state)(DOCS, key=key) ** 2)

    g, g_r = (jax.jit(jax.grad(loss(gd)))(state) for gd in (graphdef, graphdef_r))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_r)
    run = jax.jit(lambda state, key: nnx.merge(graphdef, state)(DOCS, key=key))
    assert not np.allclose(run(state, key), run(state, None), atol=1e-4)
    np.testing.assert_array_equal(run(state, None), run(state, None))


def test_errors_are_one_line():
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        Classifier(CFG, VOCAB, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"length 17 but model\.max_len is 16"):
        encoder()(jnp.ones((1, 17), jnp.int32))
