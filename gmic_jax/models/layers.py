"""Building blocks shared by the global and local networks.

Precision policy in one place: convolutions and dense layers run in the compute dtype
(float32 or bfloat16) with float32 parameters; BatchNorm normalises in float32. Max-pooling
(fast_ops.max_pool) keeps its input dtype: a maximum is exact in any dtype, so casting before it
would only cost memory.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gmic_jax.models.fast_ops import strided_conv

Dtype = Any

# PyTorch BatchNorm: eps 1e-5, momentum 0.1 (new = 0.9 * old + 0.1 * batch); flax's momentum is
# the decay of the running average, so 0.9 here.
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


class StridedConv(nn.Module):
    """Bias-free strided conv whose input gradient is computed by output phases
    (fast_ops.strided_conv); parameters as nn.Conv's ({'kernel': HWIO})."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        return strided_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *, dtype: Dtype, name: str):
    """A bias-free conv with explicit symmetric padding (PyTorch's `padding=p`), never 'SAME'."""
    if stride > 1:
        return StridedConv(features, kernel, stride, padding, dtype, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def batch_norm(x, train: bool, *, name: str, axis_name: str | None = None):
    """BatchNorm in float32 whatever the compute dtype, with PyTorch's eps and momentum.

    Call inside a compact module. ``axis_name`` (training only) synchronises the batch
    statistics over that mapped axis.

    The batch variance is the mean of squared deviations from the batch mean, as PyTorch computes
    it, not E[x^2] - E[x]^2: GMIC's channels often have a mean far larger than their spread (deep
    features of similar crops), where the one-pass formula cancels away most of float32's digits,
    and the training step then changes with the rounding of the sums (a 1-device and a 4-device
    step on the same batch differed by 0.14 in a loss of 2.5 and by 88% in the update; with this
    formula, by float32 rounding).
    """
    return BatchNorm(axis_name=axis_name, name=name)(x, train)


class BatchNorm(nn.Module):
    """flax's ``nn.BatchNorm`` variables (params ``scale``, ``bias``; batch_stats ``mean``, ``var``)
    and arithmetic, with the training-mode gradient in closed form (:func:`_batch_norm_train`).

    Inference computes ``(x - mean) * (rsqrt(var + eps) * scale) + bias`` from the running
    statistics, op for op as flax does; training normalises by the batch statistics and updates
    the running ones (biased variance, momentum ``BN_MOMENTUM``), as flax does."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if not train:
            x = x.astype(jnp.float32)
            return (x - ra_mean.value) * (lax.rsqrt(ra_var.value + BN_EPS) * scale) + bias
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = _batch_norm_train(x, scale, bias, axis_name)
        if not self.is_initializing():
            ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
            ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var
        return y


def _maybe_pmean(x, axis_name):
    return x if axis_name is None else lax.pmean(x, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, axis_name):
    """Training-mode BatchNorm over every axis but the last: ``(y, mean, var)`` in float32; the
    backward pass keeps ``x`` in its own dtype (bfloat16 activations stay bfloat16).

    The forward is flax's two-pass arithmetic. The gradient is the closed form
    ``dx = scale / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` (means over the batch, and
    over ``axis_name`` when synchronised; ``dscale``, ``dbias`` are this device's sums, as autodiff
    gives them), where autodiff through the two passes stores and rereads more: on the H100 target
    the training step's kernels move fewer bytes (benchmarks/RESULTS.md, "Where the bound could drop").
    ``mean`` and ``var`` feed only the running statistics: their cotangents are ignored.
    """
    return _batch_norm_train_fwd(x, scale, bias, axis_name)[0]


def _batch_norm_train_fwd(x_in, scale, bias, axis_name):
    x = x_in.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = _maybe_pmean(jnp.mean(x, axes), axis_name)
    var = _maybe_pmean(jnp.mean(jnp.square(x - mean), axes), axis_name)
    inv_sigma = lax.rsqrt(var + BN_EPS)
    y = (x - mean) * (inv_sigma * scale) + bias
    return (y, mean, var), (x_in, mean, inv_sigma, scale)


def _batch_norm_train_bwd(axis_name, residuals, cotangents):
    x_in, mean, inv_sigma, scale = residuals
    x, dy = x_in.astype(jnp.float32), cotangents[0]
    axes = tuple(range(x.ndim - 1))
    x_hat = (x - mean) * inv_sigma
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * x_hat, axes)
    count = x.size // x.shape[-1]
    mean_dy, mean_dy_x_hat = _maybe_pmean(jnp.stack([dbias, dscale]) / count, axis_name)
    dx = (scale * inv_sigma) * (dy - mean_dy - x_hat * mean_dy_x_hat)
    return dx.astype(x_in.dtype), dscale, dbias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def spatial_mean(x):
    """Mean over H and W, NHWC -> NC, accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def spatial_max(x):
    """Max over H and W, NHWC -> NC, in float32."""
    return jnp.max(x.astype(jnp.float32), axis=(1, 2))


def compute_dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
