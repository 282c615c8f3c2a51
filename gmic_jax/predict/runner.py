"""The predict run: exams in, one compiled function over fixed-size batches, outputs per exam."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from gmic_jax import records
from gmic_jax.augment import tta_augment
from gmic_jax.checkpoint import CheckpointError
from gmic_jax.data.pipeline import FAILURES, default_workers, load_batches
from gmic_jax.files import write_failures
from gmic_jax.predict import outputs as out_lib
from gmic_jax.predict.ensemble import FORWARD_OUTPUTS, compiled_forward, load_models
from gmic_jax.predict.exams import (
    Exam,
    ImageTask,
    PredictError,
    exams_from_dicom,
    exams_from_exam_list,
    exams_from_synthetic,
)
from gmic_jax.predict.images import ImageExamples, LoadedImage
from gmic_jax.predict.outputs import PredictResult

log = logging.getLogger("gmic_jax.predict")


def predict(
    checkpoints: Sequence,
    output_dir,
    *,
    exam_list=None,
    images_dir=None,
    dicom=None,
    synthetic: Optional[int] = None,
    preprocessed: bool = False,
    tta: int = 0,
    seed: int = 0,
    visualize: bool = False,
    segmentations_dir=None,
    batch_size: int = 4,
    workers: Optional[int] = None,
    progress: bool = True,
    devices=None,
    command: Optional[Sequence[str]] = None,
) -> PredictResult:
    """Predict every exam of an exam list (``exam_list`` + ``images_dir``), of DICOM files
    (``dicom``) or the first ``synthetic`` synthetic exams with the ensemble of ``checkpoints``;
    write the outputs to ``output_dir`` (see :mod:`gmic_jax.predict`; ``command``, the command
    line, goes into run.json) and return them. Images are loaded by the input pipeline
    (:mod:`gmic_jax.data.pipeline`) in ``workers`` processes (0: a thread of this one; None: the
    default, :func:`~gmic_jax.data.pipeline.default_workers`); the outputs do not depend on it.
    Failures are collected, never raised. A checkpoint
    that cannot be used affects every exam: nothing is predicted, failures.txt is the only output
    and ``result.checkpoint_error`` says why. Settings that contradict each other or the
    checkpoint raise ValueError before anything is written."""
    t_start = time.perf_counter()
    _check_settings(exam_list, images_dir, dicom, synthetic, segmentations_dir, preprocessed, tta, batch_size, workers)
    output_dir = Path(output_dir)
    result = PredictResult([], [], [], [])
    models = _load_checkpoints(checkpoints, preprocessed, synthetic, result)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_lib.OUTPUT_FILES:
        (output_dir / stale).unlink(missing_ok=True)
    if result.checkpoint_error is not None:
        result.failures.append(PredictError("(all)", "checkpoint", result.checkpoint_error))
        write_failures(output_dir, result.failures)
        result.written.append(out_lib.FAILURES_TXT)
        return result
    for model in models:
        log.info("checkpoint %s", records.describe(model.directory, model.selection))
        result.checkpoints.append(records.checkpoint_record(model.directory, model.selection))
    prep = models[0].preprocessing
    if exam_list is not None:
        exams, failures = exams_from_exam_list(exam_list, images_dir, preprocessed, segmentations_dir)
    elif dicom is not None:
        exams, failures = exams_from_dicom(dicom)
    else:
        exams, failures = exams_from_synthetic(synthetic, prep)
    result.failures.extend(failures)

    devices = tuple(devices or jax.local_devices())
    batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the devices
    run = _start_run(models, devices, batch_size, tta, seed, output_dir, visualize, result)
    run.execute(exams, default_workers() if workers is None else workers, progress)

    _collect_rows(run, result)
    _write_outputs(result, output_dir, visualize, localization=segmentations_dir is not None or synthetic is not None)
    inputs = {
        "exam_list": exam_list,
        "images": images_dir,
        "dicom": dicom,
        "synthetic": synthetic,
        "segmentations": segmentations_dir,
    }
    settings = {
        "inputs": {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items() if v is not None},
        "preprocessed": preprocessed,
        "tta": tta,
        "seed": seed,
        "batch_size": batch_size,
        "devices": len(devices),
    }
    out_lib.write_run_record(result, output_dir, settings, command)
    result.seconds = time.perf_counter() - t_start
    return result


def _check_settings(exam_list, images_dir, dicom, synthetic, segmentations_dir, preprocessed, tta, batch_size, workers):
    """Raise ValueError for settings that contradict each other."""
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
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0: load in this process), got {workers}")


def _load_checkpoints(checkpoints, preprocessed: bool, synthetic, result: PredictResult) -> list:
    """The ensemble's models; none, with ``result.checkpoint_error`` set, when a checkpoint cannot be
    used. Raise ValueError when the inputs asked for do not fit the checkpoint's preprocessing."""
    try:
        models = load_models(list(checkpoints))
    except CheckpointError as e:
        result.checkpoint_error = str(e)
        return []
    prep = models[0].preprocessing
    if preprocessed and prep.name != "original":
        raise ValueError(
            f"--preprocessed reads gmic-jax preprocess output, but the checkpoint expects preprocessing {prep.name!r}"
        )
    if synthetic is not None and prep.synthetic is None:
        raise ValueError(
            f"--synthetic needs a checkpoint trained on synthetic data (its config.json "
            f"records preprocessing {prep.name!r} and no synthetic data)"
        )
    return models


def _start_run(models, devices: tuple, batch_size: int, tta: int, seed: int, output_dir, visualize, result) -> "_Run":
    """The one compiled function over ``devices``, the models' variables and the TTA key on them."""
    prep = models[0].preprocessing
    augment = tta_augment(models[0].train_augment) if tta else None
    forward, mesh = compiled_forward(tuple(m.config for m in models), prep.normalization, augment, devices)
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put([m.variables for m in models], replicated)
    key_data = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    return _Run(
        forward,
        variables,
        key_data,
        NamedSharding(mesh, P("data")),
        batch_size,
        prep,
        tta,
        output_dir,
        visualize,
        models[0].config.crop_shape,
        result,
    )


def _collect_rows(run: "_Run", result: PredictResult) -> None:
    """The rows of the exams ``run`` completed, in exam order, into ``result``."""
    for position in sorted(run.rows_by_exam):
        preds, breasts, locs, per_model = run.rows_by_exam[position]
        result.predictions.extend(preds)
        result.breast_predictions.extend(breasts)
        result.localization.extend(locs)
        result.per_model.update(per_model)
    result.num_exams = len(run.rows_by_exam)
    result.num_images = len(result.predictions)
    result.first_batch_seconds = run.first_batch_seconds or 0.0


def _write_outputs(result: PredictResult, output_dir: Path, visualize: bool, localization: bool) -> None:
    """The CSVs and failures.txt; ``result.written`` lists them with the per-image folders."""
    out_lib.write_csvs(result, output_dir, localization=localization)
    if result.num_images:
        result.written.append(out_lib.SALIENCY_DIR + "/")
        if visualize:
            result.written.append(out_lib.VISUALIZATION_DIR + "/")
    if result.failures:
        write_failures(output_dir, result.failures)
        result.written.append(out_lib.FAILURES_TXT)


@dataclasses.dataclass
class _ImageState:
    task: ImageTask
    exam: "_ExamState"
    loaded: LoadedImage
    draws: int  # forward passes needed (1 + tta)
    draws_run: int = 0
    y_sum: Optional[np.ndarray] = None
    out0: Optional[dict] = None


@dataclasses.dataclass
class _ExamState:
    exam: Exam
    position: int
    pending: int
    failed: bool = False
    finished: list = dataclasses.field(default_factory=list)


class _Run:
    """The loop of one predict run: load images ahead (threads), fill fixed-size batches with
    every image's draws, run the compiled function, and write an exam's outputs once all its
    images are done -- or drop the exam when one of them failed."""

    def __init__(
        self,
        forward,
        variables,
        key_data,
        batch_sharding,
        batch_size,
        prep,
        tta,
        output_dir,
        visualize,
        crop_shape,
        result,
    ):
        self.forward, self.variables, self.key_data = forward, variables, key_data
        self.batch_sharding, self.batch_size = batch_sharding, batch_size
        self.prep, self.tta = prep, tta
        self.output_dir, self.visualize, self.crop_shape = output_dir, visualize, crop_shape
        self.result = result
        self.queue: list = []  # (image state, draw) waiting for the device
        self.rows_by_exam: dict = {}  # exam position -> its rows (completed exams only)
        self.first_batch_seconds: Optional[float] = None
        self.bar = None

    def execute(self, exams, workers: int, progress: bool):
        states = [_ExamState(e, i, len(e.images)) for i, e in enumerate(exams)]
        if progress:
            self.bar = tqdm(total=sum(len(e.images) for e in exams), desc="predict", unit="image", file=sys.stderr)
        try:
            for state, task, loaded in self._loaded(states, workers):
                if not isinstance(loaded, LoadedImage):  # a Failure: the file and what is wrong
                    path = loaded.path or task.path
                    self.result.failures.append(PredictError(state.exam.exam_id, path, loaded.problem))
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

    def _loaded(self, states, workers: int):
        """(exam state, task, LoadedImage or its :class:`~gmic_jax.data.pipeline.Failure`) in exam
        order, loaded ahead through the input pipeline (``workers`` processes, 0: a thread)."""
        jobs = [(state, task) for state in states for task in state.exam.images]
        if not jobs:
            return
        plan = [(task,) for _, task in jobs]  # one image per element: the runner fills the device batches
        batches = load_batches(plan, ImageExamples(self.prep), workers=workers, buffer=max(2, self.batch_size))
        try:
            for state, task in jobs:
                batch = next(batches)
                if batch[FAILURES]:
                    loaded = batch[FAILURES][0]
                else:  # copied out of the batch (whose memory may be shared with a worker)
                    masks = batch.get("masks")
                    loaded = LoadedImage(np.array(batch["window"][0]), None if masks is None else np.array(masks[0]))
                batch = None
                yield state, task, loaded
        finally:
            batches.close()

    def _enqueue(self, image: _ImageState):
        # Draw 0 is the plain window; draws 1..tta are augmented on device from the same window.
        self.queue.extend((image, draw) for draw in range(image.draws))
        while len(self.queue) >= self.batch_size:
            self._run_batch()

    def _run_batch(self):
        rows, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        height, width = self.prep.window_shape
        windows = np.zeros((self.batch_size, height, width), np.float32)  # padding rows stay zero
        ids = np.zeros((self.batch_size, 2), np.int32)
        for r, (image, draw) in enumerate(rows):
            windows[r] = image.loaded.window
            ids[r] = (zlib.crc32(image.task.image_index.encode()) & 0x7FFFFFFF, draw)
        t0 = time.perf_counter()
        out = self.forward(
            self.variables,
            jax.device_put(windows, self.batch_sharding),
            jax.device_put(ids, self.batch_sharding),
            self.key_data,
        )
        out = jax.tree.map(np.asarray, out)
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - t0
        for r, (image, draw) in enumerate(rows):
            if draw == 0:  # the un-augmented window: saliency, patches, figures
                image.out0 = {k: out[k][r] for k in FORWARD_OUTPUTS}
            if draw > 0 or image.draws == 1:  # the prediction: mean over the TTA draws, if any
                y = out["y_fusion"][r].astype(np.float64)
                image.y_sum = y if image.y_sum is None else image.y_sum + y
            image.draws_run += 1
            if image.draws_run == image.draws:
                if not image.exam.failed:
                    y_mean = image.y_sum / max(image.draws - 1, 1)
                    image.exam.finished.append((image.task, image.loaded, image.out0, y_mean))
                self._resolve(image.exam)

    def _resolve(self, state: _ExamState):
        """One image of ``state`` is done (predicted or failed); finish the exam after its last one."""
        state.pending -= 1
        if self.bar is not None:
            self.bar.update(1)
        if state.pending == 0 and not state.failed:
            self.rows_by_exam[state.position] = out_lib.finish_exam(
                state.exam, state.finished, self.output_dir, self.visualize, self.crop_shape
            )
