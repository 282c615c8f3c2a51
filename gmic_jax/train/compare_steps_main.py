"""``gmic-jax compare-steps``: arguments and exit status (the comparison itself is
:func:`gmic_jax.train.compare_steps.compare_steps`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gmic_jax.train.heads import HEADS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="a training workdir (best with --config.keep_evaluated=True)")
    parser.add_argument(
        "--data",
        default="synthetic:split=test",
        help="held-out data: 'synthetic[:split=test,num=...]' or 'cache:PATH' (default: %(default)s)",
    )
    parser.add_argument("--output", required=True, help="output directory for steps.json")
    parser.add_argument(
        "--prediction",
        default=None,
        choices=[*HEADS, "average"],
        help="default: the workdir's eval.prediction",
    )
    parser.add_argument("--batch-size", type=int, default=16)


def main(args) -> int:
    # The library (and JAX) is imported once the command line is parsed: `--help` stays fast.
    from gmic_jax.train.compare_steps import compare_steps, format_table

    try:
        result = compare_steps(
            args.workdir, args.data, batch_size=args.batch_size, prediction=args.prediction, progress=True
        )
    except (ValueError, OSError) as e:  # a CheckpointError is a ValueError
        print(f"gmic-jax compare-steps: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(format_table(result))
    return 0
