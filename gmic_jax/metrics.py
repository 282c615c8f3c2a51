"""Evaluation metrics (paper 3.2 and 3.5), computed on the host with numpy and scikit-learn.

Classification: ROC AUC and PR AUC (scikit-learn's average precision) per class, at image level and
at breast level (a breast's score is the mean over its views, CC and MLO; its label the maximum).

Localisation, where pixel masks exist (both averaged over the images that have a lesion of the
class):

* Dice: the saliency map of the class upsampled to the image by nearest neighbour
  (source index floor(i * h / H), as ``F.interpolate(mode='nearest')``), binarised at >= 0.5,
  against the class's mask.
* PxAP: average precision of the upsampled saliency over the image's pixels against the mask.
  Computed exactly on the saliency grid: every grid cell becomes one positive and one negative
  sample weighted by its lesion and non-lesion pixel counts, which is the pixel-level value
  (nearest upsampling makes each cell's pixels one tied group).
* ROI hit rate: the share of lesions (8-connected components of each class's mask) of which the
  union of the K patches covers at least 70% of the pixels.
* Pointing: the first (row-major) argmax cell (i, j) of the class's saliency map on its h x w grid
  points at the pixel holding its centre ((i + 1/2) H / h, (j + 1/2) W / w); a hit when that pixel
  lies in the class's mask dilated by ceil(H / 2h) rows and ceil(W / 2w) columns each way (a box
  of 2 ceil(H / 2h) + 1 x 2 ceil(W / 2w) + 1 pixels), so any cell that holds a lesion pixel is a
  hit. Its random baseline is the share of grid cells whose centre is a hit, averaged over the same
  images: what a map with its maximum at a uniformly random cell scores.

A metric that is undefined (e.g. AUC with one class present) is left out, not reported as NaN.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from gmic_jax.data.batch import CLASSES

ROI_MIN_COVERAGE = 0.7
DICE_THRESHOLD = 0.5


def auc(labels, scores) -> float | None:
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, np.float64)))


def pr_auc(labels, scores) -> float | None:
    labels = np.asarray(labels)
    if labels.size == 0 or labels.max() == 0:
        return None
    return float(average_precision_score(labels, np.asarray(scores, np.float64)))


def breast_level(scores, labels, breast_ids):
    """(scores, labels) per breast: mean of the views' scores, maximum of their labels."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    ids = np.asarray(breast_ids)
    uniq, inverse = np.unique(ids, return_inverse=True)
    count = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    out_scores = np.stack(
        [np.bincount(inverse, scores[:, c], len(uniq)) / count for c in range(scores.shape[1])], axis=1
    )
    out_labels = np.zeros((len(uniq), labels.shape[1]), labels.dtype)
    np.maximum.at(out_labels, inverse, labels)
    return out_scores, out_labels


def classification_metrics(scores, labels, breast_ids=None, prefix: str = "val_") -> dict:
    """AUC and PR-AUC per class, image level and (given breast ids) breast level."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    out = {}
    for c, name in enumerate(CLASSES):
        out[f"{prefix}auc_{name}"] = auc(labels[:, c], scores[:, c])
        out[f"{prefix}prauc_{name}"] = pr_auc(labels[:, c], scores[:, c])
    if breast_ids is not None:
        b_scores, b_labels = breast_level(scores, labels, breast_ids)
        for c, name in enumerate(CLASSES):
            out[f"{prefix}breast_auc_{name}"] = auc(b_labels[:, c], b_scores[:, c])
    return {k: v for k, v in out.items() if v is not None}


def upsample_nearest(grid_map, shape):
    """(h, w) -> (H, W) by nearest neighbour, source index floor(i * h / H)."""
    h, w = grid_map.shape
    H, W = shape
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    return grid_map[rows[:, None], cols[None, :]]


def dice(saliency, mask, threshold: float = DICE_THRESHOLD) -> float:
    """Dice of the upsampled (h, w) saliency binarised at >= threshold against an (H, W) mask."""
    pred = upsample_nearest(np.asarray(saliency), mask.shape) >= threshold
    truth = np.asarray(mask) > 0
    denom = pred.sum() + truth.sum()
    return float(2.0 * np.logical_and(pred, truth).sum() / denom) if denom else 1.0


def _cell_counts(mask, grid_shape):
    """Per grid cell: (lesion pixels, all pixels) under nearest upsampling."""
    H, W = mask.shape
    h, w = grid_shape
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    cell = (rows[:, None] * w + cols[None, :]).ravel()
    pos = np.bincount(cell, weights=(np.asarray(mask) > 0).ravel().astype(np.float64), minlength=h * w)
    tot = np.bincount(cell, minlength=h * w).astype(np.float64)
    return pos, tot


def pxap(saliency, mask) -> float:
    """Average precision of the nearest-upsampled saliency over the pixels of one image."""
    saliency = np.asarray(saliency, np.float64)
    pos, tot = _cell_counts(mask, saliency.shape)
    if pos.sum() == 0:
        raise ValueError("PxAP is undefined for an image without lesion pixels")
    s = saliency.ravel()
    scores = np.concatenate([s, s])
    targets = np.concatenate([np.ones_like(s), np.zeros_like(s)])
    weights = np.concatenate([pos, tot - pos])
    keep = weights > 0
    return float(average_precision_score(targets[keep], scores[keep], sample_weight=weights[keep]))


def patch_cover(image_shape, locations, crop_shape):
    """Boolean (H, W): union of the K crops at pixel upper-left ``locations`` (K, 2), clipped."""
    H, W = image_shape
    ch, cw = crop_shape
    cover = np.zeros((H, W), bool)
    for r, c in np.asarray(locations, np.int64):
        cover[max(r, 0) : min(r + ch, H), max(c, 0) : min(c + cw, W)] = True
    return cover


def roi_hits(mask, locations, crop_shape, min_coverage: float = ROI_MIN_COVERAGE):
    """(lesions hit, lesions) in one image; ``mask`` is (H, W, C), lesions its components per class."""
    cover = patch_cover(mask.shape[:2], locations, crop_shape)
    hits = total = 0
    for c in range(mask.shape[-1]):
        components, n = ndimage.label(mask[..., c] > 0, structure=np.ones((3, 3)))  # 8-connected
        for i in range(1, n + 1):
            lesion = components == i
            total += 1
            hits += cover[lesion].mean() >= min_coverage
    return int(hits), int(total)


def pointing_cells(mask, grid_shape) -> np.ndarray:
    """(h, w) bool: whether each grid cell's centre lies in the dilated ``mask`` (H, W) (see the
    module docstring); a summed-area table counts the mask pixels in each centre's box."""
    m = np.asarray(mask) > 0
    H, W = m.shape
    h, w = (int(v) for v in grid_shape)
    ry, rx = -(-H // (2 * h)), -(-W // (2 * w))  # ceil(H / 2h), ceil(W / 2w)
    rows = ((2 * np.arange(h) + 1) * H) // (2 * h)  # floor((i + 1/2) H / h), exactly
    cols = ((2 * np.arange(w) + 1) * W) // (2 * w)
    table = np.zeros((H + 1, W + 1), np.int64)
    table[1:, 1:] = m.cumsum(0).cumsum(1)
    r0, r1 = np.clip(rows - ry, 0, H), np.clip(rows + ry + 1, 0, H)
    c0, c1 = np.clip(cols - rx, 0, W), np.clip(cols + rx + 1, 0, W)
    count = (
        table[r1[:, None], c1[None, :]]
        - table[r0[:, None], c1[None, :]]
        - table[r1[:, None], c0[None, :]]
        + table[r0[:, None], c0[None, :]]
    )
    return count > 0


def pointing_hit(saliency, mask) -> bool:
    """Whether the first row-major argmax cell of an (h, w) saliency map points into the (H, W) mask."""
    saliency = np.asarray(saliency)
    return bool(pointing_cells(mask, saliency.shape).flat[int(np.argmax(saliency))])


def random_pointing_rates(cell_tables, rng: np.random.Generator, draws: int) -> np.ndarray:
    """(draws,) pointing rates of uniform-random saliency maps over the images whose
    :func:`pointing_cells` tables are given (one map per image per draw)."""
    tables = np.stack([np.asarray(t, bool).ravel() for t in cell_tables])  # (n, h * w)
    rates = np.empty(draws)
    for d in range(draws):
        argmax = rng.random(tables.shape).argmax(axis=1)
        rates[d] = tables[np.arange(len(tables)), argmax].mean()
    return rates


class LocalizationAccumulator:
    """Accumulates Dice, PxAP, pointing and ROI hits over batches (masks stay on the host, batch by batch)."""

    def __init__(self, crop_shape):
        self.crop_shape = tuple(crop_shape)
        self.dice = {c: [] for c in CLASSES}
        self.pxap = {c: [] for c in CLASSES}
        self.pointing = {c: [] for c in CLASSES}
        self.pointing_random = {c: [] for c in CLASSES}
        self.hits = 0
        self.lesions = 0

    def update(self, saliency_maps, masks, patch_locations):
        saliency_maps = np.asarray(saliency_maps, np.float64)
        masks = np.asarray(masks)
        for i in range(masks.shape[0]):
            for c, name in enumerate(CLASSES):
                m = masks[i, ..., c]
                if m.any():
                    self.dice[name].append(dice(saliency_maps[i, ..., c], m))
                    self.pxap[name].append(pxap(saliency_maps[i, ..., c], m))
                    cells = pointing_cells(m, saliency_maps.shape[1:3])
                    self.pointing[name].append(bool(cells.flat[int(np.argmax(saliency_maps[i, ..., c]))]))
                    self.pointing_random[name].append(float(cells.mean()))
            h, t = roi_hits(masks[i], patch_locations[i], self.crop_shape)
            self.hits += h
            self.lesions += t

    def result(self, prefix: str = "val_") -> dict:
        out = {}
        for name in CLASSES:
            if self.dice[name]:
                out[f"{prefix}dice_{name}"] = float(np.mean(self.dice[name]))
                out[f"{prefix}pxap_{name}"] = float(np.mean(self.pxap[name]))
                out[f"{prefix}pointing_{name}"] = float(np.mean(self.pointing[name]))
                out[f"{prefix}pointing_{name}_random"] = float(np.mean(self.pointing_random[name]))
        if self.lesions:
            out[f"{prefix}roi_hit_rate"] = self.hits / self.lesions
        return out
