"""Global network f_g: the narrow pre-activation ResNet-22 and its saliency head.

ResNet-22: 7x7/2 stem (1 -> 16 channels), 3x3/2 max-pool without padding, five stages of two
pre-activation basic blocks (16/32/64/128/256 channels, strides 1/2/2/2/2) with a 1x1 projection
in block 0 of every stage, then BN + ReLU: h_g. A 1x1 conv + sigmoid maps h_g to the saliency
maps A (benign, malignant). Submodule names mirror the original checkpoint (`ds_net.*`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmic_jax.models.fast_ops import max_pool, stem_conv
from gmic_jax.models.layers import batch_norm, conv
from gmic_jax.models.remat import checkpointed, remat_spec


class PreActBlock(nn.Module):
    """Pre-activation basic block: o = relu(bn1(x)); res = proj(o) or x; conv2(relu(bn2(conv1(o)))) + res."""

    features: int
    stride: int
    project: bool
    dtype: Any
    bn_axis_name: str | None = None
    kernel: int = 3  # of conv1 and conv2 (padding kernel // 2)

    @nn.compact
    def __call__(self, x, train: bool):
        o = jax.nn.relu(batch_norm(x, train, name="bn1", axis_name=self.bn_axis_name)).astype(self.dtype)
        res = conv(self.features, 1, self.stride, 0, dtype=self.dtype, name="downsample_0")(o) if self.project else x
        k = self.kernel
        o = conv(self.features, k, self.stride, k // 2, dtype=self.dtype, name="conv1")(o)
        o = jax.nn.relu(batch_norm(o, train, name="bn2", axis_name=self.bn_axis_name)).astype(self.dtype)
        o = conv(self.features, k, 1, k // 2, dtype=self.dtype, name="conv2")(o)
        return o + res.astype(o.dtype)


class SpaceToDepthStem(nn.Module):
    """The 7x7 stride-2 (pad 3) stem conv, 1 -> C channels; on CPU computed on the 2x2
    space-to-depth image (fast_ops.stem_conv); the kernel keeps the original's (7, 7, 1, C) layout."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (7, 7, 1, self.features), jnp.float32)
        return stem_conv(x.astype(self.dtype), kernel.astype(self.dtype), padding=3)


class ResNet22(nn.Module):
    """The global network's feature extractor; returns h_g (N, h, w, 256), float32.

    remat: a GMICConfig.remat policy (gmic_jax.models.remat): recompute the stem and/or the
    blocks (per block or per stage) in the backward pass."""

    dtype: Any = jnp.float32
    stage_features: Sequence[int] = (16, 32, 64, 128, 256)
    stage_strides: Sequence[int] = (1, 2, 2, 2, 2)
    stage_blocks: Sequence[int] = (2, 2, 2, 2, 2)
    stage_kernels: Sequence[int] = (3, 3, 3, 3, 3)
    remat: bool | str = False
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        spec = remat_spec(self.remat)

        def stem(mdl, x):
            h = SpaceToDepthStem(self.stage_features[0], self.dtype, name="first_conv")(x)
            return max_pool(h, 3, 2, 0)

        h = (checkpointed(stem, spec) if spec.global_stem else stem)(self, x)
        block_cls = (
            checkpointed(PreActBlock, spec, static_argnums=(2,)) if spec.global_blocks == "block" else PreActBlock
        )
        stages = zip(self.stage_features, self.stage_strides, self.stage_blocks, self.stage_kernels)
        for s, (features, stride, blocks, kernel) in enumerate(stages):

            def stage(mdl, h, s=s, features=features, stride=stride, blocks=blocks, kernel=kernel):
                for b in range(blocks):
                    h = block_cls(
                        features,
                        stride if b == 0 else 1,
                        project=(b == 0),
                        dtype=self.dtype,
                        bn_axis_name=self.bn_axis_name,
                        kernel=kernel,
                        name=f"layer_list_{s}_{b}",
                    )(h, train)
                return h

            h = (checkpointed(stage, spec) if spec.global_blocks == "stage" else stage)(self, h)
        return jax.nn.relu(batch_norm(h, train, name="final_bn", axis_name=self.bn_axis_name))


class SaliencyHead(nn.Module):
    """1x1 conv (no bias): h_g -> saliency logits (N, h, w, 2), float32; the saliency maps are
    A = sigmoid(logits)."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, h_g):
        return conv(self.num_classes, 1, dtype=jnp.float32, name="gn_conv_last")(h_g.astype(jnp.float32))


def receptive_field(
    stage_strides=(1, 2, 2, 2, 2), stage_blocks=(2, 2, 2, 2, 2), stage_kernels=(3, 3, 3, 3, 3)
) -> tuple[int, int, int]:
    """(size, jump, start) in input pixels along each axis: saliency cell i sees the pixels
    [start + i * jump, start + i * jump + size) (those inside the image). The paper's ResNet-22:
    (883, 64, -439); global_strides (1, 2, 2, 1, 1): (467, 16, -231); configs/synthetic.py's
    strides (1, 2, 1, 2, 1), one block per stage and kernels (3, 3, 3, 1, 1): (83, 16, -39)."""
    layers = [(7, 2, 3), (3, 2, 0)]  # (kernel, stride, padding): stem conv, max-pool
    for stride, blocks, k in zip(stage_strides, stage_blocks, stage_kernels):
        layers += [(k, stride, k // 2)] + [(k, 1, k // 2)] * (2 * blocks - 1)  # conv1, conv2 of each block
    size, jump, start = 1, 1, 0
    for k, s, pad in layers:
        size += (k - 1) * jump
        start -= pad * jump
        jump *= s
    return size, jump, start


def saliency_grid_shape(image_shape: tuple[int, int], stage_strides=(1, 2, 2, 2, 2)) -> tuple[int, int]:
    """(h, w) of the saliency map for an (H, W) input: stem /2 (pad 3), pool 3/2 (no pad), then
    one 3x3 conv (pad 1) per stage with that stage's stride. 2944 x 1920 -> 46 x 30."""

    def conv_out(n, k, s, p):
        return (n + 2 * p - k) // s + 1

    out = []
    for n in image_shape:
        n = conv_out(n, 7, 2, 3)
        n = conv_out(n, 3, 2, 0)
        for stride in stage_strides:
            n = conv_out(n, 3, stride, 1)
        out.append(n)
    return tuple(out)
