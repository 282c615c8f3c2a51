"""``gmic-jax train --config configs/<name>.py --workdir DIR [--config.x=y ...]``: arguments and
exit status (the run itself is :func:`gmic_jax.train.loop.train_and_evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys

from gmic_jax import logs
from gmic_jax.train.config_lib import ConfigError, apply_overrides, load_config, split_config_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py[:arg])")
    parser.add_argument("--workdir", required=True, help="output directory; a run resumes from what it holds")
    parser.add_argument(
        "--init-from",
        default=None,
        help="start from this checkpoint directory (converted model or pretrained global network)",
    )
    parser.add_argument(
        "--config-changes-ok",
        action="store_true",
        help="resume WORKDIR although the config differs from its config.json in fields that change "
        "the computation (logged and recorded in config.json's history)",
    )
    parser.epilog = (
        "Override any config field with --config.FIELD=VALUE (e.g. --config.optimizer.learning_rate=3e-4). "
        "Devices: all that JAX sees (choose with JAX_PLATFORMS=cpu|cuda, CUDA_VISIBLE_DEVICES); "
        "batch_size must be a multiple of their number."
    )


def parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The declared arguments plus any number of --config.FIELD=VALUE overrides."""
    ns, rest = parser.parse_known_args(argv)
    try:
        rest, overrides = split_config_args(rest)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    ns.config_overrides = overrides
    return ns


def main(args) -> int:
    """Exit 0 when trained; 2 for a mistake in the command or config (one line, nothing written);
    1 when the data, a checkpoint or the run fails."""
    logs.configure()
    # The library (and JAX) is imported once the command line is parsed: `--help` stays fast.
    from gmic_jax.train import loop

    try:
        config = load_config(args.config)
        apply_overrides(config, getattr(args, "config_overrides", []))
        if args.init_from:
            config.init_from = args.init_from
        record = loop.train_and_evaluate(
            config, args.workdir, config_changes_ok=getattr(args, "config_changes_ok", False)
        )
    except ConfigError as e:  # includes WorkdirError
        print(f"gmic-jax train: error: {e}", file=sys.stderr)
        return 2
    except loop.RUN_FAILURES as e:
        print(f"gmic-jax train: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(record, sort_keys=True))
    return 0
