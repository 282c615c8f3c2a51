"""Optimal centre of the model's 2944 x 1920 window, by the original inference pipeline's rules.

All in the flipped crop (breast starting at the left edge, pointing right):

- x is pinned so that the window's right edge sits next to the rightmost point:
  ``x = rightmost_x - W // 2 - 1``.
- CC: y ranges over the centres that keep the window inside the image (just the image's middle
  row ``H // 2`` when the image is not taller than the window); the one whose window covers the
  most non-zero pixels wins, ties going to the centre nearest ``(H // 2, W // 2)`` (then the
  smallest y). A window that runs past the top/left edge is shifted inside before counting.
- MLO: y is pinned to the bottommost point, ``min(bottommost_y, last non-zero row of the
  rightmost W columns) - H // 2 - 1``.

Centres may be negative or past the image: :mod:`gmic_jax.data.window` pads as the original does.
"""

from __future__ import annotations

import numpy as np

WINDOW_SHAPE = (2944, 1920)


def _window_sums(counts: np.ndarray, centers: np.ndarray, window_shape) -> np.ndarray:
    """Non-zero pixels in each candidate window (shifted inside at the top/left, clipped at the
    bottom/right), from an integral image. ``centers`` is (K, 2)."""
    shape = np.array(counts.shape) - 1
    half = np.array(window_shape) // 2
    rest = np.array(window_shape) - half
    tl = centers - half
    shift = np.clip(-tl, 0, None)
    tl = np.clip(tl, 0, None)
    br = np.minimum(centers + rest + shift, shape)
    tl = np.minimum(tl, br)  # a window entirely past the image covers nothing
    y0, x0, y1, x1 = tl[:, 0], tl[:, 1], br[:, 0], br[:, 1]
    return counts[y1, x1] - counts[y0, x1] - counts[y1, x0] + counts[y0, x0]


def best_center(image: np.ndarray, view: str, rightmost_points, bottommost_points, window_shape=WINDOW_SHAPE) -> tuple:
    """``(y, x)`` as numpy int64s, the original's ``best_center`` of one flipped crop.

    ``view`` is 'CC' or 'MLO' (or the full 'L-CC' style name); the points are the crop's
    ``rightmost_points`` and ``bottommost_points``.
    """
    view = view[2:] if len(view) > 3 and view[1] == "-" else view
    height, width = image.shape
    wh, ww = window_shape
    rightmost_x = int(rightmost_points[1])
    x = rightmost_x - ww // 2 - 1
    if view == "MLO":
        bottommost_y = int(bottommost_points[0])
        rows = np.flatnonzero((image[:, -ww:] != 0).any(axis=1))
        if rows.size:
            bottommost_y = min(int(rows[-1]), bottommost_y)
        return np.int64(bottommost_y - wh // 2 - 1), np.int64(x)
    if view != "CC":
        raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")

    middle = height // 2
    lowest, highest = wh // 2, height - (wh - wh // 2)
    if lowest >= highest:
        return np.int64(middle), np.int64(x)
    ys = np.arange(lowest, highest + 1, dtype=np.int64)
    counts = np.zeros((height + 1, width + 1), dtype=np.int64)
    np.cumsum(np.cumsum(image > 0, axis=0), axis=1, out=counts[1:, 1:])
    centers = np.stack([ys, np.full_like(ys, x)], axis=1)
    sums = _window_sums(counts, centers, window_shape)
    best = ys[sums == sums.max()]
    # ties: nearest the image centre (x is shared, so only y matters), first in ascending y
    return np.int64(best[np.argmin((best - middle) ** 2)]), np.int64(x)
