"""Loading one image task: read the file, make the model's window as the checkpoint's
preprocessing says, load its masks. A pure function of (task, preprocessing), so the input
pipeline (:mod:`gmic_jax.data.pipeline`, in worker processes or in this one) runs it for any image
in any order: :class:`ImageExamples` is its picklable load function.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from gmic_jax.data import cropping
from gmic_jax.data.image import DataError, read_image
from gmic_jax.data.image_to_window import to_window
from gmic_jax.data.synthetic import render
from gmic_jax.data.window import flip_for_model, load_segmentation, place_window, split_view
from gmic_jax.predict.exams import ImageTask
from gmic_jax.preprocessing import Preprocessing


@dataclasses.dataclass
class LoadedImage:
    window: np.ndarray  # (H, W) float32 raw window (not normalised)
    masks: Optional[np.ndarray] = None  # (H, W, 2) uint8 in the window frame


def load_image(task: ImageTask, prep: Preprocessing) -> LoadedImage:
    """Read one image and make its window (raw values; normalised on device).

    - preprocessing 'original': the original pipeline (:func:`~gmic_jax.data.image_to_window.gmic_window`),
      flipped by the exam's ``horizontal_flip`` (DICOM: read off the image); with ``best_center``
      (``--preprocessed``) the stored image is a crop and only flipped and placed;
    - 'cbis_ddsm': :func:`~gmic_jax.data.image_to_window.cbis_ddsm_window`;
    - 'window': the file is the window.

    Raises :class:`DataError` naming the file."""
    if task.synthetic is not None:  # rendered windows with their masks (preprocessing 'window')
        example = render(*task.synthetic)
        return LoadedImage(example["image"][..., 0].astype(np.float32), example["mask"])
    image = read_image(task.path)
    laterality, _ = split_view(task.view)
    if image.laterality is not None and image.laterality != laterality:
        raise DataError(task.path, f"the exam says {task.view} but the DICOM header says laterality {image.laterality}")
    if task.best_center is not None:  # --preprocessed: a cropped image and its centre
        window = place_window(
            flip_for_model(image.pixels, task.view, task.horizontal_flip),
            task.view,
            task.best_center,
            prep.window_shape,
            dtype=np.float32,
        )
    else:
        direction = None
        if prep.name == "original" and task.horizontal_flip is not None:
            direction = cropping.breast_direction(task.horizontal_flip, laterality)
        pixels = image.pixels if prep.name == "window" else image.to_uint()
        window, _ = to_window(
            prep.name,
            pixels,
            task.view,
            window_shape=prep.window_shape,
            iterations=prep.iterations,
            buffer_size=prep.buffer_size,
            direction=direction,
            path=task.path,
        )
    masks = None
    if task.seg_paths is not None:
        masks = np.stack([load_segmentation(p, prep.window_shape) for p in task.seg_paths], axis=-1)
    return LoadedImage(np.asarray(window, np.float32), masks)


class ImageExamples:
    """The input pipeline's load function: task -> {"window": (H, W) float32[, "masks": (H, W, 2)
    uint8]} (:func:`load_image` as arrays; picklable, for worker processes)."""

    def __init__(self, prep: Preprocessing):
        self.prep = prep

    def __call__(self, task: ImageTask) -> dict:
        loaded = load_image(task, self.prep)
        return {"window": loaded.window} if loaded.masks is None else {"window": loaded.window, "masks": loaded.masks}
