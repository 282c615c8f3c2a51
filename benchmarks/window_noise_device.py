"""What the window noise costs the training step on the device (the crop + bicubic resize of
gmic_jax.resample), against the same step fed the finished windows.

    python benchmarks/window_noise_device.py                          # CPU, 1472 x 960, 1 image
    python benchmarks/window_noise_device.py --image-shape 2944 1920 --batch 4 --steps 3
    python benchmarks/window_noise_device.py --deviceless h100 --batch 4 --dtype bfloat16

``window`` is the project's training step (`make_train_step` on one device, Adam, beta 0) fed
uint16 windows; ``device_noise`` is what training runs with window noise: the window program
(`make_window_fn`: each image's band of noise-context rows -- the window's height plus twice the
original's border noise, the context's width, as training ships them -- cropped and resized on
the device) and then the same step fed its windows. Reported per program: XLA's cost analysis
(flops, bytes accessed) of the compiled programs (CPU) or of the programs before optimisation
(``--deviceless``: compiled for the GPU target without one, see benchmarks/deviceless.py; plus
compiled memory), and on a real device with --steps > 0 the median and interquartile range of the
step time, the two alternating so that drift on a shared machine hits both alike.
``crop_resize`` is the window program alone. The ratios ``device_noise / window`` are the window
noise's share of the step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gmic_jax, also where it is not installed

import bench_common as bc  # noqa: E402
import deviceless as dl  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.lib import _jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from gmic_jax import GMICConfig, init_variables  # noqa: E402
from gmic_jax.data.window import noise_region_shape, window_noise_amplitudes  # noqa: E402
from gmic_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from gmic_jax.train.step import make_mesh, make_train_step, make_window_fn, replicate, shard_batch  # noqa: E402

PROGRAMS = ("window", "device_noise")


def inputs(program: str, args, rng):
    """Host arrays of one batch for ``program``: uint16 windows, or regions + borders of draws."""
    n, (wh, ww) = args.batch, args.image_shape
    label = bc.targets(n)
    if program == "window":
        return {"image": rng.integers(0, 4096, (n, wh, ww, 1)).astype(np.uint16), "label": label}
    (_, crop_x), size_noise = window_noise_amplitudes((wh, ww))
    # as CacheSource.noisy_region ships them: the tallest crop's rows, the contexts' width
    sh, sw = noise_region_shape((wh, ww), size_noise)[0], ww + 2 * (crop_x + size_noise)
    # crops up to twice the border noise larger or smaller than the window, anywhere in the region
    top, left = rng.integers(0, sh - wh + 1, n), rng.integers(0, sw - ww - 2 * size_noise + 1, n)
    bottom = np.minimum(top + wh + rng.integers(-(sh - wh) // 2, (sh - wh) // 2 + 1, n), sh)
    right = left + ww + rng.integers(-size_noise, size_noise + 1, n)
    return {
        "region": rng.integers(0, 4096, (n, sh, sw)).astype(np.uint16),
        "borders": np.stack([top, bottom, left, right], 1).astype(np.int32),
        "label": label,
    }


def costs(lowered, compiled, deviceless: bool) -> dict:
    if deviceless:
        module = lowered.compiler_ir("hlo").as_hlo_module()
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        mem = compiled.memory_analysis()
        return {
            "flops": float(dl.flops_before_optimization(lowered)),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "arg_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
        }
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", float("nan"))), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sharding), tree)


def build(args, mesh) -> dict:
    """The compiled programs: the training step (fed windows) and the window program (regions +
    borders -> windows), with their inputs and costs."""
    cfg = GMICConfig(image_shape=tuple(args.image_shape), crop_shape=tuple(args.crop_shape), dtype=args.dtype)
    tx = make_optimizer({"learning_rate": 1e-5}, total_steps=1)
    state = jax.device_get(create_train_state(init_variables(cfg, jax.random.key(0)), tx, seed=0))
    step = make_train_step(cfg, tx, mesh, beta=0.0)
    crop = make_window_fn(cfg.image_shape, mesh).crop
    window = inputs("window", args, np.random.default_rng(0))
    noise = inputs("device_noise", args, np.random.default_rng(0))
    if args.deviceless:
        rep, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        state, window, noise = _abstract(state, rep), _abstract(window, split), _abstract(noise, split)
    else:
        window, noise = shard_batch(window, mesh), shard_batch(noise, mesh)
    out = {"state": state, "window": window, "noise": noise}
    lowered = crop.lower(noise["region"], noise["borders"])
    out["crop"] = lowered.compile()
    out["crop_costs"] = costs(lowered, out["crop"], bool(args.deviceless))
    placed = replicate(state, mesh) if not args.deviceless else state
    lowered = step.lower(placed, window)
    out["step"] = lowered.compile()
    out["step_costs"] = costs(lowered, out["step"], bool(args.deviceless))
    # the same step for the window program's float32 windows (a program of its own)
    images = jax.eval_shape(crop, noise["region"], noise["borders"])
    images = jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=noise["label"].sharding)
    lowered = step.lower(placed, {"image": images, "label": noise["label"]})
    out["noise_step"] = lowered.compile()
    out["noise_step_costs"] = costs(lowered, out["noise_step"], bool(args.deviceless))
    out["replicate"] = lambda: replicate(state, mesh)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-shape", type=int, nargs=2, default=(1472, 960))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256))
    p.add_argument("--batch", type=int, default=1, help="images per step")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=7, help="timed steps per program (0: compiled costs only)")
    p.add_argument("--deviceless", choices=("h100", "h200"), help="compile for this GPU without one (no timing)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.deviceless:
        mesh, device = dl.target_mesh(args.deviceless), f"deviceless {args.deviceless} (compiled, not run)"
    else:
        mesh = make_mesh(jax.devices()[:1])
        device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else bc.cpu_name()
    built = build(args, mesh)
    step_costs, crop_costs, noise_costs = built["step_costs"], built["crop_costs"], built["noise_step_costs"]
    result = {
        "device": device,
        "versions": bc.versions(),
        "image_shape": list(args.image_shape),
        "batch": args.batch,
        "dtype": args.dtype,
        "programs": {
            "window": dict(step_costs),
            "device_noise": {k: noise_costs[k] + crop_costs[k] for k in noise_costs},
        },
        "crop_resize": dict(crop_costs),
    }
    if args.steps and not args.deviceless:
        states = {v: built["replicate"]() for v in PROGRAMS}  # the step donates its state
        window, noise, step, crop = built["window"], built["noise"], built["step"], built["crop"]
        noise_step = built["noise_step"]
        times = {v: [] for v in PROGRAMS + ("crop_resize",)}
        for i in range(args.steps + 1):  # the first round warms up
            t0 = time.perf_counter()
            states["window"], metrics = step(states["window"], window)
            jax.block_until_ready(metrics)
            t1 = time.perf_counter()
            images = crop(noise["region"], noise["borders"])
            jax.block_until_ready(images)
            t2 = time.perf_counter()
            batch = {"image": images, "label": noise["label"]}
            states["device_noise"], metrics = noise_step(states["device_noise"], batch)
            jax.block_until_ready(metrics)
            t3 = time.perf_counter()
            if i:
                times["window"].append(t1 - t0)
                times["crop_resize"].append(t2 - t1)
                times["device_noise"].append(t3 - t1)
        for v in PROGRAMS:
            med, spread = bc.median_spread([t * 1e3 for t in times[v]])
            result["programs"][v].update(median_ms=med, iqr_ms=spread, steps=len(times[v]))
        med, spread = bc.median_spread([t * 1e3 for t in times["crop_resize"]])
        result["crop_resize"].update(median_ms=med, iqr_ms=spread)
        result["step_time_ratio"] = (
            result["programs"]["device_noise"]["median_ms"] / result["programs"]["window"]["median_ms"]
        )
    b = result["programs"]
    for key in ("flops", "bytes_accessed"):
        result[f"{key}_ratio"] = b["device_noise"][key] / b["window"][key]
        result[f"crop_resize_{key}_share"] = result["crop_resize"][key] / b["device_noise"][key]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
