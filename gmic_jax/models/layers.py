"""Building blocks shared by the global and local networks.

Precision policy in one place: convolutions and dense layers run in the compute dtype
(float32 or bfloat16) with float32 parameters; BatchNorm normalises in float32. Max-pooling
(fast_ops.max_pool) keeps its input dtype: a maximum is exact in any dtype, so casting before it
would only cost memory.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

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
    it, not E[x^2] - E[x]^2 (flax's default): GMIC's channels often have a mean far larger than
    their spread (deep features of similar crops), where the one-pass formula cancels away most
    of float32's digits, and the training step then changes with the rounding of the sums (a
    1-device and a 4-device step on the same batch differed by 0.14 in a loss of 2.5 and by 88%
    in the update; with this formula, by float32 rounding).
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPS,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        axis_name=axis_name if train else None,
        use_fast_variance=False,
        name=name,
    )(x.astype(jnp.float32))


def spatial_mean(x):
    """Mean over H and W, NHWC -> NC, accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def spatial_max(x):
    """Max over H and W, NHWC -> NC, in float32."""
    return jnp.max(x.astype(jnp.float32), axis=(1, 2))


def compute_dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
