"""Flax's own MultiHeadAttention tests, run with ``attention_fn=jaxattn.nn.attention_fn``.

Ported from google/flax ``tests/nnx/nn/attention_test.py`` at commit
18f8f311c275d57f46d95e41b15aa97b454754c0 (the mirror has no v0.12.8 tag; the installed
Flax 0.12.8's ``flax/nnx/nn/attention.py`` is identical to that commit's). Every test of the
file is here, in its order, with pytest in place of absltest: each module is built with our
``attention_fn``, and where a test checks numbers they are also compared with a twin of the
module (``nnx.clone``: same params, rngs and cache) that keeps Flax's default
``attention_fn``. Assertions changed for a documented difference say why in a comment.

The second part tests the adapter itself (``jaxattn.nn.flax_attention``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from flax.nnx.nn.attention import combine_masks
from jax.lax import Precision

import jaxattn
import jaxattn.nn
from jaxattn.nn import attention_fn


def flax_twin(module):
    """A copy of ``module`` (params, rngs, cache and all) that uses Flax's own attention."""
    twin = nnx.clone(module)
    twin.attention_fn = nnx.dot_product_attention
    return twin


def capture(fn, *args):
    """``(output, intermediates)`` of ``fn(*args)`` (first arg a module), via nnx.capture."""
    return nnx.capture(fn, nnx.Intermediate)(*args)


def normal(key, shape):
    """Standard normal draws of ``shape`` from ``key``, in place of ``jax.random.normal(key,
    shape)``: the first draws of one fixed-size sample, so that the sampler compiles once
    (each new shape costs it a compile of about a second on a CPU)."""
    size = math.prod(shape)
    assert size <= 4096
    return jax.random.normal(key, (4096,))[:size].reshape(shape)


class Dummy(nnx.Module):
    pass


# ------------------------------------------------------------------------------------------
# Port of class TestMultiHeadAttention


def test_basic():
    module = nnx.MultiHeadAttention(
        num_heads=2,
        in_features=3,
        qkv_features=6,
        out_features=6,
        attention_fn=attention_fn,
        rngs=nnx.Rngs(0),
    )
    twin = flax_twin(module)
    y = module(jnp.ones((1, 7, 3)), decode=False)
    assert y.shape == (1, 7, 6)
    np.testing.assert_allclose(y, twin(jnp.ones((1, 7, 3)), decode=False), atol=1e-6)


def test_multihead_sow_attention_weights():
    class Model(nnx.Module):
        attention_kwargs: dict

        def __init__(self, attention_kwargs, rng):
            self.attention_layers = nnx.data(
                [nnx.MultiHeadAttention(**attention_kwargs, rngs=rng) for i in range(3)]
            )

        def __call__(self, x, sow_weights=False):
            x = self.attention_layers[0](x, sow_weights=sow_weights)
            x = self.attention_layers[1](x)
            x = self.attention_layers[2](x, sow_weights=sow_weights)
            return x

    rng = nnx.Rngs(0)
    x = jnp.ones((4, 6, 8))

    module = Model(
        dict(
            in_features=8,
            num_heads=8,
            kernel_init=nnx.initializers.ones_init(),
            bias_init=nnx.initializers.zeros_init(),
            deterministic=False,
            attention_fn=attention_fn,
        ),
        rng,
    )
    module.set_attributes(decode=False)
    twin = nnx.clone(module)
    for layer in twin.attention_layers:
        layer.attention_fn = nnx.dot_product_attention

    out, intermediates = capture(module, x, True)
    assert intermediates["attention_layers"][0]["attention_weights"][0].shape == (4, 8, 6, 6)
    assert 1 not in intermediates["attention_layers"]
    assert intermediates["attention_layers"][2]["attention_weights"][0].shape == (4, 8, 6, 6)

    expected, flax_intermediates = capture(twin, x, True)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    for i in (0, 2):
        ours = intermediates["attention_layers"][i]["attention_weights"][0]
        theirs = flax_intermediates["attention_layers"][i]["attention_weights"][0]
        np.testing.assert_allclose(ours, theirs, atol=1e-6)

    _, intermediates = capture(module, x)
    assert not intermediates  # empty


def test_autoregressive_decode_with_x64():
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4))
        module = nnx.MultiHeadAttention(
            in_features=4,
            num_heads=2,
            qkv_features=4,
            decode=True,
            attention_fn=attention_fn,
            rngs=nnx.Rngs(0),
        )
        module.init_cache(x.shape, dtype=x.dtype)
        assert module.cached_key.shape == (1, 4, 2, 2)
        assert module.cached_value.shape == (1, 4, 2, 2)
        twin = flax_twin(module)

        y1 = module(x[:, :1, :])
        y2 = module(x[:, 1:2, :])

        assert y1.shape == (1, 1, 4)
        assert y2.shape == (1, 1, 4)
        assert y1.dtype == y2.dtype == jnp.float64
        np.testing.assert_allclose(y1, twin(x[:, :1, :]), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(y2, twin(x[:, 1:2, :]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keep_rngs", [True, False])
def test_keep_rngs(keep_rngs):
    rngs = nnx.Rngs(42)
    module = nnx.MultiHeadAttention(
        in_features=4,
        num_heads=2,
        qkv_features=4,
        decode=True,
        rngs=rngs,
        dropout_rate=0.5,
        keep_rngs=keep_rngs,
        attention_fn=attention_fn,
    )
    if keep_rngs:
        assert module.rngs is not None
    else:
        assert module.rngs is None
    if keep_rngs:
        _, _, nondiff = nnx.split(module, nnx.Param, ...)
        assert isinstance(nondiff["rngs"]["count"], nnx.RngCount)
        assert isinstance(nondiff["rngs"]["key"], nnx.RngKey)
    else:
        nnx.split(module, nnx.Param)


@pytest.mark.parametrize("is_cross_attention", [True, False])
@pytest.mark.parametrize("use_padding", [True, False])
def test_causal_mask_equivalence(use_padding, is_cross_attention):
    batch_size = 1
    num_heads = 2
    q_len = 2
    kv_len = 4 if is_cross_attention else q_len
    head_dim = 4

    q = normal(jax.random.key(0), (batch_size, 1, q_len, num_heads, head_dim))
    k = normal(jax.random.key(1), (batch_size, 1, kv_len, num_heads, head_dim))
    v = normal(jax.random.key(2), (batch_size, 1, kv_len, num_heads, head_dim))

    causal_mask = jnp.tril(jnp.ones(shape=(q_len, kv_len), dtype=jnp.bool_))
    causal_mask = jnp.broadcast_to(
        array=causal_mask, shape=(batch_size, 1, num_heads, q_len, kv_len)
    )

    padding_mask = None

    if use_padding:
        padding_mask = jnp.ones(shape=(batch_size, 1, 1, q_len, kv_len), dtype=jnp.bool_)
        padding_mask = padding_mask.at[..., -2:].set(False)

    manual_mask = combine_masks(padding_mask, causal_mask, dtype=q.dtype)  # a float32 mask

    # Precombined mask and is_causal = False (Flax: its jax.nn path)
    attn_jax = attention_fn(
        query=q,
        key=k,
        value=v,
        mask=manual_mask,
        is_causal=False,
        deterministic=True,
        module=None,
    )

    # padding mask and is_causal = True (internally combined), sowing (Flax: its nnx path)
    dummy = Dummy()

    def _run(m):
        return attention_fn(
            query=q,
            key=k,
            value=v,
            mask=padding_mask,
            is_causal=True,
            deterministic=True,
            module=m,
        )

    attn_manual, _ = capture(_run, dummy)

    np.testing.assert_allclose(attn_jax, attn_manual, atol=1e-6)

    # Against Flax. Changed: with padding in self-attention (kv_len == 2, both keys padded)
    # every row is fully masked: Flax returns the mean of V there, we return 0 (documented).
    expected = np.asarray(
        nnx.dot_product_attention(
            query=q, key=k, value=v, mask=manual_mask, is_causal=False, deterministic=True
        )
    )
    if use_padding and not is_cross_attention:
        np.testing.assert_allclose(expected, np.broadcast_to(v.mean(-3, keepdims=True), v.shape))
        expected = np.zeros_like(expected)
    np.testing.assert_allclose(attn_jax, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Port of class TestLinenConsistency


@pytest.mark.parametrize("normalize_qk", [True, False])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("precision", [Precision.DEFAULT, Precision.HIGH, Precision.HIGHEST])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_nnx_attention_equivalence(use_bias, dtype, param_dtype, precision, decode, normalize_qk):
    key = jax.random.key(42)
    rngs = nnx.Rngs(42)

    num_heads = 2
    in_features = 3
    qkv_features = 6
    out_features = 6

    x = jax.numpy.ones((1, in_features))
    shared = {  # the settings both modules take
        "num_heads": num_heads,
        "qkv_features": qkv_features,
        "out_features": out_features,
        "use_bias": use_bias,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "precision": precision,
        "decode": decode,
        "normalize_qk": normalize_qk,
    }
    model_nnx = nnx.MultiHeadAttention(
        in_features=in_features, attention_fn=attention_fn, rngs=rngs, **shared
    )
    model = linen.MultiHeadDotProductAttention(**shared)
    variables = model.init(key, x)

    for qkvo in ("query", "key", "value", "out"):
        getattr(model_nnx, qkvo).kernel[...] = variables["params"][qkvo]["kernel"]
        if use_bias:
            getattr(model_nnx, qkvo).bias[...] = variables["params"][qkvo]["bias"]
    if decode:
        model_nnx.init_cache(x.shape, dtype=dtype)
    twin = flax_twin(model_nnx)

    out_nnx = model_nnx(x)
    out, _cache = model.apply(variables, x, mutable=["cache"])
    # Exact, as in Flax: one query and one key, so the weight is exactly 1 on every path.
    np.testing.assert_array_equal(out, out_nnx)
    np.testing.assert_array_equal(twin(x), out_nnx)


# ------------------------------------------------------------------------------------------
# Port of class TestKVFeatures


def test_varying_num_features():
    key = jax.random.key(42)
    rngs = nnx.Rngs(42)

    num_heads = 2
    in_features = 3
    in_kv_features = 4
    qkv_features = 6
    out_features = 6

    x = jax.numpy.ones((1, in_features))
    y = normal(key, (1, in_kv_features))
    layer = nnx.MultiHeadAttention(
        num_heads=num_heads,
        in_features=in_features,
        qkv_features=qkv_features,
        out_features=out_features,
        in_kv_features=in_kv_features,
        attention_fn=attention_fn,
        rngs=rngs,
        decode=False,
    )

    assert layer(x, y) is not None
    np.testing.assert_allclose(layer(x, y), flax_twin(layer)(x, y), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Port of class TestGQADotProductAttention


def test_gqa_shapes():
    B, T, S = 2, 4, 5
    D = 8
    num_heads_q = 6
    num_heads_kv = 3

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    query = normal(k1, (B, T, num_heads_q, D))
    key = normal(k2, (B, S, num_heads_kv, D))
    value = normal(k3, (B, S, num_heads_kv, D))

    output = attention_fn(query, key, value)
    expected_shape = (B, T, num_heads_q, D)
    assert output.shape == expected_shape


def test_gqa_invalid_heads():
    B, T, D = 1, 4, 8
    query = jnp.ones((B, T, 5, D))
    key = jnp.ones((B, T, 2, D))
    value = key

    with pytest.raises(ValueError, match="must be a multiple"):
        attention_fn(query, key, value)


def test_gqa_multihead_attention():
    in_feat = 128
    n_heads = 32
    n_kv_heads = 8
    qkv_feat = 2048
    head_dim = qkv_feat // n_heads

    model = nnx.MultiHeadAttention(
        num_heads=n_heads,
        in_features=in_feat,
        qkv_features=qkv_feat,
        num_kv_heads=n_kv_heads,
        attention_fn=attention_fn,
        rngs=nnx.Rngs(0),
    )
    twin = flax_twin(model)

    assert model.query.kernel.shape == (in_feat, n_heads, head_dim)
    assert model.key.kernel.shape == (in_feat, n_kv_heads, head_dim)
    assert model.value.kernel.shape == (in_feat, n_kv_heads, head_dim)

    x = jnp.ones((1, 10, in_feat))
    y = model(x, decode=False)
    assert y.shape == (1, 10, in_feat)
    np.testing.assert_allclose(y, twin(x, decode=False), atol=1e-5)

    model.init_cache((1, 10, in_feat))
    twin.init_cache((1, 10, in_feat))
    assert model.cached_key.shape == (1, 10, n_kv_heads, head_dim)

    x_token = jnp.ones((1, 1, in_feat))
    y_token = model(x_token, decode=True)
    assert y_token.shape == (1, 1, in_feat)
    assert model.cache_index == 1
    np.testing.assert_allclose(y_token, twin(x_token, decode=True), atol=1e-5)


def test_gqa_parity_with_jax():
    dummy_module = Dummy()

    B, T, S, D = 2, 8, 8, 16
    num_heads_q = 4
    num_heads_kv = 2

    rng = jax.random.key(42)
    k1, k2, k3 = jax.random.split(rng, 3)

    query = normal(k1, (B, T, num_heads_q, D))
    key = normal(k2, (B, S, num_heads_kv, D))
    value = normal(k3, (B, S, num_heads_kv, D))

    jax_out = jax.nn.dot_product_attention(query, key, value)

    def _run(m):
        return attention_fn(query, key, value, module=m)

    nnx_out, _ = capture(_run, dummy_module)

    np.testing.assert_allclose(nnx_out, jax_out, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------
# Port of class TestDotProductAttentionValidation. Changed: the patterns of the last two
# cases are our kernel's wording ("value has 15 positions but key has 16", "key head dim
# is 7 but query head dim is 8"); Flax's are "lengths must match", "depths must match".


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "match"),
    [
        ((2, 16, 4, 8), (16, 4, 8), (16, 4, 8), "same rank"),
        ((2, 16, 4, 8), (3, 16, 4, 8), (3, 16, 4, 8), "batch dims"),
        ((2, 16, 4, 8), (2, 16, 4, 8), (2, 15, 4, 8), "positions but key has"),
        ((2, 16, 4, 8), (2, 16, 4, 7), (2, 16, 4, 8), "head dim is 7 but query head dim"),
    ],
)
def test_invalid_shapes(q_shape, k_shape, v_shape, match):
    q = jnp.ones(q_shape)
    k = jnp.ones(k_shape)
    v = jnp.ones(v_shape)
    with pytest.raises(ValueError, match=match):
        attention_fn(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))


# ------------------------------------------------------------------------------------------
# The adapter's own tests. Most share one shape (each new shape costs a compile).

SHAPE = ((2,), 5, 6, 4, 2, 8)  # batch, T, S, N, K (grouped-query), H


def _inputs(batch, t, s, n, k, h, seed=0):
    """float32 query, key, value, a bool ``[..., 1, T, S]`` mask with no fully masked row,
    a float32 ``[..., N, T, S]`` bias."""
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((*batch, t, n, h)), jnp.float32)
    key = jnp.asarray(r.standard_normal((*batch, s, k, h)), jnp.float32)
    v = jnp.asarray(r.standard_normal((*batch, s, k, h)), jnp.float32)
    mask = r.random((*batch, 1, t, s)) > 0.3
    mask[..., 0] = True  # key 0 is seen by every query, also under is_causal (top-left)
    bias = jnp.asarray(r.standard_normal((*batch, n, t, s)), jnp.float32)
    return q, key, v, jnp.asarray(mask), bias


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(
    ("batch", "t", "s", "n", "k"),
    [SHAPE[:5], ((), 6, 5, 3, 1)],  # T < S; unbatched, T > S (two batch dims: sown weights)
)
def test_matches_flax_with_mask_and_bias(batch, t, s, n, k, is_causal):
    # With T != S, is_causal checks the top-left alignment of Flax and jax.nn (our kernel's
    # own is_causal aligns bottom-right).
    q, key, v, mask, bias = _inputs(batch, t, s, n, k, 8)
    out = attention_fn(q, key, v, bias, mask, is_causal=is_causal)
    expected = nnx.dot_product_attention(q, key, v, bias, mask, is_causal=is_causal)
    assert out.shape == expected.shape == (*batch, t, n, 8)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_mask_and_bias_of_lower_rank_and_float_mask():
    # A [T, S] float 0/1 mask (as combine_masks builds) and an [N, T, S] bias: leading dims
    # are added explicitly (the suite runs with jax_numpy_rank_promotion="raise").
    q, key, v, mask, bias = _inputs(*SHAPE)
    mask2 = mask[0, 0].astype(jnp.float32)
    out = attention_fn(q, key, v, bias[0], mask2)
    expected = attention_fn(q, key, v, bias[:1], mask2.astype(bool)[None, None])
    np.testing.assert_array_equal(out, expected)


def test_fully_masked_rows_give_zero_where_flax_gives_mean_of_v():
    q, key, v, mask, _ = _inputs(*SHAPE)
    mask = mask.at[:, :, 1, :].set(False)  # query 1 sees no key
    out, inter = capture(lambda m: attention_fn(q, key, v, mask=mask, module=m), Dummy())
    expected, flax_inter = capture(
        lambda m: nnx.dot_product_attention(q, key, v, mask=mask, module=m), Dummy()
    )
    np.testing.assert_array_equal(out[:, 1], 0.0)
    mean_v = np.repeat(np.asarray(v).mean(axis=1), 2, axis=1)  # key head k serves 2k, 2k+1
    np.testing.assert_allclose(expected[:, 1], mean_v, atol=1e-6)
    rows = [0, 2, 3, 4]
    np.testing.assert_allclose(out[:, rows], expected[:, rows], atol=1e-5)
    (weights,), (flax_weights,) = inter["attention_weights"], flax_inter["attention_weights"]
    np.testing.assert_array_equal(weights[:, :, 1], 0.0)
    np.testing.assert_allclose(flax_weights[:, :, 1], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(weights[:, :, rows], flax_weights[:, :, rows], atol=1e-6)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sown_weights_equal_flax(is_causal):
    q, key, v, mask, bias = _inputs((2, 2), *SHAPE[1:])

    def run(fn):
        return capture(lambda m: fn(q, key, v, bias, mask, module=m, is_causal=is_causal), Dummy())

    out, inter = run(attention_fn)
    expected, flax_inter = run(nnx.dot_product_attention)
    (weights,), (flax_weights,) = inter["attention_weights"], flax_inter["attention_weights"]
    assert weights.shape == flax_weights.shape == (2, 2, 4, 5, 6)
    assert weights.dtype == flax_weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, flax_weights, atol=1e-6)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_dtype_promotion_and_sown_dtype():
    q, key, v, mask, _ = _inputs(*SHAPE)
    q16 = q.astype(jnp.float16)
    # No dtype: q, k, v promoted to their common dtype (float32 here), as in Flax.
    out = attention_fn(q16, key, v, mask=mask)
    assert out.dtype == nnx.dot_product_attention(q16, key, v, mask=mask).dtype == jnp.float32
    # dtype=bfloat16: all three cast, output and sown weights bfloat16.
    out, inter = capture(
        lambda m: attention_fn(q16, key, v, mask=mask, module=m, dtype=jnp.bfloat16), Dummy()
    )
    expected, flax_inter = capture(
        lambda m: nnx.dot_product_attention(q16, key, v, mask=mask, module=m, dtype=jnp.bfloat16),
        Dummy(),
    )
    (weights,), (flax_weights,) = inter["attention_weights"], flax_inter["attention_weights"]
    assert out.dtype == weights.dtype == flax_weights.dtype == jnp.bfloat16
    # Our softmax runs in float32, Flax's weights path in bfloat16: bfloat16 tolerances.
    as32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(as32(weights), as32(flax_weights), atol=1e-2)
    np.testing.assert_allclose(as32(out), as32(expected), atol=5e-2)


def test_dropout_needs_dropout_rng():
    q, key, v, _, _ = _inputs(*SHAPE)
    with pytest.raises(ValueError, match=r"^dropout_rate=0.5 needs a dropout_rng, got None$"):
        attention_fn(q, key, v, dropout_rate=0.5)


def test_deterministic_ignores_dropout():
    q, key, v, mask, bias = _inputs(*SHAPE)
    plain = attention_fn(q, key, v, bias, mask)
    for rng in (None, jax.random.key(0)):
        out = attention_fn(
            q, key, v, bias, mask, dropout_rate=0.5, dropout_rng=rng, deterministic=True
        )
        np.testing.assert_array_equal(out, plain)


def test_dropout_masks_are_per_sequence_and_head():
    # Decided: broadcast_dropout is accepted and changes nothing: our mask (a hash of
    # sequence, head, query, key) is never shared across batch and heads. Each weight is
    # kept with probability 1 - rate and scaled by 1 / (1 - rate), as in Flax: the same
    # expected output. Checked exactly: out = (W * keep / (1 - rate)) V, W the sown weights
    # (taken before dropout, as Flax's).
    batch, t, s, n, k, _ = SHAPE
    rate = 0.5
    q, key, v, mask, _ = _inputs(*SHAPE)
    rng = jax.random.key(7)
    kw = {"dropout_rate": rate, "dropout_rng": rng}
    out, inter = capture(lambda m: attention_fn(q, key, v, mask=mask, module=m, **kw), Dummy())
    weights = inter["attention_weights"][0]
    # Flax sows before its dropout too: its weights are those of a dropout-free call (one
    # with dropout would compile its bernoulli draw, a second more, for the same weights).
    _, flax_inter = capture(
        lambda m: nnx.dot_product_attention(q, key, v, mask=mask, module=m), Dummy()
    )
    np.testing.assert_allclose(weights, flax_inter["attention_weights"][0], atol=1e-6)
    not_broadcast = attention_fn(q, key, v, mask=mask, broadcast_dropout=False, **kw)
    np.testing.assert_array_equal(out, not_broadcast)

    keep = np.asarray(jaxattn.attention_dropout_mask(rng, rate, batch, n, t, s))
    dropped = np.asarray(weights) * keep / (1 - rate)
    v_per_head = np.repeat(np.asarray(v), n // k, axis=-2)
    expected = np.einsum("bnts,bsnh->btnh", dropped, v_per_head)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Not broadcast: the masks differ across heads and across sequences.
    assert (keep[:, 0] != keep[:, 1]).any() and (keep[0] != keep[1]).any()
    assert abs(keep.mean() - (1 - rate)) < 0.1


def test_multihead_attention_with_dropout():
    # The shapes of test_keep_rngs (their initialisers are compiled already).
    module = nnx.MultiHeadAttention(
        in_features=4,
        num_heads=2,
        qkv_features=4,
        dropout_rate=0.5,
        decode=False,
        attention_fn=attention_fn,
        rngs=nnx.Rngs(0),
    )
    x = normal(jax.random.key(0), (2, 5, 4))
    twin = flax_twin(module)
    train1 = module(x, deterministic=False)
    train2 = module(x, deterministic=False)  # the rng stream advances: a new mask
    assert not np.allclose(train1, train2)
    np.testing.assert_allclose(
        module(x, deterministic=True), twin(x, deterministic=True), atol=1e-5
    )


def test_decode_steps_equal_a_causal_pass_under_jit():
    module = nnx.MultiHeadAttention(
        in_features=4,
        num_heads=2,
        qkv_features=4,
        decode=True,
        attention_fn=attention_fn,
        rngs=nnx.Rngs(3),
    )
    x = normal(jax.random.key(1), (2, 5, 4))
    module.init_cache(x.shape)
    whole = nnx.clone(module)

    @nnx.jit
    def step(m, token):
        return m(token)

    steps = [step(module, x[:, i : i + 1]) for i in range(x.shape[1])]
    assert int(module.cache_index[...]) == x.shape[1]
    # The cached steps (mask from the cache index, float32) equal one causal pass over the
    # whole sequence, ours and Flax's.
    out = whole(x, decode=False, is_causal=True)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), out, atol=1e-5)
    np.testing.assert_allclose(out, flax_twin(whole)(x, decode=False, is_causal=True), atol=1e-5)


def test_precision_reaches_the_kernels_matmuls():
    q, key, v, _, _ = _inputs(*SHAPE)

    def hlo(precision):
        fn = jax.jit(lambda a, b, c: attention_fn(a, b, c, precision=precision))
        return fn.lower(q, key, v).as_text()

    if jax.config.jax_default_matmul_precision is None:  # conftest sets it on a GPU
        assert "HIGHEST" not in hlo(None)
    assert "HIGHEST" in hlo(Precision.HIGHEST)
    assert "HIGHEST" in hlo("highest")
    assert "HIGHEST" in hlo((Precision.DEFAULT, Precision.HIGHEST))
    np.testing.assert_allclose(
        attention_fn(q, key, v, precision=Precision.HIGHEST), attention_fn(q, key, v), atol=1e-6
    )
    with pytest.raises(ValueError, match="precision must be"):
        attention_fn(q, key, v, precision=object())


def test_exported():
    assert jaxattn.nn.attention_fn is attention_fn
    assert "attention_fn" in jaxattn.nn.__all__
