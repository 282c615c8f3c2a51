"""`gmic-jax predict`: screening exams in; predictions, saliency maps and patch figures out.

    gmic-jax predict --exam-list exams.pkl --images DIR --checkpoint DIR [--checkpoint DIR ...]
                     --output OUT [--preprocessed] [--tta N] [--seed S] [--visualize]
                     [--segmentations DIR] [--batch-size B]
    gmic-jax predict --dicom DIR|FILE --checkpoint DIR ... --output OUT [...]
    gmic-jax predict --synthetic N --checkpoint WORKDIR --output OUT --visualize

Inputs
    Exam list (the original's pickle): every image of every view list is predicted. Without
    ``--preprocessed`` the images are the stored mammograms (``DIR/<name>.png`` or ``.dcm``) and
    the preprocessing the checkpoint records is run on them (for converted original checkpoints:
    the original pipeline -- crop, flip by ``horizontal_flip``, optimal centre, window). With
    ``--preprocessed`` the exam list and images are ``gmic-jax preprocess`` output (cropped
    images, ``best_center`` in the exam list), read as the original's model runner reads them.
    DICOM: every DICOM file under DIR (or one FILE); exams are grouped by StudyInstanceUID,
    laterality and view come from the headers, the breast's orientation from the image; labels
    are unknown (empty cells).
    Synthetic (``--synthetic N``, for checkpoints trained on :mod:`gmic_jax.data.synthetic`): the
    first N exams of its held-out 'test' split, with labels and masks (-> localization.csv).

Checkpoints
    Any directory :func:`gmic_jax.load_checkpoint` reads. Several = an ensemble: the prediction is
    the mean of the models' y_fusion, each model with its own configuration (its own t). Saliency
    maps, patches and figures are those of the first checkpoint (as the original's ensemble
    visualises its first model). All checkpoints must take the same window and preprocessing.

    The preprocessing comes from config.json's ``preprocessing`` section:
    ``{"name": N, "window_shape": [H, W], "normalization": ..., "iterations": 100, "buffer_size": 50}``
    with N one of

    - ``original`` (also ``gmic``): the original inference pipeline (``iterations`` and
      ``buffer_size`` are its erosion/dilation steps and crop buffer; defaults as the original);
    - ``cbis_ddsm``: the paper's CBIS-DDSM preprocessing;
    - ``window`` (also ``none``, ``synthetic``): the images already are the model's windows
      (H x W, breast against the left edge, as the synthetic data); they are only normalised.

    ``normalization``: ``standardize`` (= ``per_window_standardize``, the original's) or
    ``unit_range``; the default follows the name.

Test-time augmentation (``--tta N``, seeded by ``--seed``)
    The prediction becomes the mean over N augmented draws of each image (saliency maps, patches
    and localisation stay those of the un-augmented window, which is aligned with the masks).
    With the original preprocessing a draw is the original's training-time window noise: the
    window moved by up to 100 px and its borders by up to 100 px around the best centre, then
    resized back (amplitudes scaled by window_shape / (2944, 1920)). Otherwise a draw is the
    training augmentation of :mod:`gmic_jax.augment` on device. Draws depend only on
    (seed, image name, draw), never on batching.

Outputs (in OUT)
    predictions.csv           image_index, benign_pred, malignant_pred, benign_label, malignant_label
    breast_predictions.csv    exam, breast, benign_pred, malignant_pred, benign_label, malignant_label
                              (prediction = mean of the breast's CC and MLO view predictions)
    saliency/<image>.npy      float32 (2, h, w): benign then malignant, in the model's window frame
    visualization/<image>.png with --visualize (see :mod:`gmic_jax.visualize`)
    localization.csv          with --segmentations (exam-list mode; masks in the window frame as
                              the original's): image_index, dice_benign, dice_malignant,
                              pxap_benign, pxap_malignant, roi_hit -- one row per image with a
                              lesion; an empty cell is undefined (no lesion of that class).
                              Definitions in :mod:`gmic_jax.metrics`.
    failures.txt              one line per failure, when anything failed

Batching: images of all exams go through ONE compiled function with a fixed batch size (the
last batch is padded), split over the local devices; nothing about an image's result depends on
the batch size or on its batch neighbours.

Bad input: a missing or corrupt image, an unknown view, a malformed exam, ... is reported with the
exam and the file; that exam is left out of every output and the others are predicted; the exit
status is then 1. A checkpoint that cannot be used (unreadable, parameters that do not fit its
configuration, ensemble members that disagree on the input) affects every exam: nothing is
predicted and the exit status is 1.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gmic_jax.checkpoint import CheckpointError
from gmic_jax.config import GMICConfig
from gmic_jax.data import centers as centers_lib
from gmic_jax.data import cropping
from gmic_jax.data import exam_list as exam_list_lib
from gmic_jax.data.image import VIEWS, DataError, is_dicom_path, read_image
from gmic_jax.data.window import flip_for_model, load_segmentation, noisy_window, place_window, split_view

PREDICTIONS_CSV = "predictions.csv"
BREAST_CSV = "breast_predictions.csv"
LOCALIZATION_CSV = "localization.csv"
FAILURES_TXT = "failures.txt"
SALIENCY_DIR = "saliency"
VISUALIZATION_DIR = "visualization"

PREDICTION_COLUMNS = ("image_index", "benign_pred", "malignant_pred", "benign_label", "malignant_label")
BREAST_COLUMNS = ("exam", "breast", "benign_pred", "malignant_pred", "benign_label", "malignant_label")
LOCALIZATION_COLUMNS = ("image_index", "dice_benign", "dice_malignant", "pxap_benign", "pxap_malignant",
                        "roi_hit")
CLASSES = ("benign", "malignant")

ORIGINAL_WINDOW = centers_lib.WINDOW_SHAPE


class PredictError(Exception):
    """One failure: which exam, which file, what is wrong."""

    def __init__(self, exam, path, problem: str):
        self.exam, self.path, self.problem = str(exam), str(path), problem
        super().__init__(f"exam {self.exam}: {self.path}: {problem}")


# ------------------------------------------------------------------------------- preprocessing

_NAMES = {"original": "original", "gmic": "original", "cbis_ddsm": "cbis_ddsm",
          "window": "window", "none": "window", "synthetic": "window"}
_NORMALIZATIONS = {"standardize": "standardize", "per_window_standardize": "standardize",
                   "unit_range": "unit_range"}
_DEFAULT_NORMALIZATION = {"original": "standardize", "cbis_ddsm": "unit_range", "window": "standardize"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a stored image into the model's window (see the module docstring)."""

    name: str = "original"
    window_shape: tuple = ORIGINAL_WINDOW
    normalization: str = "standardize"
    iterations: int = cropping.NUM_ITERATIONS
    buffer_size: int = cropping.BUFFER_SIZE

    @classmethod
    def from_doc(cls, doc, image_shape, where: str = "config.json") -> "Preprocessing":
        """From a config.json ``preprocessing`` section; ``image_shape`` is the model's (H, W)."""
        doc = dict(doc or {"name": "original"})
        name = _NAMES.get(str(doc.get("name")))
        if name is None:
            raise CheckpointError(f"{where}: unknown preprocessing {doc.get('name')!r}; "
                                  f"predict knows {sorted(_NAMES)}")
        window = tuple(int(v) for v in doc.get("window_shape", image_shape))
        if window != tuple(image_shape):
            raise CheckpointError(f"{where}: preprocessing window_shape {list(window)} differs from the "
                                  f"model's image_shape {list(image_shape)}")
        norm = doc.get("normalization", _DEFAULT_NORMALIZATION[name])
        if norm not in _NORMALIZATIONS:
            raise CheckpointError(f"{where}: unknown normalization {norm!r}; expected one of "
                                  f"{sorted(_NORMALIZATIONS)}")
        return cls(name, window, _NORMALIZATIONS[norm], int(doc.get("iterations", cropping.NUM_ITERATIONS)),
                   int(doc.get("buffer_size", cropping.BUFFER_SIZE)))

    def to_doc(self) -> dict:
        return {"name": self.name, "window_shape": list(self.window_shape),
                "normalization": self.normalization, "iterations": self.iterations,
                "buffer_size": self.buffer_size}


# ------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class ImageTask:
    """One image to predict."""

    image_index: str            # its name in the CSVs and output files
    view: str                   # 'L-CC', 'R-CC', 'L-MLO' or 'R-MLO'
    path: str                   # the image file (or where it was expected)
    label: tuple = (math.nan, math.nan)  # (benign, malignant); NaN = unknown
    horizontal_flip: Optional[str] = None   # exam lists: 'YES'/'NO'; None: read off the image
    best_center: Optional[tuple] = None     # --preprocessed: the exam list's centre
    seg_paths: Optional[tuple] = None       # (benign, malignant) mask files in the window frame
    synthetic: Optional[tuple] = None       # --synthetic: render(seed, split, index, spec) arguments


@dataclasses.dataclass
class Exam:
    exam_id: str
    images: list
    breast_labels: dict = dataclasses.field(default_factory=dict)  # 'L'/'R' -> (benign, malignant)
    source: str = ""  # the exam list or DICOM file(s) it came from, for messages


def _label(cancer_label, side: str) -> tuple:
    def get(key):
        value = cancer_label.get(f"{side}_{key}") if isinstance(cancer_label, dict) else None
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan
    return get("benign"), get("malignant")


def _find_image(images_dir, name: str) -> str:
    from gmic_jax.data.preprocess import find_image
    try:
        return find_image(images_dir, name)
    except DataError:
        return os.path.join(str(images_dir), name + ".png")  # the load reports it missing


def exams_from_exam_list(exam_list_path, images_dir, preprocessed: bool = False,
                         segmentations_dir=None) -> tuple[list, list]:
    """(exams, failures) of an exam list; malformed exams become failures naming exam and file."""
    try:
        raw = exam_list_lib.load_exam_list(exam_list_path)
    except DataError as e:
        return [], [PredictError("(all)", e.path, e.problem)]
    good, errors = exam_list_lib.check_exams(raw, exam_list_path)
    bad = [i for i in range(len(raw)) if i not in set(good)]
    failures = [PredictError(i, e.path, e.problem) for i, e in zip(bad, errors)]
    exams = []
    for i in good:
        exam = raw[i]
        try:
            images = []
            for view, j, name in exam_list_lib.images_of_exam(exam):
                center = None
                if preprocessed:
                    try:
                        center = tuple(int(v) for v in exam["best_center"][view][j])
                    except (KeyError, IndexError, TypeError, ValueError):
                        raise PredictError(i, exam_list_path, f"not preprocessed: no best_center for "
                                           f"{view} image {j} ({name}); run gmic-jax preprocess or "
                                           "leave out --preprocessed") from None
                seg = None
                if segmentations_dir is not None:
                    seg = tuple(_segmentation_path(segmentations_dir, exam, view, j, name, cls)
                                for cls in CLASSES)
                images.append(ImageTask(name, view, _find_image(images_dir, name),
                                        _label(exam.get("cancer_label"), "left" if view[0] == "L" else "right"),
                                        exam["horizontal_flip"], center, seg))
        except PredictError as e:
            failures.append(e)
            continue
        exams.append(Exam(str(i), images, {s[0].upper(): _label(exam.get("cancer_label"), s)
                                           for s in ("left", "right")}, str(exam_list_path)))
    return exams, failures


def _segmentation_path(directory, exam, view, j, name, cls) -> str:
    """The exam list's ``<view>_<cls>_seg`` name when present, else ``<image>_<cls>`` (as the original)."""
    names = exam.get(f"{view}_{cls}_seg")
    seg = names[j] if isinstance(names, (list, tuple)) and j < len(names) and names[j] else f"{name}_{cls}"
    return os.path.join(str(directory), seg + ".png")


def _dicom_files(path) -> list:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or directory")
    return sorted(p for p in path.rglob("*") if p.is_file() and is_dicom_path(p))


def exams_from_dicom(path) -> tuple[list, list]:
    """(exams, failures) of DICOM files grouped by StudyInstanceUID; headers give laterality/view."""
    import pydicom

    from gmic_jax.data.image import _dicom_laterality, _dicom_view

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
            failures.append(PredictError("(unknown study)", f, f"not a readable DICOM header "
                                         f"({type(e).__name__}: {e})"))
            continue
        study = str(getattr(ds, "StudyInstanceUID", "") or "").strip()
        if not study:
            failures.append(PredictError("(unknown study)", f, "DICOM has no StudyInstanceUID (0020,000D)"))
            continue
        studies.setdefault(study, [])
        view, laterality = _dicom_view(ds), _dicom_laterality(ds)
        problems = []
        if view is None:
            problems.append(f"unknown view (ViewPosition {str(getattr(ds, 'ViewPosition', '') or '')!r}; "
                            "expected CC or MLO)")
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


SYNTHETIC_SPLIT = "test"  # held out from training and validation


def exams_from_synthetic(num_exams: int, prep_doc: dict, window_shape) -> tuple[list, list]:
    """The first ``num_exams`` exams of the synthetic data's held-out split, drawn as the
    checkpoint's training data was (seed and finding rates from its preprocessing section).
    Exam e holds breasts 2e (left) and 2e + 1 (right), CC and MLO each; masks come with them."""
    from gmic_jax.data.synthetic import SyntheticSpec, breast_labels

    info = dict(prep_doc.get("synthetic") or {})
    defaults = SyntheticSpec()
    spec = SyntheticSpec(image_shape=tuple(window_shape), p_benign=float(info.get("p_benign", defaults.p_benign)),
                         p_malignant=float(info.get("p_malignant", defaults.p_malignant)))
    seed = int(info.get("seed", 0))
    exams = []
    for e in range(num_exams):
        images, labels = [], {}
        for index in range(4 * e, 4 * e + 4):
            breast, view_index = divmod(index, 2)
            side = "LR"[breast % 2]
            view = f"{side}-{('CC', 'MLO')[view_index]}"
            labels[side] = tuple(float(v) for v in breast_labels(seed, SYNTHETIC_SPLIT, breast, spec))
            images.append(ImageTask(f"synthetic{e}_{view}", view, f"<synthetic {SYNTHETIC_SPLIT} seed {seed} "
                                    f"image {index}>", labels[side], synthetic=(seed, SYNTHETIC_SPLIT, index, spec)))
        images.sort(key=lambda t: VIEWS.index(t.view))
        exams.append(Exam(str(e), images, labels, "synthetic"))
    return exams, []


# ------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class LoadedImage:
    window: np.ndarray                    # (H, W) float32 raw window (not normalised)
    draws: list                           # host-side TTA windows, (H, W) float32 each
    masks: Optional[np.ndarray] = None    # (H, W, 2) uint8 in the window frame


def _image_key(seed: int, image_index: str, draw: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(image_index.encode()), draw]))


def original_source(pixels: np.ndarray, full_view: str, direction: str, prep: Preprocessing,
                    path: str = "<array>") -> tuple[np.ndarray, tuple]:
    """The original pipeline up to the window: (flipped crop, best centre (y, x))."""
    _, view = split_view(full_view)
    crop = cropping.crop_info(pixels, direction, prep.iterations, prep.buffer_size, path=path)
    top, bottom, left, right = (int(v) for v in crop.window_location)
    cropped = pixels[top:bottom, left:right]
    if direction == "left":
        cropped = cropped[:, ::-1]
    center = centers_lib.best_center(cropped, view, crop.rightmost_points, crop.bottommost_points,
                                     prep.window_shape)
    return cropped, (int(center[0]), int(center[1]))


def load_image(task: ImageTask, prep: Preprocessing, tta: int = 0, seed: int = 0) -> LoadedImage:
    """Read one image and make its window (and its TTA draws when they are made on the host).

    Raises :class:`DataError` naming the file."""
    draws = []
    if task.synthetic is not None:  # rendered windows with their masks (preprocessing 'window')
        from gmic_jax.data.synthetic import render

        example = render(*task.synthetic)
        return LoadedImage(example["image"][..., 0].astype(np.float32), [], example["mask"])
    image = read_image(task.path)
    laterality, _ = split_view(task.view)
    if image.laterality is not None and image.laterality != laterality:
        raise DataError(task.path, f"the exam says {task.view} but the DICOM header says laterality "
                                   f"{image.laterality}")
    if prep.name == "original":
        if task.best_center is not None:  # --preprocessed: a cropped image and its centre
            source = flip_for_model(image.pixels, task.view, task.horizontal_flip)
            center = task.best_center
        else:
            pixels = image.to_uint()
            if task.horizontal_flip is not None:
                direction = cropping.breast_direction(task.horizontal_flip, laterality)
            else:
                from gmic_jax.data.transforms import detect_direction
                direction = detect_direction(pixels)
            source, center = original_source(pixels, task.view, direction, prep, path=task.path)
        window = place_window(source, task.view, center, prep.window_shape, dtype=np.float32)
        draws = [noisy_window(source, task.view, center, prep.window_shape,
                              _image_key(seed, task.image_index, d))
                 for d in range(1, tta + 1)]
    elif prep.name == "cbis_ddsm":
        from gmic_jax.data.transforms import cbis_ddsm_window
        window, _ = cbis_ddsm_window(image.to_uint(), window_shape=prep.window_shape,
                                     iterations=prep.iterations, path=task.path)
    else:  # "window": the file is the model's window already
        window = image.pixels
        if window.shape != tuple(prep.window_shape):
            raise DataError(task.path, f"image is {window.shape[0]}x{window.shape[1]}; this checkpoint "
                                       f"takes {prep.window_shape[0]}x{prep.window_shape[1]} windows "
                                       "(preprocessing 'window': no cropping or resizing)")
    masks = None
    if task.seg_paths is not None:
        masks = np.stack([load_segmentation(p, prep.window_shape) for p in task.seg_paths], axis=-1)
    return LoadedImage(np.asarray(window, np.float32), draws, masks)


# --------------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass
class Model:
    directory: str
    config: GMICConfig
    variables: dict
    preprocessing: Preprocessing
    augment: object = None  # AugmentConfig from the training config, when recorded
    preprocessing_doc: dict = dataclasses.field(default_factory=dict)  # config.json's section as written


def _flat_shapes(tree) -> dict:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v)) for path, v in leaves}


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: GMICConfig) -> dict:
    """{'params/ds_net/...': shape} of GMIC(config), traced abstractly (no compute)."""
    import jax

    from gmic_jax.models import init_variables

    expected = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    return _flat_shapes({k: expected[k] for k in ("params", "batch_stats") if k in expected})


def check_variables(config: GMICConfig, variables, directory) -> None:
    """Raise :class:`CheckpointError` unless ``variables`` have exactly the parameters of GMIC(config)."""
    want = _expected_shapes(config)
    have = _flat_shapes({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {have[k]}, expected {want[k]})")
        raise CheckpointError(
            f"{directory}: the saved parameters are not those of the architecture in its config.json "
            f"(local_net={config.local_net}, crop_shape={list(config.crop_shape)}, K={config.K}): "
            + "; ".join(parts))


def _training_augment(doc: dict, directory):
    """The AugmentConfig a training workdir recorded (its config's ``augment`` section), else None."""
    train = doc.get("train")
    section = train.get("augment") if isinstance(train, dict) else None
    if not isinstance(section, dict):
        return None
    from gmic_jax.augment import AugmentConfig

    section = dict(section)
    if not section.pop("enabled", True):
        return None
    try:
        return AugmentConfig.from_dict(section)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/config.json: bad train.augment section: {e}") from None


def load_models(directories: Sequence) -> list:
    """Load and check every checkpoint of an ensemble; raise :class:`CheckpointError` naming the bad one."""
    from gmic_jax.checkpoint import load_checkpoint, read_config

    if not directories:
        raise CheckpointError("no --checkpoint given")
    models = []
    for d in directories:
        try:
            config, variables = load_checkpoint(d)
            _, doc = read_config(d)
        except CheckpointError:
            raise
        except Exception as e:  # orbax errors for missing/corrupt steps
            raise CheckpointError(f"{d}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        check_variables(config, variables, d)
        prep = Preprocessing.from_doc(doc.get("preprocessing"), config.image_shape, where=f"{d}/config.json")
        models.append(Model(str(d), config, variables, prep, _training_augment(doc, d),
                            dict(doc.get("preprocessing") or {})))
    first = models[0]
    for m in models[1:]:
        if m.config.image_shape != first.config.image_shape or m.preprocessing != first.preprocessing:
            raise CheckpointError(
                f"{m.directory}: takes {list(m.config.image_shape)} windows with preprocessing "
                f"{m.preprocessing.to_doc()}, but {first.directory} takes {list(first.config.image_shape)} "
                f"with {first.preprocessing.to_doc()}; an ensemble needs one input for all its models")
    return models


# ------------------------------------------------------------------------------------- forward

FORWARD_OUTPUTS = ("saliency_map", "patch_locations", "patch_attns", "patches")


@functools.lru_cache(maxsize=8)
def compiled_forward(configs: tuple, normalization: str, augment, devices: tuple):
    """The one jit-compiled function of a run (cached per configuration):

    ``(variables_list, images (B, H, W) float32 raw, ids (B, 2) int32, key_data) -> outputs``

    with ``outputs['y_fusion']`` (B, M, 2) of every model and the first model's
    ``FORWARD_OUTPUTS``. ``ids`` = (image hash, draw): rows with draw > 0 are augmented on
    device with ``augment`` when it is given (each row from its own key).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from gmic_jax.models import GMIC
    from gmic_jax.train.step import normalize_images

    models = [GMIC(c) for c in configs]
    mesh = Mesh(np.asarray(devices), ("data",))

    def per_device(variables_list, images, ids, key_data):
        x = normalize_images(images[..., None], normalization)
        base = jax.random.wrap_key_data(key_data)
        if augment is not None:
            from gmic_jax.augment import augment_batch

            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i[0]), i[1]))(ids)
            x = jnp.where((ids[:, 1] > 0)[:, None, None, None], augment_batch(keys, x, augment), x)
        outs = [m.apply(v, x, train=False, rngs={"roi": base}) for m, v in zip(models, variables_list)]
        result = {k: outs[0][k] for k in FORWARD_OUTPUTS}
        result["y_fusion"] = jnp.stack([o["y_fusion"] for o in outs], axis=1)
        return result

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()),
                            out_specs=P("data"), check_vma=False)
    return jax.jit(sharded), mesh


# -------------------------------------------------------------------------------------- result

@dataclasses.dataclass
class PredictResult:
    predictions: list          # rows of predictions.csv (dicts; floats unrounded)
    breast_predictions: list   # rows of breast_predictions.csv
    localization: list         # rows of localization.csv (empty without segmentations)
    failures: list             # PredictError
    num_exams: int = 0
    num_images: int = 0
    seconds: float = 0.0       # whole run, from the first load to the last output
    first_batch_seconds: float = 0.0  # includes compiling the forward function
    per_model: dict = dataclasses.field(default_factory=dict)  # image_index -> (M, 2) y_fusion of each model

    @property
    def exams_per_second(self) -> float:
        return self.num_exams / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclasses.dataclass
class _ImageState:
    task: ImageTask
    exam: "_ExamState"
    loaded: LoadedImage
    draws: int                 # forward passes needed (1 + tta)
    done: int = 0
    y_sum: Optional[np.ndarray] = None
    out0: Optional[dict] = None


@dataclasses.dataclass
class _ExamState:
    exam: Exam
    position: int
    pending: int
    failed: bool = False
    finished: list = dataclasses.field(default_factory=list)


def _fmt_pred(v) -> str:
    return f"{float(v):.6f}"


def _fmt_label(v) -> str:
    v = float(v)
    if math.isnan(v):
        return ""
    return str(int(v)) if v.is_integer() else f"{v:g}"


def _fmt_metric(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.6f}"


def _write_csv(path: Path, columns, rows, formats) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([formats.get(c, str)(row[c]) for c in columns])
    os.replace(tmp, path)


def _breast_rows(exam: Exam, finished: list) -> list:
    """Mean over the breast's views of the views' mean prediction (CC and MLO)."""
    rows = []
    for side in ("L", "R"):
        per_view = {}
        for task, pred in finished:
            if task.view[0] == side:
                per_view.setdefault(task.view[2:], []).append(pred)
        if not per_view:
            continue
        pred = np.mean([np.mean(v, axis=0) for v in per_view.values()], axis=0)
        label = exam.breast_labels.get(side, (math.nan, math.nan))
        rows.append({"exam": exam.exam_id, "breast": side, "benign_pred": float(pred[0]),
                     "malignant_pred": float(pred[1]), "benign_label": label[0], "malignant_label": label[1]})
    return rows


def _localization_row(task: ImageTask, out0: dict, masks: np.ndarray, crop_shape) -> Optional[dict]:
    from gmic_jax import metrics

    if not masks.any():
        return None
    row = {"image_index": task.image_index}
    saliency = np.asarray(out0["saliency_map"], np.float64)
    for c, name in enumerate(CLASSES):
        m = masks[..., c]
        row[f"dice_{name}"] = metrics.dice(saliency[..., c], m) if m.any() else None
        row[f"pxap_{name}"] = metrics.pxap(saliency[..., c], m) if m.any() else None
    hits, lesions = metrics.roi_hits(masks, out0["patch_locations"], crop_shape)
    row["roi_hit"] = hits / lesions if lesions else None
    return row


# -------------------------------------------------------------------------------------- predict

def predict(checkpoints: Sequence, output_dir, *, exam_list=None, images_dir=None, dicom=None,
            synthetic: Optional[int] = None, preprocessed: bool = False, tta: int = 0, seed: int = 0, visualize: bool = False,
            segmentations_dir=None, batch_size: int = 4, num_workers: int = 2,
            progress: bool = True, devices=None) -> PredictResult:
    """Predict every exam of an exam list (``exam_list`` + ``images_dir``), of DICOM files
    (``dicom``) or the first ``synthetic`` synthetic exams with the ensemble of ``checkpoints``;
    write the outputs to ``output_dir`` (see the module docstring) and return them. Failures are
    collected, never raised, except for a checkpoint that cannot be used (then nothing is
    predicted)."""
    import jax

    t_start = time.perf_counter()
    if sum(v is not None for v in (exam_list, dicom, synthetic)) != 1:
        raise ValueError("give one of exam_list (with images_dir), dicom or synthetic")
    if exam_list is not None and images_dir is None:
        raise ValueError("exam_list needs images_dir")
    if exam_list is None and (segmentations_dir is not None or preprocessed):
        raise ValueError("--segmentations and --preprocessed go with --exam-list")
    if synthetic is not None and synthetic < 1:
        raise ValueError(f"synthetic must be a number of exams >= 1, got {synthetic}")
    if tta < 0 or batch_size < 1:
        raise ValueError(f"tta must be >= 0 and batch_size >= 1, got tta={tta}, batch_size={batch_size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (PREDICTIONS_CSV, BREAST_CSV, LOCALIZATION_CSV, FAILURES_TXT):
        (output_dir / stale).unlink(missing_ok=True)

    result = PredictResult([], [], [], [])
    try:
        models = load_models(list(checkpoints))
    except CheckpointError as e:
        result.failures.append(PredictError("(all)", "checkpoint", str(e)))
        _write_failures(output_dir, result.failures)
        return result
    prep = models[0].preprocessing
    if preprocessed and prep.name != "original":
        raise ValueError(f"--preprocessed reads gmic-jax preprocess output, but the checkpoint expects "
                         f"preprocessing {prep.name!r}")
    if exam_list is not None:
        exams, failures = exams_from_exam_list(exam_list, images_dir, preprocessed, segmentations_dir)
    elif dicom is not None:
        exams, failures = exams_from_dicom(dicom)
    else:
        if prep.name != "window":
            raise ValueError(f"--synthetic needs a checkpoint trained on synthetic data (its preprocessing "
                             f"is {prep.name!r}, not 'synthetic')")
        exams, failures = exams_from_synthetic(synthetic, models[0].preprocessing_doc, prep.window_shape)
    result.failures.extend(failures)

    # The one compiled function, its devices and the fixed batch size (a multiple of the devices).
    devices = tuple(devices or jax.local_devices())
    batch_size = -(-batch_size // len(devices)) * len(devices)
    device_tta = tta > 0 and prep.name != "original"
    augment = None
    if device_tta:
        from gmic_jax.augment import AugmentConfig
        augment = models[0].augment or AugmentConfig()
    forward, mesh = compiled_forward(tuple(m.config for m in models), prep.normalization, augment, devices)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put([m.variables for m in models], replicated)
    key_data = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    batch_sharding = NamedSharding(mesh, P("data"))
    crop_shape = models[0].config.crop_shape

    run = _Run(forward, variables, key_data, batch_sharding, batch_size, prep, tta, device_tta, seed,
               output_dir, visualize, crop_shape, result)
    run.execute(exams, num_workers, progress)

    for position in sorted(run.rows_by_exam):
        preds, breasts, locs, per_model = run.rows_by_exam[position]
        result.predictions.extend(preds)
        result.breast_predictions.extend(breasts)
        result.localization.extend(locs)
        result.per_model.update(per_model)
    result.num_exams = len(run.rows_by_exam)
    result.num_images = len(result.predictions)
    result.first_batch_seconds = run.first_batch_seconds or 0.0

    _write_csv(output_dir / PREDICTIONS_CSV, PREDICTION_COLUMNS, result.predictions,
               {"benign_pred": _fmt_pred, "malignant_pred": _fmt_pred, "benign_label": _fmt_label,
                "malignant_label": _fmt_label})
    _write_csv(output_dir / BREAST_CSV, BREAST_COLUMNS, result.breast_predictions,
               {"benign_pred": _fmt_pred, "malignant_pred": _fmt_pred, "benign_label": _fmt_label,
                "malignant_label": _fmt_label})
    if segmentations_dir is not None or synthetic is not None:
        _write_csv(output_dir / LOCALIZATION_CSV, LOCALIZATION_COLUMNS, result.localization,
                   {c: _fmt_metric for c in LOCALIZATION_COLUMNS[1:]})
    if result.failures:
        _write_failures(output_dir, result.failures)
    result.seconds = time.perf_counter() - t_start
    return result

class _Run:
    """The loop of one predict run: load images ahead (threads), fill fixed-size batches with
    every image's draws, run the compiled function, and write an exam's outputs once all its
    images are done -- or drop the exam when one of them failed."""

    def __init__(self, forward, variables, key_data, batch_sharding, batch_size, prep, tta, device_tta,
                 seed, output_dir, visualize, crop_shape, result):
        self.forward, self.variables, self.key_data = forward, variables, key_data
        self.batch_sharding, self.batch_size = batch_sharding, batch_size
        self.prep, self.tta, self.device_tta, self.seed = prep, tta, device_tta, seed
        self.output_dir, self.visualize, self.crop_shape = output_dir, visualize, crop_shape
        self.result = result
        self.queue: list = []          # (image state, draw, window) waiting for the device
        self.rows_by_exam: dict = {}   # exam position -> its rows (completed exams only)
        self.first_batch_seconds: Optional[float] = None
        self.bar = None

    def execute(self, exams, num_workers: int, progress: bool):
        states = [_ExamState(e, i, len(e.images)) for i, e in enumerate(exams)]
        if progress:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=sum(len(e.images) for e in exams), desc="predict", unit="image",
                                file=sys.stderr)
            except ImportError:
                self.bar = None
        try:
            for state, task, loaded in self._loaded(states, num_workers):
                if isinstance(loaded, Exception):
                    path = getattr(loaded, "path", task.path)
                    problem = getattr(loaded, "problem", None) or f"{type(loaded).__name__}: {loaded}"
                    self.result.failures.append(PredictError(state.exam.exam_id, path, problem))
                    state.failed = True
                    state.finished.clear()
                    self._resolve(state)
                elif state.failed:
                    self._resolve(state)
                else:
                    self._enqueue(_ImageState(task, state, loaded, 1 + self.tta))
            while self.queue:
                self._run_batch()
        finally:
            if self.bar is not None:
                self.bar.close()

    def _load(self, task):
        return load_image(task, self.prep, tta=0 if self.device_tta else self.tta, seed=self.seed)

    def _loaded(self, states, num_workers: int):
        """(exam state, task, LoadedImage or the exception) in exam order, loaded ahead in threads."""
        jobs = iter([(state, task) for state in states for task in state.exam.images])
        if num_workers <= 0:
            for state, task in jobs:
                try:
                    yield state, task, self._load(task)
                except Exception as e:  # one bad image must not stop the run; DataError names its file
                    yield state, task, e
            return
        ahead = max(2 * self.batch_size, num_workers + 1)
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            pending = collections.deque()
            try:
                for state, task in jobs:
                    pending.append((state, task, pool.submit(self._load, task)))
                    while len(pending) >= ahead:
                        yield self._result_of(*pending.popleft())
                while pending:
                    yield self._result_of(*pending.popleft())
            finally:
                for *_, future in pending:
                    future.cancel()

    @staticmethod
    def _result_of(state, task, future):
        try:
            return state, task, future.result()
        except Exception as e:
            return state, task, e

    def _enqueue(self, st: _ImageState):
        self.queue.append((st, 0, st.loaded.window))
        for d in range(1, self.tta + 1):
            # Host draws (window noise) or the plain window, augmented on device.
            window = st.loaded.draws[d - 1] if st.loaded.draws else st.loaded.window
            self.queue.append((st, d, window))
        while len(self.queue) >= self.batch_size:
            self._run_batch()

    def _run_batch(self):
        import jax

        rows, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        H, W = self.prep.window_shape
        images = np.zeros((self.batch_size, H, W), np.float32)  # padding rows stay zero
        ids = np.zeros((self.batch_size, 2), np.int32)
        for r, (st, draw, window) in enumerate(rows):
            images[r] = window
            ids[r] = (zlib.crc32(st.task.image_index.encode()) & 0x7FFFFFFF, draw)
        t0 = time.perf_counter()
        out = self.forward(self.variables, jax.device_put(images, self.batch_sharding),
                           jax.device_put(ids, self.batch_sharding), self.key_data)
        out = jax.tree.map(np.asarray, out)
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - t0
        for r, (st, draw, _) in enumerate(rows):
            if draw == 0:  # the un-augmented window: saliency, patches, figures
                st.out0 = {k: out[k][r] for k in FORWARD_OUTPUTS}
            if draw > 0 or st.draws == 1:  # the prediction: mean over the TTA draws, if any
                y = out["y_fusion"][r].astype(np.float64)
                st.y_sum = y if st.y_sum is None else st.y_sum + y
            st.done += 1
            if st.done == st.draws:
                if not st.exam.failed:
                    st.exam.finished.append((st.task, st.loaded, st.out0, st.y_sum / max(st.draws - 1, 1)))
                self._resolve(st.exam)

    def _resolve(self, state: _ExamState):
        """One image of ``state`` is done (predicted or failed); finish the exam after its last one."""
        state.pending -= 1
        if self.bar is not None:
            self.bar.update(1)
        if state.pending == 0 and not state.failed:
            self.rows_by_exam[state.position] = _finish_exam(state, self.output_dir, self.visualize,
                                                             self.crop_shape)


def _finish_exam(state: _ExamState, output_dir: Path, visualize: bool, crop_shape):
    """Write the saliency maps (and figures) of a completed exam; return its rows."""
    exam = state.exam
    order = {id(t): k for k, t in enumerate(exam.images)}
    finished = sorted(state.finished, key=lambda f: order[id(f[0])])
    preds, locs, per_model, breast_inputs = [], [], {}, []
    for task, loaded, out0, y in finished:
        mean = y.mean(axis=0)
        preds.append({"image_index": task.image_index, "benign_pred": float(mean[0]),
                      "malignant_pred": float(mean[1]), "benign_label": task.label[0],
                      "malignant_label": task.label[1]})
        per_model[task.image_index] = y
        breast_inputs.append((task, mean))
        path = output_dir / SALIENCY_DIR / f"{task.image_index}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.ascontiguousarray(np.moveaxis(out0["saliency_map"], -1, 0), np.float32))
        if loaded.masks is not None:
            row = _localization_row(task, out0, loaded.masks, crop_shape)
            if row is not None:
                locs.append(row)
        if visualize:
            from gmic_jax.visualize import save_figure
            save_figure(output_dir / VISUALIZATION_DIR / f"{task.image_index}.png", loaded.window,
                        out0["saliency_map"], out0["patch_locations"], out0["patches"], out0["patch_attns"],
                        crop_shape, masks=loaded.masks,
                        title=f"{task.view}: benign {mean[0]:.2f}, malignant {mean[1]:.2f}")
    return preds, _breast_rows(exam, breast_inputs), locs, per_model


def _write_failures(output_dir: Path, failures) -> None:
    path = output_dir / FAILURES_TXT
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(f"{e}\n" for e in failures), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--exam-list", help="exam list pickle (the original's format)")
    source.add_argument("--dicom", help="a DICOM file, or a folder searched recursively for DICOM files")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="the first N exams of the synthetic data's held-out split (for a checkpoint "
                             "trained on synthetic data; masks included -> localization.csv)")
    parser.add_argument("--images", help="folder of <name>.png / <name>.dcm images (with --exam-list)")
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a gmic-jax checkpoint directory (converted or trained); repeat for an ensemble")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--preprocessed", action="store_true",
                        help="the exam list and images are gmic-jax preprocess output (cropped, best_center)")
    parser.add_argument("--tta", type=int, default=0, metavar="N",
                        help="test-time augmentation: mean over N augmented draws (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TTA draws")
    parser.add_argument("--visualize", action="store_true", help="write visualization/<image>.png")
    parser.add_argument("--segmentations", help="folder of lesion masks (window frame) -> localization.csv")
    parser.add_argument("--batch-size", type=int, default=4, help="images per device call (default 4)")
    parser.add_argument("--num-workers", type=int, default=2, help="image loading threads (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    if args.exam_list is not None and args.images is None:
        print("error: --exam-list needs --images", file=sys.stderr)
        return 2
    try:
        result = predict(args.checkpoint, args.output, exam_list=args.exam_list, images_dir=args.images,
                         dicom=args.dicom, synthetic=args.synthetic, preprocessed=args.preprocessed, tta=args.tta, seed=args.seed,
                         visualize=args.visualize, segmentations_dir=args.segmentations,
                         batch_size=args.batch_size, num_workers=args.num_workers,
                         progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in result.failures:
        print(f"error: {e}", file=sys.stderr)
    steady = ""
    if result.num_exams and result.seconds > result.first_batch_seconds:
        steady = f"; first batch incl. compile {result.first_batch_seconds:.1f} s"
    print(f"{result.num_exams} exam(s), {result.num_images} image(s) in {result.seconds:.1f} s: "
          f"{result.exams_per_second:.3f} exams/s{steady} -> {Path(args.output) / PREDICTIONS_CSV}")
    if result.failures:
        print(f"{len(result.failures)} failure(s); the CSVs hold only the exams that succeeded "
              f"(see {Path(args.output) / FAILURES_TXT})", file=sys.stderr)
        return 1
    return 0
