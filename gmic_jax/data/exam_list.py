"""Exam lists: the original's pickled list of exams, read safely, checked, and written back.

An exam is a dict with ``horizontal_flip`` ('YES'/'NO'), one list of image names per view
(``'L-CC': ['0_L-CC']``, ...), ``cancer_label`` and optional ``<view>_benign_seg`` /
``<view>_malignant_seg`` name lists. Preprocessing adds, per view, a list (one entry per image) of
``window_location``, ``rightmost_points``, ``bottommost_points``, ``distance_from_starting_side``
and ``best_center``, as tuples of numpy int64 -- the same layout and types the original writes,
so either implementation reads the other's files.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from gmic_jax.data.image import VIEWS, DataError

PREPROCESSING_KEYS = ("window_location", "rightmost_points", "bottommost_points",
                      "distance_from_starting_side", "best_center")

# What an exam list may contain besides plain Python: numpy scalars and arrays. Anything else
# (e.g. a pickle that would run code) is refused.
_ALLOWED_GLOBALS = {
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an exam list")


def _check_exam(exam, index: int) -> list[str]:
    problems = []
    if not isinstance(exam, dict):
        return [f"exam {index} is a {type(exam).__name__}, not a dict"]
    flip = exam.get("horizontal_flip")
    if flip not in ("YES", "NO"):
        problems.append(f"exam {index}: horizontal_flip must be 'YES' or 'NO', got {flip!r}")
    for view in VIEWS:
        if view not in exam:
            problems.append(f"exam {index}: missing view {view!r}")
        elif not isinstance(exam[view], (list, tuple)) or not exam[view] \
                or not all(isinstance(name, str) and name for name in exam[view]):
            problems.append(f"exam {index}: view {view!r} must be a non-empty list of image names, "
                            f"got {exam[view]!r}")
    return problems


def load_exam_list(path) -> list:
    """Read an exam list pickle; raises :class:`DataError` when it is unreadable or not a list of dicts.

    Individual exams are not checked here: see :func:`check_exams`.
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


def check_exams(exams: list, path) -> tuple[list[int], list[DataError]]:
    """Indices of well-formed exams, and one :class:`DataError` per malformed one."""
    good, errors = [], []
    for i, exam in enumerate(exams):
        problems = _check_exam(exam, i)
        if problems:
            errors.append(DataError(path, "malformed exam list: " + "; ".join(problems)))
        else:
            good.append(i)
    return good, errors


def images_of_exam(exam: dict):
    """(full_view, index_in_view, image_name) for every image of an exam, in the original's order."""
    for view in VIEWS:
        for j, name in enumerate(exam[view]):
            yield view, j, name


def add_preprocessing(exam: dict, results: dict) -> dict:
    """A copy of ``exam`` with the preprocessing keys, from ``results[name] = {key: value}``."""
    out = {k: v for k, v in exam.items() if k not in PREPROCESSING_KEYS}
    for key in PREPROCESSING_KEYS:
        out[key] = {view: [results[name][key] for name in exam[view]] for view in VIEWS}
    return out


def save_exam_list(path, exams: list) -> None:
    """Pickle an exam list atomically (temp file + rename), highest protocol as the original."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(exams, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def as_int_tuple(value):
    """Nested tuples of numpy ints -> nested tuples of Python ints (for JSON, comparisons)."""
    if isinstance(value, (tuple, list)):
        return tuple(as_int_tuple(v) for v in value)
    if isinstance(value, np.integer):
        return int(value)
    return value
