"""Structured masks (jaxattn.mask_spec) against brute-force NumPy rules: materialised masks,
per-block flags (soundness everywhere, exactness for basic masks), elementwise ``allowed``,
pytree behaviour under jit, and the error messages."""

from __future__ import annotations

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
# Brute-force rules: rule(b, t, s) -> may query t of sequence b attend key s.


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


def segment_rule(q_ids, kv_ids=None):
    kv_ids = q_ids if kv_ids is None else kv_ids

    def rule(b, t, s, T, S):
        qi = np.asarray(q_ids)
        ki = np.asarray(kv_ids)
        qi = qi if qi.ndim == 1 else qi.reshape(-1, T)[b]
        ki = ki if ki.ndim == 1 else ki.reshape(-1, S)[b]
        return qi[t] == ki[s]

    return rule


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


# --------------------------------------------------------------------------------------------
# materialize against the rules

SIZES = [(5, 5), (3, 7), (7, 3)]


def _ids(t, seed, n_segments=3):
    return np.sort(np.random.default_rng(seed).integers(0, n_segments, size=t)).astype(np.int32)


# Each case: (T, S) -> (spec, batch shape, rule).
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
    nb = int(np.prod(batch)) if batch else 1
    np.testing.assert_array_equal(as_bts(mask, nb, t, s), brute(rule, nb, t, s))


def test_rule_cases_cover_every_mask_kind_and_shape():
    # Guard against the materialize parametrisation silently shrinking.
    kinds = {type(CASES[c](4, 4)[0]).__name__ for c in CASES}
    basic = {"CausalMask", "SlidingWindowMask", "PrefixLMMask", "PaddingMask", "SegmentMask"}
    assert basic | {"_Combined"} <= kinds
    assert {(t < s) - (t > s) for t, s in SIZES} == {-1, 0, 1}


# --------------------------------------------------------------------------------------------
# block_flags: sound for every spec, exact for basic ones


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
def basic_specs(draw, nb, q_len, kv_len):
    """(spec, rule, exact): a random basic spec and whether its flags must be exact."""
    kind = draw(st.sampled_from(["causal", "window", "prefix", "padding", "segment"]))
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
    """Sizes, blocks and a spec of ``n_parts`` basic masks joined by random & and |."""
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
    q_blocks, k_blocks = _blocks(q_len, bq), _blocks(kv_len, bk)
    args = (
        q_blocks[0].reshape(1, -1, 1),
        q_blocks[1].reshape(1, -1, 1),
        k_blocks[0].reshape(1, 1, -1),
        k_blocks[1].reshape(1, 1, -1),
        q_len,
        kv_len,
    )
    assert spec.is_static()
    any_, all_ = spec.block_flags(*args)
    assert isinstance(any_, np.ndarray) and isinstance(all_, np.ndarray)  # static: NumPy
    _check_flags(any_, all_, dense, q_blocks, k_blocks, exact)
    # Traced per-sequence values (the spec as a jit argument) give the same flags.
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
    """Basic specs whose per-sequence values sweep every interesting value at once."""
    offsets = np.arange(-4, 5, dtype=np.int32)  # 9 sequences
    lengths_q = np.arange(t + 2, dtype=np.int32)
    lengths_kv = (np.arange(t + 2, dtype=np.int32) * 3) % (s + 2)
    prefixes = np.arange(9, dtype=np.int32) % (s + 2)
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
            q_blocks, k_blocks = _blocks(t, bq), _blocks(s, bk)
            any_, all_ = spec.block_flags(
                q_blocks[0].reshape(1, -1, 1),
                q_blocks[1].reshape(1, -1, 1),
                k_blocks[0].reshape(1, 1, -1),
                k_blocks[1].reshape(1, 1, -1),
                t,
                s,
            )
            _check_flags(any_, all_, dense, q_blocks, k_blocks, exact=True)


def test_segment_flags_skip_blocks_of_sorted_self_attention_ids():
    # Three packed sequences of lengths 3, 3, 2 with blocks of 3: block (i, j) is full on the
    # diagonal where one segment fills the block, empty where the segments differ.
    ids = np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32)
    lo, hi = _blocks(8, 3)
    any_, all_ = ja.SegmentMask(ids).block_flags(
        lo.reshape(1, -1, 1), hi.reshape(1, -1, 1), lo.reshape(1, 1, -1), hi.reshape(1, 1, -1), 8, 8
    )
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
    "segment_shared",
    "segment_per_seq",
    "causal_and_kv_padding",
    "window_or_prefix",
]


@pytest.mark.parametrize("size", [(3, 7), (7, 3)], ids=lambda ts: f"T{ts[0]}S{ts[1]}")
@pytest.mark.parametrize("case", ALLOWED_CASES)
def test_allowed_equals_materialized_rows_and_columns(case, size):
    t, s = size
    spec, batch, _ = CASES[case](t, s)
    nb = int(np.prod(batch)) if batch else 1
    mask = np.asarray(spec.materialize(t, s))
    dense = as_bts(mask.reshape((-1, *mask.shape[-3:])) if batch else mask, nb, t, s)
    rng = np.random.default_rng(0)
    # Any subset of rows and columns, in any order (a block of positions is one such subset).
    q_idx = jnp.asarray(rng.permutation(t)[: max(1, t - 1)], jnp.int32)
    k_idx = jnp.asarray(rng.permutation(s)[: max(1, s - 2)], jnp.int32)
    expected = [dense[b][np.ix_(np.asarray(q_idx), np.asarray(k_idx))] for b in range(nb)]
    # As the flash path calls it: the spec's arrays and the sequence index traced.
    traced = jax.jit(lambda sp, b: sp.allowed(q_idx, k_idx, b, t, s))
    for b in range(nb):
        got = np.asarray(spec.allowed(q_idx, k_idx, b, t, s))  # concrete NumPy values
        assert got.shape == (len(q_idx), len(k_idx))
        np.testing.assert_array_equal(got, expected[b], err_msg=f"b={b}")
        np.testing.assert_array_equal(traced(spec, jnp.int32(b)), expected[b], err_msg=f"b={b}")


def test_numpy_per_sequence_values_work_with_a_traced_sequence_index():
    # allowed() takes b as a traced scalar (flash's loop index); a spec holding NumPy arrays
    # must index them with it (regression: NumPy arrays indexed by a tracer raised).
    spec = ja.CausalMask(offset=np.array([0, 2])) & ja.SegmentMask(
        np.array([[0, 0, 1], [0, 1, 1]], np.int32)
    )
    idx = jnp.arange(3, dtype=jnp.int32)
    got = jax.jit(lambda b: spec.allowed(idx, idx, b, 3, 3))(jnp.int32(1))
    np.testing.assert_array_equal(got, np.asarray(spec.materialize(3, 3))[1, 0])
    # The same through flash_attention called directly (no outer jit to trace the arrays).
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 1, 4)).astype(np.float32)
    out = flash.flash_attention(
        q, q, q, spec=spec, mask=None, bias=None, scale=jnp.float32(0.5), block_q=2, block_k=2
    )
    dense = np.asarray(spec.materialize(3, 3))
    np.testing.assert_allclose(out, reference_attention(q, q, q, dense, scale=0.5)[0], atol=2e-5)


# --------------------------------------------------------------------------------------------
# Pytrees under jit, traced values


def test_specs_are_pytrees_with_arrays_as_leaves_and_ints_static():
    assert jax.tree_util.tree_leaves(ja.CausalMask(offset=2)) == []
    assert len(jax.tree_util.tree_leaves(ja.CausalMask(offset=np.array([0, 1])))) == 1
    spec = ja.PaddingMask(q_lengths=3, kv_lengths=np.array([1, 4])) & ja.SlidingWindowMask(
        (2, 1), offset=np.array([0, 1])
    )
    leaves, treedef = jax.tree_util.tree_flatten(spec)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) + 1 for x in leaves])
    expected = ja.PaddingMask(q_lengths=3, kv_lengths=np.array([2, 5])) & ja.SlidingWindowMask(
        (2, 1), offset=np.array([1, 2])
    )
    np.testing.assert_array_equal(rebuilt.materialize(4, 6), expected.materialize(4, 6))
    assert not np.array_equal(rebuilt.materialize(4, 6), spec.materialize(4, 6))


def test_spec_passes_through_jit_and_traced_lengths_work_on_the_flash_path():
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

    # A whole spec as the jit argument: its arrays are traced, its ints stay static.
    spec = ja.CausalMask(offset=np.array([0, 1, 2])) & ja.PaddingMask(q_lengths=4)
    out = jax.jit(
        lambda sp: ja.dot_product_attention(
            q, k, v, mask=sp, implementation="flash", block_sizes=(2, 3)
        )
    )(spec)
    dense = np.asarray(spec.materialize(5, 7))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=dense)[0], atol=2e-5)


# --------------------------------------------------------------------------------------------
# Errors


def test_padding_mask_needs_lengths():
    with pytest.raises(ValueError, match="PaddingMask needs q_lengths, kv_lengths or both"):
        ja.PaddingMask()


@pytest.mark.parametrize("window", [-1, (2, -1)])
def test_negative_window_is_refused(window):
    with pytest.raises(ValueError, match="window sizes must be >= 0"):
        ja.SlidingWindowMask(window=window)


def test_spec_does_not_combine_with_a_bool_array():
    for combine in (lambda a, b: a & b, lambda a, b: a | b):
        with pytest.raises(ValueError, match="structured masks combine only with structured"):
            combine(ja.CausalMask(), np.ones((4, 4), bool))


def test_combined_specs_must_share_their_batch_shape():
    with pytest.raises(ValueError, match="combined masks have different batch shapes"):
        ja.CausalMask(offset=np.array([0, 1])) & ja.PaddingMask(kv_lengths=np.array([1, 2, 3]))


def test_per_sequence_values_must_be_ints():
    with pytest.raises(ValueError, match="kv_lengths must be an int array, got dtype float32"):
        ja.PaddingMask(kv_lengths=np.array([1.0, 2.0], np.float32))


@pytest.mark.parametrize("impl", ["reference", "flash"])
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
def test_spec_batch_shape_must_match_the_query(batch, spec):
    q = np.zeros((*batch, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="per-sequence values of batch shape"):
        ja.dot_product_attention(q, q, q, mask=spec, implementation="flash")
