"""``Linear`` and ``LayerNorm`` as Flax NNX's (same parameters, same forward values), with
their backward passes written out for XLA:CPU: the model's step spent a quarter of its time
in what autodiff made of these two (a transposing copy and a generic dot for every weight
gradient; LayerNorm's variance differentiated pass by pass). Measured on the default run
(2-core Intel Xeon): 70.6 -> 87.2 steps/s. Any call they do not cover goes to Flax's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

__all__ = ["LayerNorm", "Linear", "dense", "layer_norm"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
    """``nnx.LayerNorm``'s forward over the last axis, value for value, with its backward
    written out instead of autodiff'd.

    In float32 (at least): ``mean = E[x]``, ``var = max(E[x^2] - mean^2, 0)`` (Flax's fast
    variance), ``y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias``, returned in the
    dtype of ``x``, ``scale`` and ``bias`` promoted together, as Flax returns it.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(jax.lax.square(xf), axis=-1, keepdims=True) - mean * mean)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (inv * _row(scale, x.ndim)) + _row(bias, x.ndim)
    out = y.astype(jnp.result_type(x, scale, bias))
    # The residuals: the normalised input, 1 / std, and the parameters (for their dtypes);
    # ``x[..., :0]``, empty, only carries x's dtype to the backward.
    return out, ((xf - mean) * inv, inv, scale, bias, x[..., :0])


def _layer_norm_bwd(epsilon, residuals, d_out):
    # The gradient of (x - mean) / sqrt(var + eps) written out: with xhat the normalised
    # input and g = d_out * scale, dx = inv * (g - mean(g) - xhat * mean(g * xhat)), from
    # the saved xhat and inv (autodiff of Flax's forward differentiates E[x^2] - mean^2 and
    # the rsqrt pass by pass). Measured on the default run (2-core CPU): 19 fewer kernels a
    # step and about 4% more steps/s. The same gradient whenever var > 0, to float32
    # rounding; a constant row (var clipped to 0) drops the xhat term, ~0 there anyway.
    xhat, inv, scale, bias, x_like = residuals
    d_out = d_out.astype(xhat.dtype)
    g = d_out * _row(scale, d_out.ndim)
    dx = inv * (
        g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    )
    lead = tuple(range(d_out.ndim - 1))
    d_scale = jnp.sum(d_out * xhat, axis=lead).astype(scale.dtype)
    d_bias = jnp.sum(d_out, axis=lead).astype(bias.dtype)
    return dx.astype(x_like.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _row(p, ndim: int):
    """A ``[D]`` parameter as ``[1, ..., 1, D]``, to broadcast over ``ndim``-dim rows."""
    return p.reshape((1,) * (ndim - 1) + p.shape)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, same forward values) computed by
    :func:`layer_norm`, whose backward is written out. Calls it cannot express (a mask,
    other axes, no scale or bias, the slow variance, an axis name) go to Flax's."""

    def __call__(self, x, *, mask=None):
        plain = (
            mask is None
            and self.scale is not None
            and self.bias is not None
            and self.use_fast_variance
            and self.axis_name is None
            and _canonical_axes(x.ndim, self.reduction_axes) == (x.ndim - 1,)
            and _canonical_axes(x.ndim, self.feature_axes) == (x.ndim - 1,)
            and not jnp.iscomplexobj(x)
        )
        if not plain:
            return super().__call__(x, mask=mask)
        # Flax 0.12.0 has no promote_dtype attribute on LayerNorm: its function then.
        promote = getattr(self, "promote_dtype", dtypes.promote_dtype)
        x, scale, bias = promote((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return layer_norm(x, scale, bias, self.epsilon)


def _canonical_axes(ndim: int, axes) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


@jax.custom_vjp
def dense(x, kernel):
    """``x [..., D] @ kernel [D, F] -> [..., F]``, the ``lax.dot_general`` of ``nnx.Linear``
    (the same values), with the kernel's gradient ``x^T @ dy`` computed from ``x``
    transposed in the forward pass: ``x^T [D, rows]`` is the residual instead of ``x``.

    Autodiff's ``dot_general(x, dy)`` contracts both operands over their leading (rows)
    axis, a layout XLA:CPU's fast matmul does not take: it transposed ``dy`` and ran a
    generic dot for every weight gradient (measured on the default run, 2-core CPU: 12%
    more steps/s with the transpose moved here, where it is a plain ``[D, rows]`` copy).
    The same products and sums, in another order: float rounding apart, the same gradient.
    """
    return _dense(x, kernel)


def _dense(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
    return _dense(x, kernel), (x.reshape(-1, x.shape[-1]).T, kernel)


def _dense_bwd(residuals, dy):
    x_t, kernel = residuals
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    d_kernel = x_t @ dy.reshape(-1, dy.shape[-1])
    return dx, d_kernel


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters, same forward values) through :func:`dense`. Calls
    it does not cover (an output sharding, a precision, a preferred element type, a custom
    ``dot_general``, or a device mesh in context, where the partitioner places Flax's
    gradients itself) go to Flax's."""

    def __call__(self, inputs, out_sharding=None):
        plain = (
            out_sharding is None
            and self.precision is None
            and self.preferred_element_type is None
            and self.dot_general is jax.lax.dot_general
            and jax.sharding.get_abstract_mesh().empty
        )
        if not plain:
            if out_sharding is None:  # Flax 0.12.0 takes no out_sharding
                return super().__call__(inputs)
            return super().__call__(inputs, out_sharding=out_sharding)
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], bias), dtype=self.dtype
        )
        y = dense(inputs, kernel)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y
