"""``gmic-jax predict``: arguments and exit status (the run itself is :func:`gmic_jax.predict.predict`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gmic_jax.files import FAILURES_TXT, print_failures
from gmic_jax.predict.outputs import PREDICTIONS_CSV
from gmic_jax.predict.runner import predict


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
                         dicom=args.dicom, synthetic=args.synthetic, preprocessed=args.preprocessed,
                         tta=args.tta, seed=args.seed, visualize=args.visualize,
                         segmentations_dir=args.segmentations, batch_size=args.batch_size,
                         num_workers=args.num_workers, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_failures(result.failures)
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
