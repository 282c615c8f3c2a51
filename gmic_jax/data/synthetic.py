"""Synthetic mammogram-like images with benign-like and malignant-like findings and pixel masks.

The embedded default data set: no download, deterministic per seed, any image size. Each image is
a breast silhouette against the left edge (every breast faces the same side, as after the
original's flip) filled with fat and fibroglandular texture; MLO views add a pectoral muscle.
Findings:

* benign-like: a round or oval mass with a smooth edge;
* malignant-like: a spiculated mass (irregular core with radiating lines) or a cluster of
  microcalcifications (tiny dots; its mask is the region of the cluster, as radiologists outline it).

Findings are small (each well under 1% of the image area) and never brighter than the densest
tissue of the same image (the rendered image is clipped to that value), so a classifier has to find
the finding's shape, not a global brightness cue.

Images come in breasts of two views (CC, MLO) that share the breast's labels, each view with its own
rendering of the findings, so breast-level metrics (mean of the two views) are defined.

Each example follows the batch layout of :mod:`gmic_jax.data.batch` (what the real-data readers
give): ``image`` (H, W, 1) uint16 raw 12-bit values (0..4095, not normalised: training normalises
on device), ``label`` (2,) float32 [benign, malignant], ``mask`` (H, W, 2) uint8, ``image_id``,
``breast_id``, ``view`` ('L-CC' / 'L-MLO', or 'R-...' for odd breasts) as numpy strings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np
from scipy import ndimage

from gmic_jax.data import batch as batch_lib

SPLITS = {"train": 0, "val": 1, "test": 2}
VIEWS = ("CC", "MLO")
MAX_VALUE = 4095  # 12-bit, like the sample exam


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """How the synthetic images are drawn; every size scales with the image."""

    image_shape: tuple[int, int] = (256, 192)
    p_benign: float = 0.35  # per breast
    p_malignant: float = 0.35  # per breast, independent of benign
    p_calcification: float = 0.5  # share of malignant findings that are calcification clusters
    lesion_area: tuple[float, float] = (0.002, 0.006)  # mask area of one finding / image area
    lesion_contrast: tuple[float, float] = (0.25, 0.4)  # peak added density, fraction of the range
    noise_sigma: float = 0.01  # acquisition noise, fraction of the range


def _rng(seed: int, split: str, breast: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], breast, stream]))


def breast_labels(seed: int, split: str, breast: int, spec: SyntheticSpec) -> np.ndarray:
    """(2,) float32 [benign, malignant] of one breast, drawn without rendering anything."""
    r = _rng(seed, split, breast, 0)
    return np.array([r.random() < spec.p_benign, r.random() < spec.p_malignant], np.float32)


def _smooth_noise(rng, shape, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return field / (field.std() + 1e-12)


def _tissue(rng, shape, view):
    """(image in [0, 1], breast mask) of an empty breast."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    cy = H * rng.uniform(0.45, 0.55)
    ay = H * rng.uniform(0.40, 0.47)
    ax = W * rng.uniform(0.62, 0.85)
    # Slightly wobbly outline.
    angle = np.arctan2(yy - cy, xx + 1e-9)
    wobble = 1.0 + 0.04 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
    r2 = ((yy - cy) / ay) ** 2 + (xx / ax) ** 2
    r2 = r2 / wobble**2
    breast = r2 <= 1.0
    thickness = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))  # compressed-breast thickness fall-off
    scale = min(H, W)
    dense = (
        _smooth_noise(rng, shape, scale / 12)
        + 0.45 * _smooth_noise(rng, shape, scale / 40)
        + 0.15 * _smooth_noise(rng, shape, scale / 120)
    )
    # More fibroglandular tissue behind the nipple (towards the middle), less at the skin.
    centrality = np.exp(-(((yy - cy) / (0.7 * ay)) ** 2) - ((xx - 0.35 * ax) / (0.6 * ax)) ** 2)
    density = 1.0 / (1.0 + np.exp(-(dense + rng.uniform(0.5, 1.5) * centrality - rng.uniform(0.6, 1.2)) * 2.0))
    image = thickness * (0.35 + 0.45 * density)
    if view == "MLO":  # pectoral muscle: a bright triangle at the top left
        h = H * rng.uniform(0.25, 0.4)
        w = W * rng.uniform(0.15, 0.25)
        muscle = (xx / w + yy / h) <= 1.0
        image = np.where(muscle & breast, np.maximum(image, 0.75 + 0.05 * thickness), image)
    image = np.where(breast, image, 0.0)
    return image, breast


def _place(rng, breast_mask, radius):
    """A centre well inside the breast for a finding of the given radius (pixels)."""
    inside = ndimage.binary_erosion(breast_mask, iterations=max(1, int(math.ceil(radius * 1.6))))
    if not inside.any():
        inside = breast_mask
    ys, xs = np.nonzero(inside)
    k = rng.integers(len(ys))
    return float(ys[k]) + rng.uniform(-0.5, 0.5), float(xs[k]) + rng.uniform(-0.5, 0.5)


def _window(shape, cy, cx, half):
    H, W = shape
    y0, y1 = max(0, int(cy - half)), min(H, int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(W, int(cx + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return (slice(y0, y1), slice(x0, x1)), yy - cy, xx - cx


def _round_mass(rng, shape, cy, cx, radius):
    """Benign-like: oval mass with a smooth edge. Returns (window, density, mask)."""
    win, dy, dx = _window(shape, cy, cx, 2.0 * radius)
    elong = rng.uniform(0.8, 1.25)
    theta = rng.uniform(0, np.pi)
    u = dy * np.cos(theta) + dx * np.sin(theta)
    v = -dy * np.sin(theta) + dx * np.cos(theta)
    r = np.sqrt((u * elong) ** 2 + (v / elong) ** 2) / radius
    density = 1.0 / (1.0 + np.exp((r - 1.0) / 0.08))
    return win, density, r <= 1.0


def _spiculated_mass(rng, shape, cy, cx, radius):
    """Malignant-like: irregular dense core with thin radiating spicules."""
    core = 0.6 * radius
    win, dy, dx = _window(shape, cy, cx, 2.6 * radius)
    ang = np.arctan2(dy, dx)
    dist = np.sqrt(dy**2 + dx**2)
    lobes = 1.0 + sum(rng.uniform(0.05, 0.18) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7))
    density = 1.0 / (1.0 + np.exp((dist / (core * lobes) - 1.0) / 0.06))
    n_spic = int(rng.integers(7, 13))
    width = max(0.6, 0.05 * radius)
    for a in rng.uniform(0, 2 * np.pi, n_spic):
        length = core + rng.uniform(1.0, 2.0) * radius
        along = dx * np.cos(a) + dy * np.sin(a)
        across = -dx * np.sin(a) + dy * np.cos(a)
        line = np.exp(-0.5 * (across / width) ** 2) * (along > 0) * np.clip(1.0 - along / length, 0.0, 1.0)
        density = np.maximum(density, 0.8 * line)
    # One outlined region, as a radiologist draws it: core and spicules, closed and filled, the
    # largest connected piece (thin spicule tips would otherwise count as separate lesions).
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(density > 0.3, iterations=2))
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n > 1:
        mask = labels == (1 + np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))
    return win, density, mask


def _calcifications(rng, shape, cy, cx, radius):
    """Malignant-like: a cluster of tiny dots; the mask is the cluster's region."""
    win, dy, dx = _window(shape, cy, cx, 1.2 * radius)
    density = np.zeros_like(dy)
    n = int(rng.integers(6, 14))
    dot = max(0.6, 0.09 * radius)
    for _ in range(n):
        rr = radius * 0.85 * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * np.pi)
        py, px = rr * math.sin(a), rr * math.cos(a)
        d2 = ((dy - py) ** 2 + (dx - px) ** 2) / (dot * rng.uniform(0.7, 1.3)) ** 2
        density = np.maximum(density, np.exp(-0.5 * d2))
    mask = np.sqrt(dy**2 + dx**2) <= radius
    return win, 2.2 * density, mask


def render(seed: int, split: str, index: int, spec: SyntheticSpec = SyntheticSpec()):
    """One example (the batch-dict entry) of image ``index`` of ``split``; deterministic."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
    breast, view_index = divmod(int(index), 2)
    view = VIEWS[view_index]
    shape = tuple(int(s) for s in spec.image_shape)
    label = breast_labels(seed, split, breast, spec)
    rng = _rng(seed, split, breast, 1 + view_index)
    tissue, breast_mask = _tissue(rng, shape, view)
    densest = float(tissue.max())
    lesion = np.zeros(shape)
    mask = np.zeros(shape + (2,), np.uint8)
    area = shape[0] * shape[1]
    kinds = []
    if label[0]:
        kinds.append((0, _round_mass))
    if label[1]:
        kinds.append((1, _calcifications if rng.random() < spec.p_calcification else _spiculated_mass))
    for cls, draw in kinds:
        target = rng.uniform(*spec.lesion_area) * area
        radius = math.sqrt(target / math.pi)
        if draw is _spiculated_mass:
            radius /= 0.75  # its mask (core plus spicule roots) is smaller than the disc
        cy, cx = _place(rng, breast_mask, radius)
        win, density, m = draw(rng, shape, cy, cx, radius)
        contrast = rng.uniform(*spec.lesion_contrast)
        lesion[win] = np.maximum(lesion[win], contrast * density)
        mask[win + (cls,)] |= (m & breast_mask[win]).astype(np.uint8)
    image = tissue + lesion * breast_mask
    image = image + spec.noise_sigma * rng.standard_normal(shape) * breast_mask
    # Not brighter than the densest tissue of this image (and no negative intensities).
    image = np.clip(image, 0.0, densest)
    side = "LR"[breast % 2]
    return batch_lib.make_example(
        np.rint(image * MAX_VALUE).astype(np.uint16)[..., None],
        label,
        image_id=f"synthetic-{split}-{seed}-{index:06d}",
        breast_id=f"synthetic-{split}-{seed}-{breast:06d}/{side}",
        view=f"{side}-{view}",
        mask=mask,
    )


stack = batch_lib.stack


class SyntheticLesions:
    """Random-access source of ``num_images`` synthetic images (an even number: whole breasts).

    ``labels`` is known without rendering; ``cache=True`` keeps rendered examples in memory.
    """

    def __init__(
        self,
        num_images: int,
        *,
        seed: int = 0,
        split: str = "train",
        spec: SyntheticSpec = SyntheticSpec(),
        cache: bool = True,
        with_masks: bool = True,
    ):
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
        self.num_images = int(num_images)
        self.seed, self.split, self.spec = int(seed), split, spec
        self.with_masks = with_masks
        self._cache: dict[int, dict] | None = {} if cache else None
        self.labels = np.stack([breast_labels(self.seed, split, i // 2, spec) for i in range(self.num_images)])

    @property
    def has_masks(self) -> bool:
        return self.with_masks

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        example = render(self.seed, self.split, index, self.spec)
        if not self.with_masks:
            del example["mask"]
        if self._cache is not None:
            self._cache[index] = example
        return example

    def batch(self, indices: Iterable[int]) -> dict:
        return stack([self[i] for i in indices])
