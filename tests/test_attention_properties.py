"""Invariants of attention over random shapes, head groupings and masks (hypothesis)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from conftest import reference_attention
from hypothesis import given
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
