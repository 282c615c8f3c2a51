"""Local network f_l: torchvision-layout (post-activation) ResNets encoding each patch to h_k.

ResNet-18 is weight-compatible with the original (`dn_resnet.*`); ResNet-34 and ResNet-50
(bottleneck, 2048 features) are the paper's alternatives. The 1-channel patch is repeated to
3 channels in the original; here the stem sums its kernel over the three input channels instead,
which is the same linear map at a third of the cost.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmic_jax.models.fast_ops import max_pool
from gmic_jax.models.layers import batch_norm, conv, spatial_mean
from gmic_jax.models.remat import checkpointed, remat_spec


class BasicBlock(nn.Module):
    features: int
    stride: int
    project: bool
    dtype: Any
    bn_axis_name: str | None = None
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(batch_norm, train=train, axis_name=self.bn_axis_name)
        o = conv(self.features, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
        o = jax.nn.relu(bn(o, name="bn1")).astype(self.dtype)
        o = conv(self.features, 3, 1, 1, dtype=self.dtype, name="conv2")(o)
        o = bn(o, name="bn2")
        res = x
        if self.project:
            res = conv(self.features, 1, self.stride, 0, dtype=self.dtype, name="downsample_0")(x)
            res = bn(res, name="downsample_1")
        return jax.nn.relu(o + res.astype(jnp.float32)).astype(self.dtype)


class Bottleneck(nn.Module):
    """torchvision's bottleneck (stride on the 3x3 conv), expansion 4."""

    features: int
    stride: int
    project: bool
    dtype: Any
    bn_axis_name: str | None = None
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        bn = functools.partial(batch_norm, train=train, axis_name=self.bn_axis_name)
        o = conv(self.features, 1, 1, 0, dtype=self.dtype, name="conv1")(x)
        o = jax.nn.relu(bn(o, name="bn1")).astype(self.dtype)
        o = conv(self.features, 3, self.stride, 1, dtype=self.dtype, name="conv2")(o)
        o = jax.nn.relu(bn(o, name="bn2")).astype(self.dtype)
        o = conv(self.features * 4, 1, 1, 0, dtype=self.dtype, name="conv3")(o)
        o = bn(o, name="bn3")
        res = x
        if self.project:
            res = conv(self.features * 4, 1, self.stride, 0, dtype=self.dtype, name="downsample_0")(x)
            res = bn(res, name="downsample_1")
        return jax.nn.relu(o + res.astype(jnp.float32)).astype(self.dtype)


class ResNetV1(nn.Module):
    """Patches (M, h, w, 1) -> h_k (M, L), float32, L = 512 * block expansion.

    remat: a GMICConfig.remat policy (gmic_jax.models.remat): recompute the stem and/or the
    blocks in the backward pass."""

    stage_sizes: Sequence[int]
    block_cls: Any
    dtype: Any = jnp.float32
    width: int = 64
    bn_axis_name: str | None = None
    remat: bool | str = False

    @nn.compact
    def __call__(self, x, train: bool):
        spec = remat_spec(self.remat)

        def stem(mdl, x):
            x = RepeatedChannelStem(self.width, self.dtype, name="conv1")(x)
            x = jax.nn.relu(batch_norm(x, train, name="bn1", axis_name=self.bn_axis_name)).astype(self.dtype)
            return max_pool(x, 3, 2, 1)

        x = (checkpointed(stem, spec) if spec.local_stem else stem)(self, x)
        block_cls = checkpointed(self.block_cls, spec, static_argnums=(2,)) if spec.local_blocks else self.block_cls
        in_features = self.width
        for i, n_blocks in enumerate(self.stage_sizes):
            features = self.width * 2**i
            for b in range(n_blocks):
                stride = (1 if i == 0 else 2) if b == 0 else 1
                project = b == 0 and (stride != 1 or in_features != features * self.block_cls.expansion)
                x = block_cls(features, stride, project, self.dtype, self.bn_axis_name, name=f"layer{i + 1}_{b}")(
                    x, train
                )
                in_features = features * self.block_cls.expansion
        return spatial_mean(x)


class RepeatedChannelStem(nn.Module):
    """7x7/2 conv (pad 3) of a 1-channel patch repeated to 3 channels, as the original does.

    The kernel keeps the original's (7, 7, 3, width) shape; the patch is convolved once with the
    kernel summed over its three input channels, which is the same linear map.
    """

    width: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.kaiming_normal(), (7, 7, 3, self.width), jnp.float32)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            jnp.sum(kernel, axis=2, keepdims=True).astype(self.dtype),
            (2, 2),
            ((3, 3), (3, 3)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


ResNet18 = functools.partial(ResNetV1, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNetV1, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNetV1, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# ResNet-18 at a quarter of the width (16/32/64/128 channels, 1/16 of the FLOPs): the local
# network of the CPU-sized synthetic configs, whose crops are a few dozen pixels.
ResNet18Narrow = functools.partial(ResNet18, width=16)

LOCAL_NETWORKS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50, "resnet18_narrow": ResNet18Narrow}


def local_feature_width(name: str) -> int:
    """Length of h_crops for a local network."""
    return {"resnet50": 2048, "resnet18_narrow": 128}.get(name, 512)
