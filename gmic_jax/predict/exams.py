"""predict's inputs: exams of an exam list, of DICOM files or of the synthetic data, as image tasks.

Every reader returns ``(exams, failures)``: a malformed exam becomes one :class:`PredictError`
naming it and its file, and the other exams go on.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

from gmic_jax.data import exam_list as exam_list_lib
from gmic_jax.data.batch import VIEWS
from gmic_jax.data.image import DataError, dicom_laterality, dicom_view, is_dicom_path
from gmic_jax.data.synthetic import breast_labels

SYNTHETIC_SPLIT = "test"  # held out from training and validation


class PredictError(Exception):
    """One failure: which exam, which file, what is wrong."""

    def __init__(self, exam, path, problem: str):
        self.exam, self.path, self.problem = str(exam), str(path), problem
        super().__init__(f"exam {self.exam}: {self.path}: {problem}")


@dataclasses.dataclass
class ImageTask:
    """One image to predict: everything :func:`gmic_jax.predict.images.load_image` needs."""

    image_index: str  # its name in the CSVs and output files
    view: str  # 'L-CC', 'R-CC', 'L-MLO' or 'R-MLO'
    path: str  # the image file (or where it was expected)
    label: tuple = (math.nan, math.nan)  # (benign, malignant); NaN = unknown
    horizontal_flip: Optional[str] = None  # exam lists: 'YES'/'NO'; None: read off the image
    best_center: Optional[tuple] = None  # --preprocessed: the exam list's centre
    seg_paths: Optional[tuple] = None  # (benign, malignant) mask files in the window frame
    synthetic: Optional[tuple] = None  # --synthetic: render(seed, split, index, spec) arguments


@dataclasses.dataclass
class Exam:
    exam_id: str
    images: list
    breast_labels: dict = dataclasses.field(default_factory=dict)  # 'L'/'R' -> (benign, malignant)
    source: str = ""  # the exam list or DICOM file(s) it came from, for messages


def _image_path(images_dir, name: str) -> str:
    try:
        return exam_list_lib.find_image(images_dir, name)
    except DataError as e:
        return e.path  # <name>.png: loading it reports it missing


def exams_from_exam_list(
    exam_list_path, images_dir, preprocessed: bool = False, segmentations_dir=None
) -> tuple[list, list]:
    """(exams, failures) of an exam list (read by :func:`gmic_jax.data.exam_list.read_exam_list`:
    views may be missing, labels unknown)."""
    try:
        exams, errors = exam_list_lib.read_exam_list(exam_list_path)
    except DataError as e:
        return [], [PredictError("(all)", e.path, e.problem)]
    failures = [PredictError(e.exam, e.path, e.problem) for e in errors]
    out = []
    for exam in exams:
        missing = [image for image in exam.images if image.best_center is None]
        if preprocessed and missing:
            failures.append(
                PredictError(
                    exam.index,
                    exam_list_path,
                    f"not preprocessed: no best_center for "
                    f"{missing[0].view} image {missing[0].index} ({missing[0].name}); run "
                    "gmic-jax preprocess or leave out --preprocessed",
                )
            )
            continue
        tasks = []
        for image in exam.images:
            seg = None
            if segmentations_dir is not None:
                seg = tuple(os.path.join(str(segmentations_dir), name + ".png") for name in image.segmentations)
            tasks.append(
                ImageTask(
                    image.name,
                    image.view,
                    _image_path(images_dir, image.name),
                    image.label,
                    image.horizontal_flip,
                    image.best_center if preprocessed else None,
                    seg,
                )
            )
        out.append(Exam(str(exam.index), tasks, dict(exam.breast_labels), str(exam_list_path)))
    return out, failures


def _dicom_files(path) -> list:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or directory")
    return sorted(p for p in path.rglob("*") if p.is_file() and is_dicom_path(p))


def exams_from_dicom(path) -> tuple[list, list]:
    """(exams, failures) of DICOM files grouped by StudyInstanceUID; headers give laterality/view."""
    import pydicom  # optional (extra "data"): only --dicom needs it

    root = Path(path)
    try:
        files = _dicom_files(root)
    except DataError as e:
        return [], [PredictError("(all)", e.path, e.problem)]
    if not files:
        return [], [PredictError("(all)", root, "no DICOM files found")]
    studies: dict = collections.OrderedDict()
    failures, broken = [], set()
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as e:
            failures.append(
                PredictError("(unknown study)", f, f"not a readable DICOM header ({type(e).__name__}: {e})")
            )
            continue
        study = str(getattr(ds, "StudyInstanceUID", "") or "").strip()
        if not study:
            failures.append(PredictError("(unknown study)", f, "DICOM has no StudyInstanceUID (0020,000D)"))
            continue
        studies.setdefault(study, [])
        view, laterality = dicom_view(ds), dicom_laterality(ds)
        problems = []
        if view is None:
            problems.append(
                f"unknown view (ViewPosition {str(getattr(ds, 'ViewPosition', '') or '')!r}; expected CC or MLO)"
            )
        if laterality is None:
            problems.append("unknown laterality (ImageLaterality/Laterality must be L or R)")
        if problems:
            failures.append(PredictError(study, f, "; ".join(problems)))
            broken.add(study)
            continue
        rel = f.relative_to(root) if root.is_dir() else Path(f.name)
        name = rel.with_suffix("").as_posix().replace("/", "__")
        studies[study].append(ImageTask(name, f"{laterality}-{view}", str(f)))
    exams = []
    for study, images in studies.items():
        if study in broken or not images:
            continue
        images.sort(key=lambda t: (VIEWS.index(t.view), t.image_index))
        exams.append(Exam(study, images, {}, str(root)))
    return exams, failures


def exams_from_synthetic(num_exams: int, prep) -> tuple[list, list]:
    """The first ``num_exams`` exams of the synthetic data's held-out split, drawn as the
    checkpoint's training data was (``prep.synthetic``: seed, finding rates, lesion sizes).
    Exam e holds breasts 2e (left) and 2e + 1 (right), CC and MLO each; masks come with them."""
    spec = prep.synthetic.spec(prep.window_shape)
    seed = prep.synthetic.seed
    exams = []
    for e in range(num_exams):
        images, labels = [], {}
        for index in range(4 * e, 4 * e + 4):
            breast, view_index = divmod(index, 2)
            side = "LR"[breast % 2]
            view = f"{side}-{('CC', 'MLO')[view_index]}"
            labels[side] = tuple(float(v) for v in breast_labels(seed, SYNTHETIC_SPLIT, breast, spec))
            images.append(
                ImageTask(
                    f"synthetic{e}_{view}",
                    view,
                    f"<synthetic {SYNTHETIC_SPLIT} seed {seed} image {index}>",
                    labels[side],
                    synthetic=(seed, SYNTHETIC_SPLIT, index, spec),
                )
            )
        images.sort(key=lambda t: VIEWS.index(t.view))
        exams.append(Exam(str(e), images, labels, "synthetic"))
    return exams, []
