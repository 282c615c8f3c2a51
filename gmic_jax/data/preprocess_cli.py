"""``gmic-jax preprocess``: arguments and exit status (the work is :mod:`gmic_jax.data.crop_exam_list`).

gmic-jax preprocess --exam-list exams.pkl --images DIR --output OUT [--num-workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gmic_jax.data.crop_exam_list import EXAM_LIST_NAME, PARTIAL_NAME, preprocess_exam_list
from gmic_jax.files import FAILURES_TXT, print_failures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exam-list", required=True, help="exam list pickle (the original's format)")
    parser.add_argument("--images", required=True, help="folder of <name>.png / <name>.dcm images")
    parser.add_argument("--output", required=True, help="output folder (cropped_images/, exam_list.pkl)")
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (default: min(4, cores))"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    preprocessed, failures = preprocess_exam_list(
        args.exam_list, args.images, args.output, num_workers=args.num_workers, progress=not args.no_progress
    )
    if failures:
        print_failures(failures)
        print(
            f"{len(failures)} failure(s); {len(preprocessed)} exam(s) preprocessed; NOT writing {EXAM_LIST_NAME}: "
            "the good exams are in "
            f"{Path(args.output) / PARTIAL_NAME}, the failures in {Path(args.output) / FAILURES_TXT}",
            file=sys.stderr,
        )
        return 1
    print(f"{len(preprocessed)} exam(s) preprocessed -> {Path(args.output) / EXAM_LIST_NAME}")
    return 0
