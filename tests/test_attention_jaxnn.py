"""dot_product_attention as a drop-in for jax.nn's: the signature and its keywords, the
log-sum-exp residual, the logit soft cap, NaN and Inf, transforms, and the errors of static
arguments and empty dims. Every case runs on the xla and flash paths (flash with small blocks,
so that the block loops really run) against the float64 formula (jaxattn.reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import qkv, reference_attention

import jaxattn as ja

PATHS = {
    "xla": {"implementation": "xla"},
    "flash": {"implementation": "flash", "block_sizes": (4, 4)},
}
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture(params=list(PATHS))
def path(request):
    return PATHS[request.param]


# --------------------------------------------------------------------------------------------
# The signature


def test_bias_then_mask_positionally_as_in_jax_nn(rng, path):
    q, k, v = qkv(rng, (2,), 6, 9, 2, 2, 4)
    bias = rng.standard_normal((2, 6, 9)).astype(np.float32)
    mask = rng.random((2, 1, 6, 9)) < 0.6
    by_position = ja.dot_product_attention(q, k, v, bias, jnp.asarray(mask), **path)
    by_keyword = ja.dot_product_attention(q, k, v, mask=jnp.asarray(mask), bias=bias, **path)
    np.testing.assert_array_equal(by_position, by_keyword)
    ref = reference_attention(q, k, v, mask=mask, bias=bias)[0]
    np.testing.assert_allclose(by_position, ref, **TOL)
    # jax.nn code that passes only a mask positionally: (q, k, v, None, mask).
    only_mask = ja.dot_product_attention(q, k, v, None, jnp.asarray(mask), **path)
    np.testing.assert_allclose(only_mask, reference_attention(q, k, v, mask=mask)[0], **TOL)


def test_seq_lengths_are_padding_masks(rng, path):
    q, k, v = qkv(rng, (3,), 7, 9, 2, 1, 4)
    q_len, kv_len = np.array([7, 3, 0], np.int32), np.array([9, 5, 2], np.int32)
    out = ja.dot_product_attention(
        q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len, **path
    )
    mask = ja.PaddingMask(q_lengths=q_len, kv_lengths=kv_len)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask)[0], **TOL)
    assert np.all(np.asarray(out)[1, 3:] == 0) and np.all(np.asarray(out)[2] == 0)
    # With jax.nn on the rows it defines the same way (padded query rows are 0 in both).
    theirs = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len, implementation="xla"
    )
    np.testing.assert_allclose(out[:2], theirs[:2], atol=1e-5)


def test_local_window_size_int_and_pair(rng, path):
    q, k, v = qkv(rng, (2,), 10, 10, 2, 2, 4)
    for window in (2, (3, 0), (0, 1)):
        out = ja.dot_product_attention(q, k, v, local_window_size=window, **path)
        spec = ja.SlidingWindowMask(window)
        np.testing.assert_allclose(out, reference_attention(q, k, v, mask=spec)[0], **TOL)
        theirs = jax.nn.dot_product_attention(q, k, v, local_window_size=window)
        np.testing.assert_allclose(out, theirs, atol=1e-5)  # T == S: the same positions


def test_unbatched_inputs_take_jax_nn_4d_mask_bias_and_lengths(rng, path):
    q, k, v = qkv(rng, (), 5, 8, 2, 2, 4)
    mask = rng.random((1, 2, 5, 8)) < 0.7
    bias = rng.standard_normal((1, 1, 5, 8)).astype(np.float32)
    out = ja.dot_product_attention(q, k, v, bias, jnp.asarray(mask), **path)
    assert out.shape == (5, 2, 4)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask[0], bias[0])[0], **TOL)
    lengths = np.array([6], np.int32)
    out = ja.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, **path)
    ref = reference_attention(q, k, v, mask=ja.PaddingMask(kv_lengths=6))[0]
    np.testing.assert_allclose(out, ref, **TOL)


# --------------------------------------------------------------------------------------------
# The residual: log-sum-exp per query row


def test_residual_is_the_log_sum_exp_and_minus_inf_on_empty_rows(rng, path):
    q, k, v = qkv(rng, (2,), 6, 9, 4, 2, 4)
    mask = rng.random((2, 1, 6, 9)) < 0.6
    mask[0, 0, 2] = False  # a row with no key
    bias = rng.standard_normal((4, 6, 9)).astype(np.float32)
    out, lse = ja.dot_product_attention(
        q, k, v, bias, jnp.asarray(mask), return_residual=True, **path
    )
    ref_out, ref_lse, _ = reference_attention(q, k, v, mask, bias, return_residual=True)
    assert lse.shape == (2, 6, 4) and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    assert np.all(np.asarray(lse)[0, 2] == -np.inf)


def test_partial_attentions_over_key_halves_merge_exactly(rng, path):
    q, k, v = qkv(rng, (2,), 8, 12, 2, 2, 4)
    lengths = np.array([12, 4], np.int32)  # the second half of sequence 1 sees no key
    whole, lse = ja.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, return_residual=True, **path
    )
    halves = []
    for lo in (0, 6):
        part = jnp.asarray(np.clip(lengths - lo, 0, 6), jnp.int32)
        halves.append(
            ja.dot_product_attention(
                q,
                k[:, lo : lo + 6],
                v[:, lo : lo + 6],
                key_value_seq_lengths=part,
                return_residual=True,
                **path,
            )
        )
    (o1, l1), (o2, l2) = halves
    merged_lse = jnp.logaddexp(l1, l2)
    w1, w2 = jnp.exp(l1 - merged_lse)[..., None], jnp.exp(l2 - merged_lse)[..., None]
    np.testing.assert_allclose(w1 * o1 + w2 * o2, whole, **TOL)
    np.testing.assert_allclose(merged_lse, lse, **TOL)


def test_residual_gradient_matches_the_formula(rng, path):
    q, k, v = qkv(rng, (1,), 6, 8, 2, 1, 4)
    ct = rng.standard_normal((1, 6, 2)).astype(np.float32)

    def ours(q, k, v):
        out, lse = ja.dot_product_attention(q, k, v, is_causal=True, return_residual=True, **path)
        return jnp.sum(out) + jnp.sum(lse * ct)

    def formula(q, k, v):
        out, lse = ja.reference.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
        return jnp.sum(out) + jnp.sum(lse * ct)

    got = jax.grad(ours, argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
        want = jax.grad(formula, argnums=(0, 1, 2))(*(np.float64(x) for x in (q, k, v)))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


# --------------------------------------------------------------------------------------------
# Logit soft cap


@pytest.mark.parametrize("cap, with_bias", [(1.0, True), (5.0, False)])
def test_soft_cap_values_and_gradients_match_the_formula(rng, path, cap, with_bias):
    # With a bias and without (the flash forward takes the max before the tanh then).
    q, k, v = qkv(rng, (2,), 6, 9, 2, 1, 4)
    q = q * 3  # logits of several units: the cap bites
    bias = rng.standard_normal((2, 6, 9)).astype(np.float32)
    mask = jnp.asarray(rng.random((2, 1, 6, 9)) < 0.7)
    ct = rng.standard_normal((2, 6, 2, 4)).astype(np.float32)

    def ours(q, k, v, bias):
        b = bias if with_bias else None
        out = ja.dot_product_attention(q, k, v, b, mask, logits_soft_cap=cap, **path)
        return jnp.sum(out * ct), out

    def formula(q, k, v, bias):
        b = bias if with_bias else None
        out = ja.reference.dot_product_attention(q, k, v, b, mask, logits_soft_cap=cap)
        return jnp.sum(out * ct)

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
    ref = reference_attention(q, k, v, mask, bias if with_bias else None, logits_soft_cap=cap)
    np.testing.assert_allclose(out, ref[0], **TOL)
    with jax.enable_x64(True):
        args = (np.float64(x) for x in (q, k, v, bias))
        want = jax.grad(formula, argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(grads, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    plain = ja.dot_product_attention(q, k, v, bias if with_bias else None, mask, **path)
    assert not np.allclose(out, plain, atol=1e-3)  # the cap changed something


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan"), "30", True])
def test_soft_cap_must_be_a_positive_finite_float(cap):
    q = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match="logits_soft_cap must be None or a positive finite"):
        ja.dot_product_attention(q, q, q, logits_soft_cap=cap)


# --------------------------------------------------------------------------------------------
# NaN and Inf


@pytest.mark.parametrize("t", [8, 64, 256])
def test_nan_in_a_query_reaches_its_row_on_every_path(rng, t):
    q, k, v = qkv(rng, (1,), t, t, 1, 1, 4)
    q[0, 5, 0, 0] = np.nan
    for kw in ({"implementation": "xla"}, {"implementation": "flash"}, {}):
        out = np.asarray(ja.dot_product_attention(q, k, v, **kw))
        assert np.all(np.isnan(out[0, 5])), kw
        assert np.all(np.isfinite(np.delete(out, 5, axis=1))), kw
    grad = jax.grad(lambda k: jnp.sum(ja.dot_product_attention(q, k, v, implementation="flash")))
    assert np.any(np.isnan(grad(k)))


def test_nan_in_unmasked_key_or_value_reaches_the_rows_that_see_it(rng, path):
    q, k, v = qkv(rng, (1,), 6, 6, 1, 1, 4)
    k_nan, v_inf = k.copy(), v.copy()
    k_nan[0, 3, 0, 1] = np.nan
    v_inf[0, 3, 0, 2] = np.inf
    out = np.asarray(ja.dot_product_attention(q, k_nan, v, is_causal=True, **path))
    assert np.all(np.isfinite(out[0, :3])) and np.all(np.isnan(out[0, 3:]))
    out = np.asarray(ja.dot_product_attention(q, k, v_inf, is_causal=True, **path))
    assert np.all(out[0, 3:, 0, 2] == np.inf)
    # Rows 0-2 may not see key 3: what its Inf does there is documented as unspecified (a
    # weight of exactly 0 times Inf is NaN wherever a path reads the value); it never
    # reaches another feature.
    assert np.all(np.isfinite(np.delete(out, 2, axis=-1)))


def test_nan_in_masked_key_bias_or_padding_value_never_leaks(rng, path):
    q, k, v = qkv(rng, (2,), 6, 8, 2, 2, 4)
    lengths = np.array([5, 8], np.int32)
    k[0, 6, 0, 0] = np.nan  # keys 5.. of sequence 0 are padding
    v[0, 7, 1, 3] = np.nan  # a padding value: never read, on every path
    bias = np.zeros((2, 2, 6, 8), np.float32)
    bias[0, 0, :, 5] = np.nan  # bias of a padding key
    mask = ja.PaddingMask(kv_lengths=lengths)
    out = ja.dot_product_attention(q, k, v, bias, mask, **path)
    assert np.all(np.isfinite(out))
    ref = reference_attention(q, np.nan_to_num(k), np.nan_to_num(v), mask, np.nan_to_num(bias))
    np.testing.assert_allclose(out, ref[0], **TOL)
    grads = jax.grad(lambda q: jnp.sum(ja.dot_product_attention(q, k, v, bias, mask, **path)))(q)
    assert np.all(np.isfinite(grads))


# --------------------------------------------------------------------------------------------
# Transforms


def test_grad_of_grad_on_flash_equals_the_xla_path(rng):
    q, k, v = qkv(rng, (2,), 9, 11, 2, 1, 4)
    bias = rng.standard_normal((2, 9, 11)).astype(np.float32)

    def second(kw):
        def loss(q, k, v, bias):
            out = ja.dot_product_attention(q, k, v, bias, is_causal=True, logits_soft_cap=4.0, **kw)
            return jnp.sum(jnp.sin(out))

        grad = jax.grad(loss, argnums=(0, 1, 2, 3))
        return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in grad(*a)), argnums=(0, 1, 2, 3))

    want = second(PATHS["xla"])(q, k, v, bias)
    got = second(PATHS["flash"])(q, k, v, bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_hessian_vector_product_on_flash_equals_the_xla_path(rng):
    q, k, v = qkv(rng, (1,), 8, 8, 2, 2, 4)
    direction = rng.standard_normal(q.shape).astype(np.float32)

    def hvp(kw):
        grad = jax.grad(lambda q: jnp.sum(ja.dot_product_attention(q, k, v, **kw) ** 2))
        return jax.jvp(grad, (q,), (direction,))[1]

    np.testing.assert_allclose(hvp(PATHS["flash"]), hvp(PATHS["xla"]), atol=1e-4)


def test_vmap_over_every_array_argument(rng, path):
    q, k, v = qkv(rng, (3,), 5, 7, 2, 1, 4)
    lengths = np.array([7, 2, 4], np.int32)
    scales = np.array([0.1, 0.5, 1.0], np.float32)
    keys = jax.random.split(jax.random.key(0), 3)

    def one(q, k, v, n, scale, key):
        return ja.dot_product_attention(
            q,
            k,
            v,
            key_value_seq_lengths=n,
            scale=scale,
            is_causal=True,
            dropout_rate=0.2,
            dropout_key=key,
            **path,
        )

    # Each example unbatched (lengths a scalar): vmap adds the batch back.
    batched = jax.vmap(one)(q, k, v, lengths, scales, keys)
    for i in range(3):
        np.testing.assert_allclose(
            batched[i], one(q[i], k[i], v[i], lengths[i], scales[i], keys[i]), **TOL
        )


def test_forward_mode_is_refused_by_jax_and_the_reference_supports_it(rng, path):
    q, k, v = qkv(rng, (1,), 4, 4, 1, 1, 4)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda q: ja.dot_product_attention(q, k, v, **path), (q,), (q,))
    _, tangent = jax.jvp(lambda q: ja.reference.dot_product_attention(q, k, v), (q,), (q,))
    assert np.all(np.isfinite(tangent))


# --------------------------------------------------------------------------------------------
# Errors that name the argument


@pytest.mark.parametrize(
    "shapes, word",
    [
        (((1, 0, 2, 4), (1, 3, 2, 4)), "zero-size T"),
        (((1, 2, 2, 4), (1, 0, 2, 4)), "zero-size S"),
        (((1, 2, 0, 4), (1, 3, 0, 4)), "zero-size N"),
        (((1, 2, 2, 0), (1, 3, 2, 0)), "zero-size H"),
        (((0, 2, 2, 4), (0, 3, 2, 4)), "zero-size batch dim 0"),
    ],
)
def test_zero_size_dims_raise_a_value_error_naming_them(shapes, word):
    q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
    with pytest.raises(ValueError, match=word):
        ja.dot_product_attention(q, k, k)


@pytest.mark.parametrize(
    "name, value",
    [
        ("is_causal", "traced"),
        ("return_residual", "traced"),
        ("dropout_rate", "traced"),
        ("logits_soft_cap", "traced"),
        ("local_window_size", "traced"),
        ("implementation", "traced"),
        ("block_sizes", "traced"),
        ("is_causal", 1),
        ("local_window_size", (1, 2, 3)),
        ("local_window_size", -1),
    ],
)
def test_static_arguments_are_checked_by_name(name, value):
    q = jnp.ones((1, 4, 1, 4))

    def call(x):
        arg = x if value == "traced" else value
        if name == "block_sizes" and value == "traced":
            arg = (x, x)
        return ja.dot_product_attention(q, q, q, **{name: arg})

    with pytest.raises(ValueError, match=name):
        jax.jit(call)(jnp.int32(1))


def test_soft_cap_full_blocks_and_infinite_logits(rng):
    # No mask and no bias at T = S = 16 with 4 x 4 blocks: causal attention visits full
    # blocks (the un-masked branch of the flash forward) as well as partial ones.
    q, k, v = qkv(rng, (1,), 16, 16, 2, 2, 4)
    q = q * 4
    for kw in ({"is_causal": True}, {}):
        flash = ja.dot_product_attention(q, k, v, logits_soft_cap=2.0, **PATHS["flash"], **kw)
        ref = reference_attention(q, k, v, logits_soft_cap=2.0, **kw)[0]
        np.testing.assert_allclose(flash, ref, **TOL)
    # An unmasked logit of -inf (an Inf in the query) is capped to -cap, a finite logit, as in
    # the formula: every path returns finite values for that row.
    q2, k2 = np.zeros((1, 4, 1, 4), np.float32), -np.ones((1, 4, 1, 4), np.float32)
    q2[0, 0, 0, 0] = np.inf
    v2 = rng.standard_normal((1, 4, 1, 4)).astype(np.float32)
    for path in PATHS.values():
        out = ja.dot_product_attention(q2, k2, v2, is_causal=True, logits_soft_cap=5.0, **path)
        np.testing.assert_allclose(np.asarray(out)[0, 0], v2[0, 0], atol=1e-6)


def test_second_order_with_dropout_lengths_and_the_residual(rng):
    q, k, v = qkv(rng, (2,), 8, 8, 2, 1, 4)
    lengths = np.array([8, 5], np.int32)
    key = jax.random.key(4)

    def second(kw):
        def loss(q, k, v):
            out, lse = ja.dot_product_attention(
                q,
                k,
                v,
                key_value_seq_lengths=lengths,
                is_causal=True,
                return_residual=True,
                dropout_rate=0.25,
                dropout_key=key,
                **kw,
            )
            return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        grad = jax.grad(loss, argnums=(0, 1, 2))
        return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in grad(*a)), argnums=(0, 1, 2))

    want = second(PATHS["xla"])(q, k, v)
    got = second(PATHS["flash"])(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_padding_of_combined_masks_and_two_batch_dims_is_never_read(rng, path):
    q, k, v = qkv(rng, (2, 3), 5, 6, 1, 1, 4)
    tokens = rng.integers(1, 9, (2, 3, 6))
    tokens[0, 1, 2] = tokens[1, 2, 5] = 0  # pad tokens
    k[0, 1, 2], v[1, 2, 5] = np.nan, np.inf
    mask = ja.PaddingMask.from_tokens(kv_tokens=tokens) & ja.CausalMask()
    valid = np.asarray(mask.key_valid(6))
    np.testing.assert_array_equal(valid, tokens != 0)
    out = ja.dot_product_attention(q, k, v, mask=mask, **path)
    grads = jax.grad(
        lambda q, v: jnp.sum(ja.dot_product_attention(q, k, v, mask=mask, **path)), argnums=(0, 1)
    )(q, v)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    # "or" with a rule that pads nothing: every key may be read, there is no padding.
    assert (ja.PaddingMask(kv_lengths=np.array([[1, 2, 3]] * 2)) | ja.CausalMask()).key_valid(
        6
    ) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"query_seq_lengths": np.array([1.0, 2.0])}, "query_seq_lengths must be an int array"),
        ({"key_value_seq_lengths": np.array([1, 2, 3])}, "key_value_seq_lengths must have"),
        ({"scale": np.ones(4, np.float32)}, "scale must be a scalar"),
        ({"bias": np.ones((2, 5, 5), bool)}, "a bool mask goes in mask="),
        ({"bias": "abc"}, "bias must be an array, got the string"),
        ({"scale": [1.0]}, "scale must be a real scalar"),
        ({"scale": 1j}, "scale must be a real scalar"),
        ({"query_seq_lengths": [None, 3]}, "query_seq_lengths must be an int array"),
        ({"logits_soft_cap": 1e39}, "logits_soft_cap=1e[+]39 overflows float32"),
        ({"local_window_size": 2**40}, r"local_window_size must be in \[0, 2\*\*31\)"),
        ({"implementation": "xla", "block_sizes": (4, 4)}, "implementation='xla' has no blocks"),
    ],
)
def test_keyword_errors_name_the_argument(kwargs, message):
    q = jnp.ones((2, 5, 1, 4))
    with pytest.raises(ValueError, match=message):
        ja.dot_product_attention(q, q, q, **kwargs)


def test_lengths_as_one_int_or_a_list_and_unbatched_lengths(rng):
    q, k, v = qkv(rng, (2,), 4, 6, 1, 1, 4)
    want = reference_attention(q, k, v, mask=ja.PaddingMask(kv_lengths=3))[0]
    for lengths in (3, [3, 3], np.array([3, 3])):
        got = ja.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
        np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(ValueError, match=r"shape \[\] or \[1\] for unbatched"):
        ja.dot_product_attention(q[0], k[0], v[0], key_value_seq_lengths=np.array([3, 3]))
