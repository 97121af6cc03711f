"""The mistakes of the NumPy tutorials attention is learnt from, each computed next to what
jaxattn returns (docs/walkthrough.md shows the same, section by section)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxattn import CausalMask, dot_product_attention
from jaxattn.nn import ModelConfig, TinyDecoder


def weights_of(scores, mask=None, dtype=jnp.float32):
    """jaxattn's weights for given ``scores [T, S]``: one key dim per score column (one-hot
    keys, queries = the score rows, scale 1), so q k^T is exactly the scores."""
    s = scores.shape[1]
    q = jnp.asarray(scores, dtype)[None, :, None, :]  # [1, T, 1, S]
    k = jnp.eye(s, dtype=dtype)[None, :, None, :]  # [1, S, 1, S]
    _, w = dot_product_attention(q, k, k, mask=mask, scale=1.0, return_weights=True)
    return np.asarray(w[0, 0])


def test_softmax_over_the_whole_matrix_or_the_wrong_axis_breaks_the_rows():
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [62.0, -30.0, 0.0]])
    whole = np.exp(scores) / np.sum(np.exp(scores))  # normalised over every entry
    columns = np.exp(scores) / np.sum(np.exp(scores), axis=0, keepdims=True)  # wrong axis
    assert not np.allclose(whole.sum(-1), 1.0)  # rows do not sum to 1
    assert whole[1].max() < 1e-26  # a whole row of weights near 0 (about 1e-27)
    assert not np.allclose(columns.sum(-1), 1.0)
    assert columns[0, 0] < 1e-25  # a weight of 1e-26 where the row's softmax gives 0.67
    ours = weights_of(scores)
    np.testing.assert_allclose(ours.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ours[0], np.exp([2, 1, 0]) / np.exp([2, 1, 0]).sum(), rtol=1e-6)


@given(
    scores=st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=12, max_size=12).map(
        lambda x: np.asarray(x, np.float32).reshape(3, 4)
    ),
    keep=st.lists(st.booleans(), min_size=12, max_size=12).map(
        lambda x: np.asarray(x).reshape(3, 4)
    ),
)
def test_every_row_with_a_visible_key_sums_to_one_and_the_others_are_zero(scores, keep):
    w = weights_of(scores, mask=jnp.asarray(keep))
    seen = keep.any(-1)
    np.testing.assert_allclose(w.sum(-1)[seen], 1.0, rtol=1e-5)
    assert (w[~seen] == 0).all() and (w[~keep] == 0).all()


@pytest.mark.parametrize(
    ("dtype", "top"), [(np.float32, 1e4), (np.float16, 1e4), (np.float16, 12.0)]
)
def test_softmax_without_the_max_subtracted_overflows(dtype, top):
    scores = np.array([[top, top - 1, 0.0]], dtype)  # in float16, 9999 rounds to 10000
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(scores) / np.sum(np.exp(scores), axis=-1, keepdims=True)
    assert np.isnan(naive).any()  # exp(1e4) (or exp(12) in float16) is inf: inf / inf
    ours = weights_of(scores, dtype=dtype)
    shifted = scores[0].astype(np.float64) - scores.max()
    expected = np.exp(shifted) / np.exp(shifted).sum()
    np.testing.assert_allclose(ours[0], expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(ours.sum(), 1.0, rtol=1e-6)


def test_an_additive_minus_inf_mask_makes_a_fully_masked_row_nan():
    scores = np.array([[1.0, 2.0], [3.0, 4.0]])
    additive = np.array([[0.0, 0.0], [-np.inf, -np.inf]])
    with np.errstate(invalid="ignore"):
        x = scores + additive
        e = np.exp(x - x.max(-1, keepdims=True))  # -inf - -inf = NaN
        tutorial = e / e.sum(-1, keepdims=True)
    assert np.isnan(tutorial[1]).all()

    q, k = jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2))
    v = jnp.arange(4.0).reshape(1, 2, 1, 2)
    mask = jnp.array([[True, True], [False, False]])
    for impl in ("xla", "flash"):

        def attend(q, k, v, impl=impl):
            return dot_product_attention(q, k, v, mask=mask, implementation=impl)

        out = attend(q, k, v)
        np.testing.assert_array_equal(out[0, 1], 0.0)  # zeros, not NaN
        np.testing.assert_allclose(out[0, 0, 0], [1.0, 2.0])
        grads = jax.grad(lambda q, k, v, f=attend: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))(q, k, v)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(grads[0][0, 1], 0.0)  # the masked query learns nothing


def test_a_keep_mask_applied_as_a_block_mask_blocks_exactly_the_allowed_keys():
    t = 5
    keep = 1 - np.triu(np.ones((t, t)), k=1)  # 1 = keep: the lower triangle
    with np.errstate(invalid="ignore"):
        e = np.exp(np.zeros((t, t)) + keep * -1e9)  # applied as 1 = block
        tutorial = e / e.sum(-1, keepdims=True)
    nonzero = tutorial > 0
    np.testing.assert_array_equal(nonzero[:-1], keep[:-1] == 0)  # only the future is seen
    assert np.isnan(tutorial[-1]).all()  # the last query may see every key: all blocked

    ours = weights_of(np.zeros((t, t)), mask=CausalMask())
    np.testing.assert_array_equal(ours > 0, np.tril(np.ones((t, t), bool)))
    np.testing.assert_array_equal(CausalMask().materialize(t, t), np.tril(np.ones((t, t), bool)))
    # T != S: the queries are the last T of S positions (bottom-right), as in a KV cache.
    np.testing.assert_array_equal(
        CausalMask().materialize(2, 5), np.tril(np.ones((2, 5), bool), k=3)
    )
    w = weights_of(np.zeros((2, 5)), mask=CausalMask())
    np.testing.assert_allclose(w, [[0.25] * 4 + [0.0], [0.2] * 5], rtol=1e-6)


def test_an_inverted_mask_check_fails_without_a_mask_and_ignores_one():
    def tutorial_attention(q, k, v, mask=None):
        scaled = q @ k.T / math.sqrt(q.shape[-1])
        if mask is None:  # meant: is not None
            scaled += mask
        w = np.exp(scaled - scaled.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ v

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 8)) for _ in range(3))
    with pytest.raises(TypeError):
        tutorial_attention(q, k, v)
    causal = np.where(np.tril(np.ones((4, 4))) > 0, 0.0, -np.inf)
    np.testing.assert_allclose(  # the mask given is never applied
        tutorial_attention(q, k, v, causal), tutorial_attention(q, k, v, np.zeros((4, 4)))
    )

    qj, kj, vj = (jnp.asarray(x, jnp.float32)[None, :, None, :] for x in (q, k, v))
    plain = dot_product_attention(qj, kj, vj)  # mask=None: nothing masked, no error
    causal_out = dot_product_attention(qj, kj, vj, is_causal=True)
    np.testing.assert_allclose(plain[0, -1], causal_out[0, -1], rtol=1e-5)  # last row sees all
    assert not np.allclose(plain[0, 0], causal_out[0, 0])  # the first sees only itself
    np.testing.assert_allclose(causal_out[0, 0, 0], v[0], rtol=1e-5)


def test_weights_drawn_in_the_call_cannot_learn_ours_are_created_once_and_trained():
    def tutorial_output_layer(x, vocab_size=11):
        weights = np.random.default_rng().standard_normal((x.shape[-1], vocab_size))
        return x @ weights

    x = np.ones((2, 16))
    assert not np.allclose(tutorial_output_layer(x), tutorial_output_layer(x))

    import optax

    from jaxattn.train.optim import cross_entropy

    config = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
    model = TinyDecoder(config, 11, rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 5, 7, 3, 2, 4]])
    np.testing.assert_array_equal(model(tokens), model(tokens))  # the same model each call
    graphdef, params = nnx.split(model, nnx.Param)
    before = jax.tree.map(jnp.copy, params)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:], jnp.ones((1, 5)))

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    first = float(loss(params))
    for _ in range(20):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * first  # it learns the sequence
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, before)
    assert all(jax.tree.leaves(changed))  # every parameter was trained
