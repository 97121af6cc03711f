"""Masks against brute-force loops, closed forms, jit/vmap, and their error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxattn as ja


def brute(q_len, kv_len, rule, offset=None):
    """[T, S] bool from a per-(query position, key index) rule."""
    offset = kv_len - q_len if offset is None else offset
    return np.array([[rule(t + offset, s) for s in range(kv_len)] for t in range(q_len)])


def test_causal_square_is_lower_triangle():
    np.testing.assert_array_equal(ja.causal_mask(4), np.tril(np.ones((4, 4), bool)))


def test_causal_is_bottom_right_aligned_when_t_differs_from_s():
    # Two new queries after three cached keys: they sit at positions 3 and 4.
    expected = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(ja.causal_mask(2, 5), expected)
    # The last query always sees every key.
    assert bool(ja.causal_mask(3, 7)[-1].all())


def test_causal_top_left_with_offset_zero():
    np.testing.assert_array_equal(ja.causal_mask(2, 5, offset=0), np.tril(np.ones((2, 5), bool)))


def test_causal_more_queries_than_keys_leaves_first_rows_empty():
    m = np.asarray(ja.causal_mask(4, 2))
    assert not m[:2].any()
    np.testing.assert_array_equal(m[2:], [[1, 0], [1, 1]])


@given(st.integers(1, 12), st.integers(1, 12), st.integers(-5, 5) | st.none())
def test_causal_matches_brute_force(q_len, kv_len, offset):
    expected = brute(q_len, kv_len, lambda p, s: s <= p, offset)
    np.testing.assert_array_equal(ja.causal_mask(q_len, kv_len, offset=offset), expected)


def test_causal_per_sequence_offsets_under_jit():
    offsets = jnp.array([0, 2])
    m = jax.jit(lambda o: ja.causal_mask(2, 4, offset=o))(offsets)
    assert m.shape == (2, 1, 2, 4)
    np.testing.assert_array_equal(m[0, 0], brute(2, 4, lambda p, s: s <= p, 0))
    np.testing.assert_array_equal(m[1, 0], brute(2, 4, lambda p, s: s <= p, 2))


def test_large_causal_mask_is_built_in_graph_and_agrees():
    # Above the constant-mask size the mask is computed with iota; both routes must agree.
    m = ja.causal_mask(2100, 2100)
    assert m.shape == (2100, 2100)
    np.testing.assert_array_equal(np.asarray(m)[:5, :5], np.tril(np.ones((5, 5), bool)))
    assert int(m.sum()) == 2100 * 2101 // 2


@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 4), st.integers(0, 4))
def test_sliding_window_matches_brute_force(q_len, kv_len, left, right):
    expected = brute(q_len, kv_len, lambda p, s: p - left <= s <= p + right)
    np.testing.assert_array_equal(ja.sliding_window_mask(q_len, kv_len, (left, right)), expected)


def test_sliding_window_int_is_symmetric_and_causal_local_is_left_only():
    np.testing.assert_array_equal(
        ja.sliding_window_mask(6, 6, 2), ja.sliding_window_mask(6, 6, (2, 2))
    )
    local = np.asarray(ja.and_masks(ja.causal_mask(6), ja.sliding_window_mask(6, 6, 2)))
    np.testing.assert_array_equal(local, np.asarray(ja.sliding_window_mask(6, 6, (2, 0))))
    assert local.sum(axis=-1).tolist() == [1, 2, 3, 3, 3, 3]


@given(st.integers(1, 10), st.integers(0, 12))
def test_prefix_lm_matches_brute_force(length, prefix):
    expected = brute(length, length, lambda p, s: s < prefix or s <= p)
    np.testing.assert_array_equal(ja.prefix_lm_mask(length, prefix_len=prefix), expected)


def test_prefix_lm_edges_and_per_sequence_prefixes():
    np.testing.assert_array_equal(ja.prefix_lm_mask(5, prefix_len=0), ja.causal_mask(5))
    assert bool(ja.prefix_lm_mask(5, prefix_len=5).all())
    m = ja.prefix_lm_mask(4, prefix_len=jnp.array([1, 3]))
    assert m.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(m[1, 0], brute(4, 4, lambda p, s: s < 3 or s <= p))


def test_padding_mask_from_lengths_keys_queries_and_both():
    kv = ja.padding_mask(kv_lengths=jnp.array([2, 4]), kv_len=4)
    assert kv.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(kv[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])
    q = ja.padding_mask(q_lengths=jnp.array([1, 3]), q_len=3)
    assert q.shape == (2, 1, 3, 1)
    np.testing.assert_array_equal(q[:, 0, :, 0], [[1, 0, 0], [1, 1, 1]])
    both = ja.padding_mask(
        q_lengths=jnp.array([1, 3]), kv_lengths=jnp.array([2, 4]), q_len=3, kv_len=4
    )
    assert both.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(both, np.asarray(q) & np.asarray(kv))


def test_padding_mask_zero_length_masks_everything():
    m = ja.padding_mask(kv_lengths=jnp.array([0]), kv_len=3)
    assert not bool(m.any())


def test_padding_mask_from_tokens_handles_left_padding():
    tokens = jnp.array([[0, 0, 5, 6], [7, 8, 9, 0]])
    m = ja.padding_mask_from_tokens(kv_tokens=tokens, pad_id=0)
    np.testing.assert_array_equal(m[:, 0, 0], [[0, 0, 1, 1], [1, 1, 1, 0]])
    both = ja.padding_mask_from_tokens(q_tokens=tokens, kv_tokens=tokens, pad_id=0)
    assert both.shape == (2, 1, 4, 4)
    assert not bool(both[0, 0, 0].any())  # a pad query sees nothing


def test_segment_mask_is_block_diagonal():
    ids = jnp.array([[1, 1, 2, 2, 2]])
    m = np.asarray(ja.segment_mask(ids))[0, 0]
    expected = np.zeros((5, 5), bool)
    expected[:2, :2] = True
    expected[2:, 2:] = True
    np.testing.assert_array_equal(m, expected)
    cross = ja.segment_mask(jnp.array([[1, 2]]), jnp.array([[2, 2, 1]]))
    np.testing.assert_array_equal(cross[0, 0], [[0, 0, 1], [1, 1, 0]])


def test_and_or_broadcast_to_the_common_shape():
    causal = ja.causal_mask(3)
    pad = ja.padding_mask(kv_lengths=jnp.array([2, 3]), kv_len=3)
    both = ja.and_masks(causal, pad)
    assert both.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(both[0, 0], np.tril(np.ones((3, 3), bool)) & [1, 1, 0])
    either = ja.or_masks(causal, pad)
    np.testing.assert_array_equal(either[0, 0], np.tril(np.ones((3, 3), bool)) | [1, 1, 0])


def test_masks_vmap_over_lengths():
    f = jax.vmap(lambda n: ja.padding_mask(kv_lengths=n[None], kv_len=4)[0, 0, 0])
    np.testing.assert_array_equal(f(jnp.array([1, 3])), [[1, 0, 0, 0], [1, 1, 1, 0]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ja.causal_mask(0), "q_len must be a positive int"),
        (lambda: ja.causal_mask(3, 2.5), "kv_len must be a positive int"),
        (lambda: ja.sliding_window_mask(3, 3, -1), "window sizes must be >= 0"),
        (lambda: ja.sliding_window_mask(3, 3, (1, 2, 3)), "window must be an int or a"),
        (lambda: ja.padding_mask(), "needs q_lengths, kv_lengths or both"),
        (lambda: ja.padding_mask(kv_lengths=jnp.array([1])), "kv_lengths needs kv_len"),
        (
            lambda: ja.padding_mask(kv_lengths=jnp.array([[1]]), kv_len=2),
            "kv_lengths must be an int array of shape [B]",
        ),
        (lambda: ja.padding_mask_from_tokens(), "needs q_tokens, kv_tokens or both"),
        (
            lambda: ja.segment_mask(jnp.array([1, 2])),
            "q_segment_ids must be an int array of shape [B, L]",
        ),
        (lambda: ja.and_masks(), "and_masks needs at least one mask"),
        (
            lambda: ja.and_masks(ja.causal_mask(3), jnp.ones((3, 3))),
            "and_masks: mask 1 has dtype float32; masks must be bool",
        ),
        (
            lambda: ja.or_masks(ja.causal_mask(3), ja.causal_mask(4)),
            "or_masks: mask shapes do not broadcast together: (3, 3), (4, 4)",
        ),
        (
            lambda: ja.causal_mask(2, offset=jnp.zeros((2, 2), jnp.int32)),
            "offset must be a scalar or a [B] array",
        ),
    ],
)
def test_mask_errors_name_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
