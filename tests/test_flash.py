"""The blockwise path (jaxattn._flash): values and gradients against a float64 NumPy oracle,
empty blocks really skipped, the block schedule, the dispatcher, and bounded compile size
and memory."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import qkv, reference_attention
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxattn as ja
from jaxattn import _blocks as flash_blocks
from jaxattn.attention import FLASH_MIN_PAIRS

# --------------------------------------------------------------------------------------------
# Helpers


def _sum_to(x, shape):
    """Sum ``x`` over the dims that ``shape`` broadcasts (the cotangent of a broadcast)."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True)


def oracle(q, k, v, mask=None, bias=None, scale=None, d_out=None):
    """softmax(Q K^T * scale + bias, masked) V and its gradients in float64: the forward is
    conftest's oracle (jaxattn.reference in float64, itself checked against a NumPy formula in
    test_reference.py), the gradients are written out here in NumPy, independent of the
    package. A -inf bias entry masks its pair; a row with no visible key gives 0. Returns out,
    or (out, (dq, dk, dv, d_bias)) for a cotangent."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, kh = q.shape[-2], k.shape[-2]
    g = n // kh
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    visible = mask
    if bias is not None:  # -inf entries hide their pair; the rest is added
        bias = np.asarray(bias, np.float64)
        finite = np.isfinite(bias)
        visible = finite if mask is None else np.logical_and(np.asarray(mask), finite)
        bias = np.where(finite, bias, 0.0)
    out, w = reference_attention(q, k, v, mask=visible, bias=bias, scale=scale)
    if d_out is None:
        return out
    kr, vr = np.repeat(k, g, axis=-2), np.repeat(v, g, axis=-2)
    do = np.asarray(d_out, np.float64)
    d_vr = np.einsum("...nts,...tnh->...snh", w, do)
    d_w = np.einsum("...tnh,...snh->...nts", do, vr)
    d_logits = w * (d_w - (d_w * w).sum(axis=-1, keepdims=True))
    dq = np.einsum("...nts,...snh->...tnh", d_logits, kr) * scale
    d_kr = np.einsum("...nts,...tnh->...snh", d_logits, q) * scale
    dk = d_kr.reshape((*d_kr.shape[:-2], kh, g, d_kr.shape[-1])).sum(axis=-2)
    dv = d_vr.reshape((*d_vr.shape[:-2], kh, g, d_vr.shape[-1])).sum(axis=-2)
    d_bias = None if bias is None else _sum_to(d_logits, np.shape(bias))
    return out, (dq, dk, dv, d_bias)


def flash_vjp(q, k, v, mask, bias, d_out, blocks, **kwargs):
    """Flash output and (dq, dk, dv, d_bias) for the cotangent ``d_out``."""

    def attend(q, k, v, bias):
        return ja.dot_product_attention(
            q, k, v, mask=mask, bias=bias, implementation="flash", block_sizes=blocks, **kwargs
        )

    @jax.jit  # one compile for both passes
    def run(q, k, v, bias, d_out):
        out, vjp = jax.vjp(attend, q, k, v, bias)
        return out, vjp(d_out)

    return run(q, k, v, bias, d_out)


def assert_close(actual, expected, atol, rtol, name=""):
    """allclose with atol relative to the expected array's scale (gradients vary in size)."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, atol=atol * scale, rtol=rtol, err_msg=name)


def _with_minus_inf(rng, shape, fraction=0.2):
    bias = rng.standard_normal(shape).astype(np.float32)
    bias[rng.random(shape) < fraction] = -np.inf
    return bias


# --------------------------------------------------------------------------------------------
# Values and gradients against the oracle

# id: (batch, T, S, N, K, H, Hv, blocks, mask builder (rng, batch, T, S, N), bias shape or None)
CASES = {
    # T > S (first rows see no key), odd lengths, GQA, Hv != H, per-head bias with -inf.
    "t_gt_s_gqa_hv_bias_nts": ((2,), 7, 5, 4, 2, 8, 6, (2, 3), lambda *a: ja.CausalMask(), "nts"),
    # T < S, MQA, a key-only bias with -inf, a sliding window.
    "t_lt_s_mqa_bias_keys": (
        (2,),
        3,
        10,
        4,
        1,
        8,
        8,
        (2, 4),
        lambda *a: ja.SlidingWindowMask((3, 1)),
        "keys",
    ),
    # Two leading batch dims, per-sequence lengths (incl. 0 and full), a per-row bias.
    "batch_2x3_padding_bias_rows": (
        (2, 3),
        5,
        6,
        2,
        2,
        4,
        4,
        (3, 2),
        lambda rng, b, t, s, n: ja.PaddingMask(
            q_lengths=np.array([[0, 5, 2], [4, 1, 5]], np.int32),
            kv_lengths=np.array([[6, 0, 3], [1, 6, 5]], np.int32),
        ),
        "rows",
    ),
    # No batch dims at all, blocks larger than needed on one axis.
    "no_batch_prefix": ((), 6, 6, 2, 1, 8, 8, (4, 8), lambda *a: ja.PrefixLMMask(2), None),
    # A per-head dense bool mask [B, N, T, S] with fully masked rows.
    "per_head_dense_mask": (
        (2,),
        6,
        7,
        4,
        2,
        8,
        8,
        (2, 2),
        lambda rng, b, t, s, n: jnp.asarray(rng.random((*b, n, t, s)) < 0.4),
        None,
    ),
    # Packed segments OR a local window, odd blocks.
    "segments_or_window": (
        (1,),
        9,
        9,
        2,
        2,
        4,
        4,
        (3, 3),
        lambda *a: (
            ja.SegmentMask(np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2]], np.int32))
            | ja.SlidingWindowMask((1, 0))
        ),
        None,
    ),
    # No mask, 1 x 1 blocks: every block full, keys walked in runs of every width.
    "no_mask_wide_runs": ((1,), 4, 11, 2, 2, 4, 4, (1, 1), lambda *a: None, None),
}


def _bias(rng, kind, batch, t, s, n):
    shapes = {"nts": (n, t, s), "keys": (1, 1, 1, s), "rows": (*batch, 1, t, 1)}
    return None if kind is None else _with_minus_inf(rng, shapes[kind])


def _dense(mask, t, s):
    """A bool array as is; a spec materialised (the oracle needs the bool mask)."""
    if isinstance(mask, ja.MaskSpec):
        return np.asarray(mask.materialize(t, s))
    return None if mask is None else np.asarray(mask)


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_float64_oracle(case):
    batch, t, s, n, k, h, hv, blocks, make_mask, bias_kind = CASES[case]
    rng = np.random.default_rng(0)
    q, key, v = qkv(rng, batch, t, s, n, k, h, hv)
    mask = make_mask(rng, batch, t, s, n)
    bias = _bias(rng, bias_kind, batch, t, s, n)
    d_out = rng.standard_normal((*batch, t, n, hv)).astype(np.float32)
    out, grads = flash_vjp(q, key, v, mask, bias, d_out, blocks)
    ref_out, ref_grads = oracle(q, key, v, _dense(mask, t, s), bias, d_out=d_out)
    assert out.shape == (*batch, t, n, hv) and out.dtype == jnp.float32
    assert_close(out, ref_out, 2e-5, 2e-5, "out")
    for name, g, ref in zip(("dq", "dk", "dv", "d_bias"), grads, ref_grads, strict=True):
        if ref is None:
            assert g is None, name
            continue
        assert g.shape == ref.shape and g.dtype == jnp.float32, name
        assert np.isfinite(g).all(), name
        assert_close(g, ref, 3e-5, 1e-4, name)


def test_cases_cover_the_shapes_asked_for():
    # Guard against the parametrisation silently shrinking.
    shapes = [c[:7] for c in CASES.values()]
    assert {len(b) for b, *_ in shapes} == {0, 1, 2}
    assert any(t > s for _, t, s, *_ in shapes) and any(t < s for _, t, s, *_ in shapes)
    assert any(1 < k < n for *_, n, k, _, _ in shapes) and any(k == 1 for *_, k, _, _ in shapes)
    assert any(h != hv for *_, h, hv in shapes)
    assert any(t % c[7][0] or s % c[7][1] for c in CASES.values() for t, s in [c[1:3]])
    assert {c[9] for c in CASES.values()} >= {"nts", "keys", "rows", None}


def test_float64_inputs_at_tight_tolerance():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        q, key, v = qkv(rng, (2,), 5, 7, 4, 2, 8, 6, np.float64)
        mask = ja.CausalMask() & ja.PaddingMask(kv_lengths=np.array([3, 7]))
        bias = _with_minus_inf(rng, (4, 5, 7)).astype(np.float64)
        d_out = rng.standard_normal((2, 5, 4, 6))
        out, grads = flash_vjp(q, key, v, mask, bias, d_out, (2, 3))
        ref_out, ref_grads = oracle(q, key, v, _dense(mask, 5, 7), bias, d_out=d_out)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=1e-12)
        for name, g, ref in zip(("dq", "dk", "dv", "d_bias"), grads, ref_grads, strict=True):
            assert g.dtype == jnp.float64, name
            np.testing.assert_allclose(g, ref, atol=1e-11, rtol=1e-10, err_msg=name)


def test_structured_spec_equals_its_dense_bool_mask():
    rng = np.random.default_rng(2)
    q, key, v = qkv(rng, (2,), 9, 11, 2, 1, 8)
    spec = (ja.PrefixLMMask(np.array([2, 5])) & ja.PaddingMask(kv_lengths=np.array([11, 7]))) | (
        ja.SlidingWindowMask((1, 1), offset=0)
    )
    dense = spec.materialize(9, 11)
    kw = {"implementation": "flash", "block_sizes": (2, 3)}
    by_spec = ja.dot_product_attention(q, key, v, mask=spec, **kw)
    by_dense = ja.dot_product_attention(q, key, v, mask=dense, **kw)
    np.testing.assert_allclose(by_spec, by_dense, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(by_spec, oracle(q, key, v, np.asarray(dense)), atol=2e-5)


def test_fully_masked_rows_give_exact_zeros_in_output_and_gradients():
    rng = np.random.default_rng(3)
    q, key, v = qkv(rng, (2,), 5, 6, 2, 1, 4)
    q_lengths = np.array([0, 3], np.int32)  # sequence 0 has no real query, sequence 1 has 3
    mask = ja.PaddingMask(q_lengths=q_lengths)
    bias = rng.standard_normal((2, 1, 5, 6)).astype(np.float32)
    d_out = rng.standard_normal((2, 5, 2, 4)).astype(np.float32)
    out, (dq, dk, dv, d_bias) = flash_vjp(q, key, v, mask, bias, d_out, (2, 4))
    out, dq, dk, dv, d_bias = (np.asarray(x) for x in (out, dq, dk, dv, d_bias))
    for x in (out, dq, dk, dv, d_bias):
        assert np.isfinite(x).all()
    # Padded query rows: output, dq and d_bias exactly 0, never NaN, never a mean of V.
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, 3:], 0.0)
    np.testing.assert_array_equal(dq[0], 0.0)
    np.testing.assert_array_equal(dq[1, 3:], 0.0)
    np.testing.assert_array_equal(d_bias[0], 0.0)
    np.testing.assert_array_equal(d_bias[1, :, 3:], 0.0)
    # A sequence with no real query contributes nothing to dk, dv.
    np.testing.assert_array_equal(dk[0], 0.0)
    np.testing.assert_array_equal(dv[0], 0.0)
    # The real rows are not zero and agree with the oracle.
    assert np.abs(out[1, :3]).min() > 0 and np.abs(dq[1, :3]).sum() > 0
    ref_out, ref_grads = oracle(q, key, v, _dense(mask, 5, 6), bias, d_out=d_out)
    assert_close(out, ref_out, 2e-5, 2e-5)
    for g, ref in zip((dq, dk, dv, d_bias), ref_grads, strict=True):
        assert_close(g, ref, 3e-5, 1e-4)


# --------------------------------------------------------------------------------------------
# Empty blocks are not visited
#
# NaN is put in the keys/values (or queries) that only empty blocks hold. Any computation
# that reads them gives NaN, even where the mask hides them: a hidden key has weight exactly 0,
# but 0 * NaN = NaN in the P V matmul (and NaN logits in dQ = dS K, dK = dS^T Q). The xla
# path, which multiplies the whole [T, S] weights by V, returns NaN on these inputs (so does
# the oracle below); the flash path must return the clean result because it never reads them.


def _poison_keys(key, v, hidden):
    """Copies of key and value with NaN at the key positions where ``hidden`` [B, S] is True."""
    key, v = key.copy(), v.copy()
    key[hidden], v[hidden] = np.nan, np.nan
    return key, v


# id: (T, S, blocks, mask, hidden keys [B, S] (B = 2), or None to poison queries instead)
S16 = np.arange(16)
POISON = {
    # Top-left causal with S = 2T: key blocks 2, 3 lie after every query.
    "causal": (8, 16, (4, 4), ja.CausalMask(offset=0), np.stack([S16 >= 8] * 2)),
    # Per-sequence lengths 5 and 9: keys from the next block boundary (8 and 12) are in
    # empty blocks (5..7 and 9..11 sit in partial blocks, which are read).
    "kv_lengths": (
        8,
        16,
        (4, 4),
        ja.PaddingMask(kv_lengths=np.array([5, 9], np.int32)),
        np.stack([S16 >= 8, S16 >= 12]),
    ),
    # A local window: keys 12..15 are more than one key past the last query.
    "window": (8, 16, (4, 4), ja.SlidingWindowMask((2, 1), offset=0), np.stack([S16 >= 12] * 2)),
    # Packed segments: no query is in segment 2, which fills key blocks 2 and 3.
    "segments": (
        8,
        16,
        (4, 4),
        ja.SegmentMask(
            np.repeat(np.array([[0, 1]], np.int32), 4, axis=1).repeat(2, axis=0),
            np.repeat(np.array([[0, 1, 2, 2]], np.int32), 4, axis=1).repeat(2, axis=0),
        ),
        np.stack([S16 >= 8] * 2),
    ),
    # A dense bool mask that hides keys 4..7 (one whole key block) from every query.
    "dense": (
        8,
        12,
        (4, 4),
        jnp.asarray((np.arange(12) < 4) | (np.arange(12) >= 8))[None, :],
        np.stack([(np.arange(12) >= 4) & (np.arange(12) < 8)] * 2),
    ),
    # Bottom-right causal with T = 2S: queries 0..7 come before every key; their query
    # blocks are empty (their NaN reaches dK = dS^T Q in a path that reads them).
    "causal_queries": (16, 8, (4, 4), ja.CausalMask(), None),
}


@pytest.mark.parametrize("case", list(POISON))
def test_empty_blocks_are_never_read(case):
    t, s, blocks, mask, hidden = POISON[case]
    rng = np.random.default_rng(4)
    q, key, v = qkv(rng, (2,), t, s, 2, 1, 4)
    d_out = rng.standard_normal((2, t, 2, 4)).astype(np.float32)
    dense = _dense(mask, t, s)
    if hidden is None:
        hidden_q = np.stack([np.arange(t) < t - s] * 2)  # rows before every key
        q_bad = q.copy()
        q_bad[hidden_q] = np.nan
        args_bad = (q_bad, key, v)
    else:
        visible = np.broadcast_to(dense, (2, 1, t, s))
        assert not (visible & hidden[:, None, None, :]).any()  # the poison is hidden
        args_bad = (q, *_poison_keys(key, v, hidden))
    # The poison matters: a computation that reads it gives NaN (0 * NaN), in the output
    # for hidden keys, in dK (= dS^T Q) for hidden queries.
    bad_out, bad_grads = oracle(*args_bad, dense, d_out=d_out)
    assert np.isnan(bad_out if hidden is not None else bad_grads[1]).any()

    out, grads = flash_vjp(*args_bad, mask, None, d_out, blocks)
    ref_out, ref_grads = oracle(q, key, v, dense, d_out=d_out)  # on clean inputs
    assert np.isfinite(out).all()
    assert_close(out, ref_out, 2e-5, 2e-5, "out")
    for name, g, ref in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3], strict=True):
        g = np.asarray(g)
        assert np.isfinite(g).all(), name
        assert_close(g, ref, 3e-5, 1e-4, name)
        if hidden is not None and name != "dq":
            np.testing.assert_array_equal(g[hidden], 0.0, err_msg=name)  # never visited


# --------------------------------------------------------------------------------------------
# The schedule: which blocks each row visits, and how

_schedule = jax.jit(flash_blocks.schedule)


def _kind(width):
    return 1 + flash_blocks.WIDTHS.index(width)


def walk(sched, bm, row):
    """Replay flash_blocks.walk on the host: [(column, width, partial)] in visiting order."""
    order, count, kind = (np.asarray(x)[bm] for x in sched)
    widths = flash_blocks.widths(order.shape[-1])
    visits, idx = [], 0
    while idx < count[row]:
        col, k = int(order[row, idx]), int(kind[row, idx])
        width = 1 if k == 0 else widths[k - 1]
        visits.append((col, width, k == 0))
        idx += width
    return visits


def _geo(t, s, bq, bk):
    nq, nk = -(-t // bq), -(-s // bk)
    return flash_blocks.Geo(b=1, t=t, s=s, k=1, g=1, h=8, hv=8, bq=bq, bk=bk, nq=nq, nk=nk)


def test_causal_schedule_visits_the_lower_triangle():
    geo = _geo(8, 8, 2, 2)
    cls = np.asarray(flash_blocks.classify(geo, ja.CausalMask(), None))
    expected_cls = np.tril(np.full((4, 4), 2)) - np.eye(4, dtype=int)  # full below, partial on
    np.testing.assert_array_equal(cls[0], expected_cls)
    sched = _schedule(cls)
    np.testing.assert_array_equal(np.asarray(sched.count)[0], [1, 2, 3, 4])
    order = np.asarray(sched.order)[0]
    for i in range(4):
        np.testing.assert_array_equal(order[i, : i + 1], np.arange(i + 1))
    kind = np.asarray(sched.kind)[0]
    assert kind[0, 0] == 0  # the diagonal block alone: partial
    assert kind[1, 0] == _kind(1) and kind[1, 1] == 0
    assert kind[2, 0] == _kind(2)  # two full blocks merged into one matmul
    assert kind[3, 0] == _kind(2) and kind[3, 2] == _kind(1) and kind[3, 3] == 0
    assert walk(sched, 0, 3) == [(0, 2, False), (2, 1, False), (3, 1, True)]
    assert walk(sched, 0, 0) == [(0, 1, True)]
    # The backward walks the transposed table: key block j is seen by query blocks j..3.
    back = _schedule(np.swapaxes(cls, -1, -2))
    np.testing.assert_array_equal(np.asarray(back.count)[0], [4, 3, 2, 1])
    assert walk(back, 0, 0) == [(0, 1, True), (1, 2, False), (3, 1, False)]


def test_unmasked_row_is_walked_in_the_widest_runs():
    # 10 full key blocks: runs of 4, 4, 2; a last block holding padded keys is partial.
    sched = _schedule(flash_blocks.classify(_geo(4, 40, 4, 4), None, None))
    assert walk(sched, 0, 0) == [(0, 4, False), (4, 4, False), (8, 2, False)]
    sched = _schedule(flash_blocks.classify(_geo(4, 39, 4, 4), None, None))
    assert walk(sched, 0, 0) == [(0, 4, False), (4, 4, False), (8, 1, False), (9, 1, True)]


def test_per_sequence_classification_skips_per_sequence():
    geo = flash_blocks.Geo(b=2, t=4, s=12, k=1, g=1, h=8, hv=8, bq=4, bk=4, nq=1, nk=3)
    cls = np.asarray(flash_blocks.classify(geo, ja.PaddingMask(kv_lengths=np.array([3, 8])), None))
    np.testing.assert_array_equal(cls[:, 0], [[1, 0, 0], [2, 2, 0]])
    sched = _schedule(cls)
    assert walk(sched, 0, 0) == [(0, 1, True)]
    assert walk(sched, 1, 0) == [(0, 2, False)]


@settings(max_examples=30)
@given(
    st.sampled_from([1, 2]),
    st.sampled_from([1, 3, 5, 9]),
    st.lists(st.sampled_from([0, 0, 1, 2, 2, 2]), min_size=2 * 2 * 9, max_size=2 * 2 * 9),
)
def test_schedule_visits_every_non_empty_block_once_in_greedy_runs(bm, cols, flat):
    cls = np.array(flat[: bm * 2 * cols], np.int32).reshape(bm, 2, cols)
    sched = _schedule(cls)
    widths = flash_blocks.widths(cols)
    for b in range(bm):
        for row in range(2):
            visits = walk(sched, b, row)
            covered = [c for col, w, _ in visits for c in range(col, col + w)]
            # Every non-empty block exactly once, in ascending order, never an empty one.
            assert covered == list(np.flatnonzero(cls[b, row])), visits
            for col, w, partial in visits:
                blocks = cls[b, row, col : col + w]
                if partial:
                    assert w == 1 and blocks[0] == 1
                else:
                    assert (blocks == 2).all()
                    # Greedy: no wider run would have fit here.
                    for wider in (x for x in widths if x > w):
                        assert not (cls[b, row, col : col + wider] == 2).sum() == wider


# --------------------------------------------------------------------------------------------
# Dispatcher


def _uses_loops(**kwargs):
    q = jnp.zeros((1, kwargs.pop("t"), 1, 8))
    jaxpr = jax.make_jaxpr(lambda q: ja.dot_product_attention(q, q, q, **kwargs))(q)
    return "while" in str(jaxpr)


def test_default_implementation_uses_xla_for_small_and_flash_for_large():
    rng = np.random.default_rng(5)
    q, key, v = qkv(rng, (2,), 6, 6, 2, 2, 8)
    default = ja.dot_product_attention(q, key, v, is_causal=True)
    xla = ja.dot_product_attention(q, key, v, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(default, xla)
    assert not _uses_loops(t=6)
    assert _uses_loops(t=6, implementation="flash")  # the probe does see the flash path
    side = int(np.sqrt(FLASH_MIN_PAIRS))
    assert side * side == FLASH_MIN_PAIRS
    assert _uses_loops(t=side) and not _uses_loops(t=side - 1)


def test_return_weights_needs_the_xla_path():
    q = np.zeros((1, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="return_weights"):
        ja.dot_product_attention(q, q, q, return_weights=True, implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_cudnn_refuses_off_gpu():
    q = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(ValueError, match="implementation='cudnn' cannot serve this call"):
        ja.dot_product_attention(q, q, q, implementation="cudnn")


@pytest.mark.parametrize("blocks", [(0, 4), (4,), "x", (4, 4, 4), (2.0, 2), (True, 2), (4, -1)])
def test_bad_block_sizes_are_refused(blocks):
    q = np.zeros((1, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match=r"block_sizes must be a \(block_q, block_k\) tuple"):
        ja.dot_product_attention(q, q, q, implementation="flash", block_sizes=blocks)


# --------------------------------------------------------------------------------------------
# Compile size and memory


def _fwd_bwd(blocks, impl="flash"):
    def run(q, k, v, d_out):
        def attend(q, k, v):
            kw = {"block_sizes": blocks} if impl == "flash" else {}
            return ja.dot_product_attention(q, k, v, is_causal=True, implementation=impl, **kw)

        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(d_out)

    return jax.jit(run)


def test_program_size_does_not_grow_with_t():
    def lowered(t):
        x = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
        return _fwd_bwd((64, 64)).lower(x, x, x, x).as_text()

    small, large = lowered(1024), lowered(4096)  # 16 x 16 and 64 x 64 blocks
    # The block schedule tables ([nq, nk] int32) are folded into constants at trace time, so
    # their hex payloads grow as (T / block)^2; everything else (the program: one loop nest,
    # not an unrolled one) must not grow.
    strip = lambda text: re.sub(r'dense<"0x[0-9A-Fa-f]*">', "dense<>", text)
    assert abs(len(strip(large)) - len(strip(small))) <= 0.05 * len(strip(small))
    assert large.count("\n") == small.count("\n")
    for op in ("stablehlo.dot_general", "stablehlo.while", "stablehlo.exponential"):
        assert large.count(op) == small.count(op) > 0, op


def test_flash_memory_is_far_below_materialised_logits():
    t = 2048
    x = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    flash_mem = _fwd_bwd((128, 128)).lower(x, x, x, x).compile().memory_analysis()
    ref_mem = _fwd_bwd(None, "xla").lower(x, x, x, x).compile().memory_analysis()
    if flash_mem is None or ref_mem is None:
        pytest.skip("this backend reports no memory analysis")
    logits_bytes = t * t * 4
    # The measure does see materialised [T, S] float32 tensors when they exist...
    assert ref_mem.temp_size_in_bytes >= logits_bytes
    # ... and the blockwise path has none.
    assert flash_mem.temp_size_in_bytes < logits_bytes / 4
