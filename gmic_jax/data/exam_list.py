"""Exam lists: the original's pickled list of exams, read safely, checked, and written back.

An exam is a dict with ``horizontal_flip`` ('YES'/'NO'), one list of image names per view
(``'L-CC': ['0_L-CC']``, ...), ``cancer_label`` and optional ``<view>_benign_seg`` /
``<view>_malignant_seg`` name lists. Preprocessing adds, per view, a list (one entry per image) of
``window_location``, ``rightmost_points``, ``bottommost_points``, ``distance_from_starting_side``
and ``best_center``, as tuples of numpy int64 -- the same layout and types the original writes,
so either implementation reads the other's files.

:func:`read_exam_list` is the one reader (``gmic-jax preprocess``, ``gmic-jax predict`` and
:class:`~gmic_jax.data.sources.ExamListSource` behind ``gmic-jax cache``). Its rules:

- a view whose key is absent or whose list is empty has no image (e.g. one breast after a
  mastectomy); an exam with no image at all is malformed;
- a label (``cancer_label['left_benign']``, ...) that is absent or None is unknown (NaN): predict
  leaves its cell empty, training data refuses the image (:func:`require_label`);
- the segmentation of class c of image j of a view is the file ``<name>.png`` in the segmentation
  folder, with ``name`` = the exam's ``<view>_<c>_seg[j]`` when that is a non-empty string, else
  ``<image name>_<c>``; a missing file means no lesion of that class;
- an image ``name`` is the file ``name.png``, ``name.dcm`` or ``name.dicom`` (:func:`find_image`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
from typing import Optional

import numpy as np

from gmic_jax.data.batch import CLASSES, VIEWS
from gmic_jax.data.image import DataError
from gmic_jax.files import write_atomic

PREPROCESSING_KEYS = (
    "window_location",
    "rightmost_points",
    "bottommost_points",
    "distance_from_starting_side",
    "best_center",
)
IMAGE_SUFFIXES = (".png", ".dcm", ".dicom", "")

# What an exam list may contain besides plain Python: numpy scalars and arrays. Anything else
# (e.g. a pickle that would run code) is refused.
_ALLOWED_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an exam list")


def load_exam_list(path) -> list:
    """Read an exam list pickle; raises :class:`DataError` when it is unreadable or not a list of dicts.

    Individual exams are not checked here: see :func:`read_exam_list`.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(path, f"cannot read exam list: {e.strerror or e}") from None
    try:
        exams = _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise DataError(path, f"malformed exam list: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(exams, list):
        raise DataError(path, f"malformed exam list: expected a list of exams, got {type(exams).__name__}")
    return exams


class ExamError(DataError):
    """A malformed exam of an exam list: ``path`` is the exam list, ``exam`` the exam's position."""

    def __init__(self, path, exam: int, problem: str):
        self.exam = exam
        super().__init__(path, problem)

    def __reduce__(self):
        return (type(self), (self.path, self.exam, self.problem))


@dataclasses.dataclass(frozen=True)
class ExamImage:
    """One image of an exam list, as :func:`read_exam_list` reads it."""

    exam: int  # position of its exam in the list
    view: str  # 'L-CC', 'R-CC', 'L-MLO' or 'R-MLO'
    index: int  # position in its view's list
    name: str  # image name: file <name>.png / .dcm in the images folder
    horizontal_flip: str  # the exam's 'YES' / 'NO'
    label: tuple = (math.nan, math.nan)  # (benign, malignant) of its breast; NaN = unknown
    segmentations: tuple = ()  # (benign, malignant) mask names (see the module docstring)
    best_center: Optional[tuple] = None  # (y, x) of a preprocessed exam list, else None


@dataclasses.dataclass(frozen=True)
class Exam:
    index: int  # position in the list (the exam's id in messages and outputs)
    images: tuple  # ExamImage, in the original's order (VIEWS, then list order)
    breast_labels: dict  # 'L' / 'R' -> (benign, malignant), NaN = unknown
    entry: dict  # the exam's dict as stored


def _label(cancer_label, key: str) -> float:
    value = cancer_label.get(key)
    if value is None:
        return math.nan
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return float(value)
    raise ValueError(f"cancer_label[{key!r}] must be a number, got {value!r}")


def _exam(entry, index: int) -> Exam:
    """One exam dict -> :class:`Exam`; raises ValueError listing what is malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"a {type(entry).__name__}, not a dict")
    problems = []
    flip = entry.get("horizontal_flip")
    if flip not in ("YES", "NO"):
        problems.append(f"horizontal_flip must be 'YES' or 'NO', got {flip!r}")
    cancer = entry.get("cancer_label", {})
    if not isinstance(cancer, dict):
        problems.append(f"cancer_label must be a dict, got {type(cancer).__name__}")
        cancer = {}
    labels = {}
    for side in ("left", "right"):
        try:
            labels[side[0].upper()] = (_label(cancer, f"{side}_benign"), _label(cancer, f"{side}_malignant"))
        except ValueError as e:
            problems.append(str(e))
    names = {}
    for view in VIEWS:
        value = entry.get(view, [])
        if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) and n for n in value):
            problems.append(f"view {view!r} must be a list of image names (or empty, or absent), got {value!r}")
        else:
            names[view] = list(value)
    if not problems and not any(names.values()):
        problems.append(f"no image: every view ({', '.join(VIEWS)}) is absent or empty")
    if problems:
        raise ValueError("; ".join(problems))
    centers = entry.get("best_center")
    images = []
    for view in VIEWS:
        for j, name in enumerate(names[view]):
            segs = []
            for cls in CLASSES:
                listed = entry.get(f"{view}_{cls}_seg")
                seg = listed[j] if isinstance(listed, (list, tuple)) and j < len(listed) else None
                segs.append(seg if isinstance(seg, str) and seg else f"{name}_{cls}")
            try:
                center = tuple(int(v) for v in centers[view][j])
            except (KeyError, IndexError, TypeError, ValueError):
                center = None
            images.append(ExamImage(index, view, j, name, flip, labels[view[0]], tuple(segs), center))
    return Exam(index, tuple(images), labels, entry)


def read_exam_list(path) -> tuple[list[Exam], list[ExamError]]:
    """(well-formed exams, one :class:`ExamError` per malformed exam naming it and the file).

    Raises :class:`DataError` when the file itself is unreadable (see :func:`load_exam_list`)."""
    exams, errors = [], []
    for i, entry in enumerate(load_exam_list(path)):
        try:
            exams.append(_exam(entry, i))
        except ValueError as e:
            errors.append(ExamError(path, i, f"malformed exam list: exam {i}: {e}"))
    return exams, errors


def require_label(image: ExamImage, path) -> tuple:
    """The image's label; :class:`DataError` naming the exam and ``path`` when it is unknown
    (training, evaluation and caches need every label)."""
    if any(math.isnan(v) for v in image.label):
        side = "left" if image.view[0] == "L" else "right"
        raise DataError(
            path,
            f"exam {image.exam}: {image.view} image {image.name!r} has no label "
            f"(cancer_label needs {side}_benign and {side}_malignant); training data "
            "needs every label",
        )
    return image.label


def find_image(images_dir, name: str) -> str:
    """The file of image ``name`` in ``images_dir``: ``name.png``, ``name.dcm``, ``name.dicom`` or
    ``name`` itself; :class:`DataError` naming ``name.png`` when there is none."""
    for suffix in IMAGE_SUFFIXES:
        path = os.path.join(str(images_dir), name + suffix)
        if os.path.isfile(path):
            return path
    raise DataError(os.path.join(str(images_dir), name + ".png"), "image not found (also tried .dcm, .dicom)")


def add_preprocessing(exam: dict, results: dict) -> dict:
    """A copy of ``exam`` with the preprocessing keys, from ``results[name] = {key: value}``
    (per view the exam has, absent views staying absent)."""
    out = {k: v for k, v in exam.items() if k not in PREPROCESSING_KEYS}
    for key in PREPROCESSING_KEYS:
        out[key] = {view: [results[name][key] for name in exam[view]] for view in VIEWS if view in exam}
    return out


def save_exam_list(path, exams: list) -> None:
    """Pickle an exam list atomically (temp file + rename), highest protocol as the original."""
    write_atomic(path, pickle.dumps(exams, protocol=pickle.HIGHEST_PROTOCOL))


def as_int_tuple(value):
    """Nested tuples of numpy ints -> nested tuples of Python ints (for JSON, comparisons)."""
    if isinstance(value, (tuple, list)):
        return tuple(as_int_tuple(v) for v in value)
    if isinstance(value, np.integer):
        return int(value)
    return value
