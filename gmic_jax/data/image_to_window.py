"""From a raw stored image (and its lesion masks) to the model's window.

Selected by the preprocessing name (:mod:`gmic_jax.preprocessing`; a model records its choice in
its config.json, and predict applies the same one):

- ``"original"`` -- the original inference pipeline: crop (erosion / largest component / dilation,
  buffer), flip so the breast starts at the left edge, best centre (:func:`crop_flip_center`, the
  one implementation, also behind ``gmic-jax preprocess``), 2944 x 1920 window with the original's
  padding. Values stay raw; per-window standardisation happens on device.
- ``"cbis_ddsm"`` -- the paper's CBIS-DDSM preprocessing: keep the largest component (after
  erosion / dilation), crop to it, orient the breast so it starts at the left edge, resize to the
  window shape (bilinear; masks nearest). Values stay raw; scaling to [0, 1] (x / max over the
  window) happens on device.
- ``"window"`` -- the stored image already is the window (e.g. synthetic data): taken as it is.

When the stored orientation is not known (manifest, CBIS-DDSM, DICOM), it is read off the image:
the breast points away from the side holding more foreground.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

from gmic_jax.data import centers as centers_lib
from gmic_jax.data import cropping
from gmic_jax.data.centers import WINDOW_SHAPE
from gmic_jax.data.image import DataError
from gmic_jax.data.window import place_window, split_view
from gmic_jax.preprocessing import NAMES as PREPROCESSINGS


def detect_direction(pixels: np.ndarray) -> str:
    """'right' when the breast lies against the left edge (more foreground in the left half)."""
    columns = (pixels > 0).sum(axis=0)
    half = pixels.shape[1] // 2
    return "right" if columns[:half].sum() >= columns[pixels.shape[1] - half :].sum() else "left"


def _stack_masks(masks, shape, path) -> Optional[np.ndarray]:
    if masks is None:
        return None
    out = np.zeros(shape + (len(masks),), dtype=np.uint8)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != shape:
            mask = resize(mask, shape, nearest=True)
        out[..., i] = mask > 0
    return out


def crop_flip_center(
    pixels: np.ndarray,
    full_view: str,
    direction: str,
    window_shape=WINDOW_SHAPE,
    iterations: int = cropping.NUM_ITERATIONS,
    buffer_size: int = cropping.BUFFER_SIZE,
    path: str = "<array>",
):
    """The original pipeline up to the window, on one stored image whose breast points ``direction``:
    crop to the breast, flip it to point right, find the window's best centre.

    Returns ``(crop, flipped, center)``: the :class:`~gmic_jax.data.cropping.CropInfo` (in the
    stored image's frame), the flipped crop and the best centre ``(y, x)`` as numpy int64 (the
    exam-list values). Raises :class:`DataError` naming ``path`` when no breast is found."""
    _, view = split_view(full_view)
    crop = cropping.crop_info(pixels, direction, iterations, buffer_size, path=path)
    top, bottom, left, right = (int(v) for v in crop.window_location)
    flipped = pixels[top:bottom, left:right]
    if direction == "left":
        flipped = flipped[:, ::-1]
    center = centers_lib.best_center(flipped, view, crop.rightmost_points, crop.bottommost_points, window_shape)
    return crop, flipped, center


def gmic_window(
    pixels: np.ndarray,
    full_view: str,
    direction: Optional[str] = None,
    masks: Optional[Sequence[Optional[np.ndarray]]] = None,
    window_shape=WINDOW_SHAPE,
    iterations: int = cropping.NUM_ITERATIONS,
    buffer_size: int = cropping.BUFFER_SIZE,
    path: str = "<array>",
):
    """The original pipeline on one raw image: ``(window (H, W) of pixels' dtype, masks (H, W, k) | None)``.

    ``masks`` (same frame as ``pixels``; None entries = no lesion of that class) follow the same
    crop, flip and placement. ``direction`` defaults to :func:`detect_direction`.
    """
    direction = direction or detect_direction(pixels)
    crop, flipped, center = crop_flip_center(pixels, full_view, direction, window_shape, iterations, buffer_size, path)
    window = place_window(flipped, full_view, center, window_shape)
    stacked = _stack_masks(masks, pixels.shape, path)
    if stacked is not None:
        top, bottom, left, right = (int(v) for v in crop.window_location)
        stacked = stacked[top:bottom, left:right]
        if direction == "left":
            stacked = stacked[:, ::-1]
        stacked = np.stack(
            [place_window(stacked[..., i], full_view, center, window_shape) for i in range(stacked.shape[-1])], axis=-1
        )
    return window, stacked


def resize(array: np.ndarray, shape, nearest: bool = False) -> np.ndarray:
    """Resize a 2-D array to ``shape`` (H, W): bilinear (values rounded back for integer input) or nearest."""
    array = np.asarray(array)
    if tuple(array.shape) == tuple(shape):
        return array.copy()
    if nearest:
        rows = (np.arange(shape[0]) * array.shape[0] // shape[0]).astype(np.intp)
        cols = (np.arange(shape[1]) * array.shape[1] // shape[1]).astype(np.intp)
        return array[rows[:, None], cols[None, :]]
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    out = np.asarray(image.resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR))
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(array.dtype)
    return out


def cbis_ddsm_window(
    pixels: np.ndarray,
    masks: Optional[Sequence[Optional[np.ndarray]]] = None,
    window_shape=WINDOW_SHAPE,
    iterations: int = cropping.NUM_ITERATIONS,
    path: str = "<array>",
):
    """The paper's CBIS-DDSM preprocessing: ``(image (H, W) of pixels' dtype, masks (H, W, k) | None)``."""
    mask = pixels > 0
    if not mask.any():
        raise DataError(path, "blank image: no pixel above 0, no breast found")
    eroded = cropping.erode(mask, iterations)
    if not eroded.any():
        raise DataError(path, f"no breast found: nothing is left after {iterations} erosions")
    breast = cropping.dilate(cropping.largest_component(eroded), iterations) & mask
    rows = np.flatnonzero(breast.any(axis=1))
    cols = np.flatnonzero(breast.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    image = np.where(breast, pixels, 0)[box]
    stacked = _stack_masks(masks, pixels.shape, path)
    if stacked is not None:
        stacked = stacked[box]
    if detect_direction(image) == "left":
        image = image[:, ::-1]
        stacked = None if stacked is None else stacked[:, ::-1]
    image = resize(image, window_shape)
    if stacked is not None:
        stacked = np.stack(
            [resize(stacked[..., i], window_shape, nearest=True) for i in range(stacked.shape[-1])], axis=-1
        )
    return image, stacked


def to_window(
    preprocessing: str,
    pixels: np.ndarray,
    full_view: str,
    masks=None,
    window_shape=WINDOW_SHAPE,
    iterations: int = cropping.NUM_ITERATIONS,
    buffer_size: int = cropping.BUFFER_SIZE,
    direction: Optional[str] = None,
    path: str = "<array>",
):
    """Dispatch on the preprocessing name (see the module docstring): ``(window, masks | None)``.
    ``direction`` (original only): how the stored breast points, when the caller knows it."""
    if preprocessing == "original":
        return gmic_window(
            pixels,
            full_view,
            direction=direction,
            masks=masks,
            window_shape=window_shape,
            iterations=iterations,
            buffer_size=buffer_size,
            path=path,
        )
    if preprocessing == "cbis_ddsm":
        return cbis_ddsm_window(pixels, masks=masks, window_shape=window_shape, iterations=iterations, path=path)
    if preprocessing == "window":
        if pixels.shape != tuple(window_shape):
            raise DataError(
                path,
                f"image is {pixels.shape[0]}x{pixels.shape[1]}; this model takes "
                f"{window_shape[0]}x{window_shape[1]} windows (preprocessing 'window': "
                "no cropping or resizing)",
            )
        return pixels, _stack_masks(masks, pixels.shape, path)
    raise ValueError(f"unknown preprocessing {preprocessing!r}; choose from {PREPROCESSINGS}")
