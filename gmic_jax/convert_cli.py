"""``gmic-jax convert``: arguments and exit status (the conversion itself is :mod:`gmic_jax.convert`).

gmic-jax convert sample_model_1.p --out models/gmic_1 --model-index 1
"""

from __future__ import annotations

import sys

from gmic_jax.config import RELEASED_PERCENT_T, GMICConfig


def add_arguments(parser):
    parser.add_argument(
        "src", help="original checkpoint: sample_model_N.p (torch.save; torch not needed) or an .npz of its state_dict"
    )
    parser.add_argument("--out", required=True, help="output directory (gmic-jax checkpoint layout)")
    parser.add_argument(
        "--model-index",
        type=int,
        default=1,
        choices=sorted(RELEASED_PERCENT_T),
        help="which released model (1..5) the weights are; sets top-t (default: 1)",
    )
    parser.add_argument("--percent-t", type=float, default=None, help="override top-t of --model-index")


def main(args) -> int:
    percent_t = args.percent_t if args.percent_t is not None else RELEASED_PERCENT_T[args.model_index]
    try:
        config = GMICConfig(percent_t=percent_t)
    except ValueError as e:
        print(f"gmic-jax convert: error: --percent-t {percent_t}: {e}", file=sys.stderr)
        return 2
    from gmic_jax import convert as convert_lib  # the library (JAX, Flax, Orbax), after parsing: keeps --help fast

    try:
        variables = convert_lib.convert_checkpoint(args.src, args.out, config)
    except convert_lib.ConversionError as e:
        print(f"gmic-jax convert: error: {e}", file=sys.stderr)
        return 1
    n = convert_lib.count_values(variables)
    print(f"converted {args.src} -> {args.out} ({n:,} values, percent_t={percent_t})")
    return 0
