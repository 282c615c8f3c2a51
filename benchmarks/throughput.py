"""Training throughput of GMIC (exams of 4 images per second) against the number of devices, with
the input pipeline's rate beside it.

    python benchmarks/throughput.py                               # CPU: 1 and 2 forced devices
    python benchmarks/throughput.py --device gpu --devices 1 2 4 8 --dtype bfloat16
    python benchmarks/throughput.py --image-shape 256 192 --crop-shape 64 64 --json t.json

Each device count runs in a fresh worker process pinned to the same cores with the same thread
count. On CPU the devices are forced (`jax_num_cpu_devices`): they share the pinned cores, so this
exercises the data-parallel step rather than measuring scaling; GPU counts take the first k GPUs.
The step is the project's training step (`gmic_jax.train.step.make_train_step`: a per-device
program under `jax.shard_map`, gradients averaged with `lax.pmean` over the `data` axis, Adam),
on `--per-device-exams` exams per device of standard-normal images. Reported: compile time, then
the median and interquartile spread of the step time over --steps steps after one warm-up, and
exams/s = global batch / median step time.

The input pipeline's rate is measured apart, in the parent process on the same cores: batches of
the embedded synthetic data set (`gmic_jax.data.synthetic.SyntheticLesions`, rendered at the
image size, no cache) through `gmic_jax.data.pipeline.load_batches` in this process, or, with
--input-cache DIR, a `gmic-jax cache` directory read through it by --input-workers processes.
Defaults are shown by --help.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gmic_jax, also where it is not installed

import bench_common as bc  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from gmic_jax import GMICConfig, init_variables  # noqa: E402
from gmic_jax.data.cache import CacheSource  # noqa: E402
from gmic_jax.data.pipeline import SourceExamples, load_batches  # noqa: E402
from gmic_jax.data.synthetic import SyntheticLesions, SyntheticSpec  # noqa: E402
from gmic_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from gmic_jax.train.step import make_mesh, make_train_step, replicate, shard_batch  # noqa: E402
from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache  # noqa: E402

SCRIPT = Path(__file__).resolve()
RESULT_KEYS = (
    "devices",
    "global_batch_exams",
    "compile_s",
    "compile_cache",
    "step_ms",
    "step_ms_spread",
    "exams_per_s",
)


# =============================================================================== worker side
def measure_training(spec: dict) -> dict:
    """Compile and time the data-parallel training step on spec['devices'] devices."""
    apply_cpu_defaults()  # before any JAX work
    enable_compile_cache()  # as the CLI: GMIC_JAX_COMPILE_CACHE=DIR or off
    if spec["device"] == "cpu":
        jax.config.update("jax_num_cpu_devices", int(spec["devices"]))
    devices = jax.devices()
    if len(devices) < spec["devices"]:
        raise ValueError(f"{spec['devices']} devices asked for, {len(devices)} available: {devices}")
    mesh = make_mesh(devices[: spec["devices"]])
    cfg = GMICConfig(image_shape=tuple(spec["image_shape"]), crop_shape=tuple(spec["crop_shape"]), dtype=spec["dtype"])
    tx = make_optimizer({"learning_rate": 1e-5}, total_steps=1)
    state = create_train_state(init_variables(cfg, jax.random.key(0)), tx, seed=0)
    state = replicate(jax.device_get(state), mesh)
    step = make_train_step(cfg, tx, mesh, beta=0.0)
    n_images = bc.IMAGES_PER_EXAM * spec["per_device_exams"] * spec["devices"]
    rng = np.random.default_rng(0)
    batch = shard_batch(
        {
            "image": rng.standard_normal((n_images, *spec["image_shape"], 1)).astype(np.float32),
            "label": bc.targets(n_images),
        },
        mesh,
    )
    with bc.CompileCacheEvents() as cache:
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    state, metrics = jax.block_until_ready(compiled(state, batch))  # warm-up
    if not bool(metrics["finite"]):
        raise RuntimeError(f"the training step gave a non-finite loss ({float(metrics['loss'])})")
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "compile_s": compile_s,
        "compile_cache": cache.status,
        "runs_ms": times,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_worker(spec: dict) -> int:
    return bc.serve(lambda msg: {}, lambda: measure_training(spec))


# =============================================================================== parent side
def input_pipeline_rate(args) -> dict:
    """Exams/s of the input pipeline alone (host side, no device transfer)."""
    batch_images = bc.IMAGES_PER_EXAM * args.per_device_exams
    if args.input_cache:
        source = CacheSource(args.input_cache)
        workers = args.input_workers
        name = f"gmic-jax cache {args.input_cache} through the Grain pipeline ({workers} workers)"
    else:
        n = batch_images * args.input_batches
        source = SyntheticLesions(
            n + n % 2, spec=SyntheticSpec(image_shape=tuple(args.image_shape)), cache=False, with_masks=False
        )
        workers = 0
        name = "synthetic lesions (rendered, no cache) through the Grain pipeline in this process"
    warmup = 1 if workers else 0  # first batch: the workers' start-up
    plan = [
        tuple((k * batch_images + r) % len(source) for r in range(batch_images))
        for k in range(warmup + args.input_batches)
    ]
    with load_batches(plan, SourceExamples(source, keys=("image",)), workers=workers) as batches:
        for _ in range(warmup):
            next(batches)
        t0 = time.perf_counter()
        for _ in range(args.input_batches):
            batch = next(batches)
        elapsed = time.perf_counter() - t0
    if tuple(batch["image"].shape[1:3]) != tuple(args.image_shape):
        raise ValueError(
            f"input pipeline gives images of {tuple(batch['image'].shape[1:3])}, "
            f"the benchmark runs {tuple(args.image_shape)}"
        )
    return {
        "source": name,
        "batches": args.input_batches,
        "batch_exams": args.per_device_exams,
        "exams_per_s": args.input_batches * args.per_device_exams / elapsed,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are shown in brackets.",
    )
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="[auto: GPU if JAX sees one]")
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=None,
        help="device counts [CPU: 1 2; GPU: 1, 2, 4, ... up to the GPUs present]",
    )
    p.add_argument("--per-device-exams", type=int, default=1, help="exams per device per step [1]")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="[float32]")
    p.add_argument("--image-shape", type=int, nargs=2, default=(2944, 1920), metavar=("H", "W"), help="[2944 1920]")
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="[256 256]")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up [3]")
    p.add_argument("--threads", type=int, default=2, help="threads and pinned cores of each worker [2]")
    p.add_argument("--cores", default=None, help="CPU ids to pin to, e.g. '0-1' [the first --threads CPUs]")
    p.add_argument(
        "--xla-flags",
        default="",
        help="extra XLA flags of the workers, on top of gmic_jax.xla_flags' CPU defaults ['']",
    )
    p.add_argument(
        "--input-batches",
        type=int,
        default=1,
        help="batches timed for the input pipeline rate; 0 skips it (the synthetic "
        "source renders a 2944 x 1920 exam in ~33 s on the H200 machine's CPU) [1]",
    )
    p.add_argument(
        "--input-cache",
        default=None,
        metavar="DIR",
        help="measure this gmic-jax cache through Grain instead of synthetic images [off]",
    )
    p.add_argument("--input-workers", type=int, default=2, help="Grain worker processes for --input-cache [2]")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results there [off]")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return run_worker(json.loads(args.worker))
    try:
        return run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    os.environ["JAX_PLATFORMS"] = "cpu"  # the parent never claims an accelerator, nor its input workers
    if args.steps < 1 or args.per_device_exams < 1 or args.input_batches < 0:
        raise ValueError("--steps and --per-device-exams must be >= 1, --input-batches >= 0")
    cores = bc.parse_cores(args.cores, args.threads)
    n_gpus = bc.gpu_count() if args.device in ("auto", "gpu") else 0
    device = "gpu" if (args.device == "gpu" or (args.device == "auto" and n_gpus)) else "cpu"
    if device == "gpu" and not n_gpus:
        raise ValueError("--device gpu: JAX sees no GPU")
    counts = args.devices or ([1, 2] if device == "cpu" else [k for k in (1, 2, 4, 8, 16) if k <= n_gpus])
    if device == "gpu" and max(counts) > n_gpus:
        raise ValueError(f"--devices {counts}: only {n_gpus} GPUs present")

    os.sched_setaffinity(0, set(cores))
    pipeline_rate = input_pipeline_rate(args) if args.input_batches else None
    if pipeline_rate:
        print(f"[input] {pipeline_rate['exams_per_s']:.2f} exams/s", file=sys.stderr, flush=True)

    results, kinds = [], set()
    with tempfile.TemporaryDirectory(prefix="gmic_throughput_") as tmp:
        for k in counts:
            spec = {
                "device": device,
                "devices": k,
                "per_device_exams": args.per_device_exams,
                "dtype": args.dtype,
                "image_shape": list(args.image_shape),
                "crop_shape": list(args.crop_shape),
                "steps": args.steps,
            }
            print(f"[train] {k} device(s) ...", file=sys.stderr, flush=True)
            worker = bc.Worker(
                SCRIPT, spec, cores, bc.worker_env(args.threads, device, args.xla_flags), Path(tmp) / f"devices_{k}.log"
            )
            try:
                out = worker.receive()
            finally:
                worker.close()
            kinds.add(out["device_kind"])
            xla_flags = out["xla_flags"]
            med, spread = bc.median_spread(out["runs_ms"])
            exams = k * args.per_device_exams
            results.append(
                {
                    "devices": k,
                    "global_batch_exams": exams,
                    "compile_s": out["compile_s"],
                    "compile_cache": out["compile_cache"],
                    "step_ms": med,
                    "step_ms_spread": spread,
                    "exams_per_s": exams / (med / 1e3),
                }
            )
    report = {
        "device": (
            f"{bc.cpu_name()} (CPU; {args.threads} threads pinned to cores {cores}; forced devices share them)"
            if device == "cpu"
            else ", ".join(sorted(kinds))
        ),
        "versions": bc.versions(extra=bc.GPU_PACKAGES if device == "gpu" else ()),
        "threads": args.threads,
        "image_shape": list(args.image_shape),
        "unit": bc.UNIT,
        "dtype": args.dtype,
        "train_step": "gmic_jax.train.step.make_train_step (shard_map, pmean over 'data', Adam), beta=0",
        "results": results,
        "input_pipeline": pipeline_rate,
        "xla_flags": xla_flags,
        "cpu": bc.cpu_identity() if device == "cpu" else None,
    }
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def markdown(report: dict) -> str:
    base = report["results"][0]["exams_per_s"] / report["results"][0]["devices"]
    lines = [
        f"Device: {report['device']}  ",
        f"Unit: {report['unit']}, images {report['image_shape'][0]}x{report['image_shape'][1]}, "
        f"{report['dtype']}, {report['threads']} threads  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| devices | global batch (exams) | compile (s) | compile cache | step (ms) | spread, IQR (ms) | exams/s "
        "| per device vs 1 |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['devices']} | {r['global_batch_exams']} | {r['compile_s']:.1f} | {r['compile_cache']} "
            f"| {r['step_ms']:.0f} | "
            f"{r['step_ms_spread']:.0f} | {r['exams_per_s']:.3f} | "
            f"{r['exams_per_s'] / r['devices'] / base:.2f} |"
        )
    ip = report["input_pipeline"]
    lines += [
        "",
        f"XLA_FLAGS: {report['xla_flags']!r}  ",
        "Input pipeline: not measured (--input-batches 0)"
        if ip is None
        else f"Input pipeline: {ip['exams_per_s']:.3f} exams/s ({ip['source']}, {ip['batches']} batches of "
        f"{ip['batch_exams']} exam(s), on the same cores, host side only)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
