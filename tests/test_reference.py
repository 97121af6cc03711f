"""jaxattn.reference, the specification every path is tested against, checked on its own: an
independent NumPy float64 formula, closed forms, the edges it decides (fully masked rows,
-inf bias, NaN, grouped heads, low precision, dropout) and its gradients.

Most tests call it under ``jax.jit`` (one compile per case, where an eager call compiles
every op for every new shape); the NumPy comparison and the transformation test also call it
eagerly, as written."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import qkv
from jax.test_util import check_grads

import jaxattn as ja
from jaxattn.reference import dot_product_attention as reference_eager

reference = jax.jit(
    reference_eager, static_argnames=("is_causal", "dropout_rate", "return_weights")
)

KEY = jax.random.key(5)


def numpy_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(Q K^T * scale + bias, masked) V in float64 NumPy, straight from the formula.

    q [..., T, N, H], k [..., S, K, H], v [..., S, K, Hv]; query head n reads key head
    n // (N // K). Returns (out [..., T, N, Hv], weights [..., N, T, S]); rows with no
    unmasked key give zeros.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, kh = q.shape[-2], k.shape[-2]
    k = np.repeat(k, n // kh, axis=-2)
    v = np.repeat(v, n // kh, axis=-2)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    logits = np.einsum("...tnh,...snh->...nts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    row_max = logits.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(logits - row_max)
    denom = e.sum(axis=-1, keepdims=True)
    weights = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    out = np.einsum("...nts,...snh->...tnh", weights, v)
    return out, weights


def _causal(t, s):
    """Bottom-right causal [T, S], written out here."""
    return np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)


def _x64(*xs):
    return tuple(None if x is None else jnp.asarray(np.asarray(x, np.float64)) for x in xs)


# --------------------------------------------------------------------------------------------
# Against the NumPy formula

# (batch, T, S, N, K, H, Hv): no/one/two batch dims, MHA/GQA/MQA, T != S, Hv != H.
SHAPES = [
    ((), 4, 4, 2, 2, 8, 8),
    ((2,), 3, 6, 4, 2, 4, 6),
    ((2, 2), 5, 3, 3, 1, 4, 4),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])) + f"b{s[0]}")
def test_matches_numpy_formula_in_float64(shape):
    batch, t, s, n, k, h, hv = shape
    rng = np.random.default_rng(0)
    q, key, v = qkv(rng, batch, t, s, n, k, h, hv, np.float64)
    mask = rng.random((*batch, 1, t, s)) < 0.7
    mask[(0,) * len(batch) + (0, 0)] = False  # a fully masked row
    bias = rng.standard_normal((n, t, s))
    with jax.enable_x64(True):
        args = _x64(q, key, v)
        for kw in ({}, {"mask": mask}, {"bias": bias}, {"mask": mask, "bias": bias}):
            for scale in (None, 0.7):
                out, w = reference_eager(*args, **kw, scale=scale, return_weights=True)
                ref_out, ref_w = numpy_attention(q, key, v, **kw, scale=scale)
                assert out.dtype == w.dtype == jnp.float64
                assert out.shape == (*batch, t, n, hv) and w.shape == (*batch, n, t, s)
                np.testing.assert_allclose(out, ref_out, atol=1e-13, rtol=1e-12)
                np.testing.assert_allclose(w, ref_w, atol=1e-14, rtol=1e-12)


def test_float32_inputs_compute_in_float32_close_to_the_formula(rng):
    q, key, v = qkv(rng, (2,), 5, 7, 4, 2, 8)
    mask = rng.random((2, 4, 5, 7)) < 0.6
    out, w = reference(q, key, v, mask=jnp.asarray(mask), return_weights=True)
    assert out.dtype == w.dtype == jnp.float32
    ref_out, ref_w = numpy_attention(q, key, v, mask)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=2e-5)
    np.testing.assert_allclose(w, ref_w, atol=2e-7, rtol=2e-5)


def test_masks_and_is_causal_are_the_bool_arrays_they_stand_for(rng):
    q, key, v = qkv(rng, (2,), 4, 6, 2, 1, 4)
    lengths = np.array([2, 5], np.int32)
    spec = ja.CausalMask() & ja.PaddingMask(kv_lengths=lengths)
    dense = _causal(4, 6) & (np.arange(6) < lengths[:, None, None, None])  # [B, 1, T, S]
    for kw, mask in (
        ({"mask": spec}, dense),
        ({"mask": ja.PaddingMask(kv_lengths=lengths), "is_causal": True}, dense),
        ({"is_causal": True}, _causal(4, 6)),
        ({"mask": jnp.asarray(_causal(4, 6))}, _causal(4, 6)),
    ):
        out, w = reference(q, key, v, **kw, return_weights=True)
        ref_out, ref_w = numpy_attention(q, key, v, mask)
        np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=2e-5)
        np.testing.assert_allclose(w, ref_w, atol=2e-7, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# Closed forms


def test_equal_logits_give_uniform_weights():
    rng = np.random.default_rng(1)
    _, key, v = qkv(rng, (2,), 3, 5, 2, 2, 4)
    q = np.zeros((2, 3, 2, 4), np.float32)  # every logit 0
    out, w = reference(q, key, v, return_weights=True)
    np.testing.assert_allclose(w, np.full((2, 2, 3, 5), 1 / 5), rtol=1e-6)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=1)[:, None], out.shape), atol=1e-6)
    # Under a mask: uniform over the visible keys only.
    mask = np.array([True, False, True, True, False])
    out, w = reference(q, key, v, mask=jnp.asarray(mask), return_weights=True)
    np.testing.assert_allclose(w, np.broadcast_to(mask / 3, w.shape), rtol=1e-6)
    np.testing.assert_allclose(
        out, np.broadcast_to(v[:, mask].mean(axis=1)[:, None], out.shape), atol=1e-6
    )


def test_one_visible_key_gives_exactly_its_value_row():
    rng = np.random.default_rng(2)
    q, key, v = qkv(rng, (), 4, 6, 2, 2, 3, 5)
    pick = np.array([5, 0, 3, 3])  # query t sees only key pick[t]
    mask = np.arange(6)[None, :] == pick[:, None]  # [T, S]
    bias = rng.standard_normal((2, 4, 6)).astype(np.float32) * 10
    out, w = reference(q, key, v, jnp.asarray(bias), jnp.asarray(mask), return_weights=True)
    np.testing.assert_array_equal(w, np.broadcast_to(mask, w.shape).astype(np.float32))
    np.testing.assert_array_equal(out, v[pick])  # [T, K = N, Hv]


def test_two_by_two_worked_by_hand():
    # One head, H = 1, scale 1, q = [0, 1], k = [1, 2]: logits q k^T = [[0, 0], [1, 2]].
    q = jnp.array([[[0.0]], [[1.0]]])  # [T=2, N=1, H=1]
    k = jnp.array([[[1.0]], [[2.0]]])  # [S=2, K=1, H=1]
    v = jnp.array([[[10.0]], [[20.0]]])
    e = np.e
    out, w = reference(q, k, v, scale=1.0, return_weights=True)
    np.testing.assert_allclose(w[0], [[0.5, 0.5], [1 / (1 + e), e / (1 + e)]], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [15.0, 10 / (1 + e) + 20 * e / (1 + e)], rtol=1e-6)
    # Default scale 1 / sqrt(H) = 1 here; causal: query 0 sees only key 0.
    out_c = reference(q, k, v, is_causal=True)
    np.testing.assert_allclose(out_c[:, 0, 0], [10.0, 10 / (1 + e) + 20 * e / (1 + e)], rtol=1e-6)


@pytest.mark.parametrize(("t", "s"), [(2, 5), (5, 2), (3, 3)])
def test_causal_is_bottom_right_aligned_when_t_differs_from_s(t, s):
    rng = np.random.default_rng(3)
    q, key, v = qkv(rng, (1,), t, s, 2, 1, 4)
    _, w = reference(q, key, v, is_causal=True, return_weights=True)
    visible = np.asarray(w) > 0
    # Query t sits at position t + S - T: it sees keys 0..t + S - T, and the last query sees
    # every key; with T > S the first T - S queries see none.
    np.testing.assert_array_equal(visible, np.broadcast_to(_causal(t, s), visible.shape))
    assert visible[..., -1, :].all()
    np.testing.assert_allclose(w.sum(-1)[..., max(0, t - s) :], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(w[..., : max(0, t - s), :], 0.0)


def test_default_scale_is_inverse_sqrt_head_dim(rng):
    q, key, v = qkv(rng, (1,), 3, 4, 2, 2, 16)
    np.testing.assert_array_equal(reference(q, key, v), reference(q, key, v, scale=0.25))
    assert not np.allclose(reference(q, key, v), reference(q, key, v, scale=1.0), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Edges


def _loss(mask=None, bias_fixed=None):
    ct = jnp.asarray(np.random.default_rng(9).standard_normal((2, 4, 2, 6)))

    def loss(q, k, v, bias):
        b = bias if bias_fixed is None else bias_fixed
        return jnp.sum(reference(q, k, v, b, mask) * ct.astype(q.dtype))

    return loss


def test_fully_masked_rows_give_zeros_and_zero_finite_gradients():
    rng = np.random.default_rng(4)
    q, key, v = qkv(rng, (2,), 4, 3, 2, 1, 4, 6)
    mask = np.ones((2, 1, 4, 3), bool)
    mask[0, 0, 1] = False  # sequence 0, query 1 sees nothing
    mask[1, 0, 3] = False
    bias = jnp.asarray(rng.standard_normal((2, 2, 4, 3)), jnp.float32)
    out, w = reference(q, key, v, bias, jnp.asarray(mask), return_weights=True)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(out[1, 3], 0.0)
    np.testing.assert_array_equal(w[0, :, 1], 0.0)
    np.testing.assert_allclose(w[0, :, 0].sum(-1), 1.0, rtol=1e-6)
    grads = jax.grad(_loss(jnp.asarray(mask)), argnums=(0, 1, 2, 3))(q, key, v, bias)
    for name, g in zip(("dq", "dk", "dv", "d_bias"), grads, strict=True):
        assert np.isfinite(g).all(), name
    dq, _, _, d_bias = grads
    np.testing.assert_array_equal(dq[0, 1], 0.0)
    np.testing.assert_array_equal(dq[1, 3], 0.0)
    np.testing.assert_array_equal(d_bias[0, :, 1], 0.0)
    np.testing.assert_array_equal(d_bias[1, :, 3], 0.0)
    assert np.abs(dq[0, 0]).sum() > 0


def test_minus_inf_bias_masks_like_false():
    rng = np.random.default_rng(5)
    q, key, v = qkv(rng, (2,), 4, 3, 2, 1, 4, 6)
    bias = np.zeros((1, 1, 4, 3), np.float32)
    bias[..., 2, :] = -np.inf  # a whole row
    bias[..., 0, 1] = -np.inf
    mask = jnp.asarray(np.isfinite(bias))
    out, w = reference(q, key, v, jnp.asarray(bias), return_weights=True)
    out_m, w_m = reference(q, key, v, mask=mask, return_weights=True)
    np.testing.assert_array_equal(out, out_m)
    np.testing.assert_array_equal(w, w_m)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    # Gradients are the mask's too, and finite (no inf - inf, no 0 * inf).
    g_bias = jax.grad(_loss(bias_fixed=jnp.asarray(bias)), argnums=(0, 1, 2))(q, key, v, None)
    g_mask = jax.grad(_loss(mask), argnums=(0, 1, 2))(q, key, v, None)
    for a, b in zip(g_bias, g_mask, strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
    d_bias = jax.grad(_loss(), argnums=3)(q, key, v, jnp.asarray(bias))
    assert np.isfinite(d_bias).all()
    np.testing.assert_array_equal(np.asarray(d_bias)[~np.isfinite(bias)], 0.0)


def test_nan_in_a_query_row_propagates_to_that_row_only():
    rng = np.random.default_rng(6)
    q, key, v = qkv(rng, (2,), 4, 5, 4, 2, 4)
    clean, w_clean = reference(q, key, v, is_causal=True, return_weights=True)
    q[1, 2, 3] = np.nan  # sequence 1, query 2, head 3
    out, w = reference(q, key, v, is_causal=True, return_weights=True)
    out, w, clean, w_clean = (np.asarray(x) for x in (out, w, clean, w_clean))
    assert np.isnan(out[1, 2, 3]).all() and np.isnan(w[1, 3, 2]).all()
    hit = np.zeros(out.shape[:3], bool)
    hit[1, 2, 3] = True
    np.testing.assert_array_equal(out[~hit], clean[~hit])
    w_hit = np.zeros(w.shape[:3], bool)
    w_hit[1, 3, 2] = True
    np.testing.assert_array_equal(w[~w_hit], w_clean[~w_hit])


@pytest.mark.parametrize(("n", "k"), [(4, 2), (6, 3), (4, 1)], ids=["gqa_4_2", "gqa_6_3", "mqa"])
def test_grouped_heads_read_key_head_n_over_g(n, k):
    rng = np.random.default_rng(7)
    q, key, v = qkv(rng, (2,), 3, 5, n, k, 4, 6)
    g = n // k
    out, w = reference(q, key, v, is_causal=True, return_weights=True)
    # The same as multi-head attention with each key/value head copied to its G query heads...
    k_rep, v_rep = np.repeat(key, g, axis=2), np.repeat(v, g, axis=2)
    out_mha, w_mha = reference(q, k_rep, v_rep, is_causal=True, return_weights=True)
    np.testing.assert_allclose(out, out_mha, atol=1e-6)
    np.testing.assert_allclose(w, w_mha, atol=1e-7)
    # ... and query head i, computed alone, reads key/value head i // G (consecutive groups).
    for i in range(n):
        one = reference(
            q[:, :, i : i + 1],
            key[:, :, i // g : i // g + 1],
            v[:, :, i // g : i // g + 1],
            is_causal=True,
        )
        np.testing.assert_allclose(out[:, :, i : i + 1], one, atol=1e-6)
    np.testing.assert_allclose(out, numpy_attention(q, key, v, _causal(3, 5))[0], atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_inputs_give_the_input_dtype_out_and_float32_weights(dtype):
    rng = np.random.default_rng(8)
    q, key, v = (jnp.asarray(x, dtype) for x in qkv(rng, (2,), 6, 6, 2, 1, 8))
    bias = jnp.asarray(rng.standard_normal((2, 6, 6)), jnp.float32)
    out, w = reference(q, key, v, bias, is_causal=True, return_weights=True)
    assert out.dtype == dtype and w.dtype == jnp.float32
    rounded = [np.asarray(x.astype(jnp.float32)) for x in (q, key, v)]
    ref_out, ref_w = numpy_attention(*rounded, _causal(6, 6), np.asarray(bias))
    # Weights in float32 from the rounded inputs: float32 accuracy, not the input's.
    np.testing.assert_allclose(w, ref_w, atol=2e-6, rtol=1e-5)
    atol = 2e-2 if dtype == jnp.bfloat16 else 3e-3  # the output's one rounding to dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=atol, rtol=atol)
    g = jax.grad(lambda q: jnp.sum(reference(q, key, v, is_causal=True).astype(jnp.float32)))(q)
    assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()


def test_dropout_applies_attention_dropout_mask():
    rng = np.random.default_rng(9)
    q, key, v = qkv(rng, (2,), 5, 6, 4, 2, 4)
    rate = 0.4
    _, w_plain = reference(q, key, v, is_causal=True, return_weights=True)
    out, w = reference(
        q, key, v, is_causal=True, dropout_rate=rate, dropout_key=KEY, return_weights=True
    )
    keep = np.asarray(ja.attention_dropout_mask(KEY, rate, (2,), 4, 5, 6))
    assert 0.3 < keep.mean() < 0.9 and not keep.all()
    np.testing.assert_allclose(w, np.where(keep, np.asarray(w_plain) / (1 - rate), 0.0), rtol=1e-6)
    # out is exactly the dropped weights times V (head n reads value head n // 2).
    expected = np.einsum("bnts,bsnh->btnh", np.asarray(w, np.float64), np.repeat(v, 2, axis=2))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Rate 0 is no dropout; another key drops other weights; the same key, the same ones.
    np.testing.assert_array_equal(
        reference(q, key, v, dropout_rate=0.0, dropout_key=KEY), reference(q, key, v)
    )
    same = reference(q, key, v, is_causal=True, dropout_rate=rate, dropout_key=KEY)
    np.testing.assert_array_equal(same, out)
    other = reference(q, key, v, is_causal=True, dropout_rate=rate, dropout_key=jax.random.key(6))
    assert not np.allclose(other, out, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Transformations


def test_gradients_match_finite_differences_in_float64():
    rng = np.random.default_rng(10)
    q, key, v = qkv(rng, (1,), 3, 4, 2, 1, 4, 3, np.float64)
    mask = rng.random((1, 1, 3, 4)) < 0.7
    mask[0, 0, 0] = False  # a fully masked row
    bias = rng.standard_normal((2, 3, 4))
    with jax.enable_x64(True):
        q, key, v, bias = _x64(q, key, v, bias)
        mask = jnp.asarray(mask)

        def f(q, key, v, bias, scale):
            return reference(q, key, v, bias, mask, scale=scale)

        check_grads(f, (q, key, v, bias, jnp.float64(0.6)), order=1, modes=["rev"])


def test_jit_vmap_and_traced_scale_compose(rng):
    q, key, v = qkv(rng, (3,), 4, 4, 2, 2, 8)
    mask = ja.PaddingMask(kv_lengths=np.array([1, 3, 4], np.int32))
    eager = reference_eager(q, key, v, mask=mask, scale=0.5)
    jitted = jax.jit(lambda q, k, v, m, s: reference_eager(q, k, v, mask=m, scale=s))
    jitted = jitted(q, key, v, mask, 0.5)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    mapped = jax.vmap(
        lambda q, k, v, n: reference_eager(q, k, v, mask=ja.PaddingMask(kv_lengths=n), scale=0.5)
    )(q, key, v, jnp.array([1, 3, 4]))
    np.testing.assert_allclose(mapped, eager, atol=1e-6)
