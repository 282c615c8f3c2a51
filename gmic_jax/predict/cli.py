"""``gmic-jax predict``: arguments and exit status (the run itself is :func:`gmic_jax.predict.predict`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gmic_jax import logs
from gmic_jax.files import FAILURES_TXT, print_failures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--exam-list", help="exam list pickle (the original's format)")
    source.add_argument("--dicom", help="a DICOM file, or a folder searched recursively for DICOM files")
    source.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="the first N exams of the synthetic data's held-out split (for a checkpoint "
        "trained on synthetic data; masks included -> localization.csv)",
    )
    parser.add_argument("--images", help="folder of <name>.png / <name>.dcm images (with --exam-list)")
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a gmic-jax checkpoint directory (converted or trained); repeat for an ensemble",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--preprocessed",
        action="store_true",
        help="the exam list and images are gmic-jax preprocess output (cropped, best_center)",
    )
    parser.add_argument(
        "--tta",
        type=int,
        default=0,
        metavar="N",
        help="test-time augmentation: mean over N augmented draws (default 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the TTA draws")
    parser.add_argument("--visualize", action="store_true", help="write visualization/<image>.png")
    parser.add_argument("--segmentations", help="folder of lesion masks (window frame) -> localization.csv")
    parser.add_argument("--batch-size", type=int, default=4, help="images per device call (default 4)")
    parser.add_argument(
        "--workers",
        "--num-workers",
        dest="workers",
        type=int,
        default=None,
        help="image loading processes (0: load in this process; default: the usable cores less one, 0 below 3 cores)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(message: str, code: int) -> int:
    print(f"gmic-jax predict: error: {message}", file=sys.stderr)
    return code


def _missing_input(args):
    """The first input path named on the command line that does not exist (or is of the wrong kind)."""
    for option, value, kind in (
        ("--exam-list", args.exam_list, "file"),
        ("--images", args.images, "dir"),
        ("--dicom", args.dicom, "any"),
        ("--segmentations", args.segmentations, "dir"),
    ):
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            return f"{option} {value}: no such file or directory"
        if kind == "dir" and not path.is_dir():
            return f"{option} {value}: is a file; give the folder"
        if kind == "file" and path.is_dir():
            return f"{option} {value}: is a folder; give the exam list file"
    return None


def main(args) -> int:
    logs.configure()
    if args.exam_list is not None and args.images is None:
        return _error("--exam-list needs --images (the folder of its images)", 2)
    problem = _missing_input(args)
    if problem:
        return _error(problem, 1)
    out = Path(args.output)
    from gmic_jax.predict.runner import predict  # the library (JAX, Flax, Orbax), after parsing: keeps --help fast

    try:
        result = predict(
            args.checkpoint,
            args.output,
            exam_list=args.exam_list,
            images_dir=args.images,
            dicom=args.dicom,
            synthetic=args.synthetic,
            preprocessed=args.preprocessed,
            tta=args.tta,
            seed=args.seed,
            visualize=args.visualize,
            segmentations_dir=args.segmentations,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
            command=getattr(args, "command_line", None),
        )
    except ValueError as e:
        return _error(str(e), 2)
    if result.checkpoint_error is not None:
        return _error(f"{result.checkpoint_error}; nothing was predicted (written: {out / FAILURES_TXT} only)", 1)
    print_failures(result.failures)
    steady = ""
    if result.num_exams and result.seconds > result.first_batch_seconds:
        steady = f"; first batch incl. compile {result.first_batch_seconds:.1f} s"
    print(
        f"{result.num_exams} exam(s), {result.num_images} image(s) in {result.seconds:.1f} s: "
        f"{result.exams_per_second:.3f} exams/s{steady} -> {out}: {', '.join(result.written)}"
    )
    if result.failures:
        held = (
            f"the outputs hold only the {result.num_exams} exam(s) that succeeded"
            if result.num_exams
            else "nothing was predicted: the CSVs have no rows"
        )
        return _error(f"{len(result.failures)} failure(s); {held} (see {out / FAILURES_TXT})", 1)
    return 0
