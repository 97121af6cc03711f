"""JAX's own ``dot_product_attention`` tests, run against ``jaxattn.dot_product_attention``.

Source: ``tests/nn_test.py`` of JAX 0.10.2 (tag ``jax-v0.10.2``, commit
990e6a0b84138346e6a38785412f36356e0e5dc3), class ``NNFunctionsTest``: every test there that
calls ``nn.dot_product_attention``:

- ``testDotProductAttention`` (dtype x GQA group x vmap x implementation: output, residual and
  their gradients),
- ``testDotProductAttentionMask`` (bias, causal, padding, custom mask, sliding window and
  their combinations: output and gradients, the bias's included),
- ``testDotProductAttentionFloat64MaskDebugInfs`` (float64 under ``jax.debug_infs``),
- ``testDotProductAttentionBiasGradient`` (batch x vmap: the bias gradient),
- ``testDotProductAttention_localWindowSizeWithoutMask``.

What was swapped: the function under test (JAX's ``sdpa_ans`` / ``attn_ans``) is ours, on each
of our paths: ``implementation="xla"``, ``"flash"`` (with small ``block_sizes``, so that the
blockwise loops run over several blocks at these shapes) and ``None`` (which at JAX's
T = S = 128 takes the flash path with its default blocks). The reference (JAX's ``sdpa_ref``,
``jax.nn.dot_product_attention(implementation=None)``) is
``jax.nn.dot_product_attention(implementation="xla")``, which is what ``None`` resolves to
without a GPU. JAX's ``implementation="cudnn"`` parameterisations need an NVIDIA GPU: they are
kept and skipped off GPU (the cuDNN HLO checks, ``_check_cudnn_backend``, are left out: they
test JAX's dispatch, not the values). Where JAX's test picks cuDNN on a CUDA device and
``"xla"`` elsewhere (``use_cudnn = jtu.is_device_cuda()``), the non-CUDA branch is ported.

Shapes, parameterisations, PRNG keys and tolerances are JAX's (no shape was shrunk: compile
time, not the T = S = 128 shapes, is what costs here). ``jtu.assertAllClose`` is re-created in
:func:`assert_all_close` (dtype check, JAX's default tolerance per dtype). As in JAX's tests,
``testDotProductAttentionBiasGradient`` is jitted and the others run eagerly (jax.nn's float16
path cannot be jitted on CPU: its einsum asks for the ``F16_F16_F32`` dot algorithm, which
XLA:CPU refuses, and jax.nn's fallback only catches that eagerly); a reference shared by
several of our paths is computed once.

Runtime: each parameterisation compiles our kernel anew (several seconds for the flash path's
forward and backward on a 2-core CPU), so JAX's whole product (78 runs here, 12 more cuDNN
ones skipped) takes minutes (348 s measured with the 2 cores shared). By default a covering
subset runs (23 tests: every test on every path, every value of every parameter on some path,
every mask mode on the xla path, dense and structured masks with lengths on the flash path);
the others are collected and skipped. ``JAXATTN_JAX_SUITE=full`` runs all of them.

Changed assertions, each with a comment at the assertion. The numbers are the documented
differences from jax.nn (README, "Switching from jax.nn"; the docstring of
:func:`jaxattn.dot_product_attention`): 1 a row with no key gives 0 (jax.nn: the mean of V);
2 causal and windows align bottom-right when T != S; 3 the residual is float32, -inf on
empty rows and differentiable; 4 q, k, v share one dtype and masks are bool.

1. ``testDotProductAttention``, the residual (log-sum-exp) values: ours is float32, jax.nn
   casts it to the input dtype (difference 3). Ours is cast to the input dtype, as jax.nn
   does, before the comparison (JAX's tolerance).
2. ``testDotProductAttention``, the gradients with ``return_residual=True``: jax.nn stops the
   residual's gradient, ours differentiates it (difference 3). The residual's cotangent is
   passed in float32 (our residual's dtype), and the reference gradients are those of
   jax.nn's output plus those of JAX's own log-sum-exp formula (``_dot_product_attention_core``:
   ``logsumexp`` of the float32 scaled logits, B N T -> B T N) without its ``stop_gradient``
   (JAX's tolerances).

No other assertion is changed: the only query rows here that see no key are the padded
ones of ``query_seq_lengths``, where both give 0 (difference 1 does not arise), T == S
everywhere (difference 2), and the inputs already share one dtype, with bool masks
(difference 4).
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import random

import jaxattn

FULL = os.environ.get("JAXATTN_JAX_SUITE") == "full"

# Our paths. JAX's "cudnn" parameterisations need an NVIDIA GPU (none on the CPU machines
# this suite runs on): kept, and skipped off GPU.
IMPLS = ("xla", "flash", None)
ON_GPU = jax.default_backend() == "gpu"

# Flash blocks: T = S = 128 in JAX's tests, so (16, 16) walks 8 x 8 blocks.
BLOCKS = (16, 16)


def jax_product(quick, **axes):
    """JAX's ``parameterized.product`` as pytest params: every combination of ``axes``, the
    ``quick`` ones run by default, the rest only with ``JAXATTN_JAX_SUITE=full``; "cudnn"
    only on a GPU, and there always (a GPU run is rare: it must not skip what only it can
    check; on an H200 the quick subset alone left every cuDNN case out)."""
    params = []
    for combo in itertools.product(*axes.values()):
        marks = []
        if "cudnn" in combo and not ON_GPU:
            marks.append(pytest.mark.skip(reason="implementation='cudnn' needs an NVIDIA GPU"))
        elif not FULL and combo not in quick and "cudnn" not in combo:
            marks.append(
                pytest.mark.skip(reason="outside the quick subset: JAXATTN_JAX_SUITE=full")
            )
        params.append(pytest.param(*combo, marks=marks, id="-".join(map(_name, combo))))
    return pytest.mark.parametrize(",".join(axes), params)


def _name(x):
    if isinstance(x, tuple):
        return "+".join(x)
    return getattr(x, "__name__", str(x))


# jtu's default tolerances (jax._src.public_test_util._default_tolerance), where JAX's test
# passes none.
_DEFAULT_TOL = {
    np.dtype(jnp.bfloat16): 1e-2,
    np.dtype(np.float16): 1e-3,
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float64): 1e-15,
}


def assert_all_close(actual, desired, *, atol=None, rtol=None):
    """``jtu.JaxTestCase.assertAllClose``: trees of arrays (or None), equal dtypes (float64
    is float32 without x64), equal shapes, then ``np.testing.assert_allclose`` with ``atol``
    and ``rtol`` defaulting to the larger of the two dtypes' tolerances."""
    if actual is None or desired is None:
        assert actual is None and desired is None, (actual, desired)
        return
    if isinstance(actual, (tuple, list)):
        assert isinstance(desired, (tuple, list)) and len(actual) == len(desired)
        for a, d in zip(actual, desired, strict=True):
            assert_all_close(a, d, atol=atol, rtol=rtol)
        return
    a, d = np.asarray(actual), np.asarray(desired)
    canon = jax.dtypes.canonicalize_dtype
    assert canon(a.dtype) == canon(d.dtype), (a.dtype, d.dtype)
    assert a.shape == d.shape, (a.shape, d.shape)
    atol = max(_DEFAULT_TOL[a.dtype], _DEFAULT_TOL[d.dtype]) if atol is None else atol
    rtol = max(_DEFAULT_TOL[a.dtype], _DEFAULT_TOL[d.dtype]) if rtol is None else rtol
    a = a.astype(np.float32) if a.dtype == jnp.bfloat16 else a
    d = d.astype(np.float32) if d.dtype == jnp.bfloat16 else d
    np.testing.assert_allclose(a, d, atol=atol, rtol=rtol)


def ours(impl, blocks=BLOCKS):
    """``jaxattn.dot_product_attention`` on one path (small blocks on the flash path)."""
    kw = {"block_sizes": blocks} if impl == "flash" else {}
    return functools.partial(jaxattn.dot_product_attention, implementation=impl, **kw)


sdpa_ref = functools.partial(jax.nn.dot_product_attention, implementation="xla")


# --------------------------------------------------------------------------------------------
# testDotProductAttention


def _lse_formula(q, k):
    """JAX's residual (``_dot_product_attention_core``): ``logsumexp`` of the float32 scaled
    logits, B N T -> B T N; here without its ``stop_gradient``."""
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / np.sqrt(q.shape[-1]))
    return jnp.swapaxes(jax.nn.logsumexp(logits, axis=-1), 1, 2)


def _sdpa_inputs(dtype, group_num):
    B, S, T, N, H, G = 2, 128, 128, 4, 32, group_num
    keys = random.split(random.PRNGKey(0), 5)
    Q = random.normal(keys[0], (B, T, N, H), dtype)
    K = random.normal(keys[1], (B, S, N // G, H), dtype)
    V = random.normal(keys[2], (B, S, N // G, H), dtype)
    grad = random.normal(keys[3], (B, T, N, H), dtype)
    lse_grad = random.normal(keys[4], (B, T, N), dtype)
    return Q, K, V, grad, lse_grad


@functools.cache
def _sdpa_reference(dtype, group_num):
    """The reference half of testDotProductAttention (independent of impl and vmap)."""
    Q, K, V, grad, lse_grad = _sdpa_inputs(dtype, group_num)
    B, S, _, H = K.shape
    N, G = Q.shape[2], group_num
    bias, mask = None, None
    sdpa_ref_lse = functools.partial(sdpa_ref, return_residual=True)

    # For testing purposes, we call the non-GQA version without vmap in the
    # reference code (JAX's comment).
    K_ref = jnp.repeat(K, G, axis=2)
    V_ref = jnp.repeat(V, G, axis=2)
    out_ref, sdpa_vjp_ref = jax.vjp(sdpa_ref, Q, K_ref, V_ref, bias, mask)
    out_ref_lse = sdpa_ref_lse(Q, K_ref, V_ref, bias, mask)

    dQ_ref, dK_ref, dV_ref = sdpa_vjp_ref(grad)[:3]
    dK_ref = dK_ref.reshape(B, S, N // G, G, H).sum(axis=3)
    dV_ref = dV_ref.reshape(B, S, N // G, G, H).sum(axis=3)

    # Changed assertion 2 (difference 3): the reference gradient of our differentiable
    # residual is that of jax.nn's output with JAX's log-sum-exp formula.
    def sdpa_ref_lse_grad(q, k, v):
        return sdpa_ref(q, k, v), _lse_formula(q, k)

    _, sdpa_vjp_ref_lse = jax.vjp(sdpa_ref_lse_grad, Q, K_ref, V_ref)
    dQ_ref_lse, dK_ref_lse, dV_ref_lse = sdpa_vjp_ref_lse((grad, lse_grad.astype(jnp.float32)))
    dK_ref_lse = dK_ref_lse.reshape(B, S, N // G, G, H).sum(axis=3)
    dV_ref_lse = dV_ref_lse.reshape(B, S, N // G, G, H).sum(axis=3)
    return (out_ref, dQ_ref, dK_ref, dV_ref), (out_ref_lse, dQ_ref_lse, dK_ref_lse, dV_ref_lse)


# Quick subset: each path, both dtypes, every group size, with and without vmap.
_SDPA_QUICK = {
    (jnp.bfloat16, 1, False, "xla"),
    (jnp.bfloat16, 2, True, "flash"),
    (jnp.float16, 4, False, None),
}


@jax_product(
    _SDPA_QUICK,
    dtype=[jnp.bfloat16, jnp.float16],
    group_num=[1, 2, 4],
    use_vmap=[False, True],
    impl=["cudnn", *IMPLS],
)
def test_dot_product_attention(dtype, group_num, use_vmap, impl):
    Q, K, V, grad, lse_grad = _sdpa_inputs(dtype, group_num)
    bias, mask = None, None

    sdpa_ans = ours(impl)
    sdpa_ans_lse = functools.partial(sdpa_ans, return_residual=True)
    if use_vmap:
        sdpa_ans = jax.vmap(sdpa_ans, in_axes=(0, 0, 0, None, None), out_axes=0)

    out_ans, sdpa_vjp_ans = jax.vjp(sdpa_ans, Q, K, V, bias, mask)
    out_ans_lse, sdpa_vjp_ans_lse = jax.vjp(sdpa_ans_lse, Q, K, V, bias, mask)
    dQ_ans, dK_ans, dV_ans = sdpa_vjp_ans(grad)[:3]
    # Difference 3: our residual is float32, and so is its cotangent.
    lse_ct = lse_grad.astype(jnp.float32)
    dQ_ans_lse, dK_ans_lse, dV_ans_lse = sdpa_vjp_ans_lse((grad, lse_ct))[:3]

    (out_ref, dQ_ref, dK_ref, dV_ref), lse_ref = _sdpa_reference(dtype, group_num)
    out_ref_lse, dQ_ref_lse, dK_ref_lse, dV_ref_lse = lse_ref

    assert_all_close(out_ref, out_ans, atol=0.01, rtol=0.01)
    assert_all_close(dQ_ref, dQ_ans, rtol=0.01, atol=0.01)
    assert_all_close(dK_ref, dK_ans, rtol=0.01, atol=0.01)
    assert_all_close(dV_ref, dV_ans, rtol=0.01, atol=0.01)

    assert_all_close(out_ref_lse[0], out_ans_lse[0], atol=0.01, rtol=0.01)
    # Changed assertion 1 (difference 3): our residual is float32, jax.nn casts its residual
    # to the input dtype; ours is cast the same way before the comparison.
    assert out_ans_lse[1].dtype == jnp.float32
    assert_all_close(out_ref_lse[1], out_ans_lse[1].astype(dtype), atol=0.01, rtol=0.01)
    # Changed assertion 2 (difference 3): jax.nn stops the residual's gradient, ours
    # differentiates it; the reference adds the gradient of JAX's log-sum-exp formula.
    assert_all_close(dQ_ref_lse, dQ_ans_lse, rtol=0.01, atol=0.01)
    assert_all_close(dK_ref_lse, dK_ans_lse, rtol=0.01, atol=0.01)
    assert_all_close(dV_ref_lse, dV_ans_lse, rtol=0.01, atol=0.01)


# --------------------------------------------------------------------------------------------
# testDotProductAttentionMask


def _mask_case(sdpa, mask_mode):
    """JAX's testDotProductAttentionMask up to its assertions, with ``sdpa`` (``is_causal``,
    lengths and window passed as keywords); returns ``out, (dQ, dK, dV, dbias)``."""
    dtype = jnp.bfloat16
    B, S, T, N, H = 2, 128, 128, 4, 32
    keys = random.split(random.PRNGKey(0), 4)
    Q = random.normal(keys[0], (B, T, N, H), dtype)
    K = random.normal(keys[1], (B, S, N, H), dtype)
    V = random.normal(keys[2], (B, S, N, H), dtype)
    grad = random.normal(keys[3], (B, T, N, H), dtype)
    bias, mask = None, None
    q_seqlen, kv_seqlen = None, None
    window_size = None

    is_causal = "causal" in mask_mode
    if "padding" in mask_mode:
        q_seqlen = jnp.array([T // 2, T // 4], dtype=jnp.int32)
        kv_seqlen = jnp.array([S // 4, S // 2], dtype=jnp.int32)
    if "custom" in mask_mode:
        # Use a generated causal mask as the custom mask.
        custom_mask = jnp.tril(jnp.ones((T, S), dtype=jnp.bool_))
        mask = custom_mask[None, None, :, :]
    if "bias" in mask_mode:
        # JAX's test reads keys[4] of these 4 keys, which JAX's indexing clamps to keys[3].
        bias = random.normal(keys[3], (1, N, T, S), dtype)
    if "sliding_window" in mask_mode:
        window_size = (3, 2) if is_causal else (3, 0)

    args = (Q, K, V, bias, mask)

    # Convert the kwargs to positional args for the jax.vjp.
    def fn(q, k, v, b, m, qs, kvs):
        return sdpa(
            q,
            k,
            v,
            b,
            m,
            is_causal=is_causal,
            query_seq_lengths=qs,
            key_value_seq_lengths=kvs,
            local_window_size=window_size,
        )

    out, sdpa_vjp = jax.vjp(fn, *args, q_seqlen, kv_seqlen)
    return out, sdpa_vjp(grad)[:4]


MASK_MODES = [
    "bias",
    "causal",
    "padding",
    "custom",
    ("causal", "padding"),
    ("custom", "padding"),
    ("bias", "causal"),
    ("causal", "sliding_window"),
]
# Quick subset: every mode on the xla path; structured and dense masks with lengths on the
# flash path, bias with causal on None.
_MASK_QUICK = {(mode, "xla") for mode in MASK_MODES} | {
    (("causal", "padding"), "flash"),
    (("custom", "padding"), "flash"),
    (("bias", "causal"), None),
}


@jax_product(_MASK_QUICK, mask_mode=MASK_MODES, impl=IMPLS)
def test_dot_product_attention_mask(mask_mode, impl):
    # JAX's test runs cuDNN on a CUDA device and "xla" elsewhere: the latter is ported.
    if isinstance(mask_mode, str):
        mask_mode = (mask_mode,)
    out_ref, (dQ_ref, dK_ref, dV_ref, dbias_ref) = _mask_reference(mask_mode)
    out_ans, (dQ_ans, dK_ans, dV_ans, dbias_ans) = _mask_case(ours(impl), mask_mode)

    assert_all_close(out_ref, out_ans, atol=0.01, rtol=0.01)
    assert_all_close(dQ_ref, dQ_ans, rtol=0.02, atol=0.02)
    assert_all_close(dK_ref, dK_ans, rtol=0.02, atol=0.02)
    assert_all_close(dV_ref, dV_ans, rtol=0.01, atol=0.01)
    assert_all_close(dbias_ref, dbias_ans, rtol=0.02, atol=0.02)


@functools.cache
def _mask_reference(mask_mode):
    return _mask_case(sdpa_ref, mask_mode)


# --------------------------------------------------------------------------------------------
# testDotProductAttentionFloat64MaskDebugInfs


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_dot_product_attention_float64_mask_debug_infs(impl):
    # Regression test for https://github.com/jax-ml/jax/issues/37422
    # Flash blocks (2, 2): T = 5 and S = 7 walk 3 x 4 blocks.
    sdpa = ours(impl, blocks=(2, 2))
    with jax.enable_x64(True):
        T, S, K, N, H = 5, 7, 3, 6, 11
        mask = jnp.arange(S) <= S // 2
        with warnings.catch_warnings():  # self.assertNoWarnings()
            warnings.simplefilter("error")
            with jax.debug_infs(True):
                out = sdpa(
                    jnp.zeros((T, N, H), dtype=jnp.float64),
                    jnp.zeros((S, K, H), dtype=jnp.float64),
                    jnp.zeros((S, K, H), dtype=jnp.float64),
                    mask=mask,
                )
                out.block_until_ready()


# --------------------------------------------------------------------------------------------
# testDotProductAttentionBiasGradient


def _bias_grad_case(sdpa, batch_size, use_vmap):
    """JAX's testDotProductAttentionBiasGradient up to its assertions, with ``sdpa``;
    returns ``y, dbias``."""
    dtype = jnp.bfloat16
    B, S, N, H = batch_size, 128, 4, 32
    keys = random.split(random.PRNGKey(0), 2)
    x = random.normal(keys[0], (B, S, N, H), dtype)
    bias = random.normal(keys[1], (B, N, S, S), dtype=dtype)
    mask = jnp.ones((1, 1, S), dtype=jnp.bool_)

    def attention(x, bias, mask):
        return sdpa(query=x, key=x, value=x, bias=bias, mask=mask, is_causal=False)

    attn_batched = jax.vmap(attention, in_axes=(0, 0, None)) if use_vmap else attention
    y = jax.jit(attn_batched)(x, bias, mask)

    @jax.jit
    def bwd(x, bias, mask):
        _, f_vjp = jax.vjp(attention, x, bias, mask)
        return f_vjp(x)

    _, dbias, _ = bwd(x, bias, mask)
    return y, dbias


@functools.cache
def _bias_grad_reference(batch_size, use_vmap):
    return _bias_grad_case(sdpa_ref, batch_size, use_vmap)


# Quick subset: each path, both batch sizes, with and without vmap.
_BIAS_QUICK = {(16, True, "xla"), (1, False, "flash"), (1, True, None)}


@jax_product(_BIAS_QUICK, batch_size=[1, 16], use_vmap=[False, True], impl=IMPLS)
def test_dot_product_attention_bias_gradient(batch_size, use_vmap, impl):
    # JAX's test runs cuDNN on a CUDA device and "xla" elsewhere: the latter is ported.
    y_ref, dbias_ref = _bias_grad_reference(batch_size, use_vmap)
    y_ans, dbias_ans = _bias_grad_case(ours(impl), batch_size, use_vmap)
    assert_all_close(y_ref, y_ans)
    assert_all_close(dbias_ans, dbias_ref, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------------------------
# testDotProductAttention_localWindowSizeWithoutMask


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_dot_product_attention_local_window_size_without_mask(impl):
    dtype = jnp.float32
    B, S, T, N, H = 2, 128, 128, 4, 32
    keys = random.split(random.PRNGKey(0), 3)
    Q = random.normal(keys[0], (B, T, N, H), dtype)
    K = random.normal(keys[1], (B, S, N, H), dtype)
    V = random.normal(keys[2], (B, S, N, H), dtype)
    sdpa = ours(impl)

    output_large_window = sdpa(Q, K, V, mask=None, local_window_size=(32, 32))
    output_small_window = sdpa(Q, K, V, mask=None, local_window_size=(1, 1))

    assert not jnp.allclose(output_large_window, output_small_window), (
        "Attention output should differ with different local_window_size, even without a mask."
    )
