"""The one batch layout every data source yields (exam lists, manifest CSV, CBIS-DDSM, the cache).

A batch is a plain dict of numpy arrays:

==========  ==================  =========  ==================================================
key         shape               dtype      meaning
==========  ==================  =========  ==================================================
image       (N, H, W, 1)        uint16     raw window values: flipped so the breast starts at
                                           the left edge, cropped/placed/padded, NOT normalised
                                           (normalisation and augmentation happen on device)
label       (N, 2)              float32    [benign, malignant], image level, 0 or 1
mask        (N, H, W, 2)        uint8      optional: lesion masks [benign, malignant], 0 or 1,
                                           in the same frame as ``image``
image_id    (N,)                str        unique image name
breast_id   (N,)                str        images of one breast share it ("<patient>/<L|R>")
view        (N,)                str        'L-CC', 'R-CC', 'L-MLO' or 'R-MLO'
==========  ==================  =========  ==================================================

Training batches with window noise (``data.window_noise``) carry, instead of ``image``, what the
device needs to make each window (:meth:`gmic_jax.data.cache.CacheSource.noisy_region`):

==========  ==================  =========  ==================================================
region      (N, h, w)           uint16     the band of the cached noise context's rows that
                                           holds the drawn crop (one fixed shape per cache)
borders     (N, 4)              int32      the crop [top, bottom, left, right] in ``region``,
                                           resized to the window on the device before the
                                           step (:func:`gmic_jax.train.step.make_window_fn`)
==========  ==================  =========  ==================================================

A single example is the same dict without the leading N. Keep this layout stable: training,
evaluation, the cache and the benchmarks all depend on it. String keys stay on the host; send
``device_arrays(batch)`` to the accelerator.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

IMAGE = "image"
LABEL = "label"
MASK = "mask"
IMAGE_ID = "image_id"
BREAST_ID = "breast_id"
VIEW = "view"
REGION = "region"
BORDERS = "borders"

IMAGE_DTYPE = np.uint16
LABEL_DTYPE = np.float32
MASK_DTYPE = np.uint8
REQUIRED_KEYS = (IMAGE, LABEL, IMAGE_ID, BREAST_ID, VIEW)
DEVICE_KEYS = (IMAGE, LABEL, MASK, REGION, BORDERS)
TRAIN_KEYS = (IMAGE, REGION, BORDERS, LABEL)  # what the training step takes
VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")  # the original's order of the four standard views
CLASSES = ("benign", "malignant")  # the order of a label's (and a mask's, a prediction's) two entries


def make_example(
    image: np.ndarray,
    label: Sequence[float],
    image_id: str,
    breast_id: str,
    view: str,
    mask: Optional[np.ndarray] = None,
) -> dict:
    """One example in the batch layout, checked. ``image`` is (H, W) or (H, W, 1);
    ``mask`` (H, W, 2) or None."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != 1:
        raise ValueError(f"image must be (H, W) or (H, W, 1), got {image.shape}")
    if image.dtype != IMAGE_DTYPE:
        if np.issubdtype(image.dtype, np.floating):
            image = np.rint(image)
        image = np.clip(image, 0, np.iinfo(IMAGE_DTYPE).max).astype(IMAGE_DTYPE)
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    example = {
        IMAGE: image,
        LABEL: np.asarray(label, dtype=LABEL_DTYPE).reshape(2),
        IMAGE_ID: np.str_(image_id),
        BREAST_ID: np.str_(breast_id),
        VIEW: np.str_(view),
    }
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2] + (2,):
            raise ValueError(f"mask must be {image.shape[:2] + (2,)}, got {mask.shape}")
        example[MASK] = (mask > 0).astype(MASK_DTYPE)
    return example


def stack(examples: Sequence[Mapping]) -> dict:
    """Stack examples into a batch (what Grain's Batch does, for use without Grain)."""
    if not examples:
        raise ValueError("no examples to stack")
    keys = examples[0].keys()
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


def check_batch(batch: Mapping, window_shape: Optional[Sequence[int]] = None) -> None:
    """Raise ValueError unless ``batch`` follows the layout above."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}")
    image = batch[IMAGE]
    if image.ndim != 4 or image.shape[-1] != 1 or image.dtype != IMAGE_DTYPE:
        raise ValueError(f"image must be (N, H, W, 1) {np.dtype(IMAGE_DTYPE)}, got {image.shape} {image.dtype}")
    n = image.shape[0]
    if window_shape is not None and tuple(image.shape[1:3]) != tuple(window_shape):
        raise ValueError(f"image windows are {image.shape[1:3]}, expected {tuple(window_shape)}")
    if batch[LABEL].shape != (n, 2) or batch[LABEL].dtype != LABEL_DTYPE:
        raise ValueError(f"label must be ({n}, 2) float32, got {batch[LABEL].shape} {batch[LABEL].dtype}")
    for key in (IMAGE_ID, BREAST_ID, VIEW):
        if batch[key].shape != (n,) or batch[key].dtype.kind != "U":
            raise ValueError(f"{key} must be ({n},) str, got {batch[key].shape} {batch[key].dtype}")
    if MASK in batch:
        mask = batch[MASK]
        if mask.shape != image.shape[:3] + (2,) or mask.dtype != MASK_DTYPE:
            raise ValueError(f"mask must be {image.shape[:3] + (2,)} uint8, got {mask.shape} {mask.dtype}")


def device_arrays(batch: Mapping) -> dict:
    """The numeric part of a batch (what goes to the accelerator)."""
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}
