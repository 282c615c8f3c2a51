"""The `gmic-jax` command line: parses arguments and dispatches to library functions.

Each subcommand has a module that exposes ``add_arguments(parser)`` and
``main(args) -> int`` (and optionally ``parse_args(parser, argv)`` for arguments argparse cannot
declare, such as ``--config.FIELD=VALUE``); this file only lists them. The chosen command's module
is imported once the command is known and that module imports the library once its arguments are
parsed, so ``gmic-jax --help`` and ``gmic-jax COMMAND --help`` stay fast.

Exit status: 0 done; 2 a mistake in the command line or config (one line on stderr, no traceback,
nothing written); 1 the data, a checkpoint or the run failed (a batch job lists its failures).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache  # light: JAX is imported later

# name -> (module, one-line help). Modules are imported lazily, only for the chosen command.
COMMANDS = {
    "convert": ("gmic_jax.convert_cli", "convert an original GMIC checkpoint (.p or .npz) to gmic-jax"),
    "preprocess": (
        "gmic_jax.data.preprocess_cli",
        "crop images and find window centres (the original's exam-list pipeline)",
    ),
    "cache": ("gmic_jax.data.cache_cli", "preprocess a dataset once into memory-mapped uint16 window shards"),
    "predict": ("gmic_jax.predict.cli", "predict exams (exam list or DICOM): CSVs, saliency maps, figures"),
    "train": ("gmic_jax.train.main", "train GMIC from a config (configs/*.py); resumes from WORKDIR by itself"),
    "evaluate": (
        "gmic_jax.train.evaluate_main",
        "evaluate a checkpoint on labelled data: metrics.json and ROC/PR figure",
    ),
    "compare-steps": (
        "gmic_jax.train.compare_steps_main",
        "evaluate every evaluated checkpoint step of a training workdir on held-out data",
    ),
}
# Options that name an output directory (each command has at most one).
OUTPUT_DIR_OPTIONS = ("workdir", "output", "out")


def _output_is_a_file(args) -> str | None:
    for name in OUTPUT_DIR_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and Path(value).exists() and not Path(value).is_dir():
            return f"--{name} {value} is a file; give a directory (it is created if missing)"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmic-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.set_defaults(_add_arguments_pending=True)
    return parser


def main(argv=None) -> int:
    apply_cpu_defaults()  # before any JAX work
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Two-phase parse: find the command, then let its module declare its own arguments.
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module = importlib.import_module(COMMANDS[name][0])
        sub = argparse.ArgumentParser(prog=f"gmic-jax {name}", description=COMMANDS[name][1])
        module.add_arguments(sub)
        parse = getattr(module, "parse_args", None)
        args = parse(sub, argv[1:]) if parse else sub.parse_args(argv[1:])
        args.command_line = ["gmic-jax", *argv]  # as typed; outputs that record their command take it
        problem = _output_is_a_file(args)
        if problem:
            print(f"gmic-jax {name}: error: {problem}", file=sys.stderr)
            return 2
        enable_compile_cache()  # persistent compilation cache: GMIC_JAX_COMPILE_CACHE=DIR or off
        try:
            return int(module.main(args) or 0)
        except KeyboardInterrupt:
            print(f"gmic-jax {name}: interrupted", file=sys.stderr)
            return 130
    parser.parse_args(argv)  # prints help / usage errors
    return 2


if __name__ == "__main__":
    sys.exit(main())
