"""Analytic FLOP count of GMIC from its layer shapes (FLOPs = 2 x multiply-adds).

Only convolutions and dense layers are counted (they are >95% of the arithmetic); BatchNorm,
activations, pooling, top-t pooling and retrieve_roi are not. Padding follows XLA's cost analysis:
a tap of a padded convolution that lands outside the input is not a multiply-add
(`count_padding=True` gives the convention of the paper, fvcore and torch's flop counter, which
count every tap of every output position).

The architecture is the original's: the global network's ResNet-22 on (H, W, 1) images, the local
network on N*K crops of 3 channels (the original repeats the 1-channel crop; gmic-jax folds the
repeat into the kernel, which costs a third of that stem), and the heads. The paper's "122B"
multiply-adds per exam of 4 images at 2944 x 1920 correspond to `forward_flops(...) / 2`.

    python benchmarks/flops.py                      # table for one exam at 2944 x 1920
    python benchmarks/flops.py --image-shape 256 192 --crop-shape 64 64

The backward pass of a layer costs a weight gradient (as many multiply-adds as its forward) and,
unless nothing upstream needs it, an input gradient (as many again): the stems of both networks
read images, which need no gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from gmic_jax.models.global_net import saliency_grid_shape

GLOBAL_STAGE_FEATURES = (16, 32, 64, 128, 256)
GLOBAL_STAGE_STRIDES = (1, 2, 2, 2, 2)
LOCAL_STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
ATTENTION_HIDDEN = 128


def conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def valid_taps(n: int, kernel: int, stride: int, padding: int) -> int:
    """Sum over the output positions of one spatial dimension of the kernel taps inside the input."""
    total = 0
    for i in range(conv_out(n, kernel, stride, padding)):
        start = i * stride - padding
        total += max(0, min(kernel, n - start) - max(0, -start))
    return total


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution (kernel (kh, kw)) or dense layer (kernel (1, 1), spatial (1, 1)) applied to
    `count` inputs of spatial size `in_hw`."""

    name: str
    kind: str  # 'conv' | 'dense'
    count: int
    in_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: int
    padding: int
    cin: int
    cout: int
    needs_input_grad: bool = True

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(conv_out(n, k, self.stride, self.padding) for n, k in zip(self.in_hw, self.kernel))

    def macs(self, count_padding: bool = False) -> int:
        if count_padding:
            h, w = self.out_hw
            spatial = h * w * self.kernel[0] * self.kernel[1]
        else:
            spatial = 1
            for n, k in zip(self.in_hw, self.kernel):
                spatial *= valid_taps(n, k, self.stride, self.padding)
        return self.count * spatial * self.cin * self.cout

    def flops(self, count_padding: bool = False) -> int:
        return 2 * self.macs(count_padding)

    def fwd_bwd_flops(self, count_padding: bool = False) -> int:
        passes = 3 if self.needs_input_grad else 2
        return passes * self.flops(count_padding)


def _conv(name, count, hw, k, s, p, cin, cout, needs_input_grad=True) -> Layer:
    return Layer(name, "conv", count, tuple(hw), (k, k), s, p, cin, cout, needs_input_grad)


def _dense(name, count, cin, cout) -> Layer:
    return Layer(name, "dense", count, (1, 1), (1, 1), 1, 0, cin, cout)


def global_layers(
    image_shape: Sequence[int], n_images: int, global_strides: Sequence[int] = GLOBAL_STAGE_STRIDES
) -> list[Layer]:
    """ResNet-22 (pre-activation) and the saliency 1x1 conv on (n_images, H, W, 1); the stages'
    strides are GMICConfig.global_strides (the paper's by default)."""
    layers = [_conv("ds_net.first_conv", n_images, image_shape, 7, 2, 3, 1, 16, needs_input_grad=False)]
    hw = tuple(conv_out(n, 7, 2, 3) for n in image_shape)
    hw = tuple(conv_out(n, 3, 2, 0) for n in hw)  # first_pool
    cin = GLOBAL_STAGE_FEATURES[0]
    for s, (c, stride) in enumerate(zip(GLOBAL_STAGE_FEATURES, global_strides)):
        for b in range(2):
            st = stride if b == 0 else 1
            prefix = f"ds_net.layer_list.{s}.{b}"
            if b == 0:
                layers.append(_conv(f"{prefix}.downsample.0", n_images, hw, 1, st, 0, cin, c))
            layers.append(_conv(f"{prefix}.conv1", n_images, hw, 3, st, 1, cin, c))
            hw = tuple(conv_out(n, 3, st, 1) for n in hw)
            layers.append(_conv(f"{prefix}.conv2", n_images, hw, 3, 1, 1, c, c))
            cin = c
    assert hw == saliency_grid_shape(tuple(image_shape), tuple(global_strides))  # the model's grid rule
    layers.append(_conv("left_postprocess_net.gn_conv_last", n_images, hw, 1, 1, 0, cin, 2))
    return layers


def local_layers(
    crop_shape: Sequence[int], n_crops: int, local_net: str = "resnet18", stem_channels: int = 3
) -> list[Layer]:
    """torchvision-layout ResNet on (n_crops, h, w, stem_channels)."""
    if local_net not in LOCAL_STAGE_SIZES:
        raise ValueError(f"unknown local_net {local_net!r}; expected one of {sorted(LOCAL_STAGE_SIZES)}")
    bottleneck = local_net == "resnet50"
    expansion = 4 if bottleneck else 1
    layers = [_conv("dn_resnet.conv1", n_crops, crop_shape, 7, 2, 3, stem_channels, 64, needs_input_grad=False)]
    hw = tuple(conv_out(n, 7, 2, 3) for n in crop_shape)
    hw = tuple(conv_out(n, 3, 2, 1) for n in hw)  # maxpool, padding 1
    cin = 64
    for i, n_blocks in enumerate(LOCAL_STAGE_SIZES[local_net]):
        c = 64 * 2**i
        for b in range(n_blocks):
            st = (1 if i == 0 else 2) if b == 0 else 1
            prefix = f"dn_resnet.layer{i + 1}.{b}"
            project = b == 0 and (st != 1 or cin != c * expansion)
            if bottleneck:
                layers.append(_conv(f"{prefix}.conv1", n_crops, hw, 1, 1, 0, cin, c))
                layers.append(_conv(f"{prefix}.conv2", n_crops, hw, 3, st, 1, c, c))
                out_hw = tuple(conv_out(n, 3, st, 1) for n in hw)
                layers.append(_conv(f"{prefix}.conv3", n_crops, out_hw, 1, 1, 0, c, c * 4))
            else:
                layers.append(_conv(f"{prefix}.conv1", n_crops, hw, 3, st, 1, cin, c))
                out_hw = tuple(conv_out(n, 3, st, 1) for n in hw)
                layers.append(_conv(f"{prefix}.conv2", n_crops, out_hw, 3, 1, 1, c, c))
            if project:
                layers.append(_conv(f"{prefix}.downsample.0", n_crops, hw, 1, st, 0, cin, c * expansion))
            hw, cin = out_hw, c * expansion
    return layers


def head_layers(
    n_images: int, K: int, feature_width: int, post_processing_dim: int = 256, num_classes: int = 2
) -> list[Layer]:
    """Gated attention on the N*K patch vectors, the local classifier and the fusion layer."""
    return [
        _dense("mil_attn_U", n_images * K, feature_width, ATTENTION_HIDDEN),
        _dense("mil_attn_V", n_images * K, feature_width, ATTENTION_HIDDEN),
        _dense("mil_attn_w", n_images * K, ATTENTION_HIDDEN, 1),
        _dense("classifier_linear", n_images, feature_width, num_classes),
        _dense("fusion_dnn", n_images, post_processing_dim + feature_width, num_classes),
    ]


def gmic_layers(
    n_images: int,
    image_shape=(2944, 1920),
    crop_shape=(256, 256),
    K: int = 6,
    local_net: str = "resnet18",
    attention: str = "gated",
    local_stem_channels: int = 3,
    global_strides: Sequence[int] = GLOBAL_STAGE_STRIDES,
) -> list[Layer]:
    width = 2048 if local_net == "resnet50" else 512
    heads = head_layers(n_images, K, width)
    if attention != "gated":
        heads = [layer for layer in heads if not layer.name.startswith("mil_attn")]
    return (
        global_layers(image_shape, n_images, global_strides)
        + local_layers(crop_shape, n_images * K, local_net, local_stem_channels)
        + heads
    )


def layers_for_config(config, n_images: int, image_shape=None, local_stem_channels: int = 3) -> list[Layer]:
    """Layers of GMIC(config) (a `GMICConfig`) on n_images images of `image_shape` (default: the config's)."""
    return gmic_layers(
        n_images,
        tuple(image_shape or config.image_shape),
        tuple(config.crop_shape),
        config.K,
        config.local_net,
        config.attention,
        local_stem_channels,
        config.global_strides,
    )


def forward_flops(layers: Sequence[Layer], count_padding: bool = False) -> int:
    return sum(layer.flops(count_padding) for layer in layers)


def fwd_bwd_flops(layers: Sequence[Layer], count_padding: bool = False) -> int:
    return sum(layer.fwd_bwd_flops(count_padding) for layer in layers)


def summary(layers: Sequence[Layer]) -> dict[str, int]:
    """FLOPs of the forward pass by part: global (ds_net + saliency), local (dn_resnet), heads."""
    out = {"global": 0, "local": 0, "heads": 0}
    for layer in layers:
        part = (
            "global"
            if layer.name.startswith(("ds_net", "left_postprocess_net"))
            else "local"
            if layer.name.startswith("dn_resnet")
            else "heads"
        )
        out[part] += layer.flops()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-shape", type=int, nargs=2, default=(2944, 1920), metavar=("H", "W"))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--images", type=int, default=4, help="images (default: 4, one exam)")
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--local-net", default="resnet18", choices=sorted(LOCAL_STAGE_SIZES))
    p.add_argument("--per-layer", action="store_true", help="print every layer")
    args = p.parse_args(argv)
    layers = gmic_layers(args.images, tuple(args.image_shape), tuple(args.crop_shape), args.K, args.local_net)
    if args.per_layer:
        for layer in layers:
            print(
                f"{layer.name:45s} {layer.count:4d} x {layer.in_hw} -> {layer.out_hw} "
                f"k{layer.kernel[0]} s{layer.stride} {layer.cin:4d}->{layer.cout:4d}  {layer.flops() / 1e9:9.3f} GFLOP"
            )
    parts = summary(layers)
    print(
        f"{args.images} images {args.image_shape[0]}x{args.image_shape[1]}, K={args.K}, "
        f"crops {args.crop_shape[0]}x{args.crop_shape[1]}, {args.local_net}"
    )
    for name, value in parts.items():
        print(f"  forward {name:7s} {value / 1e9:10.2f} GFLOP")
    print(
        f"  forward total   {forward_flops(layers) / 1e9:10.2f} GFLOP "
        f"({forward_flops(layers) / 2e9:.2f} G multiply-adds; every tap incl. padding: "
        f"{forward_flops(layers, True) / 2e9:.2f} G)"
    )
    print(f"  fwd+bwd total   {fwd_bwd_flops(layers) / 1e9:10.2f} GFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
