"""Masks (jaxattn.masks) against brute-force NumPy rules written here: closed forms, every
materialised mask, per-block flags (sound everywhere, exact for basic masks), the elementwise
``allowed``, pytrees under jit and vmap, the blockwise path, ``repr`` and the error messages."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_attention
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxattn as ja
from jaxattn import _flash as flash

# --------------------------------------------------------------------------------------------
# Brute-force rules: rule(b, t, s, T, S) -> may query t of sequence b attend key s.


def _value(x, b):
    """Per-sequence value of sequence ``b`` of the flattened batch (a scalar passes through)."""
    if x is None or np.ndim(x) == 0:
        return x
    return np.asarray(x).reshape(-1)[b]


def _position(offset, b, t, q_len, kv_len):
    off = kv_len - q_len if offset is None else int(_value(offset, b))
    return t + off


def causal_rule(offset=None):
    return lambda b, t, s, T, S: s <= _position(offset, b, t, T, S)


def window_rule(left, right, offset=None):
    def rule(b, t, s, T, S):
        p = _position(offset, b, t, T, S)
        return p - left <= s <= p + right

    return rule


def prefix_rule(prefix, offset=None):
    return lambda b, t, s, T, S: s < int(_value(prefix, b)) or s <= _position(offset, b, t, T, S)


def padding_rule(q_lengths=None, kv_lengths=None):
    def rule(b, t, s, T, S):
        ok = True
        if q_lengths is not None:
            ok = ok and t < int(_value(q_lengths, b))
        if kv_lengths is not None:
            ok = ok and s < int(_value(kv_lengths, b))
        return ok

    return rule


def _row_of(ids, b, length):
    ids = np.asarray(ids)
    return ids if ids.ndim == 1 else ids.reshape(-1, length)[b]


def token_rule(q_tokens=None, kv_tokens=None, pad_id=0):
    def rule(b, t, s, T, S):
        ok = True
        if q_tokens is not None:
            ok = ok and _row_of(q_tokens, b, T)[t] != pad_id
        if kv_tokens is not None:
            ok = ok and _row_of(kv_tokens, b, S)[s] != pad_id
        return ok

    return rule


def segment_rule(q_ids, kv_ids=None):
    kv_ids = q_ids if kv_ids is None else kv_ids
    return lambda b, t, s, T, S: _row_of(q_ids, b, T)[t] == _row_of(kv_ids, b, S)[s]


def and_rule(*rules):
    return lambda *a: all(r(*a) for r in rules)


def or_rule(*rules):
    return lambda *a: any(r(*a) for r in rules)


def brute(rule, nb, q_len, kv_len):
    """bool ``[nb, T, S]`` from a rule, one element at a time."""
    return np.array(
        [
            [[bool(rule(b, t, s, q_len, kv_len)) for s in range(kv_len)] for t in range(q_len)]
            for b in range(nb)
        ]
    ).reshape(nb, q_len, kv_len)


def grid(rule, q_len, kv_len):
    """bool ``[T, S]`` of a rule without per-sequence values."""
    return brute(rule, 1, q_len, kv_len)[0]


def as_bts(mask, nb, q_len, kv_len):
    """A materialised mask (``[T, S]``, ``[1, T|1, S|1]`` or ``[B, 1, T|1, S|1]``) as
    ``[nb, T, S]``; refuses anything that is not one of those layouts."""
    m = np.asarray(mask)
    assert m.dtype == np.bool_
    if m.ndim == 4:
        assert m.shape[1] == 1, m.shape
        m = m[:, 0]
    elif m.ndim == 2:
        m = m[None]
    assert m.ndim == 3, m.shape
    return np.broadcast_to(m, (nb, q_len, kv_len))


def tril(t, s, offset=0):
    return np.tril(np.ones((t, s), bool), k=offset)


# --------------------------------------------------------------------------------------------
# Closed forms


def test_causal_square_is_lower_triangle():
    m = ja.CausalMask().materialize(4, 4)
    assert m.shape == (4, 4) and m.dtype == jnp.bool_
    np.testing.assert_array_equal(m, tril(4, 4))


def test_causal_is_bottom_right_aligned_when_t_differs_from_s():
    # Two new queries after three cached keys: they sit at positions 3 and 4.
    expected = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(ja.CausalMask().materialize(2, 5), expected)
    # The last query always sees every key.
    assert bool(ja.CausalMask().materialize(3, 7)[-1].all())


def test_causal_top_left_with_offset_zero():
    np.testing.assert_array_equal(ja.CausalMask(offset=0).materialize(2, 5), tril(2, 5))


def test_causal_more_queries_than_keys_leaves_first_rows_empty():
    m = np.asarray(ja.CausalMask().materialize(4, 2))
    assert not m[:2].any()
    np.testing.assert_array_equal(m[2:], [[1, 0], [1, 1]])


@given(st.integers(1, 12), st.integers(1, 12), st.integers(-5, 5) | st.none())
def test_causal_matches_brute_force(q_len, kv_len, offset):
    expected = grid(causal_rule(offset), q_len, kv_len)
    np.testing.assert_array_equal(ja.CausalMask(offset=offset).materialize(q_len, kv_len), expected)


def test_causal_per_sequence_offsets_under_jit():
    offsets = jnp.array([0, 2])
    m = jax.jit(lambda o: ja.CausalMask(offset=o).materialize(2, 4))(offsets)
    assert m.shape == (2, 1, 2, 4)
    np.testing.assert_array_equal(m[0, 0], grid(causal_rule(0), 2, 4))
    np.testing.assert_array_equal(m[1, 0], grid(causal_rule(2), 2, 4))


def test_static_masks_are_constants_and_large_ones_are_built_in_graph():
    # A small mask with static values enters the graph as a constant (no iota, no compare)...
    small = str(jax.make_jaxpr(lambda: ja.CausalMask().materialize(8, 8))())
    assert "iota" not in small
    # ... above the constant size it is computed with iota; both routes must agree.
    large = str(jax.make_jaxpr(lambda: ja.CausalMask().materialize(2100, 2100))())
    assert "iota" in large
    m = ja.CausalMask().materialize(2100, 2100)
    assert m.shape == (2100, 2100)
    np.testing.assert_array_equal(np.asarray(m)[:5, :5], tril(5, 5))
    assert int(m.sum()) == 2100 * 2101 // 2


@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 4), st.integers(0, 4))
def test_sliding_window_matches_brute_force(q_len, kv_len, left, right):
    expected = grid(window_rule(left, right), q_len, kv_len)
    np.testing.assert_array_equal(
        ja.SlidingWindowMask((left, right)).materialize(q_len, kv_len), expected
    )


def test_sliding_window_int_is_symmetric_and_causal_local_is_left_only():
    np.testing.assert_array_equal(
        ja.SlidingWindowMask(2).materialize(6, 6), ja.SlidingWindowMask((2, 2)).materialize(6, 6)
    )
    local = np.asarray((ja.CausalMask() & ja.SlidingWindowMask(2)).materialize(6, 6))
    np.testing.assert_array_equal(local, ja.SlidingWindowMask((2, 0)).materialize(6, 6))
    assert local.sum(axis=-1).tolist() == [1, 2, 3, 3, 3, 3]


def test_one_window_parser_for_the_mask_and_the_kernel(rng):
    # SlidingWindowMask(window) and dot_product_attention(local_window_size=) parse alike: an
    # int or NumPy int w is (w, w), a (left, right) tuple or list is itself; sides in [0, 2**31).
    q = jnp.asarray(rng.standard_normal((1, 6, 1, 4)), jnp.float32)
    for window, pair in ((np.int64(2), (2, 2)), ([2, 1], (2, 1)), ((np.int32(0), 3), (0, 3))):
        mask = ja.SlidingWindowMask(window)
        assert (mask.left, mask.right) == pair
        assert type(mask.left) is int and type(mask.right) is int
        np.testing.assert_array_equal(
            ja.dot_product_attention(q, q, q, local_window_size=window),
            ja.dot_product_attention(q, q, q, mask=ja.SlidingWindowMask(pair)),
        )
    for bad in (2**31, (0, -1)):
        with pytest.raises(ValueError, match=re.escape("window must be in [0, 2**31)")):
            ja.SlidingWindowMask(bad)
        with pytest.raises(ValueError, match=re.escape("local_window_size must be in [0, 2**31)")):
            ja.dot_product_attention(q, q, q, local_window_size=bad)


@given(st.integers(1, 10), st.integers(0, 12))
def test_prefix_lm_matches_brute_force(length, prefix):
    expected = grid(prefix_rule(prefix), length, length)
    np.testing.assert_array_equal(ja.PrefixLMMask(prefix).materialize(length, length), expected)


def test_prefix_lm_edges_and_per_sequence_prefixes():
    np.testing.assert_array_equal(ja.PrefixLMMask(0).materialize(5, 5), tril(5, 5))
    assert bool(ja.PrefixLMMask(5).materialize(5, 5).all())
    m = ja.PrefixLMMask(jnp.array([1, 3])).materialize(4, 4)
    assert m.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(m[0, 0], grid(prefix_rule(1), 4, 4))
    np.testing.assert_array_equal(m[1, 0], grid(prefix_rule(3), 4, 4))


def test_padding_mask_from_lengths_keys_queries_and_both():
    kv = ja.PaddingMask(kv_lengths=jnp.array([2, 4])).materialize(3, 4)
    assert kv.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(kv[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])
    q = ja.PaddingMask(q_lengths=jnp.array([1, 3])).materialize(3, 4)
    assert q.shape == (2, 1, 3, 1)
    np.testing.assert_array_equal(q[:, 0, :, 0], [[1, 0, 0], [1, 1, 1]])
    both = ja.PaddingMask(q_lengths=jnp.array([1, 3]), kv_lengths=jnp.array([2, 4]))
    both = both.materialize(3, 4)
    assert both.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(both, np.asarray(q) & np.asarray(kv))


def test_padding_mask_zero_length_masks_everything():
    assert not bool(ja.PaddingMask(kv_lengths=jnp.array([0])).materialize(2, 3).any())
    assert not bool(ja.PaddingMask(q_lengths=0).materialize(2, 3).any())


def test_padding_mask_from_tokens_handles_left_padding():
    tokens = jnp.array([[0, 0, 5, 6], [7, 8, 9, 0]])
    m = ja.PaddingMask.from_tokens(kv_tokens=tokens, pad_id=0).materialize(4, 4)
    assert m.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(m[:, 0, 0], [[0, 0, 1, 1], [1, 1, 1, 0]])
    both = ja.PaddingMask.from_tokens(q_tokens=tokens, kv_tokens=tokens).materialize(4, 4)
    assert both.shape == (2, 1, 4, 4)
    assert not bool(both[0, 0, 0].any())  # a pad query sees nothing
    np.testing.assert_array_equal(both[1, 0, 1], [1, 1, 1, 0])
    # Another pad id: only that id is padding (0 is then a real token).
    other = ja.PaddingMask.from_tokens(kv_tokens=tokens, pad_id=9).materialize(1, 4)
    np.testing.assert_array_equal(other[:, 0, 0], [[1, 1, 1, 1], [1, 1, 0, 1]])


def test_segment_mask_is_block_diagonal():
    ids = jnp.array([[1, 1, 2, 2, 2]])
    m = np.asarray(ja.SegmentMask(ids).materialize(5, 5))[0, 0]
    expected = np.zeros((5, 5), bool)
    expected[:2, :2] = True
    expected[2:, 2:] = True
    np.testing.assert_array_equal(m, expected)
    cross = ja.SegmentMask(jnp.array([[1, 2]]), jnp.array([[2, 2, 1]])).materialize(2, 3)
    np.testing.assert_array_equal(cross[0, 0], [[0, 0, 1], [1, 1, 0]])
    # Ids without batch dims give a [T, S] mask.
    np.testing.assert_array_equal(ja.SegmentMask(ids[0]).materialize(5, 5), expected)


def test_and_or_broadcast_to_the_common_shape():
    causal = ja.CausalMask()
    pad = ja.PaddingMask(kv_lengths=jnp.array([2, 3]))
    both = (causal & pad).materialize(3, 3)
    assert both.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(both[0, 0], tril(3, 3) & [1, 1, 0])
    np.testing.assert_array_equal(both[1, 0], tril(3, 3))
    either = (causal | pad).materialize(3, 3)
    np.testing.assert_array_equal(either[0, 0], tril(3, 3) | [1, 1, 0])


def test_masks_vmap_over_lengths():
    f = jax.vmap(lambda n: ja.PaddingMask(kv_lengths=n).materialize(1, 4)[0])
    np.testing.assert_array_equal(f(jnp.array([1, 3])), [[1, 0, 0, 0], [1, 1, 1, 0]])
    g = jax.vmap(lambda n: ja.PaddingMask(kv_lengths=n[None]).materialize(1, 4)[0, 0, 0])
    np.testing.assert_array_equal(g(jnp.array([1, 3])), [[1, 0, 0, 0], [1, 1, 1, 0]])


def test_a_mask_passed_into_vmap_takes_the_batch_of_the_arrays_it_holds_there():
    """A batched mask given to jax.vmap as an argument is each sequence's own inside (its
    per-sequence arrays are one row each there), as inside jax.shard_map a device's rows:
    what tests/train/test_sharding.py checks for attention split over devices."""
    lengths = jnp.array([1, 3])
    segments = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    mask = ja.PaddingMask(kv_lengths=lengths) & ja.SegmentMask(segments)
    rows = jax.vmap(lambda m: m.materialize(4, 4))(mask)
    np.testing.assert_array_equal(rows, mask.materialize(4, 4)[:, 0])
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32) for _ in range(3))
    mapped = jax.vmap(lambda q, k, v, m: ja.dot_product_attention(q, k, v, mask=m))
    np.testing.assert_allclose(
        mapped(q, k, v, mask), ja.dot_product_attention(q, k, v, mask=mask), rtol=1e-6
    )
    # A tree of placeholders (what JAX builds trees from, too) keeps the batch it was built with.
    leaves, treedef = jax.tree.flatten(mask)
    assert jax.tree.unflatten(treedef, [None] * len(leaves)).batch_shape() == (2,)


# --------------------------------------------------------------------------------------------
# materialize against the rules

SIZES = [(5, 5), (3, 7), (7, 3)]


def _ids(t, seed, n_segments=3):
    return np.sort(np.random.default_rng(seed).integers(0, n_segments, size=t)).astype(np.int32)


def _tokens(shape, seed, pad_id=0):
    """Random int tokens with about one pad in three, anywhere (left, right, middle)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, size=shape).astype(np.int32)
    tokens[rng.random(shape) < 0.35] = pad_id
    return tokens


# Each case: (T, S) -> (mask, batch shape, rule).
CASES = {
    "causal": lambda T, S: (ja.CausalMask(), (), causal_rule()),
    "causal_offset_0": lambda T, S: (ja.CausalMask(offset=0), (), causal_rule(0)),
    "causal_offset_2": lambda T, S: (ja.CausalMask(offset=2), (), causal_rule(2)),
    "causal_offset_neg": lambda T, S: (ja.CausalMask(offset=-2), (), causal_rule(-2)),
    "causal_per_seq": lambda T, S: (
        ja.CausalMask(offset=np.array([0, 2, -1])),
        (3,),
        causal_rule(np.array([0, 2, -1])),
    ),
    "causal_per_seq_2d": lambda T, S: (
        ja.CausalMask(offset=np.array([[0, 1], [-3, 4]])),
        (2, 2),
        causal_rule(np.array([[0, 1], [-3, 4]])),
    ),
    "window_1": lambda T, S: (ja.SlidingWindowMask(1), (), window_rule(1, 1)),
    "window_2_0": lambda T, S: (ja.SlidingWindowMask((2, 0)), (), window_rule(2, 0)),
    "window_0_2_offset": lambda T, S: (
        ja.SlidingWindowMask((0, 2), offset=1),
        (),
        window_rule(0, 2, 1),
    ),
    "window_per_seq": lambda T, S: (
        ja.SlidingWindowMask((1, 1), offset=np.array([0, 3])),
        (2,),
        window_rule(1, 1, np.array([0, 3])),
    ),
    "prefix_2": lambda T, S: (ja.PrefixLMMask(2), (), prefix_rule(2)),
    "prefix_0": lambda T, S: (ja.PrefixLMMask(0), (), prefix_rule(0)),
    "prefix_offset_0": lambda T, S: (ja.PrefixLMMask(1, offset=0), (), prefix_rule(1, 0)),
    "prefix_per_seq": lambda T, S: (
        ja.PrefixLMMask(np.array([0, 2, 9])),
        (3,),
        prefix_rule(np.array([0, 2, 9])),
    ),
    "prefix_and_offset_per_seq": lambda T, S: (
        ja.PrefixLMMask(np.array([1, 3]), offset=np.array([0, -2])),
        (2,),
        prefix_rule(np.array([1, 3]), np.array([0, -2])),
    ),
    "kv_padding_int": lambda T, S: (ja.PaddingMask(kv_lengths=2), (), padding_rule(None, 2)),
    "q_padding_int": lambda T, S: (ja.PaddingMask(q_lengths=2), (), padding_rule(2, None)),
    "kv_padding_per_seq": lambda T, S: (
        ja.PaddingMask(kv_lengths=np.array([0, S, 1, S + 4])),
        (4,),
        padding_rule(None, np.array([0, S, 1, S + 4])),
    ),
    "q_and_kv_padding_per_seq": lambda T, S: (
        ja.PaddingMask(q_lengths=np.array([0, T, 2]), kv_lengths=np.array([S, 0, 1])),
        (3,),
        padding_rule(np.array([0, T, 2]), np.array([S, 0, 1])),
    ),
    "kv_tokens_per_seq": lambda T, S: (
        ja.PaddingMask.from_tokens(kv_tokens=_tokens((3, S), 7)),
        (3,),
        token_rule(None, _tokens((3, S), 7)),
    ),
    "q_and_kv_tokens_pad_id_5": lambda T, S: (
        ja.PaddingMask.from_tokens(
            q_tokens=_tokens((2, T), 8, pad_id=5), kv_tokens=_tokens((2, S), 9, pad_id=5), pad_id=5
        ),
        (2,),
        token_rule(_tokens((2, T), 8, pad_id=5), _tokens((2, S), 9, pad_id=5), pad_id=5),
    ),
    "q_tokens_shared": lambda T, S: (
        ja.PaddingMask.from_tokens(q_tokens=_tokens((T,), 10)),
        (),
        token_rule(_tokens((T,), 10), None),
    ),
    "segment_shared": lambda T, S: (
        ja.SegmentMask(_ids(T, 1), _ids(S, 2)),
        (),
        segment_rule(_ids(T, 1), _ids(S, 2)),
    ),
    "segment_per_seq": lambda T, S: (
        ja.SegmentMask(np.stack([_ids(T, 3), _ids(T, 4)]), np.stack([_ids(S, 5), _ids(S, 6)])),
        (2,),
        segment_rule(np.stack([_ids(T, 3), _ids(T, 4)]), np.stack([_ids(S, 5), _ids(S, 6)])),
    ),
    "causal_and_kv_padding": lambda T, S: (
        ja.CausalMask() & ja.PaddingMask(kv_lengths=np.array([1, S])),
        (2,),
        and_rule(causal_rule(), padding_rule(None, np.array([1, S]))),
    ),
    "window_or_prefix": lambda T, S: (
        ja.SlidingWindowMask((1, 0)) | ja.PrefixLMMask(2),
        (),
        or_rule(window_rule(1, 0), prefix_rule(2)),
    ),
    "tokens_and_causal": lambda T, S: (
        ja.PaddingMask.from_tokens(kv_tokens=_tokens((2, S), 11)) & ja.CausalMask(offset=0),
        (2,),
        and_rule(token_rule(None, _tokens((2, S), 11)), causal_rule(0)),
    ),
    "nested": lambda T, S: (
        (ja.CausalMask(offset=0) | ja.SlidingWindowMask((0, 1))) & ja.PaddingMask(q_lengths=T - 1),
        (),
        and_rule(or_rule(causal_rule(0), window_rule(0, 1)), padding_rule(T - 1, None)),
    ),
}


@pytest.mark.parametrize("size", SIZES, ids=lambda ts: f"T{ts[0]}S{ts[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_materialize_matches_brute_force(case, size):
    t, s = size
    spec, batch, rule = CASES[case](t, s)
    assert spec.batch_shape() == batch
    mask = np.asarray(spec.materialize(t, s))
    if batch:
        # Per-sequence masks keep the leading batch dims: [*batch, 1, T|1, S|1].
        assert mask.shape[: len(batch) + 1] == (*batch, 1) and mask.ndim == len(batch) + 3
        mask = mask.reshape((-1, *mask.shape[-3:]))
    else:
        assert mask.shape == (t, s)
    nb = int(np.prod(batch)) if batch else 1
    np.testing.assert_array_equal(as_bts(mask, nb, t, s), brute(rule, nb, t, s))


def test_rule_cases_cover_every_mask_kind_and_shape():
    # Guard against the materialize parametrisation silently shrinking.
    kinds = {type(CASES[c](4, 4)[0]).__name__ for c in CASES}
    basic = {"CausalMask", "SlidingWindowMask", "PrefixLMMask", "PaddingMask", "SegmentMask"}
    assert basic | {"_TokenPadding", "_Combined"} <= kinds
    assert {(t < s) - (t > s) for t, s in SIZES} == {-1, 0, 1}


# --------------------------------------------------------------------------------------------
# block_flags: sound for every mask, exact for basic ones


@st.composite
def _offsets(draw, nb):
    kind = draw(st.sampled_from(["default", "int", "per_seq"]))
    if kind == "default":
        return None
    if kind == "int":
        return draw(st.integers(-4, 4))
    return np.array(draw(st.lists(st.integers(-4, 4), min_size=nb, max_size=nb)), np.int32)


@st.composite
def _per_seq_int(draw, nb, lo, hi):
    if draw(st.booleans()):
        return draw(st.integers(lo, hi))
    return np.array(draw(st.lists(st.integers(lo, hi), min_size=nb, max_size=nb)), np.int32)


@st.composite
def _segment_ids(draw, nb, length, per_seq, sorted_, dense):
    """``[nb, L]`` or ``[L]`` int ids; sorted and/or dense labels (steps of 0 or 1)."""
    shape = (nb, length) if per_seq else (length,)
    flat = draw(st.lists(st.integers(0, 3), min_size=int(np.prod(shape)), max_size=128))
    ids = np.array(flat[: int(np.prod(shape))], np.int32).reshape(shape)
    if dense:
        ids = np.cumsum(np.minimum(ids, 1), axis=-1).astype(np.int32)  # sorted, no gaps
    elif sorted_:
        ids = np.sort(ids, axis=-1)
    return ids


@st.composite
def _token_ids(draw, nb, length, per_seq):
    """``[nb, L]`` or ``[L]`` tokens in 0..2 (0 the pad, anywhere)."""
    shape = (nb, length) if per_seq else (length,)
    flat = draw(st.lists(st.integers(0, 2), min_size=int(np.prod(shape)), max_size=128))
    return np.array(flat[: int(np.prod(shape))], np.int32).reshape(shape)


@st.composite
def basic_specs(draw, nb, q_len, kv_len):
    """(mask, rule, exact): a random basic mask and whether its flags must be exact."""
    kind = draw(st.sampled_from(["causal", "window", "prefix", "padding", "tokens", "segment"]))
    if kind == "causal":
        off = draw(_offsets(nb))
        return ja.CausalMask(offset=off), causal_rule(off), True
    if kind == "window":
        left, right = draw(st.integers(0, 4)), draw(st.integers(0, 4))
        off = draw(_offsets(nb))
        return ja.SlidingWindowMask((left, right), offset=off), window_rule(left, right, off), True
    if kind == "prefix":
        prefix = draw(_per_seq_int(nb, 0, kv_len + 1))
        off = draw(_offsets(nb))
        return ja.PrefixLMMask(prefix, offset=off), prefix_rule(prefix, off), True
    if kind == "padding":
        which = draw(st.sampled_from(["q", "kv", "both"]))
        ql = draw(_per_seq_int(nb, 0, q_len + 1)) if which != "kv" else None
        kl = draw(_per_seq_int(nb, 0, kv_len + 1)) if which != "q" else None
        return ja.PaddingMask(q_lengths=ql, kv_lengths=kl), padding_rule(ql, kl), True
    if kind == "tokens":
        which = draw(st.sampled_from(["q", "kv", "both"]))
        per_seq = draw(st.booleans())
        qt = draw(_token_ids(nb, q_len, per_seq)) if which != "kv" else None
        kt = draw(_token_ids(nb, kv_len, per_seq)) if which != "q" else None
        spec = ja.PaddingMask.from_tokens(q_tokens=qt, kv_tokens=kt)
        return spec, token_rule(qt, kt), True
    per_seq = draw(st.booleans())
    layout = draw(st.sampled_from(["self_sorted", "cross_dense", "cross_sorted", "unsorted"]))
    if layout == "self_sorted" and q_len == kv_len:
        ids = draw(_segment_ids(nb, q_len, per_seq, True, False))
        return ja.SegmentMask(ids), segment_rule(ids), True
    sorted_, dense = layout != "unsorted", layout == "cross_dense"
    q_ids = draw(_segment_ids(nb, q_len, per_seq, sorted_, dense))
    kv_ids = draw(_segment_ids(nb, kv_len, per_seq, sorted_, dense))
    # Range-based flags are exact for sorted ids shared by queries and keys, and for sorted
    # ids without gaps in their labels (every id between a block's min and max occurs).
    return ja.SegmentMask(q_ids, kv_ids), segment_rule(q_ids, kv_ids), dense


@st.composite
def flag_problems(draw, n_parts):
    """Sizes, blocks and a mask of ``n_parts`` basic masks joined by random & and |."""
    q_len, kv_len = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    bq, bk = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    nb = draw(st.integers(1, 3))
    n_parts = draw(n_parts)
    parts = [draw(basic_specs(nb, q_len, kv_len)) for _ in range(n_parts)]
    spec, rule, exact = parts[0]
    for part_spec, part_rule, _ in parts[1:]:
        if draw(st.booleans()):
            spec, rule = spec & part_spec, and_rule(rule, part_rule)
        else:
            spec, rule = spec | part_spec, or_rule(rule, part_rule)
    return q_len, kv_len, bq, bk, nb, spec, rule, exact and n_parts == 1


def _blocks(length, size):
    lo = np.arange(-(-length // size)) * size
    hi = np.minimum(lo + size, length) - 1
    return lo, hi


def _block_args(t, s, bq, bk):
    (q_lo, q_hi), (k_lo, k_hi) = _blocks(t, bq), _blocks(s, bk)
    return (
        q_lo.reshape(1, -1, 1),
        q_hi.reshape(1, -1, 1),
        k_lo.reshape(1, 1, -1),
        k_hi.reshape(1, 1, -1),
        t,
        s,
    )


def _check_flags(any_, all_, dense, q_blocks, k_blocks, exact):
    nb = dense.shape[0]
    (q_lo, q_hi), (k_lo, k_hi) = q_blocks, k_blocks
    shape = (nb, len(q_lo), len(k_lo))
    assert np.ndim(any_) == 3 and np.ndim(all_) == 3
    any_ = np.broadcast_to(np.asarray(any_), shape)
    all_ = np.broadcast_to(np.asarray(all_), shape)
    for b in range(nb):
        for i in range(len(q_lo)):
            for j in range(len(k_lo)):
                blk = dense[b, q_lo[i] : q_hi[i] + 1, k_lo[j] : k_hi[j] + 1]
                where = f"sequence {b}, block ({i}, {j}): {blk.astype(int).tolist()}"
                if all_[b, i, j]:
                    assert blk.all(), f"flagged full but has a masked pair at {where}"
                if not any_[b, i, j]:
                    assert not blk.any(), f"flagged empty but has a visible pair at {where}"
                if exact:
                    assert any_[b, i, j] == blk.any(), f"any not exact at {where}"
                    assert all_[b, i, j] == blk.all(), f"all not exact at {where}"


def _check_spec_flags(problem):
    q_len, kv_len, bq, bk, nb, spec, rule, exact = problem
    dense = brute(rule, nb, q_len, kv_len)
    # The materialised mask is the same mask.
    np.testing.assert_array_equal(as_bts(spec.materialize(q_len, kv_len), nb, q_len, kv_len), dense)
    args = _block_args(q_len, kv_len, bq, bk)
    assert spec.is_static()
    any_, all_ = spec.block_flags(*args)
    assert isinstance(any_, np.ndarray) and isinstance(all_, np.ndarray)  # static: NumPy
    _check_flags(any_, all_, dense, _blocks(q_len, bq), _blocks(kv_len, bk), exact)
    # Traced per-sequence values (the mask as a jit argument) give the same flags.
    traced_any, traced_all = jax.jit(lambda sp: sp.block_flags(*args))(spec)
    np.testing.assert_array_equal(np.broadcast_to(traced_any, np.shape(any_)), any_)
    np.testing.assert_array_equal(np.broadcast_to(traced_all, np.shape(all_)), all_)


@settings(max_examples=20)
@given(flag_problems(st.just(1)))
def test_block_flags_of_basic_masks_are_exact(problem):
    _check_spec_flags(problem)


@settings(max_examples=12)
@given(flag_problems(st.integers(2, 3)))
def test_block_flags_of_combined_masks_are_sound(problem):
    _check_spec_flags(problem)


def _sweep_specs(t, s):
    """Basic masks whose per-sequence values sweep every interesting value at once."""
    offsets = np.arange(-4, 5, dtype=np.int32)  # 9 sequences
    lengths_q = np.arange(t + 2, dtype=np.int32)
    lengths_kv = (np.arange(t + 2, dtype=np.int32) * 3) % (s + 2)
    prefixes = np.arange(9, dtype=np.int32) % (s + 2)
    # Tokens: no pad, all pad, left-padded, right-padded, pads in the middle, random.
    q_tok, kv_tok = np.ones((6, t), np.int32), np.ones((6, s), np.int32)
    q_tok[1], kv_tok[1] = 0, 0
    q_tok[2, : t // 2], kv_tok[2, : s // 2] = 0, 0
    q_tok[3, t // 2 :], kv_tok[3, s // 2 :] = 0, 0
    q_tok[4, 1:-1], kv_tok[4, 1:-1] = 0, 0
    q_tok[5], kv_tok[5] = _tokens((t,), 12), _tokens((s,), 13)
    specs = [
        (ja.CausalMask(offset=offsets), causal_rule(offsets), 9),
        (ja.PrefixLMMask(prefixes, offset=offsets), prefix_rule(prefixes, offsets), 9),
        (ja.PaddingMask(q_lengths=lengths_q), padding_rule(lengths_q), t + 2),
        (ja.PaddingMask(kv_lengths=lengths_kv), padding_rule(None, lengths_kv), t + 2),
        (
            ja.PaddingMask(q_lengths=lengths_q, kv_lengths=lengths_kv),
            padding_rule(lengths_q, lengths_kv),
            t + 2,
        ),
        (ja.PaddingMask.from_tokens(q_tokens=q_tok), token_rule(q_tok, None), 6),
        (ja.PaddingMask.from_tokens(kv_tokens=kv_tok), token_rule(None, kv_tok), 6),
        (
            ja.PaddingMask.from_tokens(q_tokens=q_tok, kv_tokens=kv_tok[::-1].copy()),
            token_rule(q_tok, kv_tok[::-1]),
            6,
        ),
    ]
    for window in [(0, 0), (1, 2), (3, 0), (0, 4)]:
        specs.append(
            (ja.SlidingWindowMask(window, offset=offsets), window_rule(*window, offsets), 9)
        )
    if t == s:
        ids = np.array([np.sort(np.random.default_rng(i).integers(0, 3, t)) for i in range(4)])
        specs.append((ja.SegmentMask(ids.astype(np.int32)), segment_rule(ids), 4))
    return specs


@pytest.mark.parametrize("size", SIZES, ids=lambda ts: f"T{ts[0]}S{ts[1]}")
def test_block_flags_of_basic_masks_are_exact_on_a_sweep(size):
    t, s = size
    for spec, rule, nb in _sweep_specs(t, s):
        dense = brute(rule, nb, t, s)
        for bq, bk in [(1, 1), (2, 3), (3, 2), (4, 4), (t, s)]:
            any_, all_ = spec.block_flags(*_block_args(t, s, bq, bk))
            _check_flags(any_, all_, dense, _blocks(t, bq), _blocks(s, bk), exact=True)


def test_segment_flags_skip_blocks_of_sorted_self_attention_ids():
    # Three packed sequences of lengths 3, 3, 2 with blocks of 3: block (i, j) is full on the
    # diagonal where one segment fills the block, empty where the segments differ.
    ids = np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32)
    any_, all_ = ja.SegmentMask(ids).block_flags(*_block_args(8, 8, 3, 3))
    np.testing.assert_array_equal(any_[0], np.eye(3, dtype=bool))
    np.testing.assert_array_equal(all_[0], np.eye(3, dtype=bool))


def test_segment_flags_are_conservative_for_cross_attention_ids_with_label_gaps():
    # Exactness is promised only when queries and keys share one sorted id sequence. With
    # different ids (queries [0, 2], keys [1, 1]) the id ranges overlap although no pair
    # matches: the block is called partial (evaluated elementwise, still correct), never full.
    q_ids, kv_ids = np.array([0, 2], np.int32), np.array([1, 1], np.int32)
    lo = np.zeros((1, 1, 1), np.int64)
    hi = np.ones((1, 1, 1), np.int64)
    any_, all_ = ja.SegmentMask(q_ids, kv_ids).block_flags(lo, hi, lo, hi, 2, 2)
    assert not np.asarray(ja.SegmentMask(q_ids, kv_ids).materialize(2, 2)).any()
    assert bool(np.asarray(any_).reshape(())) and not bool(np.asarray(all_).reshape(()))


# --------------------------------------------------------------------------------------------
# allowed: the elementwise rule of a partial block


ALLOWED_CASES = [
    "causal",
    "causal_per_seq",
    "window_per_seq",
    "prefix_and_offset_per_seq",
    "q_and_kv_padding_per_seq",
    "q_and_kv_tokens_pad_id_5",
    "segment_shared",
    "segment_per_seq",
    "causal_and_kv_padding",
    "window_or_prefix",
]


@pytest.mark.parametrize("size", [(3, 7), (7, 3)], ids=lambda ts: f"T{ts[0]}S{ts[1]}")
@pytest.mark.parametrize("case", ALLOWED_CASES)
def test_allowed_equals_brute_force_on_any_rows_and_columns(case, size):
    t, s = size
    spec, batch, rule = CASES[case](t, s)
    nb = int(np.prod(batch)) if batch else 1
    dense = brute(rule, nb, t, s)
    rng = np.random.default_rng(0)
    # Any subset of rows and columns, in any order (a block of positions is one such subset).
    q_idx = jnp.asarray(rng.permutation(t)[: max(1, t - 1)], jnp.int32)
    k_idx = jnp.asarray(rng.permutation(s)[: max(1, s - 2)], jnp.int32)
    expected = [dense[b][np.ix_(np.asarray(q_idx), np.asarray(k_idx))] for b in range(nb)]
    # As the flash path calls it: the mask's arrays and the sequence index traced.
    traced = jax.jit(lambda sp, b: sp.allowed(q_idx[:, None], k_idx[None, :], b, t, s))
    for b in range(nb):
        got = np.asarray(spec.allowed(q_idx[:, None], k_idx[None, :], b, t, s))
        got = np.broadcast_to(got, (len(q_idx), len(k_idx)))
        np.testing.assert_array_equal(got, expected[b], err_msg=f"b={b}")
        got = np.broadcast_to(traced(spec, jnp.int32(b)), (len(q_idx), len(k_idx)))
        np.testing.assert_array_equal(got, expected[b], err_msg=f"b={b}")


def test_numpy_per_sequence_values_work_with_a_traced_sequence_index():
    # allowed() takes b as a traced scalar (flash's loop index); a mask holding NumPy arrays
    # must index them with it (regression: NumPy arrays indexed by a tracer raised).
    offsets, ids = np.array([0, 2]), np.array([[0, 0, 1], [0, 1, 1]], np.int32)
    spec = ja.CausalMask(offset=offsets) & ja.SegmentMask(ids)
    dense = brute(and_rule(causal_rule(offsets), segment_rule(ids)), 2, 3, 3)
    idx = jnp.arange(3, dtype=jnp.int32)
    got = jax.jit(lambda b: spec.allowed(idx[:, None], idx[None, :], b, 3, 3))(jnp.int32(1))
    np.testing.assert_array_equal(got, dense[1])
    # The same through flash_attention called directly (no outer jit to trace the arrays).
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 1, 4)).astype(np.float32)
    out, _ = flash.flash_attention(
        q, q, q, spec=spec, mask=None, bias=None, scale=jnp.float32(0.5), block_q=2, block_k=2
    )
    expected = reference_attention(q, q, q, dense[:, None], scale=0.5)[0]
    np.testing.assert_allclose(out, expected, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Pytrees under jit, traced values, the blockwise path


def test_masks_are_pytrees_with_arrays_as_leaves_and_ints_static():
    assert jax.tree_util.tree_leaves(ja.CausalMask(offset=2)) == []
    assert len(jax.tree_util.tree_leaves(ja.CausalMask(offset=np.array([0, 1])))) == 1
    tokens = ja.PaddingMask.from_tokens(kv_tokens=np.ones((2, 3), np.int32), pad_id=4)
    assert len(jax.tree_util.tree_leaves(tokens)) == 1  # pad_id is static
    spec = ja.PaddingMask(q_lengths=3, kv_lengths=np.array([1, 4])) & ja.SlidingWindowMask(
        (2, 1), offset=np.array([0, 1])
    )
    leaves, treedef = jax.tree_util.tree_flatten(spec)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) + 1 for x in leaves])
    rule = and_rule(padding_rule(3, np.array([2, 5])), window_rule(2, 1, np.array([1, 2])))
    np.testing.assert_array_equal(as_bts(rebuilt.materialize(4, 6), 2, 4, 6), brute(rule, 2, 4, 6))
    assert not np.array_equal(rebuilt.materialize(4, 6), spec.materialize(4, 6))


def test_mask_passes_through_jit_and_traced_lengths_work_on_the_flash_path():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 5, 2, 4)).astype(np.float32)
    k = rng.standard_normal((3, 7, 1, 4)).astype(np.float32)
    v = rng.standard_normal((3, 7, 1, 4)).astype(np.float32)

    @jax.jit
    def attend(lens):
        mask = ja.PaddingMask(kv_lengths=lens)
        return ja.dot_product_attention(
            q, k, v, mask=mask, implementation="flash", block_sizes=(2, 3)
        )

    for lens in ([7, 0, 4], [1, 3, 6]):  # one compile, different lengths (incl. 0)
        lens = np.array(lens, np.int32)
        dense = np.arange(7)[None, None, None, :] < lens[:, None, None, None]  # [B, 1, 1, S]
        expected = reference_attention(q, k, v, mask=dense)[0]
        np.testing.assert_allclose(attend(jnp.asarray(lens)), expected, atol=2e-5, rtol=2e-5)

    # A whole mask as the jit argument: its arrays are traced, its ints stay static.
    offsets = np.array([0, 1, 2])
    spec = ja.CausalMask(offset=offsets) & ja.PaddingMask(q_lengths=4)
    out = jax.jit(
        lambda sp: ja.dot_product_attention(
            q, k, v, mask=sp, implementation="flash", block_sizes=(2, 3)
        )
    )(spec)
    dense = brute(and_rule(causal_rule(offsets), padding_rule(4)), 3, 5, 7)[:, None]
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=dense)[0], atol=2e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["tokens", "tokens_and_causal"])
def test_padding_from_tokens_on_the_flash_path(causal):
    # Left padding, right padding, pads in the middle and a sequence that is all padding.
    tokens = np.array(
        [
            [0, 0, 0, 5, 6, 7, 8],
            [1, 2, 3, 4, 0, 0, 0],
            [9, 0, 9, 0, 9, 9, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        np.int32,
    )
    mask = ja.PaddingMask.from_tokens(q_tokens=tokens, kv_tokens=tokens)
    rule = token_rule(tokens, tokens)
    if causal:
        mask, rule = mask & ja.CausalMask(), and_rule(rule, causal_rule())
    dense = brute(rule, 4, 7, 7)[:, None]  # [B, 1, T, S]
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((4, 7, 2, 4)).astype(np.float32) for _ in range(3))
    ref_out = reference_attention(q, k, v, mask=dense)[0]
    d_out = jnp.asarray(rng.standard_normal((4, 7, 2, 4)), jnp.float32)

    @jax.jit
    def run(q, k, v):
        def attend(q, k, v):
            return ja.dot_product_attention(
                q, k, v, mask=mask, implementation="flash", block_sizes=(2, 3)
            )

        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    out, dq, dk, dv = (np.asarray(x) for x in jax.tree_util.tree_leaves(run(q, k, v)))
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    # A pad query's row is exactly 0, and so is its query gradient; a pad key gets none.
    pad = tokens == 0
    np.testing.assert_array_equal(out[pad], 0.0)
    np.testing.assert_array_equal(dq[pad], 0.0)
    np.testing.assert_array_equal(dk[pad], 0.0)
    np.testing.assert_array_equal(dv[pad], 0.0)
    assert np.abs(out[~pad]).min() > 0
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    # The dense path agrees.
    xla = ja.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(xla, ref_out, atol=2e-5, rtol=2e-5)
    # The all-padding sequence is never visited: NaN inputs there still give exact zeros.
    q_bad, k_bad, v_bad = q.copy(), k.copy(), v.copy()
    for x in (q_bad, k_bad, v_bad):
        x[3] = np.nan
    out_bad = np.asarray(run(q_bad, k_bad, v_bad)[0])
    np.testing.assert_array_equal(out_bad[3], 0.0)
    np.testing.assert_allclose(out_bad[:3], out[:3], atol=1e-6)


# --------------------------------------------------------------------------------------------
# repr


def test_repr_names_the_rule_and_summarises_arrays():
    assert repr(ja.CausalMask()) == "CausalMask(offset=None)"
    assert repr(ja.CausalMask(offset=3)) == "CausalMask(offset=3)"
    assert repr(ja.CausalMask(offset=np.zeros(5, np.int32))) == "CausalMask(offset=<int32 [5]>)"
    assert repr(ja.PrefixLMMask(2)) == "PrefixLMMask(prefix_len=2, offset=None)"
    assert repr(ja.PaddingMask(kv_lengths=jnp.zeros((2, 3), jnp.int32))) == (
        "PaddingMask(q_lengths=None, kv_lengths=<int32 [2, 3]>)"
    )
    tokens = ja.PaddingMask.from_tokens(q_tokens=np.zeros((2, 7), np.int32), pad_id=3)
    assert (
        repr(tokens) == "PaddingMask.from_tokens(q_tokens=<int32 [2, 7]>, kv_tokens=None, pad_id=3)"
    )
    window = repr(ja.SlidingWindowMask((2, 1), offset=0))
    assert window.startswith("SlidingWindowMask(") and "2" in window and "1" in window
    segments = repr(ja.SegmentMask(np.zeros((4, 9), np.int32), np.zeros((4, 6), np.int32)))
    assert segments.startswith("SegmentMask(")
    assert "<int32 [4, 9]>" in segments and "<int32 [4, 6]>" in segments
    # Array contents are never dumped, however large.
    big = repr(ja.PaddingMask(kv_lengths=np.arange(10_000, dtype=np.int32)))
    assert len(big) < 80 and "9999" not in big


def test_repr_of_combined_masks_shows_every_part_and_the_nesting():
    a, b, c = ja.CausalMask(), ja.PrefixLMMask(1), ja.SlidingWindowMask(2)
    # a & b & c is one flat conjunction; (a & b) | c nests it inside a disjunction.
    flat = repr(a & b & c)
    assert re.fullmatch(
        r"\(CausalMask\(offset=None\) (and|&) PrefixLMMask\(prefix_len=1, offset=None\) "
        r"(and|&) SlidingWindowMask\(.*\)\)",
        flat,
    ), flat
    nested = repr((a & b) | c)
    assert re.fullmatch(
        r"\(\(CausalMask\(.*\) (and|&) PrefixLMMask\(.*\)\) (or|\|) Sliding.*\)\)", nested
    )
    assert repr(a | b) != repr(a & b)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ja.CausalMask().materialize(0, 3), "q_len must be a positive int"),
        (lambda: ja.CausalMask().materialize(3, 2.5), "kv_len must be a positive int"),
        (lambda: ja.CausalMask().materialize(True, 3), "q_len must be a positive int"),
        (lambda: ja.SlidingWindowMask(-1), "window must be in [0, 2**31)"),
        (lambda: ja.SlidingWindowMask((2, -1)), "window must be in [0, 2**31)"),
        (lambda: ja.SlidingWindowMask((1, 2, 3)), "window must be an int or a (left, right)"),
        (lambda: ja.SlidingWindowMask(2.0), "window must be an int or a (left, right)"),
        (lambda: ja.PaddingMask(), "PaddingMask needs q_lengths, kv_lengths or both"),
        (lambda: ja.PaddingMask(kv_lengths=[1, 2]), "kv_lengths must be an int or an int array"),
        (
            lambda: ja.PaddingMask(kv_lengths=np.array([1.0, 2.0], np.float32)),
            "kv_lengths must be an int array, got dtype float32",
        ),
        (
            lambda: ja.PaddingMask(q_lengths=np.array([1]), kv_lengths=np.array([1, 2])),
            "q_lengths has batch shape (1,) but kv_lengths has (2,)",
        ),
        (lambda: ja.PaddingMask.from_tokens(), "needs q_tokens, kv_tokens or both"),
        (
            lambda: ja.PaddingMask.from_tokens(kv_tokens=[1, 2]),
            "kv_tokens must be an int array [..., L], got list",
        ),
        (
            lambda: ja.PaddingMask.from_tokens(kv_tokens=np.zeros(3, np.int32), pad_id=True),
            "pad_id must be an int",
        ),
        (
            lambda: ja.PaddingMask.from_tokens(q_tokens=np.zeros(3, np.int32)).materialize(4, 4),
            "q_tokens has length 3 but the attention has 4",
        ),
        (lambda: ja.SegmentMask(3), "q_segment_ids must be an int array [..., L], got an int"),
        (
            lambda: ja.SegmentMask(np.zeros(3, np.float32)),
            "q_segment_ids must be an int array, got dtype float32",
        ),
        (lambda: ja.SegmentMask(np.array(3)), "q_segment_ids must have at least 1 dims"),
        (
            lambda: ja.SegmentMask(np.zeros((2, 3), np.int32), np.zeros((3, 3), np.int32)),
            "q_segment_ids has batch shape (2,) but kv_segment_ids has (3,)",
        ),
        (lambda: ja.CausalMask(offset=1.5), "offset must be an int or an int array, got float"),
        (lambda: ja.CausalMask(offset=True), "offset must be an int or an int array, got bool"),
        (
            lambda: ja.CausalMask(offset=jnp.zeros((2,), jnp.float32)),
            "offset must be an int array, got dtype float32",
        ),
        (
            lambda: (
                ja.CausalMask(offset=np.array([0, 1])) | ja.PaddingMask(kv_lengths=np.ones(3, int))
            ),
            "combined masks have different batch shapes",
        ),
    ],
)
def test_mask_errors_name_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.parametrize(
    "other",
    [np.ones((4, 4), bool), jnp.ones((4, 4), bool), True, None, 1],
    ids=["numpy", "jax", "bool", "none", "int"],
)
def test_a_mask_does_not_combine_with_a_non_mask(other):
    combines = (lambda a, b: a & b, lambda a, b: a | b, lambda a, b: b & a, lambda a, b: b | a)
    for combine in combines:  # either side: `array & mask` defers to the mask's __rand__
        with pytest.raises(ValueError) as info:
            combine(ja.CausalMask(), other)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"masks combine only with masks, got {type(other).__name__};")
        assert "mask.materialize(T, S)" in message


@pytest.mark.parametrize("impl", ["xla", "flash"])
def test_segment_ids_of_the_wrong_length_are_refused(impl):
    q = np.zeros((2, 4, 1, 8), np.float32)
    kv = np.zeros((2, 5, 1, 8), np.float32)
    kw = {"implementation": impl, "block_sizes": (2, 2) if impl == "flash" else None}
    with pytest.raises(ValueError, match="q_segment_ids has length 3 but the attention has 4"):
        ja.dot_product_attention(
            q,
            kv,
            kv,
            mask=ja.SegmentMask(np.zeros((2, 3), np.int32), np.zeros((2, 5), np.int32)),
            **kw,
        )
    with pytest.raises(ValueError, match="kv_segment_ids has length 4 but the attention has 5"):
        ja.dot_product_attention(q, kv, kv, mask=ja.SegmentMask(np.zeros((2, 4), np.int32)), **kw)


@pytest.mark.parametrize(
    ("batch", "spec"),
    [
        ((2,), ja.CausalMask(offset=np.array([0, 1, 2]))),
        ((), ja.PaddingMask(kv_lengths=np.array([3]))),
        ((2, 3), ja.PrefixLMMask(np.ones((3, 2), np.int32))),
    ],
    ids=["3_vs_2", "1_vs_none", "3x2_vs_2x3"],
)
@pytest.mark.parametrize("impl", ["xla", "flash"])
def test_mask_batch_shape_must_match_the_query(batch, spec, impl):
    q = np.zeros((*batch, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="per-sequence values of batch shape"):
        ja.dot_product_attention(q, q, q, mask=spec, implementation=impl)
