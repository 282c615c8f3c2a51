"""What the training step pays for BatchNorm's two-pass batch variance (mean of squared deviations
from the batch mean, as PyTorch computes it; gmic_jax.models.layers.batch_norm) against flax's
one-pass E[x^2] - E[x]^2.

    python benchmarks/batchnorm_variance.py                              # CPU, 1472 x 960, batch 1
    python benchmarks/batchnorm_variance.py --image-shape 2944 1920 --steps 0   # compiled costs only
    python benchmarks/batchnorm_variance.py --dtype bfloat16 --json bn.json    # on a GPU

Both steps are the project's training step (`make_train_step` on one device, Adam, beta 0) on the
same standard-normal images; the one-pass variant swaps the formula in `gmic_jax.models.layers` for
this process only. Reported per variant: XLA's compiled
cost analysis (flops, bytes accessed: deterministic, from the compiled program) and, with --steps
> 0, the median and interquartile range of the step time, the two variants' steps alternating so
that drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gmic_jax, also where it is not installed

import bench_common as bc  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from gmic_jax import GMICConfig, init_variables  # noqa: E402
from gmic_jax.models import layers  # noqa: E402
from gmic_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from gmic_jax.train.step import make_mesh, make_train_step, replicate, shard_batch  # noqa: E402

VARIANTS = ("two_pass", "one_pass")
# The flax namespace gmic_jax.models.layers builds its BatchNorms from (two-pass variance).
ORIGINAL_NN = layers.nn


def _use_one_pass_variance():
    """Make gmic_jax.models.layers build flax BatchNorms with use_fast_variance=True."""

    def batch_norm(**kwargs):
        return nn.BatchNorm(**{**kwargs, "use_fast_variance": True})

    layers.nn = types.SimpleNamespace(**{**vars(nn), "BatchNorm": batch_norm})


def build(variant: str, args):
    layers.nn = ORIGINAL_NN
    if variant == "one_pass":
        _use_one_pass_variance()
    mesh = make_mesh(jax.devices()[:1])
    cfg = GMICConfig(image_shape=tuple(args.image_shape), crop_shape=tuple(args.crop_shape), dtype=args.dtype)
    tx = make_optimizer({"learning_rate": 1e-5}, total_steps=1)
    host = jax.device_get(create_train_state(init_variables(cfg, jax.random.key(0)), tx, seed=0))
    step = make_train_step(cfg, tx, mesh, beta=0.0)
    rng = np.random.default_rng(0)
    batch = shard_batch(
        {
            "image": rng.standard_normal((args.batch, *args.image_shape, 1)).astype(np.float32),
            "label": bc.targets(args.batch),
        },
        mesh,
    )
    state = replicate(host, mesh)
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (
        compiled,
        state,
        batch,
        {
            "flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        },
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-shape", type=int, nargs=2, default=(1472, 960))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=7, help="timed steps per variant (0: compiled costs only)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    built = {v: build(v, args) for v in VARIANTS}
    result = {
        "device": jax.devices()[0].device_kind if jax.default_backend() != "cpu" else bc.cpu_name(),
        "versions": bc.versions(),
        "image_shape": list(args.image_shape),
        "batch": args.batch,
        "dtype": args.dtype,
        "variants": {v: dict(built[v][3]) for v in VARIANTS},
    }
    if args.steps:
        states = {v: built[v][1] for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for i in range(args.steps + 1):  # the first round warms up
            for v in VARIANTS:
                compiled, _, batch, _ = built[v]
                t0 = time.perf_counter()
                states[v], metrics = compiled(states[v], batch)
                jax.block_until_ready(metrics)
                if i:
                    times[v].append(time.perf_counter() - t0)
        for v in VARIANTS:
            med, spread = bc.median_spread([t * 1e3 for t in times[v]])
            result["variants"][v].update(median_ms=med, iqr_ms=spread, steps=len(times[v]))
        result["two_pass_over_one_pass"] = (
            result["variants"]["two_pass"]["median_ms"] / result["variants"]["one_pass"]["median_ms"]
        )
    b = result["variants"]
    result["bytes_ratio"] = b["two_pass"]["bytes_accessed"] / b["one_pass"]["bytes_accessed"]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
