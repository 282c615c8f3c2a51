"""``gmic-jax evaluate``: arguments and exit status (the evaluation itself is
:func:`gmic_jax.train.evaluate.evaluate_checkpoint`; what it writes is described there).

    gmic-jax evaluate --checkpoint DIR --data synthetic:num=200,seed=0 --output OUT [--split test]
    gmic-jax evaluate --checkpoint DIR --data cache:PATH --output OUT [--split NAME] [--step N] [--tta 10]
"""

from __future__ import annotations

import argparse
import json
import sys

from gmic_jax import logs
from gmic_jax.files import print_failures
from gmic_jax.train.heads import PREDICTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (converted model or training workdir)"
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="step to evaluate (default: the step the workdir's selection rule keeps, else the latest)",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="'synthetic[:num=200,seed=0,split=test]' or 'cache:PATH' (a gmic-jax cache with labels)",
    )
    parser.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="the split scored, the prefix of every metric key: synthetic data draws it (train, val, "
        "test; default test); for a cache it names what the cache holds (default: the split its "
        "metadata records)",
    )
    parser.add_argument("--output", required=True, help="output directory for metrics.json and roc_pr.png")
    parser.add_argument("--prediction", default="fusion", choices=PREDICTIONS)
    parser.add_argument(
        "--tta",
        type=int,
        default=0,
        help="test-time augmentation draws (paper: 10); the augmentation the checkpoint was trained "
        "with, else the paper's (gmic_jax.augment.tta_augment)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--normalization",
        default=None,
        choices=["standardize", "unit_range"],
        help="default: what the checkpoint's config.json says",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="input worker processes (0: load in this process; default: the usable cores less one, 0 below 3 cores)",
    )


def _error(message: str, code: int) -> int:
    print(f"gmic-jax evaluate: error: {message}", file=sys.stderr)
    return code


def main(args) -> int:
    """Exit 0 when evaluated; 2 for a mistake in the command; 1 when the checkpoint or the data
    fails (also when some images could not be loaded: the metrics leave them out)."""
    logs.configure()
    # The library (and JAX) is imported once the command line is parsed: `--help` stays fast.
    from gmic_jax.train import evaluate as evaluation

    try:
        result = evaluation.evaluate_checkpoint(
            args.checkpoint,
            args.data,
            args.output,
            step=args.step,
            split=args.split,
            prediction=args.prediction,
            tta=args.tta,
            batch_size=args.batch_size,
            normalization=args.normalization,
            seed=args.seed,
            workers=args.workers,
            command=getattr(args, "command_line", None),
        )
    except evaluation.EvaluateError as e:
        return _error(str(e), e.exit_code)
    if result.failures_path is not None:  # scored without them; the run says so and fails
        print_failures(result.failures)
        print(
            f"{len(result.failures)} image(s) could not be loaded and are left out of metrics.json "
            f"(see {result.failures_path})",
            file=sys.stderr,
        )
    if result.written:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
    return 1 if result.failures else 0
