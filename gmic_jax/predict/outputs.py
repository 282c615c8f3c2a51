"""predict's outputs: the result of a run, the rows of its CSVs, the files of a finished exam, the
run's record (run.json: the checkpoints' steps and why, the settings, the command, the versions)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gmic_jax import metrics, records
from gmic_jax.data.batch import CLASSES
from gmic_jax.files import FAILURES_TXT, atomic_path, write_atomic
from gmic_jax.predict.exams import Exam, ImageTask
from gmic_jax.visualize import save_figure

PREDICTIONS_CSV = "predictions.csv"
BREAST_CSV = "breast_predictions.csv"
LOCALIZATION_CSV = "localization.csv"
SALIENCY_DIR = "saliency"
VISUALIZATION_DIR = "visualization"
RUN_JSON = "run.json"
OUTPUT_FILES = (PREDICTIONS_CSV, BREAST_CSV, LOCALIZATION_CSV, FAILURES_TXT, RUN_JSON)

PREDICTION_COLUMNS = ("image_index", "benign_pred", "malignant_pred", "benign_label", "malignant_label")
BREAST_COLUMNS = ("exam", "breast", "benign_pred", "malignant_pred", "benign_label", "malignant_label")
LOCALIZATION_COLUMNS = (
    "image_index",
    "dice_benign",
    "dice_malignant",
    "pxap_benign",
    "pxap_malignant",
    "pointing_benign",
    "pointing_malignant",
    "roi_hit",
)


@dataclasses.dataclass
class PredictResult:
    predictions: list  # rows of predictions.csv (dicts; floats unrounded)
    breast_predictions: list  # rows of breast_predictions.csv
    localization: list  # rows of localization.csv (empty without segmentations)
    failures: list  # PredictError
    num_exams: int = 0
    num_images: int = 0
    seconds: float = 0.0  # whole run, from the first load to the last output
    first_batch_seconds: float = 0.0  # includes compiling the forward function
    per_model: dict = dataclasses.field(default_factory=dict)  # image_index -> (M, 2) y_fusion of each model
    checkpoints: list = dataclasses.field(default_factory=list)  # per model: gmic_jax.records.checkpoint_record
    checkpoint_error: Optional[str] = None  # a checkpoint could not be used: nothing was predicted
    written: list = dataclasses.field(default_factory=list)  # what the run wrote in its output folder, in order

    @property
    def exams_per_second(self) -> float:
        return self.num_exams / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _fmt_pred(v) -> str:
    return f"{float(v):.6f}"


def _fmt_label(v) -> str:
    v = float(v)
    if math.isnan(v):
        return ""
    return str(int(v)) if v.is_integer() else f"{v:g}"


def _fmt_metric(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.6f}"


def _fmt_hit(v) -> str:
    return "" if v is None else str(int(v))


_PRED_FORMATS = {
    "benign_pred": _fmt_pred,
    "malignant_pred": _fmt_pred,
    "benign_label": _fmt_label,
    "malignant_label": _fmt_label,
}


def write_csv(path: Path, columns, rows, formats) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([formats.get(c, str)(row[c]) for c in columns])


def write_csvs(result: PredictResult, output_dir: Path, localization: bool) -> None:
    """predictions.csv and breast_predictions.csv (and localization.csv) of ``result``."""
    write_csv(output_dir / PREDICTIONS_CSV, PREDICTION_COLUMNS, result.predictions, _PRED_FORMATS)
    write_csv(output_dir / BREAST_CSV, BREAST_COLUMNS, result.breast_predictions, _PRED_FORMATS)
    result.written += [PREDICTIONS_CSV, BREAST_CSV]
    if localization:
        write_csv(
            output_dir / LOCALIZATION_CSV,
            LOCALIZATION_COLUMNS,
            result.localization,
            {c: _fmt_hit if c.startswith("pointing_") else _fmt_metric for c in LOCALIZATION_COLUMNS[1:]},
        )
        result.written.append(LOCALIZATION_CSV)


def write_run_record(
    result: PredictResult, output_dir: Path, settings: dict, command: Optional[Sequence[str]] = None
) -> None:
    """OUT/run.json: every checkpoint's step and why it was chosen (an ensemble: each member's, in
    ``--checkpoint`` order), the run's settings, what it predicted and wrote, the command, the
    versions (:mod:`gmic_jax.records`)."""
    result.written.append(RUN_JSON)
    doc = {
        "checkpoints": result.checkpoints,
        **settings,
        "num_exams": result.num_exams,
        "num_images": result.num_images,
        "num_failures": len(result.failures),
        "outputs": list(result.written),
        **records.provenance(command),
    }
    write_atomic(output_dir / RUN_JSON, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def breast_rows(exam: Exam, finished: list) -> list:
    """Mean over the breast's views of the views' mean prediction (CC and MLO); one row per breast
    with images."""
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
        rows.append(
            {
                "exam": exam.exam_id,
                "breast": side,
                "benign_pred": float(pred[0]),
                "malignant_pred": float(pred[1]),
                "benign_label": label[0],
                "malignant_label": label[1],
            }
        )
    return rows


def localization_row(task: ImageTask, out0: dict, masks: np.ndarray, crop_shape) -> Optional[dict]:
    """Dice, PxAP, pointing (1 / 0; per class with a lesion) and the ROI hit rate of one image
    (:mod:`gmic_jax.metrics`)."""
    if not masks.any():
        return None
    row = {"image_index": task.image_index}
    saliency = np.asarray(out0["saliency_map"], np.float64)
    for c, name in enumerate(CLASSES):
        lesion = masks[..., c]
        row[f"dice_{name}"] = metrics.dice(saliency[..., c], lesion) if lesion.any() else None
        row[f"pxap_{name}"] = metrics.pxap(saliency[..., c], lesion) if lesion.any() else None
        row[f"pointing_{name}"] = int(metrics.pointing_hit(saliency[..., c], lesion)) if lesion.any() else None
    hits, lesions = metrics.roi_hits(masks, out0["patch_locations"], crop_shape)
    row["roi_hit"] = hits / lesions if lesions else None
    return row


def finish_exam(exam: Exam, finished: list, output_dir: Path, visualize: bool, crop_shape):
    """Write the saliency maps (and figures) of a completed exam; return its rows
    ``(predictions, breast rows, localization rows, {image: (M, 2) per model})``.
    ``finished``: (task, loaded image, un-augmented outputs, (M, 2) prediction) per image."""
    order = {id(t): k for k, t in enumerate(exam.images)}
    finished = sorted(finished, key=lambda f: order[id(f[0])])
    preds, locs, per_model, breast_inputs = [], [], {}, []
    for task, loaded, out0, y in finished:
        mean = y.mean(axis=0)
        preds.append(
            {
                "image_index": task.image_index,
                "benign_pred": float(mean[0]),
                "malignant_pred": float(mean[1]),
                "benign_label": task.label[0],
                "malignant_label": task.label[1],
            }
        )
        per_model[task.image_index] = y
        breast_inputs.append((task, mean))
        with atomic_path(output_dir / SALIENCY_DIR / f"{task.image_index}.npy") as tmp:
            np.save(tmp, np.ascontiguousarray(np.moveaxis(out0["saliency_map"], -1, 0), np.float32))
        if loaded.masks is not None:
            row = localization_row(task, out0, loaded.masks, crop_shape)
            if row is not None:
                locs.append(row)
        if visualize:
            save_figure(
                output_dir / VISUALIZATION_DIR / f"{task.image_index}.png",
                loaded.window,
                out0["saliency_map"],
                out0["patch_locations"],
                out0["patches"],
                out0["patch_attns"],
                crop_shape,
                masks=loaded.masks,
                title=f"{task.view}: benign {mean[0]:.2f}, malignant {mean[1]:.2f}",
            )
    return preds, breast_rows(exam, breast_inputs), locs, per_model
