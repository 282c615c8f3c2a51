"""Every kernel's measured time in one traced training step, beside its roofline bound.

    python benchmarks/kernel_times.py --device gpu --dtype bfloat16 --json kernels.json   # on the GPU
    python benchmarks/kernel_times.py --device cpu --image-shape 256 192 --crop-shape 96 96 --K 2 \
        --percent-t 0.1                                                                  # a rehearsal

Builds, on the device at hand, the training step that benchmarks/roofline.py bounds
(`gmic_jax.train.step.make_train_step` with Adam, loss beta = 0, one-device 'data' mesh), runs it
--warmup times, times --runs more (median wall time per step), then traces one step with
`jax.profiler` and sums the trace's device time per HLO instruction: on GPU the kernels' events name
their instruction in `args.hlo_op`; on CPU the events are named by the instruction
(`profile_summary`). The compiled program's own HLO gives every kernel's bytes, FLOPs and bound
(`roofline.hlo_kernels`, `roofline.roofline`) with the peaks of --target [by the device's name:
h200 for an H200, else h100]. Reported per exam: the step's wall time, the sum of its kernels'
times, the bound, and per kernel and per part the measured time beside the bound ("x from the
limit" = measured / bound). On CPU the bound is the GPU target's and means nothing; a CPU run
rehearses the script (benchmarks/gpu_checks.sh, REHEARSE=1).

--json OUT: {"device", "versions", "target", "peaks", "unit", "config", "step_ms", "kernel_ms",
"bound_ms", "by_part": {part: {"measured_ms", "bound_ms"}}, "kernels": [{"name", "part", "bytes",
"flops", "bound_ms", "measured_ms", "calls"}, ...]} (largest measured time first; per exam).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the gmic_jax of this checkout

import bench_common as bc  # noqa: E402
import profile_summary  # noqa: E402
import roofline  # noqa: E402

from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache  # noqa: E402

apply_cpu_defaults()  # before JAX starts its backends (roofline imported jax, started none)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gmic_jax import init_variables  # noqa: E402
from gmic_jax.train.state import TrainState, make_optimizer  # noqa: E402
from gmic_jax.train.step import make_mesh, make_train_step, replicate, shard_array  # noqa: E402


def build_step(spec: dict):
    """(compiled step, state, batch) on the first device, as roofline.compile_program builds it."""
    cfg, mesh = bc.make_config(spec), make_mesh(jax.devices()[:1])
    tx = make_optimizer({"learning_rate": 1e-5}, total_steps=1)
    v = init_variables(cfg, jax.random.key(0))
    state = TrainState(jnp.int32(0), v["params"], v["batch_stats"], tx.init(v["params"]), jnp.zeros(2, jnp.uint32))
    state = replicate(jax.device_get(state), mesh)
    n = bc.IMAGES_PER_EXAM * spec["batch_exams"]
    images = jax.device_get(jax.random.normal(jax.random.key(1), (n, *cfg.image_shape, 1), jnp.float32))
    batch = {"image": shard_array(images, mesh), "label": shard_array(bc.targets(n), mesh)}
    compiled = make_train_step(cfg, tx, mesh, beta=0.0).lower(state, batch).compile()
    return compiled, state, batch


def kernel_times(logdir: Path) -> dict[str, tuple[float, int]]:
    """{HLO instruction: (milliseconds summed, events)} of the trace in logdir: GPU kernel events by
    their `args.hlo_op`, else (CPU) the events named by their instruction."""
    events = profile_summary.trace_events(logdir)
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    device_events = [e for e in events if "hlo_op" in e.get("args", {})]
    if device_events:
        for e in device_events:
            out[e["args"]["hlo_op"]][0] += e["dur"] / 1e3
            out[e["args"]["hlo_op"]][1] += 1
    else:
        for name, ms in profile_summary.op_durations(events):
            out[name][0] += ms
            out[name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def measure(args) -> dict:
    spec = bc.model_spec(args)
    t0 = time.perf_counter()
    compiled, state, batch = build_step(spec)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) * 1e3)
    with tempfile.TemporaryDirectory(prefix="gmic_kernel_times_") as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        measured = kernel_times(Path(logdir))
    device = jax.devices()[0]
    target = args.target or ("h200" if "H200" in device.device_kind else "h100")
    peaks = json.loads(roofline.PEAKS_FILE.read_text())[target]
    n = args.batch_exams
    line = roofline.roofline(roofline.hlo_kernels(compiled.as_text()), peaks, per=n)
    kernels, by_part = [], collections.defaultdict(lambda: {"measured_ms": 0.0, "bound_ms": 0.0})
    for k in line["kernels"]:
        ms, calls = measured.get(k["name"], (0.0, 0))
        kernels.append({**{key: k[key] for key in roofline.KERNEL_KEYS}, "measured_ms": ms / n, "calls": calls})
        by_part[k["part"]]["measured_ms"] += ms / n
        by_part[k["part"]]["bound_ms"] += k["bound_ms"]
    kernels.sort(key=lambda k: -k["measured_ms"])
    cpu = device.platform == "cpu"
    return {
        "device": f"{bc.cpu_name()} (CPU, {args.threads} threads)" if cpu else device.device_kind,
        "versions": bc.versions(extra=() if cpu else bc.GPU_PACKAGES),
        "target": target,
        "peaks": peaks,
        "unit": bc.UNIT,
        "config": spec,
        "compile_s": compile_s,
        "step_ms": statistics.median(times) / n,
        "step_ms_runs": [t / n for t in times],
        "kernel_ms": sum(k["measured_ms"] for k in kernels),
        "bound_ms": line["bound_ms"],
        "unmatched_ms": sum(ms for name, (ms, _) in measured.items() if not any(k["name"] == name for k in kernels))
        / n,
        "by_part": dict(by_part),
        "kernels": kernels,
    }


def markdown(r: dict, top: int) -> str:
    lines = [
        f"Device: {r['device']}; bound from the {r['peaks']['name']} peaks; per {r['unit']}  ",
        f"Training step (Adam), {r['config']['dtype']}, remat {r['config']['remat']}, {r['config']['batch_exams']} "
        f"exam(s) per batch, {r['config']['image_shape'][0]}x{r['config']['image_shape'][1]}: wall "
        f"{r['step_ms']:.2f} ms, kernels {r['kernel_ms']:.2f} ms (+{r['unmatched_ms']:.2f} ms not in the HLO's "
        f"kernels), bound {r['bound_ms']:.3f} ms: **{r['step_ms'] / r['bound_ms']:.1f}x from the limit**",
        "",
        "| part | measured ms | bound ms | x |",
        "|---|---:|---:|---:|",
    ]
    for part, v in sorted(r["by_part"].items(), key=lambda kv: -kv[1]["measured_ms"]):
        x = v["measured_ms"] / v["bound_ms"] if v["bound_ms"] else float("nan")
        lines.append(f"| {part} | {v['measured_ms']:.3f} | {v['bound_ms']:.3f} | {x:.1f} |")
    lines += ["", "| kernel | part | measured ms | bound ms | x | MB | GFLOP |", "|---|---|---:|---:|---:|---:|---:|"]
    for k in r["kernels"][:top]:
        x = k["measured_ms"] / k["bound_ms"] if k["bound_ms"] else float("nan")
        lines.append(
            f"| {k['name']} | {k['part']} | {k['measured_ms']:.3f} | {k['bound_ms']:.4f} | {x:.1f} | "
            f"{k['bytes'] / 1e6:.1f} | {k['flops'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu", help="[gpu]")
    p.add_argument("--target", choices=("h100", "h200"), default=None, help="peaks of the bound [by device name]")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="[bfloat16]")
    p.add_argument("--remat", default="none", help="GMICConfig.remat [none]")
    p.add_argument("--batch-exams", type=int, default=1, help="exams (4 images) per batch [1]")
    p.add_argument("--image-shape", type=int, nargs=2, default=(2944, 1920), metavar=("H", "W"))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--percent-t", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first [2]")
    p.add_argument("--runs", type=int, default=5, help="timed steps before the traced one [5]")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu) [2]")
    p.add_argument("--top", type=int, default=15, help="kernels in the table [15]")
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    env = bc.worker_env(args.threads, args.device)
    wanted = {k: env[k] for k in ("JAX_PLATFORMS", "OMP_NUM_THREADS")}
    if any(os.environ.get(k) != v for k, v in wanted.items()):  # read when JAX starts: run again with them
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    enable_compile_cache()
    report = measure(args)
    print(markdown(report, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
