"""Crop every image of an exam list and find its window's best centre (`gmic-jax preprocess`, whose
command line is :mod:`gmic_jax.data.preprocess_cli`).

    gmic-jax preprocess --exam-list exams.pkl --images DIR --output OUT [--num-workers N]

reads ``DIR/<name>.png`` (or ``<name>.dcm``) for every image name of the exam list and writes
``OUT/cropped_images/<name>.png`` (same bit depth as the input; DICOM becomes 16-bit PNG) and
``OUT/exam_list.pkl``: the exam list with ``window_location``, ``rightmost_points``,
``bottommost_points``, ``distance_from_starting_side`` and ``best_center`` added in the original
pipeline's layout (for the views each exam has: a missing view stays missing). The cropped images
and that exam list are what the original's model runner, ``gmic-jax predict --preprocessed`` and
``gmic-jax cache --source exam-list`` read. The exam list is read by
:func:`gmic_jax.data.exam_list.read_exam_list` (its rules: missing views, PNG or DICOM).

Bad inputs do not stop the run: every failure is reported at the end, the exit status is 1, and
``OUT/exam_list.pkl`` is then NOT written; the exams that did succeed go to
``OUT/exam_list.partial.pkl`` and the failures to ``OUT/failures.txt``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gmic_jax.data import cropping
from gmic_jax.data import exam_list as exam_list_lib
from gmic_jax.data.image import DataError, read_image, write_png
from gmic_jax.data.image_to_window import crop_flip_center
from gmic_jax.files import FAILURES_TXT, write_failures

CROPPED_DIR = "cropped_images"
EXAM_LIST_NAME = "exam_list.pkl"
PARTIAL_NAME = "exam_list.partial.pkl"


def preprocess_image(
    pixels: np.ndarray,
    full_view: str,
    horizontal_flip: str,
    path: str = "<array>",
    iterations: int = cropping.NUM_ITERATIONS,
    buffer_size: int = cropping.BUFFER_SIZE,
):
    """Crop one stored image and find its best centre (:func:`~gmic_jax.data.image_to_window.crop_flip_center`).

    Returns ``(cropped, info)``: the cropped stored image (not flipped) and a dict with the five
    exam-list values of this image.
    """
    direction = cropping.breast_direction(horizontal_flip, full_view[0])
    crop, _, center = crop_flip_center(
        pixels, full_view, direction, iterations=iterations, buffer_size=buffer_size, path=path
    )
    top, bottom, left, right = (int(v) for v in crop.window_location)
    info = dict(zip(exam_list_lib.PREPROCESSING_KEYS, crop.as_tuple() + (center,)))
    return pixels[top:bottom, left:right], info


def _process_one(task):
    """Worker: (name, full_view, horizontal_flip, images_dir, output_dir) -> (name, info | DataError)."""
    name, full_view, horizontal_flip, images_dir, output_dir = task
    try:
        path = exam_list_lib.find_image(images_dir, name)
        image = read_image(path)
        if image.laterality is not None and image.laterality != full_view[0]:
            raise DataError(
                path, f"the exam list says {full_view} but the DICOM header says laterality {image.laterality}"
            )
        pixels = image.to_uint()
        cropped, info = preprocess_image(pixels, full_view, horizontal_flip, path=path)
        write_png(os.path.join(output_dir, CROPPED_DIR, name + ".png"), np.ascontiguousarray(cropped))
        return name, info
    except DataError as e:
        return name, e
    except Exception as e:  # an unexpected failure on one image must not stop the batch
        return name, DataError(os.path.join(images_dir, name), f"{type(e).__name__}: {e}")


def preprocess_exam_list(
    exam_list_path, images_dir, output_dir, num_workers: int = 1, progress: bool = False
) -> tuple[list, list[DataError]]:
    """Run the preprocessing; returns (exams written, failures). See the module docstring."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (EXAM_LIST_NAME, PARTIAL_NAME, FAILURES_TXT):
        (output_dir / stale).unlink(missing_ok=True)

    failures: list[DataError] = []
    try:
        exams, bad = exam_list_lib.read_exam_list(exam_list_path)
    except DataError as e:
        failures.append(e)
        write_failures(output_dir, failures)
        return [], failures
    failures.extend(bad)

    tasks, seen = [], set()
    for exam in exams:
        for image in exam.images:
            if image.name not in seen:
                seen.add(image.name)
                tasks.append((image.name, image.view, image.horizontal_flip, str(images_dir), str(output_dir)))

    results = dict(_run(tasks, num_workers, progress))
    preprocessed = []
    for exam in exams:
        errors = [results[image.name] for image in exam.images if isinstance(results[image.name], DataError)]
        if errors:
            failures.extend(errors)
            continue
        preprocessed.append(exam_list_lib.add_preprocessing(exam.entry, results))

    if failures:
        exam_list_lib.save_exam_list(output_dir / PARTIAL_NAME, preprocessed)
        write_failures(output_dir, failures)
    else:
        exam_list_lib.save_exam_list(output_dir / EXAM_LIST_NAME, preprocessed)
    return preprocessed, failures


def _run(tasks, num_workers: int, progress: bool):
    if num_workers <= 1 or len(tasks) <= 1:
        iterator = map(_process_one, tasks)
    else:
        context = multiprocessing.get_context("spawn")  # safe even when the parent holds JAX threads
        pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context)
        iterator = pool.map(_process_one, tasks, chunksize=1)
    if progress:
        iterator = tqdm(iterator, total=len(tasks), desc="preprocess", unit="image")
    try:
        yield from iterator
    finally:
        if num_workers > 1 and len(tasks) > 1:
            pool.shutdown()
