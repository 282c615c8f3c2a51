"""What the training step pays for each way of computing BatchNorm: the model's
(`gmic_jax.models.layers.BatchNorm`: two-pass batch variance, gradient in closed form) against
flax's `nn.BatchNorm` with the same two-pass variance and autodiff's gradient, and against flax's
one-pass E[x^2] - E[x]^2 variance.

    python benchmarks/batchnorm_variants.py                              # CPU, 1472 x 960, batch 1
    python benchmarks/batchnorm_variants.py --image-shape 2944 1920 --batch 4 --steps 5   # one exam
    python benchmarks/batchnorm_variants.py --image-shape 2944 1920 --steps 0   # compiled costs only
    python benchmarks/batchnorm_variants.py --dtype bfloat16 --json bn.json    # on a GPU

Every variant is the project's training step (`make_train_step` on one device, Adam, beta 0), or
with --program fwd_bwd the forward + backward that memory_fwd_bwd.py times
(`bench_common.make_grad_fn`), on the same standard-normal images; a flax variant swaps the
model's `batch_norm` for this process only.
Reported per variant, from the compiled program (deterministic): XLA's cost analysis (flops, bytes
accessed), the bytes its kernels move by `roofline.py`'s rules, and two kinds of kernel XLA:CPU adds
around convolutions and reductions: the transposed copies feeding convolutions (a weight gradient's
operands in the canonical layout) and reduce-window kernels (large reductions as trees). With
--steps > 0, the median and interquartile range of the step time, the variants' steps alternating
so that drift on a shared machine hits all alike, and each flax variant's first-step loss and
gradient norm beside the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gmic_jax, also where it is not installed

import bench_common as bc  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import roofline  # noqa: E402

from gmic_jax import GMIC, GMICConfig, init_variables  # noqa: E402
from gmic_jax.models import global_net, layers, local_net  # noqa: E402
from gmic_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from gmic_jax.train.step import make_mesh, make_train_step, replicate, shard_batch  # noqa: E402
from gmic_jax.xla_flags import apply_cpu_defaults  # noqa: E402

VARIANTS = ("closed_form", "flax_two_pass", "flax_one_pass")
MODULES = (layers, global_net, local_net)  # where the model looks up `batch_norm`
MODEL_BATCH_NORM = layers.batch_norm


def flax_batch_norm(fast_variance: bool):
    """`batch_norm` built from flax's nn.BatchNorm (autodiff gradient), PyTorch's eps and momentum."""

    def batch_norm(x, train: bool, *, name: str, axis_name: str | None = None):
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=layers.BN_MOMENTUM,
            epsilon=layers.BN_EPS,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            axis_name=axis_name if train else None,
            use_fast_variance=fast_variance,
            name=name,
        )(x.astype(jnp.float32))

    return batch_norm


def use(variant: str) -> None:
    impl = {
        "closed_form": MODEL_BATCH_NORM,
        "flax_two_pass": flax_batch_norm(False),
        "flax_one_pass": flax_batch_norm(True),
    }[variant]
    for module in MODULES:
        module.batch_norm = impl


def hlo_counts(hlo_text: str) -> dict:
    """Bytes of all kernels, of the transposed copies feeding convolutions and of reduce-windows."""
    program = roofline.HloProgram(hlo_text)
    kernels = program.kernels()
    by_name = {k["name"]: k for k in kernels}
    instructions = {i["name"]: i for c in program.computations.values() for i in c}
    copies = {
        operand
        for k in kernels
        if instructions[k["name"]]["opcode"] == "convolution"
        for operand in instructions[k["name"]]["operands"]
        if operand in by_name and ("transpose" in operand or "copy" in operand)
    }
    windows = [
        k for k in kernels if "reduce-window" in k["name"] or instructions[k["name"]]["opcode"] == "reduce-window"
    ]
    return {
        "kernels": len(kernels),
        "kernel_bytes": sum(k["bytes"] for k in kernels),
        "conv_operand_copies": len(copies),
        "conv_operand_copy_bytes": sum(by_name[c]["bytes"] for c in copies),
        "reduce_window_kernels": len(windows),
        "reduce_window_bytes": sum(k["bytes"] for k in windows),
    }


def build(variant: str, args):
    use(variant)
    mesh = make_mesh(jax.devices()[:1])
    cfg = GMICConfig(image_shape=tuple(args.image_shape), crop_shape=tuple(args.crop_shape), dtype=args.dtype)
    tx = make_optimizer({"learning_rate": 1e-5}, total_steps=1)
    host = jax.device_get(create_train_state(init_variables(cfg, jax.random.key(0)), tx, seed=0))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, *args.image_shape, 1)).astype(np.float32)
    if args.program == "fwd_bwd":
        grad_fn = bc.make_grad_fn(GMIC(cfg), train=True)

        def fn(*args):
            (loss, _), grads = grad_fn(*args)
            return loss, optax.global_norm(grads), grads

        fn = jax.jit(fn)
        state = (host.params, host.batch_stats)
        batch = (images, bc.targets(args.batch), jax.random.key(0))
        compiled = fn.lower(*state, *batch).compile()
        return FwdBwd(compiled), state, batch, costs(compiled)
    step = make_train_step(cfg, tx, mesh, beta=0.0)
    batch = shard_batch({"image": images, "label": bc.targets(args.batch)}, mesh)
    state = replicate(host, mesh)
    compiled = step.lower(state, batch).compile()
    return compiled, state, batch, costs(compiled)


class FwdBwd:
    """make_grad_fn's compiled program called as a training step: (state, batch) -> (state, metrics)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, state, batch):
        loss, grad_norm, grads = self.compiled(*state, *batch)
        return state, {"loss": loss, "grad_norm": grad_norm, "grads": grads}


def costs(compiled) -> dict:
    use("closed_form")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        **hlo_counts(compiled.as_text()),
    }


def time_steps(built: dict, steps: int) -> dict:
    """Median and IQR (ms) of each variant's step, alternating; and its first step's metrics."""
    states = {v: built[v][1] for v in built}
    times, first = {v: [] for v in built}, {}
    for i in range(steps + 1):  # the first round warms up
        for v, (compiled, _, batch, _) in built.items():
            t0 = time.perf_counter()
            states[v], metrics = compiled(states[v], batch)
            jax.block_until_ready(metrics)
            if i:
                times[v].append(time.perf_counter() - t0)
            else:
                first[v] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
    out = {}
    for v in built:
        med, spread = bc.median_spread([t * 1e3 for t in times[v]])
        out[v] = dict(median_ms=med, iqr_ms=spread, steps=len(times[v]), first_step=first[v])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-shape", type=int, nargs=2, default=(1472, 960))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256))
    p.add_argument("--batch", type=int, default=1, help="images per step [1]; 4 = one exam")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--program", default="train", choices=("train", "fwd_bwd"), help="[train]")
    p.add_argument("--steps", type=int, default=7, help="timed steps per variant (0: compiled costs only)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    apply_cpu_defaults()  # XLA:CPU as the CLI runs it; read when the backend starts, below
    built = {v: build(v, args) for v in VARIANTS}
    result = {
        "device": jax.devices()[0].device_kind if jax.default_backend() != "cpu" else bc.cpu_name(),
        "versions": bc.versions(),
        "image_shape": list(args.image_shape),
        "batch": args.batch,
        "dtype": args.dtype,
        "program": args.program,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "variants": {v: dict(built[v][3]) for v in VARIANTS},
    }
    if args.steps:
        for v, timing in time_steps(built, args.steps).items():
            result["variants"][v].update(timing)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
