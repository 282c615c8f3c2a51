"""The model's input window: flip, place the 2944 x 1920 window at ``best_center``, normalise.

Placement follows the original inference code (no crop noise):

- the window is centred at ``best_center`` (top = y - H // 2, left = x - W // 2);
- an image shorter than the window is zero-padded: CC views equally above and below (the extra
  odd row below), MLO views below only, and the window then covers the padded height from row 0;
- an image narrower than the window is zero-padded on the right and the window starts at column 0;
- a window still running past an edge is moved inside the (padded) image.

Normalisation is per window, over all its pixels including padding: ``(x - mean) / max(std, 1e-5)``.

Entry points:

- :func:`load_window` -- path in, normalised float32 (H, W) window out: what the model takes.
- :func:`load_raw_window` -- the same window before normalisation (raw stored values), for caches
  and training-time augmentation, which normalises on device.
- :func:`load_segmentation` -- a lesion mask, already in the flipped window frame; a missing file
  is "no lesion of that class" (all zeros).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from gmic_jax.data.centers import WINDOW_SHAPE
from gmic_jax.data.cropping import needs_flip
from gmic_jax.data.image import DataError, read_image, read_png_array


def split_view(view: str) -> tuple[str, str]:
    """'L-CC' -> ('L', 'CC'). Raises ValueError for anything else."""
    if not isinstance(view, str) or len(view) < 4 or view[1] != "-" or view[0] not in "LR" \
            or view[2:] not in ("CC", "MLO"):
        raise ValueError(f"view must be one of L-CC, R-CC, L-MLO, R-MLO, got {view!r}")
    return view[0], view[2:]


def flip_for_model(pixels: np.ndarray, view: str, horizontal_flip: str) -> np.ndarray:
    """Mirror left-right when the exam's ``horizontal_flip`` says this view points left."""
    laterality, _ = split_view(view)
    return pixels[:, ::-1] if needs_flip(horizontal_flip, laterality) else pixels


def window_bounds(image_shape, view: str, center, window_shape=WINDOW_SHAPE):
    """Padding and window of the original's placement rules.

    Returns ``(pad_top, pad_bottom, pad_right), (top, left)``: the zero padding added to the image and
    the window's upper-left corner in the padded image.
    """
    _, short_view = split_view(view) if "-" in view else ("", view)
    height, width = image_shape
    wh, ww = window_shape
    cy, cx = int(center[0]), int(center[1])
    top, left = cy - wh // 2, cx - ww // 2
    pad_top = pad_bottom = pad_right = 0
    if height < wh:
        extra = wh - height
        if short_view == "CC":
            pad_top, pad_bottom = extra // 2, extra - extra // 2
        elif short_view == "MLO":
            pad_bottom = extra
        else:
            raise ValueError(f"view must be CC or MLO, got {view!r}")
        top = 0
    if width < ww:
        pad_right = ww - width
        left = 0
    padded_h, padded_w = height + pad_top + pad_bottom, width + pad_right
    top = min(max(top, 0), padded_h - wh)
    left = min(max(left, 0), padded_w - ww)
    return (pad_top, pad_bottom, pad_right), (top, left)


def place_window(pixels: np.ndarray, view: str, center, window_shape=WINDOW_SHAPE,
                 dtype=None) -> np.ndarray:
    """The (H, W) window of an already flipped image, zero-padded as the original does."""
    (pad_top, _, _), (top, left) = window_bounds(pixels.shape, view, center, window_shape)
    wh, ww = window_shape
    out = np.zeros(window_shape, dtype=dtype or pixels.dtype)
    # window rows [top, top + wh) of the padded image = image rows [top - pad_top, ...)
    r0, c0 = top - pad_top, left
    src_r0, src_r1 = max(r0, 0), min(r0 + wh, pixels.shape[0])
    src_c0, src_c1 = max(c0, 0), min(c0 + ww, pixels.shape[1])
    if src_r1 > src_r0 and src_c1 > src_c0:
        out[src_r0 - r0:src_r1 - r0, src_c0 - c0:src_c1 - c0] = pixels[src_r0:src_r1, src_c0:src_c1]
    return out


def normalize_window(window: np.ndarray) -> np.ndarray:
    """``(x - mean) / max(std, 1e-5)`` over the whole window, in float32."""
    window = np.array(window, dtype=np.float32, copy=True)
    window -= np.mean(window)
    window /= np.maximum(np.std(window), np.float32(1e-5))
    return window


def load_raw_window(image_path, view: str, horizontal_flip: str, best_center,
                    window_shape=WINDOW_SHAPE) -> np.ndarray:
    """Read a preprocessed (cropped) image, flip it and place the window: float32 (H, W), raw values.

    ``view`` is the full view name ('L-CC', ...), ``horizontal_flip`` the exam's 'YES'/'NO' and
    ``best_center`` the exam list's ``(y, x)`` for this image.
    """
    pixels = read_image(image_path).pixels
    return place_window(flip_for_model(pixels, view, horizontal_flip), view, best_center, window_shape)


def load_window(image_path, view: str, horizontal_flip: str, best_center,
                window_shape=WINDOW_SHAPE) -> np.ndarray:
    """The model's input for one preprocessed image: float32 (H, W), normalised per window."""
    return normalize_window(load_raw_window(image_path, view, horizontal_flip, best_center, window_shape))


def load_segmentation(path: Optional[str], window_shape=WINDOW_SHAPE) -> np.ndarray:
    """A lesion mask in the flipped window frame as uint8 {0, 1}; a missing file gives all zeros."""
    if path is None or not os.path.exists(path):
        return np.zeros(window_shape, dtype=np.uint8)
    mask = read_png_array(path)
    if mask.shape != tuple(window_shape):
        raise DataError(path, f"segmentation is {mask.shape[0]}x{mask.shape[1]}, expected "
                              f"{window_shape[0]}x{window_shape[1]} (the flipped window frame)")
    return (mask > 0).astype(np.uint8)
