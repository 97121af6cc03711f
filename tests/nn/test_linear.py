"""Linear and LayerNorm with written-out backward passes (jaxattn/nn/linear.py): Flax's
forward value for value, Flax's gradients to rounding, Flax itself where they do not apply,
and differentiable twice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.nn.linear import LayerNorm, Linear


def _same_as_flax(ours, theirs, make, names, x, params, w, tol):
    """Forward value for value and dtype, gradients (x and both parameters) within ``tol``:
    ``make(cls)`` builds the layer, ``params`` are assigned to its parameters ``names``."""

    def loss(cls, x, *values):
        layer = make(cls)
        for name, value in zip(names, values, strict=True):
            getattr(layer, name)[...] = value
        y = layer(x)
        return jnp.sum(w * y.astype(jnp.float32)), y

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, want), want_grads = jax.jit(grad, static_argnums=0)(theirs, x, *params)
    (_, got), got_grads = jax.jit(grad, static_argnums=0)(ours, x, *params)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for g, h in zip(got_grads, want_grads, strict=True):
        assert g.dtype == h.dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=tol, atol=tol
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_is_flaxs_forward_with_the_same_gradient(dtype):
    # The written-out backward: the forward must be Flax's value for value, the gradients
    # autodiff's to float32 rounding (one bfloat16 ulp where x is bfloat16).
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.standard_normal((4, 7, 16)) + 1, dtype)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    params = (jnp.asarray(rng.standard_normal(16)), jnp.asarray(rng.standard_normal(16)))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    make = lambda cls: cls(16, dtype=dtype, rngs=nnx.Rngs(0))
    _same_as_flax(LayerNorm, nnx.LayerNorm, make, ("scale", "bias"), x, params, w, tol)


def test_layer_norm_falls_back_to_flax_where_it_cannot_express_the_call():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32)
    mask = jnp.arange(8) < 5
    ours, flax_s = LayerNorm(8, rngs=nnx.Rngs(0)), nnx.LayerNorm(8, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours(x, mask=mask), flax_s(x, mask=mask))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_is_flaxs_forward_with_the_same_gradient(dtype):
    # The kernel's gradient from x transposed in the forward: the same values as Flax's
    # forward, autodiff's gradients up to the order of the sums.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 8)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
    params = (jnp.asarray(rng.standard_normal((8, 6))), jnp.asarray(rng.standard_normal(6)))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    make = lambda cls: cls(8, 6, dtype=dtype, rngs=nnx.Rngs(0))
    _same_as_flax(Linear, nnx.Linear, make, ("kernel", "bias"), x, params, w, tol)


def test_second_derivatives_are_flaxs():
    # The backward passes are written in JAX: grad of grad goes through them (a
    # Hessian-vector product of a Linear + LayerNorm stack).
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)

    def loss(linear, norm, x):
        layer, ln = linear(8, 8, rngs=nnx.Rngs(0)), norm(8, rngs=nnx.Rngs(1))
        return jnp.sum(jnp.tanh(ln(layer(x))) ** 2)

    def hvp(linear, norm):
        g = jax.grad(lambda x: loss(linear, norm, x))
        return jax.grad(lambda x: jnp.vdot(g(x), v))(x)

    np.testing.assert_allclose(hvp(Linear, LayerNorm), hvp(nnx.Linear, nnx.LayerNorm), atol=1e-5)
