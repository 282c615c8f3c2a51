"""``gmic-jax cache``: arguments and exit status (the cache itself is :mod:`gmic_jax.data.cache`).

    gmic-jax cache --output CACHE_DIR --source manifest --manifest data.csv --split train
    gmic-jax cache --output CACHE_DIR --source exam-list --exam-list OUT/exam_list.pkl \
        --images OUT/cropped_images [--segmentations SEG_DIR] [--window-noise]
    gmic-jax cache --output CACHE_DIR --source cbis-tcia --root CBIS_ROOT --split train [--kinds calc mass]
    gmic-jax cache --output CACHE_DIR --source cbis-tfds --tfds-config original-calc --split train
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gmic_jax.data.cache import INDEX_NAME, WINDOW_NOISE_OPTION, build_cache, supports_window_noise
from gmic_jax.data.cbis_ddsm import tcia_records, tcia_source, tfds_source
from gmic_jax.data.image import DataError
from gmic_jax.data.manifest import manifest_source, read_manifest
from gmic_jax.data.sources import ExamListSource
from gmic_jax.data.window import window_noise_amplitudes
from gmic_jax.files import FAILURES_TXT, print_failures
from gmic_jax.preprocessing import NAMES as PREPROCESSING_NAMES


def make_source(args):
    """The data source the command-line arguments describe."""
    window_shape = tuple(args.window_shape)
    common = dict(window_shape=window_shape)
    if args.source == "exam-list":
        if not args.exam_list or not args.images:
            raise SystemExit("--source exam-list needs --exam-list and --images")
        return ExamListSource(args.exam_list, args.images, args.segmentations, **common)
    common.update(iterations=args.iterations)
    if args.preprocessing:
        common.update(preprocessing=args.preprocessing)
    if args.source == "manifest":
        if not args.manifest:
            raise SystemExit("--source manifest needs --manifest")
        source = manifest_source(args.manifest, split=args.split, strict=False, **common)
        source.load_errors = read_manifest(args.manifest)[1]
        return source
    if args.source == "cbis-tcia":
        if not args.root:
            raise SystemExit("--source cbis-tcia needs --root")
        source = tcia_source(
            args.root, args.split or "train", kinds=args.kinds, val_fraction=args.val_fraction, seed=args.seed, **common
        )
        source.load_errors = tcia_records(args.root, args.kinds, args.val_fraction, args.seed)[1]
        return source
    if args.source == "cbis-tfds":
        return tfds_source(
            args.tfds_config,
            args.split or "train",
            data_dir=args.data_dir,
            val_fraction=args.val_fraction,
            seed=args.seed,
            **common,
        )
    raise SystemExit(f"unknown source {args.source!r}")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=["manifest", "exam-list", "cbis-tcia", "cbis-tfds"])
    parser.add_argument("--manifest", help="manifest CSV (--source manifest)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to take (all if omitted, manifest)")
    parser.add_argument("--exam-list", help="preprocessed exam list (--source exam-list)")
    parser.add_argument("--images", help="cropped images folder (--source exam-list)")
    parser.add_argument("--segmentations", help="segmentations folder (--source exam-list)")
    parser.add_argument("--root", help="TCIA CBIS-DDSM download (--source cbis-tcia)")
    parser.add_argument("--kinds", nargs="+", default=["calc", "mass"], choices=["calc", "mass"])
    parser.add_argument("--tfds-config", default="original-calc", choices=["original-calc", "original-mass"])
    parser.add_argument("--data-dir", help="TFDS data_dir (--source cbis-tfds)")
    parser.add_argument(
        "--preprocessing",
        choices=list(PREPROCESSING_NAMES),
        help="default: original for manifest, cbis_ddsm for CBIS-DDSM (see gmic_jax.preprocessing)",
    )
    parser.add_argument("--window-shape", type=int, nargs=2, default=[2944, 1920], metavar=("H", "W"))
    parser.add_argument("--iterations", type=int, default=100, help="erosion/dilation steps of the cropping")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="cache folder")
    add_source_arguments(parser)
    parser.add_argument("--shard-size", type=int, default=256, help="windows per shard file")
    parser.add_argument(
        WINDOW_NOISE_OPTION,
        action="store_true",
        help="also store each image's context for the original's training-time window noise "
        "(exam-list source; data.window_noise=True in training)",
    )
    parser.add_argument(
        "--crop-noise",
        type=int,
        nargs=2,
        metavar=("Y", "X"),
        help="window noise: max window shift in pixels (default: the original's 100, 100 scaled to --window-shape)",
    )
    parser.add_argument(
        "--size-noise",
        type=int,
        metavar="S",
        help="window noise: max border move in pixels (default: the original's 100, scaled)",
    )
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    if args.shard_size < 1 or min(args.window_shape) < 1:
        print(
            f"gmic-jax cache: error: --shard-size ({args.shard_size}) and --window-shape "
            f"({' '.join(map(str, args.window_shape))}) must be >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        source = make_source(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    window_noise = None
    if getattr(args, "window_noise", False):
        if not supports_window_noise(source):
            print(
                f"error: {WINDOW_NOISE_OPTION} needs --source exam-list (images with a best centre); "
                f"got --source {args.source}",
                file=sys.stderr,
            )
            return 2
        default_crop, default_size = window_noise_amplitudes(tuple(args.window_shape))
        window_noise = (
            tuple(args.crop_noise) if args.crop_noise else default_crop,
            default_size if args.size_noise is None else args.size_noise,
        )
        if min(*window_noise[0], window_noise[1]) < 0:
            print("error: --crop-noise and --size-noise must be >= 0", file=sys.stderr)
            return 2
    elif getattr(args, "crop_noise", None) or getattr(args, "size_noise", None) is not None:
        print(f"error: --crop-noise/--size-noise need {WINDOW_NOISE_OPTION}", file=sys.stderr)
        return 2
    # The split the cache holds (CBIS-DDSM sources take 'train' when none is named; a manifest
    # without --split and an exam list hold all they list: none recorded). evaluate names its keys by it.
    split = args.split or ("train" if args.source in ("cbis-tcia", "cbis-tfds") else None)
    metadata = {"source": args.source, "split": split, "window_shape": list(args.window_shape)}
    count, failures = build_cache(
        source,
        args.output,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        metadata=metadata,
        progress=not args.no_progress,
        prior_failures=getattr(source, "load_errors", ()),
        window_noise=window_noise,
    )
    if failures:
        print_failures(failures)
        print(
            f"{len(failures)} failure(s); {count} window(s) cached but the cache is NOT complete "
            f"(no {INDEX_NAME}; see {Path(args.output) / FAILURES_TXT})",
            file=sys.stderr,
        )
        return 1
    print(f"{count} window(s) cached in {args.output}")
    return 0
