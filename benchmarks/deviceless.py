"""Compile GMIC for an NVIDIA GPU on a machine without one, and read what XLA planned.

`benchmarks/memory_fwd_bwd.py --deviceless h100|h200` runs one worker per configuration with
`DevicelessRunner`. The worker needs the `[gpu]` extra (jax[cuda12]): XLA's CUDA compiler builds
the program against a target description (`gpu_targets/*.txtpb`, written from the card's public
specifications) through `jax.experimental.topologies`, with `CUDA_VISIBLE_DEVICES=-1` and
`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` so that no driver is looked for. Inputs are
`jax.ShapeDtypeStruct`s on a one-device mesh of that target: nothing is allocated.

What comes back is compiled memory (XLA's buffer assignment: argument, temporary, output bytes;
the buffers live at the peak), never runtime: no autotuning ran (cuDNN workspaces are 0 bytes in
a deviceless program), and allocator fragmentation is not in it. FLOPs are XLA's cost analysis
of the program before optimisation (the CUDA compiler's own cost analysis needs a device); a
remat policy's recompute is explicit there, so policy minus 'none' is its recompute cost.

The persistent compilation cache stays off here: an executable built against a hand-written
target without autotuning must never be served to a real card of the same name.

The parent side is here too (`run_deviceless`: one worker per configuration, then the report and
its markdown); the workers run memory_fwd_bwd.py --worker, which builds a `DevicelessRunner`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
import hlo_report
import jax
import jax.numpy as jnp
from jax._src.lib import _jax
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from gmic_jax import GMIC, init_variables

BENCH_DIR = Path(__file__).resolve().parent
TARGETS = {"h100": BENCH_DIR / "gpu_targets" / "h100_sxm.txtpb", "h200": BENCH_DIR / "gpu_targets" / "h200_sxm.txtpb"}
PLUGIN_MISSING = (
    "--deviceless needs the CUDA plugin of jaxlib (the [gpu] extra: pip install 'jax[cuda12]'); "
    "it compiles for the GPU without one"
)
WORKER_ENV = {
    "JAX_PLATFORMS": "cpu",
    "CUDA_VISIBLE_DEVICES": "-1",
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
    "GMIC_JAX_COMPILE_CACHE": "off",
}
# details.per_result of a --deviceless run: what each configuration's worker found, as it found it.
DETAIL_KEYS = (
    "phase",
    "dtype",
    "remat",
    "batch_exams",
    "cudnn_by_kind",
    "custom_calls",
    "host_transfers",
    "hlo_has_cpu_kernel",
    "peak",
)
# One row per configuration and phase of a --deviceless run (bytes and FLOPs per exam).
DEVICELESS_KEYS = (
    "impl",
    "phase",
    "device",
    "dtype",
    "remat",
    "batch_exams",
    "arg_bytes",
    "temp_bytes",
    "out_bytes",
    "alias_bytes",
    "flops",
    "recompute_flops",
    "compile_s",
    "compile_cache",
    "cudnn_convs",
    "fusions",
    "host_transfers",
    "peak_temp_bytes",
    "kernels",
)


def plugin_available() -> bool:
    return importlib.util.find_spec("jax_cuda12_plugin") is not None


def target_config(name: str) -> str:
    if name not in TARGETS:
        raise ValueError(f"unknown deviceless target {name!r}; known: {sorted(TARGETS)}")
    return TARGETS[name].read_text()


def target_mesh(name: str):
    """A one-device mesh ('data') of the named GPU target, without a GPU."""
    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(name), topology="1x1x1")
    return topologies.make_mesh(topology, (1,), ("data",))


def flops_before_optimization(lowered) -> float:
    """XLA's cost analysis (the CPU client's) of a lowered program's HLO before optimisation."""
    module = lowered.compiler_ir("hlo").as_hlo_module()
    return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["flops"])


class DevicelessRunner:
    """Compile the forward (inference) or the training step's forward + backward for a GPU target."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.mesh = target_mesh(spec["deviceless"])
        self.device = self.mesh.devices.flat[0]
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def on_target(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)

        self.cfg = bc.make_config(spec)
        self.model = GMIC(self.cfg)
        n = bc.IMAGES_PER_EXAM * spec["batch_exams"]
        variables = jax.tree.map(on_target, jax.eval_shape(lambda: init_variables(self.cfg, jax.random.key(0))))
        x = jax.ShapeDtypeStruct((n, *self.cfg.image_shape, 1), jnp.float32, sharding=replicated)
        y = jax.ShapeDtypeStruct((n, 2), jnp.float32, sharding=replicated)
        rng = on_target(jax.eval_shape(lambda: jax.random.key(0)))
        if spec["phase"] == "fwd":
            self.fn = jax.jit(lambda v, x, rng: self.model.apply(v, x, train=False, rngs={"roi": rng}))
            self.args = (variables, x, rng)
        else:
            self.fn = jax.jit(bc.make_grad_fn(self.model, train=True))
            self.args = (variables["params"], variables["batch_stats"], x, y, rng)

    def ready(self) -> dict:
        with tempfile.TemporaryDirectory(prefix="gmic_deviceless_") as dump:
            t0 = time.perf_counter()
            lowered = self.fn.lower(*self.args)
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
            compile_s = time.perf_counter() - t0
            [live_range] = Path(dump).glob("*after_optimizations-live-range.txt")
            [assignment] = Path(dump).glob("*after_optimizations-buffer-assignment.txt")
            live_range_text, assignment_text = live_range.read_text(), assignment.read_text()
        hlo_text = compiled.as_text()
        mem = compiled.memory_analysis()
        return {
            "device_kind": self.device.device_kind,
            "platform": self.device.platform,
            "target": self.spec["deviceless"],
            "target_file": str(TARGETS[self.spec["deviceless"]].relative_to(BENCH_DIR.parent)),
            "compile_s": compile_s,
            "compile_cache": "off",
            "arg_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "out_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "flops": flops_before_optimization(lowered),
            "hlo_has_cpu_kernel": "cpu_kernel" in hlo_text,
            **hlo_report.program_counts(hlo_text),
            "peak": hlo_report.attribute_peak(assignment_text, live_range_text, hlo_text),
            "kernels": os.environ.get("GMIC_JAX_KERNELS") or "auto",
        }

    def handle(self, msg: dict) -> dict:
        raise ValueError(f"a deviceless worker only compiles; got command {msg['cmd']!r}")


# =============================================================================== parent side
def deviceless_configs(args) -> list[dict]:
    """The forward once per dtype and batch (remat does not change inference; tagged 'none' when
    asked for, else the first policy given), the training step per dtype, policy and batch."""
    fwd_remat = "none" if "none" in args.remat else args.remat[0]
    out = []
    for dtype in args.dtype:
        for batch in args.batch_exams:
            out.append(dict(phase="fwd", dtype=dtype, remat=fwd_remat, batch_exams=batch))
            out += [dict(phase="train", dtype=dtype, remat=r, batch_exams=batch) for r in args.remat]
    return out


def run_deviceless(args, cores, user_env, script: Path) -> int:
    """Compile each configuration in a fresh worker (`script` --worker), then print and write the report."""
    base = {
        "impl": "jax",
        "deviceless": args.deviceless,
        "image_shape": list(args.image_shape),
        "crop_shape": list(args.crop_shape),
        "K": args.K,
        "percent_t": args.percent_t,
    }
    env = {**bc.worker_env(args.threads, "cpu", ""), **WORKER_ENV, "GMIC_JAX_KERNELS": args.kernels}
    workdir = Path(tempfile.mkdtemp(prefix="gmic_deviceless_"))
    entries = []
    try:
        for config in deviceless_configs(args):
            spec = {**base, **config}
            tag = f"{config['phase']}_{config['dtype']}_{config['remat']}_b{config['batch_exams']}"
            print(f"[deviceless {args.deviceless}] compiling {tag} ...", file=sys.stderr, flush=True)
            worker = bc.Worker(script, spec, cores, env, workdir / f"{tag}.log")
            try:
                entries.append({**config, **worker.receive()})
            finally:
                worker.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = assemble_deviceless(args, cores, entries, user_env)
    print(markdown_deviceless(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def assemble_deviceless(args, cores, entries, user_env) -> dict:
    kinds = sorted({e["device_kind"] for e in entries})
    device = (
        f"{', '.join(kinds)} (deviceless compile for target {entries[0]['target_file']}; compiled memory, not runtime)"
    )
    baseline = {
        (e["dtype"], e["batch_exams"]): e["flops"] for e in entries if e["phase"] == "train" and e["remat"] == "none"
    }
    results = [_deviceless_row(e, device, baseline) for e in entries]
    details = [{k: e[k] for k in DETAIL_KEYS} for e in entries]
    report = {
        "device": device,
        "versions": bc.versions(extra=(*bc.GPU_PACKAGES, "nvidia-cuda-nvcc-cu12")),
        "threads": args.threads,
        "image_shape": list(args.image_shape),
        "unit": bc.UNIT,
        "results": results,
        "details": {
            "target": args.deviceless,
            "target_file": entries[0]["target_file"],
            "crop_shape": list(args.crop_shape),
            "K": args.K,
            "percent_t": args.percent_t,
            "kernels": args.kernels,
            "host_cpu": bc.cpu_identity(),
            "per_result": details,
            "user_xla_flags": user_env.get("XLA_FLAGS", ""),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "memory": "XLA buffer assignment of the compiled program (argument, temporary, output bytes); "
            "no autotuning ran, so cuDNN workspaces are not in it; not runtime peak_bytes_in_use",
            "flops": "XLA cost analysis of the HLO before optimisation; recompute_flops = this policy's minus "
            "remat='none' of the same dtype and batch",
            "compile_s": "wall time of lower + compile (tracing included), one fresh process per configuration, "
            "persistent cache off, XLA dump of the buffer assignment included",
        },
    }
    assert all(tuple(r) == DEVICELESS_KEYS for r in results)
    return report


def _deviceless_row(e: dict, device: str, baseline: dict) -> dict:
    """A configuration's row of "results", per exam; `baseline`: the training step's FLOPs without
    remat, by (dtype, batch_exams)."""
    n = e["batch_exams"]
    base_flops = baseline.get((e["dtype"], n)) if e["phase"] == "train" else None
    return {
        "impl": "jax",
        "phase": e["phase"],
        "device": device,
        "dtype": e["dtype"],
        "remat": e["remat"],
        "batch_exams": n,
        "arg_bytes": e["arg_bytes"] // n,
        "temp_bytes": e["temp_bytes"] // n,
        "out_bytes": e["out_bytes"] // n,
        "alias_bytes": e["alias_bytes"] // n,
        "flops": e["flops"] / n,
        "recompute_flops": None if base_flops is None else (e["flops"] - base_flops) / n,
        "compile_s": e["compile_s"],
        "compile_cache": e["compile_cache"],
        "cudnn_convs": e["cudnn_convs"],
        "fusions": e["fusions"],
        "host_transfers": len(e["host_transfers"]),
        "peak_temp_bytes": e["peak"]["bytes"] // n,
        "kernels": e["kernels"],
    }


def markdown_deviceless(report: dict) -> str:
    MiB, GiB, G = 2**20, 2**30, 1e9
    lines = [
        f"Device: {report['device']}  ",
        f"Unit: {report['unit']}, images {report['image_shape'][0]}x{report['image_shape'][1]}; compiled on "
        f"{bc.cpu_name(report['details']['host_cpu'])}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| phase | dtype | remat | exams/batch | args MiB | temp MiB | out MiB | args + temp GiB | GFLOP | "
        "recompute GFLOP | cuDNN convs | fusions | host transfers | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        recompute = "-" if r["recompute_flops"] is None else f"{r['recompute_flops'] / G:.1f}"
        lines.append(
            f"| {r['phase']} | {r['dtype']} | {r['remat']} | {r['batch_exams']} | {r['arg_bytes'] / MiB:.0f} | "
            f"{r['temp_bytes'] / MiB:.0f} | {r['out_bytes'] / MiB:.0f} | "
            f"{(r['arg_bytes'] + r['temp_bytes']) / GiB:.3f} | {r['flops'] / G:.1f} | {recompute} | "
            f"{r['cudnn_convs']} | {r['fusions']} | {r['host_transfers']} | {r['compile_s']:.1f} |"
        )
    lines.append("\n(per exam; compiled memory of XLA's buffer assignment, not runtime)")
    for r, d in zip(report["results"], report["details"]["per_result"]):
        if r["phase"] == "train" and r["batch_exams"] == min(x["batch_exams"] for x in report["results"]):
            lines += [
                "",
                f"### Peak of the training step: {r['dtype']}, remat={r['remat']}, {r['batch_exams']} exam(s)",
                "",
                hlo_report.peak_markdown(d["peak"], per=r["batch_exams"]),
            ]
    return "\n".join(lines)
