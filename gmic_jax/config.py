"""`GMICConfig`: every choice that changes the model's computation, in one frozen dataclass.

Kept free of ml_collections on purpose: the model and benchmark path must import on machines
that only have jax/flax. Training configs (`configs/*.py`) hold a `GMICConfig`'s fields under
`config.model` and build it with `GMICConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

AGGREGATIONS = ("top_t", "gmp", "gap")
ATTENTIONS = ("gated", "uniform")
PATCH_SELECTIONS = ("retrieve_roi", "random")
DTYPES = ("float32", "bfloat16")
SALIENCY_SYMMETRIES = ("none", "rot180")
LOCAL_NETS = ("resnet18", "resnet34", "resnet50", "resnet18_narrow")

# Rematerialisation policies, GMICConfig.remat (implemented in gmic_jax.models.remat; memory and
# recompute cost per exam in benchmarks/RESULTS.md). False and True are the names "none" and "global".
REMAT_POLICIES = {
    "none": "keep every activation the backward pass needs",
    "global": "recompute the global network's blocks (one checkpoint per block)",
    "global_convs": "as global, but keep the blocks' convolution outputs (recompute BatchNorm and ReLU only)",
    "global_stages": "recompute the global network's stages (one checkpoint per stage of two blocks)",
    "global_stem": "as global, and recompute the global stem (stem conv + max-pool)",
    "local": "recompute the local network's stem and blocks",
    "all": "global_stem and local together",
}


def remat_policy_name(remat) -> str:
    """The policy name of a GMICConfig.remat value: a name of REMAT_POLICIES, or False / True."""
    if remat is False or remat is None:
        return "none"
    if remat is True:
        return "global"
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return remat
    raise ValueError(f"GMICConfig.remat={remat!r}; expected False, True or one of {tuple(REMAT_POLICIES)}")


# top-t of the five released models (index 1..5), from the original's inference parameters.
RELEASED_PERCENT_T = {1: 0.02, 2: 0.03, 3: 0.03, 4: 0.05, 5: 0.1}


def check_fields(cls, d: Mapping[str, Any], what: str) -> dict:
    """``d`` as a dict, after checking that every key is a field of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; known: {sorted(names)}")
    return dict(d)


@dataclasses.dataclass(frozen=True)
class GMICConfig:
    """Hyper-parameters of GMIC (names follow the paper).

    percent_t: t of top-t% pooling of the saliency maps (aggregation='top_t').
    K: number of regions of interest (patches) retrieved per image.
    crop_shape: (h, w) of each patch in input pixels.
    local_net: local network f_l ('resnet18' is weight-compatible with the original;
        'resnet18_narrow' is ResNet-18 at a quarter of the width, for small CPU configs).
    aggregation: 'top_t' (the paper's), 'gmp' (global max) or 'gap' (global average).
    attention: 'gated' (the paper's gated attention) or 'uniform' (plain mean of patches).
    patch_selection: 'retrieve_roi' (greedy, the paper's) or 'random' (ablation: uniform random
        windows drawn from the flax rng stream 'roi').
    dtype: compute dtype of the convolutions ('float32' or 'bfloat16'). Parameters stay float32;
        BatchNorm, pooling, sigmoids and the heads run in float32.
    image_shape: (H, W) of the input images; the model checks it (a window of another size is
        a preprocessing bug), and the saliency grid and ROI window follow from it. The original:
        2944 x 1920.
    rotate_crops: training-time rotation of each patch by a random multiple of 90 degrees
        (paper's augmentation, 'roi' rng stream); inactive when train=False.
    remat: rematerialisation policy, by name (REMAT_POLICIES: 'none', 'global', ...): which parts
        the backward pass recomputes instead of keeping their activations (saves memory, costs
        recompute). False and True are accepted and mean 'none' and 'global' (the global
        network's blocks); the field holds the name.
    global_strides: strides of the global network's five stages. The paper's (1, 2, 2, 2, 2) makes
        the saliency grid 1/64 of the image (46 x 30 for 2944 x 1920). Small images (the synthetic
        CPU configs) keep the paper's grid-cell-to-lesion proportion with fewer stride-2 stages,
        e.g. (1, 2, 2, 1, 1): 1/16. Parameter shapes do not depend on it.
    global_blocks: pre-activation blocks in each of the global network's five stages (the paper's
        ResNet-22: two each). Fewer blocks bound the receptive field of a saliency cell (each 3x3
        conv widens it by two of that stage's pixels; ``receptive_field`` in models/global_net.py)
        and cost less. Block 0 of each stage stays (it changes the width), so each count is >= 1.
    global_widths: channels of the global network's five stages (the paper's: 16, 32, 64, 128,
        256; h_g has the last). Narrower stages pay for a finer saliency grid on small images.
    global_kernels: kernel size (3 or 1) of the two convs of every block of each of the global
        network's five stages (the paper's: 3 everywhere). Kernel 1 makes a stage pointwise, so it
        widens no receptive field: a saliency cell of a small image sees only the pixels around
        it and cannot carry evidence for a finding to a cell far from it (``receptive_field``).
    saliency_symmetry: "none" (the paper's) or "rot180": h_g is the mean of the global network on
        the image and, rotated back, on the image turned by 180 degrees. A network whose evidence
        for a finding lands at a fixed offset from it (image-level labels leave that offset free:
        every saliency cell of a small image sees the whole image) then puts its two halves at
        +offset and -offset; only offset 0 makes them add up, so training is pushed to the
        finding. Costs a second pass of the global network.
    """

    percent_t: float = 0.02
    K: int = 6
    crop_shape: tuple[int, int] = (256, 256)
    local_net: str = "resnet18"
    aggregation: str = "top_t"
    attention: str = "gated"
    patch_selection: str = "retrieve_roi"
    dtype: str = "float32"
    image_shape: tuple[int, int] = (2944, 1920)
    rotate_crops: bool = False
    remat: str = "none"
    global_strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    global_blocks: tuple[int, ...] = (2, 2, 2, 2, 2)
    global_widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    global_kernels: tuple[int, ...] = (3, 3, 3, 3, 3)
    saliency_symmetry: str = "none"

    def __post_init__(self):
        # Normalise sequences to tuples so configs read from JSON compare and hash equal.
        object.__setattr__(self, "crop_shape", tuple(int(v) for v in self.crop_shape))
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        object.__setattr__(self, "global_strides", tuple(int(v) for v in self.global_strides))
        object.__setattr__(self, "remat", remat_policy_name(self.remat))
        object.__setattr__(self, "global_blocks", tuple(int(v) for v in self.global_blocks))
        object.__setattr__(self, "global_widths", tuple(int(v) for v in self.global_widths))
        object.__setattr__(self, "global_kernels", tuple(int(v) for v in self.global_kernels))
        checks = (
            ("aggregation", AGGREGATIONS),
            ("attention", ATTENTIONS),
            ("patch_selection", PATCH_SELECTIONS),
            ("dtype", DTYPES),
            ("local_net", LOCAL_NETS),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"GMICConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if not 0.0 < self.percent_t <= 1.0:
            raise ValueError(f"GMICConfig.percent_t={self.percent_t}; expected 0 < t <= 1")
        if self.K < 1:
            raise ValueError(f"GMICConfig.K={self.K}; expected K >= 1")
        if len(self.crop_shape) != 2 or min(self.crop_shape) < 1:
            raise ValueError(f"GMICConfig.crop_shape={self.crop_shape}; expected (h, w) >= 1")
        if len(self.image_shape) != 2 or min(self.image_shape) < 1:
            raise ValueError(f"GMICConfig.image_shape={self.image_shape}; expected (H, W) >= 1")
        if len(self.global_strides) != 5 or not set(self.global_strides) <= {1, 2}:
            raise ValueError(f"GMICConfig.global_strides={self.global_strides}; expected five strides of 1 or 2")
        if len(self.global_blocks) != 5 or min(self.global_blocks) < 1:
            raise ValueError(f"GMICConfig.global_blocks={self.global_blocks}; expected five block counts >= 1")
        if self.saliency_symmetry not in SALIENCY_SYMMETRIES:
            raise ValueError(
                f"GMICConfig.saliency_symmetry={self.saliency_symmetry!r}; expected one of {SALIENCY_SYMMETRIES}"
            )
        if len(self.global_widths) != 5 or min(self.global_widths) < 1:
            raise ValueError(f"GMICConfig.global_widths={self.global_widths}; expected five channel counts >= 1")
        if len(self.global_kernels) != 5 or not set(self.global_kernels) <= {1, 3}:
            raise ValueError(f"GMICConfig.global_kernels={self.global_kernels}; expected five kernel sizes of 3 or 1")
        if self.rotate_crops and self.crop_shape[0] != self.crop_shape[1]:
            raise ValueError(f"GMICConfig.rotate_crops needs square crops, got crop_shape={self.crop_shape}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_shape"] = list(self.crop_shape)
        d["image_shape"] = list(self.image_shape)
        d["global_strides"] = list(self.global_strides)
        d["global_blocks"] = list(self.global_blocks)
        d["global_widths"] = list(self.global_widths)
        d["global_kernels"] = list(self.global_kernels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GMICConfig":
        return cls(**check_fields(cls, d, "GMICConfig"))

    def replace(self, **kw) -> "GMICConfig":
        return dataclasses.replace(self, **kw)
