"""`gmic-jax preprocess`: crop every image of an exam list and find its window's best centre.

    gmic-jax preprocess --exam-list exams.pkl --images DIR --output OUT [--num-workers N]

reads ``DIR/<name>.png`` (or ``<name>.dcm``) for every image name of the exam list and writes
``OUT/cropped_images/<name>.png`` (same bit depth as the input; DICOM becomes 16-bit PNG) and
``OUT/exam_list.pkl``: the exam list with ``window_location``, ``rightmost_points``,
``bottommost_points``, ``distance_from_starting_side`` and ``best_center`` added in the original
pipeline's layout. The cropped images and that exam list are what the original's model runner and
``gmic-jax predict`` read (through :func:`gmic_jax.data.window.load_window`).

Bad inputs do not stop the run: every failure is reported at the end, the exit status is 1, and
``OUT/exam_list.pkl`` is then NOT written; the exams that did succeed go to
``OUT/exam_list.partial.pkl`` and the failures to ``OUT/failures.txt``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from gmic_jax.data import centers as centers_lib
from gmic_jax.data import cropping
from gmic_jax.data import exam_list as exam_list_lib
from gmic_jax.data.image import DataError, read_image, write_png
from gmic_jax.data.window import flip_for_model

CROPPED_DIR = "cropped_images"
EXAM_LIST_NAME = "exam_list.pkl"
PARTIAL_NAME = "exam_list.partial.pkl"
FAILURES_NAME = "failures.txt"
IMAGE_SUFFIXES = (".png", ".dcm", ".dicom", "")


def find_image(images_dir, name: str) -> str:
    """The file of image ``name`` in ``images_dir``: ``name.png``, ``name.dcm`` (or ``name`` itself)."""
    for suffix in IMAGE_SUFFIXES:
        path = os.path.join(images_dir, name + suffix)
        if os.path.isfile(path):
            return path
    raise DataError(os.path.join(images_dir, name + ".png"), "image not found (also tried .dcm)")


def preprocess_image(pixels: np.ndarray, full_view: str, horizontal_flip: str, path: str = "<array>",
                     iterations: int = cropping.NUM_ITERATIONS, buffer_size: int = cropping.BUFFER_SIZE):
    """Crop one stored image and find its best centre.

    Returns ``(cropped, info)``: the cropped stored image (not flipped) and a dict with the five
    exam-list values of this image.
    """
    laterality, view = full_view[0], full_view[2:]
    direction = cropping.breast_direction(horizontal_flip, laterality)
    crop = cropping.crop_info(pixels, direction, iterations, buffer_size, path=path)
    top, bottom, left, right = (int(v) for v in crop.window_location)
    cropped = pixels[top:bottom, left:right]
    center = centers_lib.best_center(flip_for_model(cropped, full_view, horizontal_flip), view,
                                     crop.rightmost_points, crop.bottommost_points)
    info = dict(zip(exam_list_lib.PREPROCESSING_KEYS, crop.as_tuple() + (center,)))
    return cropped, info


def _process_one(task):
    """Worker: (name, full_view, horizontal_flip, images_dir, output_dir) -> (name, info | DataError)."""
    name, full_view, horizontal_flip, images_dir, output_dir = task
    try:
        path = find_image(images_dir, name)
        image = read_image(path)
        if image.laterality is not None and image.laterality != full_view[0]:
            raise DataError(path, f"the exam list says {full_view} but the DICOM header says "
                                  f"laterality {image.laterality}")
        pixels = image.to_uint()
        cropped, info = preprocess_image(pixels, full_view, horizontal_flip, path=path)
        write_png(os.path.join(output_dir, CROPPED_DIR, name + ".png"), np.ascontiguousarray(cropped))
        return name, info
    except DataError as e:
        return name, e
    except Exception as e:  # an unexpected failure on one image must not stop the batch
        return name, DataError(os.path.join(images_dir, name), f"{type(e).__name__}: {e}")


def preprocess_exam_list(exam_list_path, images_dir, output_dir, num_workers: int = 1,
                         progress: bool = False) -> tuple[list, list[DataError]]:
    """Run the preprocessing; returns (exams written, failures). See the module docstring."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (EXAM_LIST_NAME, PARTIAL_NAME, FAILURES_NAME):
        (output_dir / stale).unlink(missing_ok=True)

    failures: list[DataError] = []
    try:
        exams = exam_list_lib.load_exam_list(exam_list_path)
    except DataError as e:
        failures.append(e)
        _write_failures(output_dir, failures)
        return [], failures
    good, bad = exam_list_lib.check_exams(exams, exam_list_path)
    failures.extend(bad)

    tasks, seen = [], set()
    for i in good:
        exam = exams[i]
        for view, _, name in exam_list_lib.images_of_exam(exam):
            if name not in seen:
                seen.add(name)
                tasks.append((name, view, exam["horizontal_flip"], str(images_dir), str(output_dir)))

    results = dict(_run(tasks, num_workers, progress))
    done = []
    for i in good:
        exam = exams[i]
        names = [name for _, _, name in exam_list_lib.images_of_exam(exam)]
        errors = [results[n] for n in names if isinstance(results[n], DataError)]
        if errors:
            failures.extend(errors)
            continue
        done.append(exam_list_lib.add_preprocessing(exam, results))

    if failures:
        exam_list_lib.save_exam_list(output_dir / PARTIAL_NAME, done)
        _write_failures(output_dir, failures)
    else:
        exam_list_lib.save_exam_list(output_dir / EXAM_LIST_NAME, done)
    return done, failures


def _run(tasks, num_workers: int, progress: bool):
    if num_workers <= 1 or len(tasks) <= 1:
        iterator = map(_process_one, tasks)
    else:
        context = multiprocessing.get_context("spawn")  # safe even when the parent holds JAX threads
        pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context)
        iterator = pool.map(_process_one, tasks, chunksize=1)
    if progress:
        try:
            from tqdm import tqdm
            iterator = tqdm(iterator, total=len(tasks), desc="preprocess", unit="image")
        except ImportError:
            pass
    try:
        yield from iterator
    finally:
        if num_workers > 1 and len(tasks) > 1:
            pool.shutdown()


def _write_failures(output_dir: Path, failures) -> None:
    text = "".join(f"{e}\n" for e in failures)
    tmp = output_dir / f".{FAILURES_NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output_dir / FAILURES_NAME)


def report_failures(failures, stream=None, what: str = "image") -> None:
    """Print every failure, then a one-line count."""
    stream = stream or sys.stderr
    for e in failures:
        print(f"error: {e}", file=stream)
    if failures:
        print(f"{len(failures)} failure(s); see above", file=stream)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exam-list", required=True, help="exam list pickle (the original's format)")
    parser.add_argument("--images", required=True, help="folder of <name>.png / <name>.dcm images")
    parser.add_argument("--output", required=True, help="output folder (cropped_images/, exam_list.pkl)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes (default: min(4, cores))")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    done, failures = preprocess_exam_list(args.exam_list, args.images, args.output,
                                          num_workers=args.num_workers, progress=not args.no_progress)
    if failures:
        report_failures(failures)
        print(f"{len(done)} exam(s) preprocessed; NOT writing {EXAM_LIST_NAME}: the good exams are in "
              f"{Path(args.output) / PARTIAL_NAME}, the failures in {Path(args.output) / FAILURES_NAME}",
              file=sys.stderr)
        return 1
    print(f"{len(done)} exam(s) preprocessed -> {Path(args.output) / EXAM_LIST_NAME}")
    return 0


def run(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="gmic-jax preprocess")
    add_arguments(parser)
    return main(parser.parse_args(argv))
