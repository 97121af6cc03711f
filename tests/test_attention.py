"""dot_product_attention against the float64 reference, jax.nn, closed forms and its errors.

Every numerical test runs over both implementations: the flash path with tiny blocks, so that
every case spans several query and key blocks, odd lengths leave partial last blocks, and
empty, partial and full blocks all occur.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import qkv, reference_attention

import jaxattn as ja

# Keyword arguments that select each implementation.
IMPLS = {
    "xla": {"implementation": "xla"},
    "flash": {"implementation": "flash", "block_sizes": (2, 3)},
}
impls = pytest.mark.parametrize("impl", list(IMPLS))


def _lengths(rng, batch, size):
    """Per-sequence lengths ``[*batch]`` in 0..size (a 0-d array without batch dims)."""
    return jnp.asarray(np.asarray(rng.integers(0, size + 1, size=batch), np.int32))


def _ids(rng, batch, length):
    return jnp.asarray(np.sort(rng.integers(0, 3, size=(*batch, length)), axis=-1), jnp.int32)


def _causal(t, s):
    """Bottom-right causal [T, S], written out here."""
    return np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)


# Each builder: (rng, batch, T, S) -> a mask of jaxattn.masks, or a bool array broadcastable
# to [*batch, N, T, S].
MASKS = {
    "causal": lambda rng, b, t, s: ja.CausalMask(),
    "window": lambda rng, b, t, s: ja.SlidingWindowMask((2, 1)),
    "prefix": lambda rng, b, t, s: ja.PrefixLMMask(2),
    "kv_padding": lambda rng, b, t, s: ja.PaddingMask(kv_lengths=_lengths(rng, b, s)),
    "q_and_kv_padding": lambda rng, b, t, s: ja.PaddingMask(
        q_lengths=_lengths(rng, b, t), kv_lengths=_lengths(rng, b, s)
    ),
    "segments": lambda rng, b, t, s: ja.SegmentMask(_ids(rng, b, t), _ids(rng, b, s)),
    "causal_and_padding": lambda rng, b, t, s: (
        MASKS["causal"](rng, b, t, s) & MASKS["kv_padding"](rng, b, t, s)
    ),
    "window_or_prefix": lambda rng, b, t, s: ja.SlidingWindowMask((1, 0)) | ja.PrefixLMMask(1),
    "random": lambda rng, b, t, s: jnp.asarray(rng.random((*b, 1, t, s)) < 0.5),
}

# (batch, T, S, N, K, H, Hv): leading dims none/1/2, MHA/GQA/MQA, T != S, Hv != H.
SHAPES = [
    ((), 5, 5, 2, 2, 8, 8),
    ((1,), 3, 7, 4, 2, 8, 8),
    ((2,), 6, 4, 4, 1, 4, 6),
    ((2, 3), 4, 4, 6, 3, 8, 5),
    ((3,), 1, 9, 8, 2, 16, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])) + f"b{s[0]}")
@pytest.mark.parametrize("mask_kind", [None, *MASKS])
@impls
def test_matches_float64_reference(rng, shape, mask_kind, impl):
    batch, t, s, n, k, h, hv = shape
    q, key, v = qkv(rng, batch, t, s, n, k, h, hv)
    mask = None if mask_kind is None else MASKS[mask_kind](rng, batch, t, s)
    bias = rng.standard_normal((n, t, s)).astype(np.float32) if mask_kind == "window" else None
    ref_out, ref_w = reference_attention(q, key, v, mask=mask, bias=bias)
    if impl == "xla":
        # The flash path gets every mask as it is (evaluated per block). The xla path
        # materialises a mask of jaxattn.masks inside its jit: it gets the mask itself on the
        # shapes with no or two batch dims, and the bool array on the one-batch-dim shapes,
        # where one compile then serves every mask kind of that array shape (time budget).
        if isinstance(mask, ja.MaskSpec) and len(batch) == 1:
            mask = mask.materialize(t, s)
        out, weights = ja.dot_product_attention(
            q, key, v, mask=mask, bias=bias, return_weights=True, **IMPLS[impl]
        )
        assert weights.shape == (*batch, n, t, s)
        np.testing.assert_allclose(weights, np.broadcast_to(ref_w, weights.shape), atol=2e-6)
    else:
        out = ja.dot_product_attention(q, key, v, mask=mask, bias=bias, **IMPLS[impl])
    assert out.shape == (*batch, t, n, hv) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("t,s", [(4, 4), (3, 6), (6, 3)])
@impls
def test_is_causal_equals_causal_mask(rng, t, s, impl):
    q, key, v = qkv(rng, (2,), t, s, 4, 2, 8)
    a = ja.dot_product_attention(q, key, v, is_causal=True, **IMPLS[impl])
    b = ja.dot_product_attention(q, key, v, mask=jnp.asarray(_causal(t, s)), **IMPLS[impl])
    c = ja.dot_product_attention(q, key, v, mask=ja.CausalMask(), **IMPLS[impl])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a, reference_attention(q, key, v, _causal(t, s))[0], atol=2e-5)


@pytest.mark.parametrize(
    ("n", "k", "causal", "with_mask", "with_bias"),
    [
        (4, 4, False, False, False),
        (4, 4, True, False, False),
        (8, 2, True, False, False),
        (4, 1, False, True, False),
        (4, 4, False, False, True),
    ],
)
@impls
def test_matches_jax_nn(rng, n, k, causal, with_mask, with_bias, impl):
    q, key, v = qkv(rng, (2,), 6, 6, n, k, 8)
    # Every row keeps its diagonal key: jax.nn gives a fully masked row the mean of V.
    mask = jnp.asarray((rng.random((2, 1, 6, 6)) < 0.7) | np.eye(6, dtype=bool))
    mask = mask if with_mask else None
    bias = jnp.asarray(rng.standard_normal((1, n, 6, 6)), jnp.float32) if with_bias else None
    ours = ja.dot_product_attention(
        q, key, v, mask=mask, bias=bias, is_causal=causal, **IMPLS[impl]
    )
    theirs = jax.nn.dot_product_attention(q, key, v, mask=mask, bias=bias, is_causal=causal)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_two_by_two_worked_by_hand():
    # One head, H = 1, scale 1, q = [0, 1], k = [1, 2]: logits q k^T = [[0, 0], [1, 2]].
    # Query 0 weighs both keys equally; query 1 weighs them 1/(1+e) and e/(1+e).
    q = jnp.array([[[0.0]], [[1.0]]])  # [T=2, N=1, H=1]
    k = jnp.array([[[1.0]], [[2.0]]])  # [S=2, K=1, H=1]
    v = jnp.array([[[10.0]], [[20.0]]])
    out, w = ja.dot_product_attention(q, k, v, scale=1.0, return_weights=True)
    e = np.e
    np.testing.assert_allclose(w[0], [[0.5, 0.5], [1 / (1 + e), e / (1 + e)]], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [15.0, 10 / (1 + e) + 20 * e / (1 + e)], rtol=1e-6)
    # Causal: query 0 sees only key 0; the flash path with 1 x 1 blocks agrees.
    for kwargs in ({}, {"implementation": "flash", "block_sizes": (1, 1)}):
        out_c = ja.dot_product_attention(q, k, v, scale=1.0, is_causal=True, **kwargs)
        np.testing.assert_allclose(
            out_c[:, 0, 0], [10.0, 10 / (1 + e) + 20 * e / (1 + e)], rtol=1e-6
        )
    flash = ja.dot_product_attention(q, k, v, scale=1.0, implementation="flash")
    np.testing.assert_allclose(flash, out, rtol=1e-6)


def test_default_scale_is_inverse_sqrt_head_dim(rng):
    q, key, v = qkv(rng, (1,), 3, 3, 2, 2, 16)
    default = ja.dot_product_attention(q, key, v)
    explicit = ja.dot_product_attention(q, key, v, scale=0.25)
    other = ja.dot_product_attention(q, key, v, scale=1.0)
    np.testing.assert_allclose(default, explicit, atol=1e-6)
    assert not np.allclose(default, other, atol=1e-3)


def test_every_option_changes_the_output(rng):
    q, key, v = qkv(rng, (2,), 5, 5, 2, 2, 8)
    base = ja.dot_product_attention(q, key, v)
    mask = ja.SlidingWindowMask(1)
    bias = jnp.asarray(rng.standard_normal((2, 5, 5)), jnp.float32)
    for variant in (
        ja.dot_product_attention(q, key, v, is_causal=True),
        ja.dot_product_attention(q, key, v, mask=mask),
        ja.dot_product_attention(q, key, v, bias=bias),
        ja.dot_product_attention(q, key, v, scale=2.0),
    ):
        assert not np.allclose(base, variant, atol=1e-4)


@impls
class TestFullyMaskedRows:
    def setup_method(self):
        rng = np.random.default_rng(1)
        self.q, self.k, self.v = qkv(rng, (2,), 4, 3, 4, 2, 8)
        mask = np.ones((2, 1, 4, 3), bool)
        mask[0, 0, 1] = False  # sequence 0, query 1 sees nothing
        mask[1, 0, 3] = False
        self.mask = jnp.asarray(mask)

    def test_output_and_weights_are_zero(self, impl):
        out = ja.dot_product_attention(self.q, self.k, self.v, mask=self.mask, **IMPLS[impl])
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0, 1], 0.0)
        np.testing.assert_array_equal(out[1, 3], 0.0)
        assert np.abs(out[0, 0]).sum() > 0
        if impl == "xla":
            _, w = ja.dot_product_attention(
                self.q, self.k, self.v, mask=self.mask, return_weights=True
            )
            np.testing.assert_array_equal(w[0, :, 1], 0.0)
            np.testing.assert_allclose(w[0, :, 0].sum(-1), 1.0, rtol=1e-6)

    def test_gradients_are_zero_and_finite(self, impl):
        def loss(q, k, v):
            return jnp.sum(ja.dot_product_attention(q, k, v, mask=self.mask, **IMPLS[impl]) ** 2)

        dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(self.q, self.k, self.v)
        for g in (dq, dk, dv):
            assert np.isfinite(g).all()
        np.testing.assert_array_equal(dq[0, 1], 0.0)
        np.testing.assert_array_equal(dq[1, 3], 0.0)
        assert np.abs(dq[0, 0]).sum() > 0

    def test_causal_with_more_queries_than_keys(self, impl):
        # T=4 > S=3: query 0 sits before every key.
        out = ja.dot_product_attention(self.q, self.k, self.v, is_causal=True, **IMPLS[impl])
        np.testing.assert_array_equal(out[:, 0], 0.0)
        assert np.abs(out[:, 1]).sum() > 0

    def test_minus_inf_bias_masks_like_false(self, impl):
        bias = np.zeros((1, 1, 4, 3), np.float32)
        bias[..., 2, :] = -np.inf
        bias[..., 0, 1] = -np.inf
        kw = IMPLS[impl]
        out = ja.dot_product_attention(self.q, self.k, self.v, bias=jnp.asarray(bias), **kw)
        mask = jnp.asarray(np.isfinite(bias))
        np.testing.assert_array_equal(
            out, ja.dot_product_attention(self.q, self.k, self.v, mask=mask, **kw)
        )
        np.testing.assert_array_equal(out[:, 2], 0.0)


def _ref64(q, k, v, mask, bias, scale):
    """The reference formula (autodiff), for float64 gradients: call under jax.enable_x64."""
    return ja.reference.dot_product_attention(q, k, v, bias, mask, scale=scale)


@pytest.mark.parametrize(("n", "k", "t", "s"), [(4, 4, 5, 5), (4, 2, 3, 6), (6, 2, 6, 4)])
@impls
def test_gradients_match_float64_reference(n, k, t, s, impl):
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        q, key, v = (jnp.asarray(x) for x in qkv(rng, (2,), t, s, n, k, 8, 6, np.float64))
        mask = _causal(t, s) & (rng.random((2, 1, t, s)) < 0.8)
        mask[0, 0, 0] = False  # a fully masked row
        mask = jnp.asarray(mask)
        bias = jnp.asarray(rng.standard_normal((1, n, t, s)))
        ct = jnp.asarray(rng.standard_normal((2, t, n, 6)))

        def ours(q, key, v, bias, scale):
            return jnp.sum(
                ja.dot_product_attention(
                    q, key, v, mask=mask, bias=bias, scale=scale, **IMPLS[impl]
                )
                * ct
            )

        def ref(q, key, v, bias, scale):
            return jnp.sum(_ref64(q, key, v, mask, bias, scale) * ct)

        args = (q, key, v, bias, jnp.float64(0.3))
        g_ours = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3, 4)))(*args)
        g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3, 4)))(*args)
        for name, a, b in zip(
            ("query", "key", "value", "bias", "scale"), g_ours, g_ref, strict=True
        ):
            assert a.dtype == jnp.float64, name
            np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(g_ours[0][0, 0], 0.0)


def test_gradients_through_returned_weights_match_float64_reference():
    # A loss of both outputs: the weights' cotangent adds its own rowsum(dW * W) term to the
    # softmax backward (a model that reuses the weights, e.g. dropout on them, needs it).
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        q, key, v = (jnp.asarray(x) for x in qkv(rng, (2,), 5, 6, 4, 2, 8, 6, np.float64))
        mask = rng.random((2, 1, 5, 6)) < 0.7
        mask[1, 0, 2] = False  # a fully masked row
        mask = jnp.asarray(mask)
        ct_out = jnp.asarray(rng.standard_normal((2, 5, 4, 6)))
        ct_w = jnp.asarray(rng.standard_normal((2, 4, 5, 6)))

        def ours(q, key, v):
            out, w = ja.dot_product_attention(
                q, key, v, mask=mask, return_weights=True, implementation="xla"
            )
            return jnp.sum(out * ct_out) + jnp.sum(w**2 * ct_w)

        def ref(q, key, v):
            out, w = ja.reference.dot_product_attention(
                q, key, v, mask=mask, scale=1 / np.sqrt(8), return_weights=True
            )
            return jnp.sum(out * ct_out) + jnp.sum(w**2 * ct_w)

        g_ours = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, key, v)
        g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, key, v)
        for name, a, b in zip(("query", "key", "value"), g_ours, g_ref, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(g_ours[0][1, 2], 0.0)


@impls
def test_float32_gradients_close_to_float64(impl):
    rng = np.random.default_rng(3)
    q, key, v = qkv(rng, (2,), 6, 6, 4, 2, 8)
    mask = ja.CausalMask()

    def loss(fn, q, key, v):
        return jnp.sum(jnp.sin(fn(q, key, v)))

    def attend(q, k, v):
        return ja.dot_product_attention(q, k, v, mask=mask, **IMPLS[impl])

    g32 = jax.jit(jax.grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2)))(q, key, v)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in (q, key, v)]
        g64 = jax.jit(
            jax.grad(
                lambda *a: loss(lambda q, k, v: _ref64(q, k, v, mask, None, None), *a),
                argnums=(0, 1, 2),
            )
        )(*args64)
    for a, b in zip(g32, g64, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
@pytest.mark.parametrize(
    "impl_kwargs",
    [IMPLS["xla"], {"implementation": "flash", "block_sizes": (4, 8)}],
    ids=["xla", "flash"],
)
def test_low_precision_inputs_within_tolerance(rng, dtype, atol, impl_kwargs):
    q, key, v = qkv(rng, (2,), 16, 16, 4, 2, 32)
    q16, k16, v16 = (jnp.asarray(x, dtype) for x in (q, key, v))
    out = ja.dot_product_attention(q16, k16, v16, is_causal=True, **impl_kwargs)
    assert out.dtype == dtype
    # Compared with the float64 result on the same (rounded) inputs.
    ref = reference_attention(
        *(np.asarray(x.astype(jnp.float32)) for x in (q16, k16, v16)), _causal(16, 16)
    )[0]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=atol, rtol=atol)

    def loss(q, k, v):
        out = ja.dot_product_attention(q, k, v, is_causal=True, **impl_kwargs)
        return jnp.sum(out.astype(jnp.float32) * ct)

    ct = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    grads = grad(q16, k16, v16)
    grads32 = grad(*(x.astype(jnp.float32) for x in (q16, k16, v16)))
    for g, g32 in zip(grads, grads32, strict=True):
        assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()
        scale = float(np.abs(np.asarray(g32)).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), g32, atol=4 * atol * scale, rtol=0)


@impls
def test_jit_vmap_and_grad_compose(rng, impl):
    kw = IMPLS[impl]
    q, key, v = qkv(rng, (3,), 4, 4, 2, 2, 8)
    batched = ja.dot_product_attention(q, key, v, is_causal=True, **kw)
    mapped = jax.vmap(lambda a, b, c: ja.dot_product_attention(a, b, c, is_causal=True, **kw))(
        q, key, v
    )
    np.testing.assert_allclose(batched, mapped, atol=1e-6)
    jitted = jax.jit(lambda a, b, c: ja.dot_product_attention(a, b, c, is_causal=True, **kw))(
        q, key, v
    )
    np.testing.assert_allclose(batched, jitted, atol=1e-6)
    g = jax.jit(jax.grad(lambda a: ja.dot_product_attention(a, key, v, **kw).sum()))(q)
    assert g.shape == q.shape and np.abs(g).sum() > 0
    # A traced scale works too and its gradient matches a central difference.
    ds = jax.grad(lambda s: ja.dot_product_attention(q, key, v, scale=s, **kw).sum())(0.5)
    f = lambda s: float(ja.dot_product_attention(q, key, v, scale=s, **kw).sum())
    np.testing.assert_allclose(ds, (f(0.5 + 1e-2) - f(0.5 - 1e-2)) / 2e-2, rtol=2e-2)


def _err(**overrides):
    rng = np.random.default_rng(0)
    q, key, v = qkv(rng, (2,), 4, 5, 4, 2, 8)
    args = {"query": q, "key": key, "value": v}
    args.update(overrides)
    q, key, v = args.pop("query"), args.pop("key"), args.pop("value")
    with pytest.raises(ValueError) as info:
        ja.dot_product_attention(q, key, v, **args)
    return str(info.value)


Z = np.zeros


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"query": Z((4, 8), np.float32)},
            "query must have shape [..., L, heads, head_dim] (rank >= 3), got rank 2 shape [4, 8]",
        ),
        (
            {"key": Z((2, 5, 3, 8), np.float32), "value": Z((2, 5, 3, 8), np.float32)},
            "key has 3 heads but query has 4; query heads must be a multiple of key heads",
        ),
        ({"key": Z((2, 5, 2, 7), np.float32)}, "key head dim is 7 but query head dim is 8"),
        ({"value": Z((2, 6, 2, 8), np.float32)}, "value has 6 positions but key has 5"),
        ({"value": Z((2, 5, 1, 8), np.float32)}, "value has 1 heads but key has 2"),
        (
            {"key": Z((3, 5, 2, 8), np.float32), "value": Z((3, 5, 2, 8), np.float32)},
            "key has batch dims [3] but query has [2]",
        ),
        (
            {"key": Z((2, 5, 2, 8), np.float16)},
            "query, key and value must share one dtype, "
            "got query float32, key float16, value float32",
        ),
        ({"query": Z((2, 4, 4, 8), np.int32)}, "query must have a floating dtype, got int32"),
        (
            {"mask": Z((4, 5), np.float32)},
            "mask must be a bool array (True = may attend), got dtype float32; "
            "an additive float mask (0 / -inf) belongs in `bias`",
        ),
        (
            {"mask": Z((4, 5), np.int32)},
            "mask must be a bool array (True = may attend), got dtype int32",
        ),
        (
            {"mask": Z((5, 4), bool)},
            "mask has shape [5, 4], which does not broadcast to [..., N, T, S] = [2, 4, 4, 5]",
        ),
        (
            {"bias": Z((3, 4, 5), np.float32)},
            "bias has shape [3, 4, 5], which does not broadcast to [..., N, T, S] = [2, 4, 4, 5]",
        ),
        ({"bias": Z((4, 5), bool)}, "bias must be a floating array, got dtype bool"),
        (
            {"implementation": "fastest"},
            "implementation must be one of (None, 'xla', 'flash', 'cudnn'), got 'fastest'",
        ),
        (
            {"implementation": "reference"},
            "got 'reference' (the dense path is now named 'xla', as in jax.nn)",
        ),
    ],
)
def test_error_messages(overrides, message):
    assert message in _err(**overrides)


def test_errors_raise_at_trace_time_under_jit():
    q = jnp.zeros((2, 4, 4, 8))
    k = jnp.zeros((2, 5, 3, 8))
    with pytest.raises(ValueError, match="query heads must be a multiple of key heads"):
        jax.jit(ja.dot_product_attention).lower(q, k, k)


def test_checks_see_the_arguments_as_jax_jit_converts_them(rng):
    # The checks read shapes and dtypes before jax.jit, once per signature (cached): a NumPy
    # float64 array is float32 there without jax_enable_x64, a Python scalar a 0-d array.
    q, key, v = qkv(rng, (2,), 4, 5, 4, 2, 8)
    want = ja.dot_product_attention(q, key, v, implementation="xla")
    got = ja.dot_product_attention(q.astype(np.float64), jnp.asarray(key), v, implementation="xla")
    np.testing.assert_array_equal(got, want)
    for kw in ({"bias": 0.0}, {"mask": True}):
        got = ja.dot_product_attention(q, key, v, implementation="xla", **kw)
        np.testing.assert_allclose(got, want, atol=1e-6)
    with jax.enable_x64(True), pytest.raises(ValueError, match="must share one dtype"):
        # The same arguments as above: the cache is keyed on jax_enable_x64 as well.
        ja.dot_product_attention(q.astype(np.float64), jnp.asarray(key), v, implementation="xla")


def test_equal_static_arguments_compile_once(rng):
    # The core's one static argument is the normalised record of the call: np.True_ and
    # True, a window 2 and (2, 2), a cap 3 and 3.0 make the same record, compiled once.
    from jaxattn.attention import _attention

    q, key, v = qkv(rng, (1,), 3, 3, 1, 1, 4)
    a = ja.dot_product_attention(
        q, key, v, is_causal=True, local_window_size=(2, 2), logits_soft_cap=3.0
    )
    compiled = _attention._cache_size()
    b = ja.dot_product_attention(
        q, key, v, is_causal=np.True_, local_window_size=np.int64(2), logits_soft_cap=3
    )
    assert _attention._cache_size() == compiled
    np.testing.assert_array_equal(a, b)


def test_all_mask_kinds_and_shapes_were_covered():
    # Guard against the parametrisation silently shrinking.
    kinds = set(MASKS)
    assert {"causal", "window", "prefix", "kv_padding", "segments"} <= kinds
    assert {len(b) for b, *_ in SHAPES} == {0, 1, 2}
    assert any(n != k for _, _, _, n, k, *_ in SHAPES)
    assert any(k == 1 for _, _, _, _, k, *_ in SHAPES)
    assert any(h != hv for *_, h, hv in SHAPES)
    assert any(t != s for _, t, s, *_ in SHAPES)
