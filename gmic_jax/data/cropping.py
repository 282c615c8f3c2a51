"""Cropping a mammogram to its breast, by the original inference pipeline's rules.

The mask is ``pixel > 0``; it is eroded 100 times by the 4-connected cross (treating pixels past
the border as background), the largest 4-connected component is kept and dilated 100 times by the
same cross; the crop is that component's bounding box plus up to 50 px on the top, the bottom and
the side where the breast ends (the chest-wall side is never extended).

k-fold erosion/dilation by the cross equals erosion/dilation by the L1 ball of radius k, so both are
done with one exact taxicab distance transform each instead of 2 x 100 image passes.

Along with the box, the original records (all in the crop's frame, flipped so the breast starts
on the left): the rightmost points of the dilated mask in its lower two thirds
``((y_first, y_last), x)``, the bottommost points ``(y, (x_first, x_last))`` and the number of
empty columns between the image edge on the chest-wall side and the mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from gmic_jax.data.image import DataError

NUM_ITERATIONS = 100
BUFFER_SIZE = 50
RIGHTMOST_SEARCH_FROM = 1 / 3  # rightmost points are searched below the top third of the crop


def breast_direction(horizontal_flip: str, laterality: str) -> str:
    """Which way the breast points in the stored image: 'left' or 'right'.

    With ``horizontal_flip == 'NO'`` left breasts point right and right breasts point left;
    'YES' swaps that.
    """
    if horizontal_flip not in ("YES", "NO"):
        raise ValueError(f"horizontal_flip must be 'YES' or 'NO', got {horizontal_flip!r}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    points_right = (laterality == "L") == (horizontal_flip == "NO")
    return "right" if points_right else "left"


def needs_flip(horizontal_flip: str, laterality: str) -> bool:
    """Whether the model's input is the mirror image of the stored one (breast made to point right)."""
    return breast_direction(horizontal_flip, laterality) == "left"


def erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, iterations=k)`` (cross, border = background), exactly."""
    if iterations <= 0:
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_cdt(padded, metric="taxicab")
    return dist[1:-1, 1:-1] > iterations


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=k)`` (cross), exactly."""
    if iterations <= 0:
        return mask.copy()
    if not mask.any():
        return mask.copy()
    dist = ndimage.distance_transform_cdt(~mask, metric="taxicab")
    return dist <= iterations


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component (ties: the one scipy labels first)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        raise ValueError("empty mask")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@dataclasses.dataclass(frozen=True)
class CropInfo:
    """The four values the original adds to the exam list for one image (numpy int64s)."""

    window_location: tuple  # (top, bottom, left, right) in the stored image
    rightmost_points: tuple  # ((y_first, y_last), x)
    bottommost_points: tuple  # (y, (x_first, x_last))
    distance_from_starting_side: np.int64

    def as_tuple(self):
        return (self.window_location, self.rightmost_points, self.bottommost_points, self.distance_from_starting_side)


def crop_info(
    pixels: np.ndarray,
    direction: str,
    iterations: int = NUM_ITERATIONS,
    buffer_size: int = BUFFER_SIZE,
    path: str = "<array>",
) -> CropInfo:
    """The crop window and landmark points of one image (see the module docstring).

    ``direction`` is :func:`breast_direction` of the image. Raises :class:`DataError` when no breast
    is found (blank image, or nothing survives the erosion).
    """
    if direction not in ("left", "right"):
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    height, width = pixels.shape
    mask = pixels > 0
    if not mask.any():
        raise DataError(path, "blank image: no pixel above 0, no breast found")
    eroded = erode(mask, iterations)
    if not eroded.any():
        raise DataError(
            path,
            f"no breast found: nothing is left of the foreground after {iterations} "
            "erosions (image blank or too small)",
        )
    breast = dilate(largest_component(eroded), iterations)

    rows = np.flatnonzero(breast.any(axis=1))
    cols = np.flatnonzero(breast.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1

    bottom_row = bottom - 1
    bottom_cols = np.flatnonzero(breast[bottom_row])

    top -= min(top, buffer_size)
    bottom += min(height - bottom, buffer_size)
    distance = width - right if direction == "left" else left
    if direction == "left":
        left -= min(left, buffer_size)
    else:
        right += min(width - right, buffer_size)

    # Bottommost points in the crop's frame, mirrored when the breast points left.
    by = bottom_row - top
    if direction == "left":
        bx_first, bx_last = right - bottom_cols[-1], right - bottom_cols[0]
    else:
        bx_first, bx_last = bottom_cols[0] - left, bottom_cols[-1] - left

    crop = breast[top:bottom, left:right]
    skip = int(crop.shape[0] * RIGHTMOST_SEARCH_FROM)
    search = crop[skip:]
    search_cols = np.flatnonzero(search.any(axis=0))
    if search_cols.size == 0:
        raise DataError(path, "no breast found in the lower two thirds of the crop")
    rx = int(search_cols[-1] if direction == "right" else search_cols[0])
    ry = np.flatnonzero(search[:, rx]) + skip
    if direction == "left":
        rx = crop.shape[1] - rx

    i64 = np.int64
    return CropInfo(
        window_location=(i64(top), i64(bottom), i64(left), i64(right)),
        rightmost_points=((i64(ry[0]), i64(ry[-1])), i64(rx)),
        bottommost_points=(i64(by), (i64(bx_first), i64(bx_last))),
        distance_from_starting_side=i64(distance),
    )
