"""Random-access data sources: ``len(source)`` and ``source[i]`` -> one example in the batch layout
(:mod:`gmic_jax.data.batch`). Grain reads them directly (they follow its RandomAccessDataSource
protocol); so does ``gmic-jax cache``.

- :class:`RecordSource` -- a list of :class:`ImageRecord` (raw image files + labels + optional mask
  files in the image's frame), through a named preprocessing (:mod:`gmic_jax.data.image_to_window`).
  The manifest CSV and the raw CBIS-DDSM reader produce these records.
- :class:`ExamListSource` -- an exam list written by ``gmic-jax preprocess`` (cropped images +
  ``best_center``), windows placed exactly as the original model runner does; segmentations are
  in the flipped window frame, a missing file meaning "no lesion of that class".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional, Sequence

import numpy as np

from gmic_jax.data import batch as batch_lib
from gmic_jax.data import cropping
from gmic_jax.data.centers import WINDOW_SHAPE
from gmic_jax.data.exam_list import find_image, read_exam_list, require_label
from gmic_jax.data.image import DataError, read_image
from gmic_jax.data.image_to_window import resize, to_window
from gmic_jax.data.window import flip_for_model, load_segmentation, place_window

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset. ``mask_paths`` = (benign files, malignant files), each a tuple of
    files in the image's frame whose union is that class's mask (empty: no lesion)."""

    image_id: str
    breast_id: str
    view: str  # 'L-CC', 'R-CC', 'L-MLO', 'R-MLO'
    label: tuple  # (benign, malignant)
    split: str
    path: str
    mask_paths: tuple = ((), ())
    patient: str = ""

    @property
    def has_masks(self) -> bool:
        return any(self.mask_paths[0]) or any(self.mask_paths[1])


def validation_fraction_of(patient: str, seed: int) -> float:
    """A patient's position in [0, 1), fixed by (seed, patient): the seeded train/validation split."""
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def assign_validation(records: Sequence[ImageRecord], fraction: float, seed: int) -> list:
    """Move the 'train' records of a seeded ``fraction`` of patients to 'val' (patient-grouped)."""
    out = []
    for r in records:
        if r.split == "train" and validation_fraction_of(r.patient or r.breast_id, seed) < fraction:
            r = dataclasses.replace(r, split="val")
        out.append(r)
    return out


def _read_mask(path: str) -> np.ndarray:
    return read_image(path).pixels > 0


class RecordSource:
    """Records -> examples. ``iterations`` (erosion/dilation steps) can be lowered for tiny test images."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        preprocessing: str = "original",
        window_shape=WINDOW_SHAPE,
        with_masks: Optional[bool] = None,
        iterations: int = cropping.NUM_ITERATIONS,
    ):
        self.records = list(records)
        self.preprocessing = preprocessing
        self.window_shape = tuple(window_shape)
        self.with_masks = any(r.has_masks for r in self.records) if with_masks is None else with_masks
        self.iterations = iterations

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_image(record.path)
        pixels = image.to_uint() if image.bit_depth > 8 else image.to_uint().astype(np.uint16)
        masks = None
        if self.with_masks:
            masks = []
            for paths in record.mask_paths:
                union = None
                for p in paths:
                    mask = _read_mask(p)
                    if mask.shape != pixels.shape:
                        mask = resize(mask.astype(np.uint8), pixels.shape, nearest=True) > 0
                    union = mask if union is None else union | mask
                masks.append(union)
        return self.make_example(record, pixels, masks)

    def make_example(self, record: ImageRecord, pixels: np.ndarray, masks) -> dict:
        """The example of ``record`` from its stored ``pixels`` and full-image ``masks`` (or None):
        the source's preprocessing to its window, in the batch layout."""
        window, mask_window = to_window(
            self.preprocessing,
            pixels,
            record.view,
            masks=masks,
            window_shape=self.window_shape,
            iterations=self.iterations,
            path=record.path,
        )
        return batch_lib.make_example(
            window, record.label, record.image_id, record.breast_id, record.view, mask=mask_window
        )

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} images, preprocessing={self.preprocessing!r})"


class ExamListSource:
    """The images of a preprocessed exam list (``gmic-jax preprocess`` output) as examples, read
    with :func:`~gmic_jax.data.exam_list.read_exam_list` (its rules: missing views, PNG or DICOM,
    segmentation names). An image without a label fails with an error naming its exam and file."""

    preprocessing = "original"  # the windows are the original pipeline's (recorded by gmic-jax cache)

    def __init__(
        self,
        exam_list_path,
        images_dir,
        segmentation_dir: Optional[str] = None,
        window_shape=WINDOW_SHAPE,
        with_masks: Optional[bool] = None,
    ):
        exams, errors = read_exam_list(exam_list_path)
        if errors:
            raise errors[0]
        self.items = [image for exam in exams for image in exam.images]
        for item in self.items:
            if item.best_center is None:
                raise DataError(
                    exam_list_path,
                    f"exam {item.exam} is not preprocessed (no best_center for "
                    f"{item.view} image {item.name!r}); run gmic-jax preprocess first",
                )
        self.images_dir = str(images_dir)
        self.segmentation_dir = segmentation_dir
        self.window_shape = tuple(window_shape)
        self.with_masks = segmentation_dir is not None if with_masks is None else with_masks

    def __len__(self) -> int:
        return len(self.items)

    def flipped_pixels(self, index: int) -> np.ndarray:
        """The stored (cropped) image ``index``, flipped as the model sees it, raw values."""
        item = self.items[index]
        return flip_for_model(
            read_image(find_image(self.images_dir, item.name)).pixels, item.view, item.horizontal_flip
        )

    def __getitem__(self, index: int) -> dict:
        return self.example(index)

    def example(self, index: int, pixels: Optional[np.ndarray] = None) -> dict:
        """Example ``index``; ``pixels``: its :meth:`flipped_pixels` when the caller has them already."""
        item = self.items[index]
        label = require_label(item, find_image(self.images_dir, item.name))
        pixels = self.flipped_pixels(index) if pixels is None else pixels
        window = place_window(pixels, item.view, item.best_center, self.window_shape)
        mask = None
        if self.with_masks:
            mask = np.stack(
                [
                    load_segmentation(
                        None if self.segmentation_dir is None else os.path.join(self.segmentation_dir, seg + ".png"),
                        self.window_shape,
                    )
                    for seg in item.segmentations
                ],
                axis=-1,
            )
        breast = f"exam{item.exam}/{item.view[0]}"
        return batch_lib.make_example(window, label, item.name, breast, item.view, mask=mask)
