"""Invariants of attention over random shapes, head groupings and masks (hypothesis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import reference_attention
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxattn as ja


@st.composite
def problems(draw):
    """Random (q, k, v, mask) with GQA grouping, T != S and some fully masked rows."""
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 6))
    s = draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 2]))
    n = k * draw(st.sampled_from([1, 2, 3]))
    h = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    per_head = draw(st.booleans())
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    key = rng.standard_normal((b, s, k, h)).astype(np.float32)
    v = rng.standard_normal((b, s, k, h)).astype(np.float32)
    mask = rng.random((b, n if per_head else 1, t, s)) < density
    return q, key, v, mask


@given(problems())
def test_weights_sum_to_one_or_zero_and_masked_weights_are_exactly_zero(problem):
    q, key, v, mask = problem
    _, w = ja.dot_product_attention(q, key, v, mask=jnp.asarray(mask), return_weights=True)
    w = np.asarray(w)
    mask = np.broadcast_to(mask, w.shape)
    row_has_key = mask.any(axis=-1)
    sums = w.sum(axis=-1)
    np.testing.assert_allclose(sums[row_has_key], 1.0, rtol=1e-5)
    assert (sums[~row_has_key] == 0.0).all()
    assert (w[~mask] == 0.0).all()
    assert (w >= 0).all()


@given(problems())
def test_output_matches_reference(problem):
    q, key, v, mask = problem
    out = ja.dot_product_attention(q, key, v, mask=jnp.asarray(mask))
    np.testing.assert_allclose(out, reference_attention(q, key, v, mask)[0], atol=3e-5, rtol=3e-5)


@given(problems(), st.randoms(use_true_random=False))
def test_permuting_keys_and_values_together_leaves_output_unchanged(problem, random):
    q, key, v, mask = problem
    s = key.shape[1]
    perm = np.array(random.sample(range(s), s))
    out = ja.dot_product_attention(q, key, v, mask=jnp.asarray(mask))
    permuted = ja.dot_product_attention(
        q, key[:, perm], v[:, perm], mask=jnp.asarray(mask[..., perm])
    )
    np.testing.assert_allclose(out, permuted, atol=2e-6, rtol=2e-5)


@given(problems())
def test_query_rows_are_independent(problem):
    # Attention has no interaction between query rows: computing rows one at a time agrees.
    q, key, v, mask = problem
    out = np.asarray(ja.dot_product_attention(q, key, v, mask=jnp.asarray(mask)))
    row = q.shape[1] - 1
    single = ja.dot_product_attention(
        q[:, row : row + 1], key, v, mask=jnp.asarray(mask[..., row : row + 1, :])
    )
    np.testing.assert_allclose(out[:, row : row + 1], single, atol=2e-6, rtol=2e-5)


# The blockwise path with random block sizes (1 x 1 up to 4 x 4, so that problems span several
# blocks, lengths leave partial last blocks and dense masks make empty, partial and full
# blocks) against the same float64 reference.
block_sizes = st.tuples(st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=15)
@given(problems(), block_sizes, st.randoms(use_true_random=False))
def test_flash_matches_reference_and_is_invariant_to_key_order(problem, blocks, random):
    q, key, v, mask = problem
    kw = {"implementation": "flash", "block_sizes": blocks}
    out = np.asarray(ja.dot_product_attention(q, key, v, mask=jnp.asarray(mask), **kw))
    np.testing.assert_allclose(out, reference_attention(q, key, v, mask)[0], atol=3e-5, rtol=3e-5)
    # Rows that see no key are exactly 0.
    b, t, n, _ = q.shape
    empty = ~np.broadcast_to(mask, (b, n, t, key.shape[1])).any(axis=-1)  # [B, N, T]
    assert (np.swapaxes(out, 1, 2)[empty] == 0.0).all()
    # Permuting keys, values and mask columns together changes the blocks, not the result.
    s = key.shape[1]
    perm = np.array(random.sample(range(s), s))
    permuted = ja.dot_product_attention(
        q, key[:, perm], v[:, perm], mask=jnp.asarray(mask[..., perm]), **kw
    )
    np.testing.assert_allclose(out, permuted, atol=2e-6, rtol=2e-5)


@settings(max_examples=6)
@given(problems(), block_sizes)
def test_flash_gradients_match_xla_path(problem, blocks):
    q, key, v, mask = problem
    ct = np.random.default_rng(q.shape[1]).standard_normal((*q.shape[:-1], v.shape[-1]))
    ct = jnp.asarray(ct, jnp.float32)

    def grads(**kw):
        def loss(q, k, v):
            out = ja.dot_product_attention(q, k, v, mask=jnp.asarray(mask), **kw)
            return jnp.sum(out * ct)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, key, v)

    flash = grads(implementation="flash", block_sizes=blocks)
    xla = grads(implementation="xla")
    for name, a, b in zip(("dq", "dk", "dv"), flash, xla, strict=True):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4, err_msg=name)
