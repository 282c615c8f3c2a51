"""The model's input window: flip, place the 2944 x 1920 window at ``best_center``.

Placement follows the original inference code (no crop noise):

- the window is centred at ``best_center`` (top = y - H // 2, left = x - W // 2);
- an image shorter than the window is zero-padded: CC views equally above and below (the extra
  odd row below), MLO views below only, and the window then covers the padded height from row 0;
- an image narrower than the window is zero-padded on the right and the window starts at column 0;
- a window still running past an edge is moved inside the (padded) image.

Windows keep the stored values; normalisation happens on device
(:func:`gmic_jax.preprocessing.normalize_images`, per window, over all its pixels including padding).

Entry points:

- :func:`flip_for_model` then :func:`place_window` -- a preprocessed (cropped) image and its
  exam-list ``best_center`` -> the window, as the original's model runner makes it.
- :func:`load_segmentation` -- a lesion mask, already in the flipped window frame; a missing file
  is "no lesion of that class" (all zeros).

Window noise (the original's training-time augmentation around the best centre):

- :func:`noisy_window` -- one draw on the flipped crop: the window moved by up to ``crop_noise``
  and each border by up to ``size_noise``, resized back to the window shape (bicubic).
- :func:`noise_context` / :func:`draw_window` -- the same in two halves: the region of the padded
  image that any draw can touch (what ``gmic-jax cache --window-noise`` stores), then one draw from
  it. ``draw_window(*noise_context(image, ...)[:2], ...)`` equals ``noisy_window(image, ...)`` for
  the same generator state; masks drawn with it move with the image (nearest-neighbour resize).
- :func:`noise_borders` + :func:`cut_region` -- a draw's crop borders and the fixed-shape band of
  the context's rows holding them: what training ships, the crop + resize then runs on the device
  (:func:`gmic_jax.resample.crop_resize`, the same resize as :func:`crop_resized` here).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from gmic_jax.data.centers import WINDOW_SHAPE
from gmic_jax.data.cropping import needs_flip
from gmic_jax.data.image import DataError, read_png_array


def split_view(view: str) -> tuple[str, str]:
    """'L-CC' -> ('L', 'CC'). Raises ValueError for anything else."""
    if (
        not isinstance(view, str)
        or len(view) < 4
        or view[1] != "-"
        or view[0] not in "LR"
        or view[2:] not in ("CC", "MLO")
    ):
        raise ValueError(f"view must be one of L-CC, R-CC, L-MLO, R-MLO, got {view!r}")
    return view[0], view[2:]


def flip_for_model(pixels: np.ndarray, view: str, horizontal_flip: str) -> np.ndarray:
    """Mirror left-right when the exam's ``horizontal_flip`` says this view points left."""
    laterality, _ = split_view(view)
    return pixels[:, ::-1] if needs_flip(horizontal_flip, laterality) else pixels


def window_bounds(image_shape, view: str, center, window_shape=WINDOW_SHAPE, margin=(0, 0)):
    """Padding and window of the original's placement rules.

    Returns ``(pad_top, pad_bottom, pad_right), (top, left)``: the zero padding added to the image and
    the window's upper-left corner in the padded image. ``margin`` (rows, columns) is room kept
    for window noise: an image shorter than the window plus that room (CC: twice, above and below;
    MLO: once, below) or narrower (once, on the right) is padded to it, and the window then starts
    ``margin`` rows down (CC) or at row 0 (MLO), at column 0.
    """
    _, short_view = split_view(view) if "-" in view else ("", view)
    height, width = image_shape
    wh, ww = window_shape
    my, mx = (int(v) for v in margin)
    cy, cx = int(center[0]), int(center[1])
    top, left = cy - wh // 2, cx - ww // 2
    pad_top = pad_bottom = pad_right = 0
    if short_view == "CC":
        if height < wh + 2 * my:
            extra = wh - height + 2 * my
            pad_top, pad_bottom, top = extra // 2, extra - extra // 2, my
    elif short_view == "MLO":
        if height < wh + my:
            pad_bottom, top = wh - height + my, 0
    else:
        raise ValueError(f"view must be CC or MLO, got {view!r}")
    if width < ww + mx:
        pad_right, left = ww - width + mx, 0
    padded_h, padded_w = height + pad_top + pad_bottom, width + pad_right
    top = min(max(top, 0), padded_h - wh)
    left = min(max(left, 0), padded_w - ww)
    return (pad_top, pad_bottom, pad_right), (top, left)


def paste(out: np.ndarray, array: np.ndarray, row: int, col: int) -> np.ndarray:
    """Copy ``array`` into ``out`` with its [0, 0] at ``out[row, col]``, clipped to ``out``; returns ``out``."""
    r0, r1 = max(row, 0), min(row + array.shape[0], out.shape[0])
    c0, c1 = max(col, 0), min(col + array.shape[1], out.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = array[r0 - row : r1 - row, c0 - col : c1 - col]
    return out


def place_window(pixels: np.ndarray, view: str, center, window_shape=WINDOW_SHAPE, dtype=None) -> np.ndarray:
    """The (H, W) window of an already flipped image (or (h, w, k) masks), zero-padded as the original does."""
    (pad_top, _, _), (top, left) = window_bounds(pixels.shape[:2], view, center, window_shape)
    # window rows [top, top + wh) of the padded image = image rows [top - pad_top, ...)
    out = np.zeros(tuple(window_shape) + pixels.shape[2:], dtype=dtype or pixels.dtype)
    return paste(out, pixels, pad_top - top, -left)


def load_segmentation(path: Optional[str], window_shape=WINDOW_SHAPE) -> np.ndarray:
    """A lesion mask in the flipped window frame as uint8 {0, 1}; a missing file gives all zeros."""
    if path is None or not os.path.exists(path):
        return np.zeros(window_shape, dtype=np.uint8)
    mask = read_png_array(path)
    if mask.shape != tuple(window_shape):
        raise DataError(
            path,
            f"segmentation is {mask.shape[0]}x{mask.shape[1]}, expected "
            f"{window_shape[0]}x{window_shape[1]} (the flipped window frame)",
        )
    return (mask > 0).astype(np.uint8)


# ------------------------------------------------------------------------------------ window noise

# The original's training-time window noise at WINDOW_SHAPE (2944 x 1920), in pixels: how far the
# window may move (rows, columns) and how far each of its borders may move.
MAX_CROP_NOISE = (100, 100)
MAX_CROP_SIZE_NOISE = 100


def window_noise_amplitudes(window_shape) -> tuple[tuple[int, int], int]:
    """(max crop noise (y, x), max crop size noise) for a window: the original's, scaled."""
    sy, sx = window_shape[0] / WINDOW_SHAPE[0], window_shape[1] / WINDOW_SHAPE[1]
    return (int(round(MAX_CROP_NOISE[0] * sy)), int(round(MAX_CROP_NOISE[1] * sx))), int(
        round(MAX_CROP_SIZE_NOISE * sy)
    )


def _amplitudes(window_shape, crop_noise, size_noise) -> tuple[tuple[int, int], int]:
    default_crop, default_size = window_noise_amplitudes(window_shape)
    crop_noise = default_crop if crop_noise is None else crop_noise
    size_noise = default_size if size_noise is None else size_noise
    return (int(crop_noise[0]), int(crop_noise[1])), int(size_noise)


def noise_context(
    image: np.ndarray, view: str, center, window_shape=WINDOW_SHAPE, crop_noise=None, size_noise=None
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """What any draw of the window noise around ``center`` can see, for a flipped crop ``image``.

    The image is zero-padded as the original pads it for noise (:func:`window_bounds` with a margin
    of crop + size noise) and cut to the un-noised window plus that margin on every side (less
    where the padded image ends). Returns ``(context, (top, left), (row, col))``: the region (dtype
    of ``image``, at most ``window + 2 * margin`` in each dimension), the un-noised window's corner
    in it, and the image coordinates of ``context[0, 0]`` (negative inside padding above). Draws
    from the context equal draws on the whole padded image: they only depend on the room around
    the window up to ``margin``, which the cut keeps. Amplitudes default to
    :func:`window_noise_amplitudes`.
    """
    (ny, nx), s = _amplitudes(window_shape, crop_noise, size_noise)
    wh, ww = window_shape
    h, w = image.shape[:2]
    my, mx = ny + s, nx + s
    (pad_top, pad_bottom, pad_right), (top, left) = window_bounds((h, w), view, center, window_shape, (my, mx))
    padded_h, padded_w = h + pad_top + pad_bottom, w + pad_right
    r0, r1 = max(top - my, 0), min(top + wh + my, padded_h)
    c0, c1 = max(left - mx, 0), min(left + ww + mx, padded_w)
    context = np.zeros((r1 - r0, c1 - c0) + image.shape[2:], image.dtype)
    # image row y is padded row y + pad_top
    paste(context, image, pad_top - r0, -c0)
    return context, (top - r0, left - c0), (r0 - pad_top, c0)


def window_to_context(
    window: np.ndarray, image_shape, view: str, center, context_shape, origin, window_shape=WINDOW_SHAPE
) -> np.ndarray:
    """An array in the plain window's frame (:func:`place_window`; e.g. an exam list's lesion mask)
    moved into the frame of :func:`noise_context` (``context_shape``, ``origin``): zero where the
    plain window does not reach."""
    (pad_top, _, _), (top, left) = window_bounds(image_shape, view, center, window_shape)
    out = np.zeros(tuple(context_shape[:2]) + window.shape[2:], window.dtype)
    # plain window row 0 = image row top - pad_top = context row top - pad_top - origin[0]
    return paste(out, window, top - pad_top - int(origin[0]), left - int(origin[1]))


def noise_borders(
    context_shape, window_at, window_shape, rng: np.random.Generator, crop_noise, size_noise
) -> np.ndarray:
    """One draw of the crop borders ``[top, bottom, left, right]`` in a context (or padded image).

    Crop noise: the window moves by up to ``crop_noise`` (uniform in [-1, 1] times the amplitude,
    rounded), only towards a side with room when it touches an edge, the amplitude limited by the
    room on that side. Size noise: each border moves by up to ``size_noise`` (the amplitude first
    limited by the room around the moved window; the shorter side's scaled by the aspect ratio).
    ``rng`` draws two uniforms for the move (only when ``crop_noise`` is not zero), then four.
    """
    (ny, nx), s = (int(crop_noise[0]), int(crop_noise[1])), int(size_noise)
    wh, ww = window_shape
    H, W = context_shape[:2]
    top, left = window_at
    mult = rng.uniform(-1.0, 1.0, size=2) if (ny or nx) else np.zeros(2)
    my = abs(mult[0]) if top == 0 else -abs(mult[0]) if top + wh == H else mult[0]
    mx = abs(mult[1]) if left == 0 else -abs(mult[1]) if left + ww == W else mult[1]
    room_y = (H - top - wh) if my >= 0 else top
    room_x = (W - left - ww) if mx >= 0 else left
    dy = int(np.round(min(ny, room_y) * my))
    dx = int(np.round(min(nx, room_x) * mx))
    b = np.array([top + dy, top + dy + wh, left + dx, left + dx + ww], np.int64)

    size_mult = rng.uniform(-1.0, 1.0, size=4)
    sv, sh = _border_amplitudes(window_shape, min(s, b[0], H - b[1], b[2], W - b[3]))
    return b + np.round(np.array([sv, sv, sh, sh]) * size_mult).astype(np.int64)


def crop_resized(array: np.ndarray, borders, window_shape, nearest: bool = False) -> np.ndarray:
    """``array[top:bottom, left:right]`` resized to ``window_shape``: float32 bicubic, or (``nearest``)
    nearest neighbour in the array's dtype, per channel of an (h, w, k) array."""
    wh, ww = window_shape
    crop = array[borders[0] : borders[1], borders[2] : borders[3]]
    if not nearest:
        crop = np.asarray(crop, np.float32)
    if crop.shape[:2] == (wh, ww):
        return np.ascontiguousarray(crop)
    if nearest:
        channels = crop[..., None] if crop.ndim == 2 else crop
        out = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(channels[..., k], np.float32), mode="F").resize(
                        (ww, wh), Image.Resampling.NEAREST
                    )
                )
                for k in range(channels.shape[-1])
            ],
            axis=-1,
        ).astype(array.dtype)
        return out[..., 0] if crop.ndim == 2 else out
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(crop), mode="F").resize((ww, wh), Image.Resampling.BICUBIC), np.float32
    )


def _border_amplitudes(window_shape, size_noise) -> tuple[int, int]:
    """How far the (top, bottom) and (left, right) borders may move for border noise ``size_noise``:
    the window's longer side takes it, the shorter one scaled by the aspect ratio."""
    wh, ww = int(window_shape[0]), int(window_shape[1])
    s = int(size_noise)
    return (s, int(np.round(s * ww / wh))) if wh >= ww else (int(np.round(s * wh / ww)), s)


def noise_region_shape(window_shape, size_noise) -> tuple[int, int]:
    """The largest crop a draw with border noise ``size_noise`` can make: each border of the window
    moved outwards as far as it may (:func:`noise_borders`)."""
    sv, sh = _border_amplitudes(window_shape, size_noise)
    return int(window_shape[0]) + 2 * sv, int(window_shape[1]) + 2 * sh


def cut_region(context: np.ndarray, borders, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rows`` consecutive full-width rows of ``context`` (or of a zero-padded array holding
    it in its upper left corner) that the crop ``borders`` lies in, and the borders in their frame
    (int32).

    What the device path of the window noise ships per example: a fixed shape, so a batch is one
    array, and a contiguous block of a C-ordered context, so it copies at memcpy speed (cutting
    the columns too would ship 12% fewer bytes but copy them strided, 1.4x slower per byte
    here); the crop and resize then run on the device (:func:`gmic_jax.resample.crop_resize`).
    ``rows``: the tallest crop a draw can make (:func:`noise_region_shape`)."""
    b = np.asarray(borders, np.int64)
    if b[1] - b[0] > rows or rows > context.shape[0] or b[3] > context.shape[1]:
        raise ValueError(f"crop {b.tolist()} or context {context.shape[:2]} does not fit {rows} rows")
    r0 = min(int(b[0]), context.shape[0] - rows)
    return context[r0 : r0 + rows], (b - np.array([r0, r0, 0, 0])).astype(np.int32)


def draw_window(
    context: np.ndarray,
    window_at,
    window_shape,
    rng: np.random.Generator,
    crop_noise=None,
    size_noise=None,
    masks: Optional[np.ndarray] = None,
):
    """One draw of the window noise from a :func:`noise_context`: float32 (H, W) window, and with
    ``masks`` (context frame, (h, w, k)) the masks cut at the same borders (nearest neighbour).

    Returns the window alone when ``masks`` is None, else ``(window, masks)``."""
    (ny, nx), s = _amplitudes(window_shape, crop_noise, size_noise)
    borders = noise_borders(context.shape, window_at, window_shape, rng, (ny, nx), s)
    window = crop_resized(context, borders, window_shape)
    if masks is None:
        return window
    return window, crop_resized(masks, borders, window_shape, nearest=True)


def noisy_window(
    image: np.ndarray, full_view: str, center, window_shape, rng: np.random.Generator, crop_noise=None, size_noise=None
) -> np.ndarray:
    """One draw of the original's window noise around ``center`` on a flipped crop; float32 (H, W).

    The image is zero-padded as for the plain window but with room for the noise (CC: above and
    below; MLO: below; both: on the right); the window is moved inside, shifted by up to
    ``crop_noise`` (only towards where there is room), each border moved by up to ``size_noise``
    (scaled to the window's aspect ratio, limited by the room left), and the crop resized back to
    the window shape (bicubic). With zero noise this is :func:`place_window`. Amplitudes default to
    :func:`window_noise_amplitudes`.
    """
    amplitudes = _amplitudes(window_shape, crop_noise, size_noise)
    context, window_at, _ = noise_context(image, full_view, center, window_shape, *amplitudes)
    return draw_window(context, window_at, window_shape, rng, *amplitudes)
