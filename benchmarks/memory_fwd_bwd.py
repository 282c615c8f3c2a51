"""Parameters, FLOPs, peak memory and latency of GMIC per exam (4 images), optionally side by side
with the original PyTorch release.

    python benchmarks/memory_fwd_bwd.py                                   # JAX, CPU, 2944 x 1920
    python benchmarks/memory_fwd_bwd.py --torch-ref ~/src/GMIC --json cpu.json
    python benchmarks/memory_fwd_bwd.py --device gpu --dtype float32 bfloat16 --remat none global
    python benchmarks/memory_fwd_bwd.py --deviceless h100 --dtype bfloat16 --json h100.json  # no GPU needed

What is measured, per exam (a batch of N exams is 4N images; every figure is divided by N):
* parameters of the global network (ResNet-22 + saliency conv), the local network, the heads;
* FLOPs of the forward pass and of forward + backward: JAX from XLA's cost analysis of the
  compiled programs, PyTorch from torch's flop counter, beside the analytic count of
  `benchmarks/flops.py` (2 x multiply-adds of every convolution and dense layer);
* latency of the forward pass (inference: eval mode) and of forward + backward (a training step's
  gradient computation: BatchNorm on batch statistics, loss = the three heads' BCE; the optimizer
  update is left out): compile time apart, then the median and interquartile spread of n runs,
  each waited for (`block_until_ready`, or the end of the eager call);
* peak memory of that training step, measured at the first step in a fresh process of its own:
  on GPU the device's `peak_bytes_in_use` (torch: `max_memory_allocated`); on CPU the rise of the
  process's resident memory during the step (and XLA's compiled `temp_size_in_bytes` beside it).

Every implementation and phase runs in its own worker process, pinned to the same cores with the
same thread count; with --torch-ref the runs of both implementations alternate (ABBA order). The
same weights go into both (the reference recipe's when ../shared is beside the repo, else random
weights of gmic-jax mapped to the original's layout) and their outputs are checked to agree before
any number is reported. JAX workers start from the project's XLA:CPU defaults
(`gmic_jax.xla_flags.apply_cpu_defaults`; flags in XLA_FLAGS win); the inference and training
workers may get different extra flags (--xla-flags-fwd / --xla-flags-train); the table and the
JSON show the XLA_FLAGS each worker ran with.

--torch-peers adds, beside the original (eager float32, row "torch"), the PyTorch a performance-
minded user runs (torch_reference.PEERS): autocast bfloat16, channels_last, torch.compile of the
global and local networks (or of the whole model), and their combinations; same weights, inputs,
phases and ABBA runs. Each peer's outputs are checked against the JAX row of its dtype (else
against the original; bfloat16 without requiring the same patches). A torch.compile row's compile_s
is the time of its first call in that phase (tracing, inductor's C++ compile in a fresh cache
directory, one run), and its memory is the rise of the step after that one. A peer that cannot run
here (no C++ compiler, an error) stays in "results" with "skipped": the reason. The markdown
compares JAX with the fastest PyTorch row of the same dtype (`torch_reference.fastest_peer`),
naming both. Every worker of a phase stays alive through that phase, so the workers' resident
memory adds up: the JSON's details.workers_memory and the markdown's "Workers alive together" lines
give it (see benchmarks/RESULTS.md for runs split by dtype to fit a small machine).

--deviceless h100|h200 compiles instead for that GPU without one (benchmarks/deviceless.py; needs
the [gpu] extra): per configuration (dtype x remat policy x exams per batch; the forward once per
dtype and batch) the compiled memory (argument, temporary, output bytes per exam), FLOPs, cuDNN
convolution calls, fusions, host transfers and the buffers live at the peak by part of the
model. Compiled memory, not runtime; one "results" row per configuration and phase.

Compile time (`compile_s`) is the wall time of lower + compile, tracing included; JAX workers use
the persistent compilation cache like the CLI (`gmic_jax.xla_flags.enable_compile_cache`;
GMIC_JAX_COMPILE_CACHE=DIR or off) and each JAX row says whether its training-step compile was a
cache "hit", a "miss" or "off". --kernels forces the kernel variant (gmic_jax.models.fast_ops).

Every table names the CPU by its family / model numbers and whether it has AMX.

Output: a markdown table on stdout and, with --json, the JSON file
{"device", "versions", "threads", "image_shape", "unit": "exam of 4 images", "results": [...],
 "details": {...}} with one entry per implementation/configuration in "results".
The default run (JAX only, CPU, 1 exam at 2944 x 1920, 5 runs) takes about 3 minutes on a
2-core CPU; --torch-ref adds about 5 for the original and 2-5 per peer (a torch.compile peer's
first calls take 0.5-1.5 minutes per phase there). All rows of a phase are alive at once: the
float32 rows (JAX, the original, channels_last, the two compiled) held 8.9 GiB resident together
at the end of the training phase on that CPU, each 3.4-3.8 GiB at its peak (RESULTS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the gmic_jax of this checkout

import bench_common as bc  # noqa: E402
import deviceless  # noqa: E402
import flops as analytic  # noqa: E402
import plots  # noqa: E402
import torch_reference as tref  # noqa: E402

from gmic_jax.config import REMAT_POLICIES  # noqa: E402
from gmic_jax.models.global_net import saliency_grid_shape  # noqa: E402

IMAGES_PER_EXAM = 4
UNIT = "exam of 4 images"
RESULT_KEYS = (
    "impl",
    "dtype",
    "remat",
    "params",
    "params_global",
    "params_local",
    "flops_fwd",
    "flops_fwd_bwd",
    "flops_fwd_analytic",
    "compile_s",
    "fwd_ms",
    "fwd_ms_spread",
    "fwd_bwd_ms",
    "fwd_bwd_ms_spread",
    "peak_mem_bytes",
    "compile_cache",
)
# Keys after RESULT_KEYS that a row may have: "skipped" (why the row could not run; its numbers None).
OPTIONAL_RESULT_KEYS = ("skipped",)
# --torch-peers: the PyTorch configurations beside the original (torch_reference.PEERS).
TORCH_PEERS = tuple(name for name in tref.PEERS if name != "torch")
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
TOP_KEYS = ("device", "versions", "threads", "image_shape", "unit", "results")
# XLA flags of the inference and of the training worker when none are given on the command line.
INFERENCE_XLA_FLAGS = ""
TRAINING_XLA_FLAGS = ""
REMAT_MODES = tuple(REMAT_POLICIES)
# Agreement of the two implementations' forward outputs (max abs error / max abs value).
AGREE_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}
SCRIPT = Path(__file__).resolve()


# =============================================================================== worker side
def make_config(spec: dict):
    """The GMICConfig of a worker spec; --remat only where the model offers it."""
    from gmic_jax import GMICConfig

    kw = dict(
        image_shape=tuple(spec["image_shape"]),
        crop_shape=tuple(spec["crop_shape"]),
        K=spec["K"],
        percent_t=spec["percent_t"],
        dtype=spec["dtype"],
    )
    remat = spec.get("remat", "none")
    if remat != "none":
        fields = {f.name: f for f in dataclasses.fields(GMICConfig)}
        if "remat" not in fields:
            raise ValueError("--remat: this version of gmic_jax.GMICConfig has no 'remat' field")
        kw["remat"] = True if isinstance(fields["remat"].default, bool) else remat
    return GMICConfig(**kw)


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


class JaxRunner:
    def __init__(self, spec: dict):
        import jax
        import numpy as np

        from gmic_jax import GMIC
        from gmic_jax.convert import convert_state_dict

        self.spec, self.jax, self.np = spec, jax, np
        if spec.get("precision") == "highest":
            jax.config.update("jax_default_matmul_precision", "highest")
        self.cfg = make_config(spec)
        self.model = GMIC(self.cfg)
        self.dev = jax.devices()[0]
        with np.load(spec["weights"]) as f:
            variables = convert_state_dict({k: f[k] for k in f.files}, self.cfg)
        self.variables = jax.device_put(variables, self.dev)
        self.x = jax.device_put(np.load(spec["input"])[..., None], self.dev)
        self.y = jax.device_put(bc.targets(self.x.shape[0]), self.dev)
        self.rng = jax.random.key(0)
        self.last = None

    def ready(self) -> dict:
        jax = self.jax
        info = {
            "device_kind": self.dev.device_kind,
            "platform": self.dev.platform,
            "params": bc.jax_param_counts(self.variables["params"]),
        }
        if self.spec["phase"] == "fwd":
            fn = jax.jit(lambda v, x, rng: self.model.apply(v, x, train=False, rngs={"roi": rng}))
            self.args = (self.variables, self.x, self.rng)
        else:
            fn = jax.jit(bc.make_grad_fn(self.model, train=True))
            self.args = (self.variables["params"], self.variables["batch_stats"], self.x, self.y, self.rng)
        with bc.CompileCacheEvents() as cache:
            t0 = time.perf_counter()
            lowered = fn.lower(*self.args)
            self.compiled = lowered.compile()
            info["compile_s"] = time.perf_counter() - t0
        info["compile_cache"] = cache.status
        # XLA:CPU's optimised program still counts its convolutions; on GPU they become cuDNN
        # calls that carry no FLOPs (1.4 of 229 GFLOP counted on an H200), so there the
        # program before optimisation is counted, as the deviceless compile does.
        info["flops"] = (
            _cost_flops(self.compiled) if self.dev.platform == "cpu" else deviceless.flops_before_optimization(lowered)
        )
        info["flops_source"] = "XLA cost analysis" + (
            "" if self.dev.platform == "cpu" else " (HLO before optimisation)"
        )
        info["xla_temp_bytes"] = _temp_bytes(self.compiled)
        if self.spec["phase"] == "train":
            info.update(self._first_step_memory())
        return info

    def _first_step_memory(self) -> dict:
        if self.dev.platform == "cpu":
            with bc.ResidentRise() as rise:
                self.last = self.jax.block_until_ready(self.compiled(*self.args))
            return {
                "peak_mem_bytes": rise.rise,
                "mem_method": f"resident rise ({rise.method})",
                "rss_before_bytes": rise.baseline,
            }
        self.last = self.jax.block_until_ready(self.compiled(*self.args))
        stats = self.dev.memory_stats() or {}
        return {"peak_mem_bytes": int(stats.get("peak_bytes_in_use", -1)), "mem_method": "peak_bytes_in_use"}

    def handle(self, msg: dict) -> dict:
        if msg["cmd"] == "run":
            t0 = time.perf_counter()
            self.last = self.jax.block_until_ready(self.compiled(*self.args))
            return {"ms": (time.perf_counter() - t0) * 1e3}
        if msg["cmd"] == "save":
            return {"path": self._save(Path(msg["path"]))}
        if msg["cmd"] == "profile":
            return self._profile(Path(msg["path"]))
        raise ValueError(f"unknown command {msg['cmd']!r}")

    def _save(self, path: Path) -> str:
        np = self.np
        if self.spec["phase"] == "fwd":
            out = self.jax.device_get(self.last)
            arrays = {
                k: np.asarray(out[k])
                for k in ("y_global", "y_local", "y_fusion", "saliency_map", "patch_locations", "patch_attns")
            }
        else:
            from gmic_jax.convert import variables_to_state_dict

            (loss, _), grads = self.jax.device_get(self.last)
            arrays = {
                "loss": np.asarray(loss),
                **{f"grad/{k}": v for k, v in variables_to_state_dict({"params": grads}).items()},
            }
        np.savez(path, **arrays)
        return str(path)

    def _profile(self, logdir: Path) -> dict:
        import profile_summary

        with self.jax.profiler.trace(str(logdir), create_perfetto_trace=True):
            self.jax.block_until_ready(self.compiled(*self.args))
        return {"summary": profile_summary.summarize(logdir, self.compiled.as_text())}


class TorchRunner:
    def __init__(self, spec: dict):
        import numpy as np

        self.spec, self.np = spec, np
        with np.load(spec["weights"]) as f:
            state_dict = {k: f[k] for k in f.files}
        self.ref = tref.TorchGMIC(
            spec["torch_ref"],
            state_dict,
            image_shape=spec["image_shape"],
            crop_shape=spec["crop_shape"],
            K=spec["K"],
            percent_t=spec["percent_t"],
            cam_size=saliency_grid_shape(spec["image_shape"]),
            device=spec["device"],
            threads=spec["threads"],
            **tref.PEERS[spec["impl"]],
        )
        highest = spec.get("precision") == "highest"
        self.ref.torch.backends.cudnn.allow_tf32 = not highest  # PyTorch's default: True
        self.ref.torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
        self.x = self.ref.to_input(np.load(spec["input"])[..., None])
        self.y = self.ref.torch.from_numpy(bc.targets(self.x.shape[0])).to(self.ref.device)
        self.loss = None

    def ready(self) -> dict:
        torch = self.ref.torch
        info = {
            "device_kind": torch.cuda.get_device_name(0) if self.ref.device.type == "cuda" else "cpu",
            "platform": self.ref.device.type,
            "params": self.ref.param_counts(),
            "compile_s": 0.0,
            "compile_cache": "off",
            "xla_temp_bytes": None,
            "torch_threads": torch.get_num_threads(),
            "flops_source": "torch.utils.flop_counter",
        }
        if tref.PEERS[self.spec["impl"]].get("compile"):  # the first call traces and compiles
            t0 = time.perf_counter()
            self.handle({"cmd": "run"})
            info["compile_s"] = time.perf_counter() - t0
        if self.spec["phase"] == "train":
            if self.ref.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self.loss = self._step()
                info.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()), mem_method="max_memory_allocated")
            else:
                with bc.ResidentRise() as rise:
                    self.loss = self._step()
                info.update(
                    peak_mem_bytes=rise.rise,
                    mem_method=f"resident rise ({rise.method})",
                    rss_before_bytes=rise.baseline,
                )
            if info["compile_s"]:
                info["mem_method"] += ", the step after the compiling one"
        if self.spec["phase"] == "train":
            info["flops"] = self.ref.train_step_flops(self.x, self.y)
        else:
            info["flops"] = self.ref.forward_flops(self.x)
        return info

    def _step(self):
        loss = self.ref.train_step(self.x, self.y)
        self.ref.sync()
        return loss

    def handle(self, msg: dict) -> dict:
        if msg["cmd"] == "run":
            t0 = time.perf_counter()
            if self.spec["phase"] == "fwd":
                self.ref.forward(self.x)
                self.ref.sync()
            else:
                self.loss = self._step()
            return {"ms": (time.perf_counter() - t0) * 1e3}
        if msg["cmd"] == "save":
            path = Path(msg["path"])
            if self.spec["phase"] == "fwd":
                arrays = self.ref.outputs()
            else:
                arrays = {
                    "loss": self.np.asarray(float(self.loss.detach())),
                    **{f"grad/{k}": v for k, v in self.ref.grads().items()},
                }
            self.np.savez(path, **arrays)
            return {"path": str(path)}
        raise ValueError(f"unknown command {msg['cmd']!r}")


def run_worker(spec: dict) -> int:
    holder = {}

    def ready():
        if spec["impl"] == "jax":
            from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache

            apply_cpu_defaults()  # the project's XLA:CPU defaults, unless the flags given say otherwise
            enable_compile_cache()  # as the CLI: GMIC_JAX_COMPILE_CACHE=DIR or off
        if spec.get("deviceless"):
            from deviceless import DevicelessRunner

            holder["runner"] = DevicelessRunner(spec)
            return holder["runner"].ready()
        try:
            holder["runner"] = (JaxRunner if spec["impl"] == "jax" else TorchRunner)(spec)
            info = holder["runner"].ready()
        except Exception as e:
            if spec["impl"] in ("jax", "torch"):
                raise
            traceback.print_exc()  # a peer that cannot run here becomes a "skipped" row
            return {"skipped": f"{type(e).__name__}: {e}"[:400]}
        return {**info, "xla_flags": os.environ.get("XLA_FLAGS", "")}

    return bc.serve(lambda msg: holder["runner"].handle(msg), ready)


# =============================================================================== parent side
def detect_device() -> str:
    """'gpu' when JAX sees one (asked in a subprocess, so this process never claims GPU memory)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import jax; print(jax.default_backend())"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": ""},
        )
    except subprocess.TimeoutExpired:
        return "cpu"
    return "gpu" if out.stdout.strip() in ("gpu", "cuda", "rocm") else "cpu"


def _rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a - b), initial=0.0))


def compare_forward(jax_npz, torch_npz, rtol: float, exact: bool = True) -> dict:
    """Outputs of the two implementations on the same weights and images. `exact` (float32): every
    output within rtol and the same patch locations. Otherwise (bfloat16 against the original's
    float32) only the global network's outputs are held to rtol: a patch chosen differently on a
    near-tie changes everything downstream of it."""
    import numpy as np

    with np.load(jax_npz) as j, np.load(torch_npz) as t:
        errors = {k: _rel_err(j[k], t[k]) for k in ("y_global", "y_local", "y_fusion", "saliency_map", "patch_attns")}
        same_locations = bool(np.array_equal(j["patch_locations"].astype(np.int64), t["patch_locations"]))
    held = errors if exact else {k: errors[k] for k in ("y_global", "saliency_map")}
    ok = (same_locations or not exact) and all(e <= rtol for e in held.values())
    return {
        "ok": ok,
        "rtol": rtol,
        "checked": sorted(held),
        "max_rel_err": errors,
        "patch_locations_equal": same_locations,
    }


def compare_training(jax_npz, torch_npz, rtol: float) -> dict:
    import numpy as np

    with np.load(jax_npz) as j, np.load(torch_npz) as t:
        loss_err = abs(float(j["loss"]) - float(t["loss"])) / max(abs(float(t["loss"])), 1e-12)
        keys = sorted(k for k in t.files if k.startswith("grad/"))
        missing = sorted(set(keys) ^ {k for k in j.files if k.startswith("grad/")})
        errs = {k[5:]: _rel_err(j[k], t[k]) for k in keys if k in j.files}
    worst = max(errs, key=errs.get) if errs else None
    return {
        "ok": loss_err <= rtol and not missing,
        "rtol": rtol,
        "loss_rel_err": loss_err,
        "grad_max_rel_err": errs[worst] if worst else None,
        "grad_worst_key": worst,
        "grad_median_rel_err": float(np.median(list(errs.values()))) if errs else None,
        "grad_keys_missing": missing,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Defaults are shown in brackets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where to run: auto = GPU when JAX sees one, else CPU [auto]",
    )
    p.add_argument(
        "--deviceless",
        choices=sorted(deviceless.TARGETS),
        default=None,
        help="compile for this GPU without one (needs the [gpu] extra) and report compiled memory, "
        "FLOPs, cuDNN calls, fusions, host transfers and the peak's buffers; nothing runs [off]",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype(s) of the JAX model; each is its own configuration "
        "[float32; --deviceless: float32 bfloat16]",
    )
    p.add_argument(
        "--remat",
        nargs="+",
        choices=REMAT_MODES,
        default=None,
        help="rematerialisation policies (GMICConfig.remat), each its own configuration "
        "[none; --deviceless: all of them]",
    )
    p.add_argument(
        "--batch-exams",
        type=int,
        nargs="+",
        default=None,
        help="exams per batch (4 images each); several only with --deviceless [1; --deviceless: 1 4]",
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "cpu", "xla"),
        default="auto",
        help="kernel variant of the JAX model (gmic_jax.models.fast_ops): by the platform, or forced [auto]",
    )
    p.add_argument(
        "--image-shape", type=int, nargs=2, default=(2944, 1920), metavar=("H", "W"), help="image size [2944 1920]"
    )
    p.add_argument(
        "--crop-shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="patch size [256 256]"
    )
    p.add_argument("--K", type=int, default=6, help="patches per image [6]")
    p.add_argument("--percent-t", type=float, default=0.02, help="top-t of the aggregation [0.02, model 1]")
    p.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="float32 convolutions and matrix products: the backend's default (on GPUs since Ampere "
        "both JAX and PyTorch run float32 convolutions in TF32) or full float32 in both (JAX's "
        "jax_default_matmul_precision, PyTorch's allow_tf32 off); no effect on CPU [default]",
    )
    p.add_argument("--n-runs", type=int, default=5, help="timed runs of each measurement after one warm-up [5]")
    p.add_argument("--threads", type=int, default=2, help="threads (and pinned cores) of every worker [2]")
    p.add_argument(
        "--cores", default=None, help="CPU ids to pin to, e.g. '0-1' [the first --threads CPUs this process may use]"
    )
    p.add_argument(
        "--torch-ref",
        default=None,
        metavar="PATH",
        help="checkout of the original GMIC release: measure it side by side [off]",
    )
    p.add_argument(
        "--torch-peers",
        nargs="+",
        choices=(*TORCH_PEERS, "all", "none"),
        default=["all"],
        help="with --torch-ref, the PyTorch configurations run beside the original (torch_reference.PEERS); "
        "'none': the original alone [all]",
    )
    p.add_argument(
        "--xla-flags-fwd",
        default=INFERENCE_XLA_FLAGS,
        help="extra XLA flags of the JAX inference worker, on top of gmic_jax.xla_flags' "
        f"CPU defaults [{INFERENCE_XLA_FLAGS!r}]",
    )
    p.add_argument(
        "--xla-flags-train",
        default=TRAINING_XLA_FLAGS,
        help="extra XLA flags of the JAX training worker, on top of gmic_jax.xla_flags' "
        f"CPU defaults [{TRAINING_XLA_FLAGS!r}]",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also trace one JAX forward and one training step and print where the time goes [off]",
    )
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results there [off]")
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="run once per --image-scale and draw time per exam against image size (reports: PNG.json) [off]",
    )
    p.add_argument(
        "--image-scale",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 1.5],
        help="with --plot: image pixels relative to --image-shape [0.5 1 1.5]",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep the workers' files and logs [off]")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return run_worker(json.loads(args.worker))
    try:
        if args.plot:
            return run_sizes(args, sys.argv[1:] if argv is None else list(argv))
        return run_benchmark(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"memory_fwd_bwd: error: {e}", file=sys.stderr)
        return 1


def run_sizes(args, argv: list[str]) -> int:
    """--plot: the whole run once per --image-scale (a fresh invocation each, the image's sides
    times sqrt(scale), multiples of 32), then forward and forward + backward time per exam of every
    row against the image's pixels, drawn into the PNG; the reports go to PNG.json."""
    if args.deviceless:
        raise ValueError("--plot draws measured times: use roofline.py --plot for compiled memory and bounds")
    base = [a for a in argv if a not in ("--plot", args.plot)]
    reports = {}
    for scale in args.image_scale:
        shape = [max(32, round(s * scale**0.5 / 32) * 32) for s in args.image_shape]
        with tempfile.TemporaryDirectory(prefix="gmic_sizes_") as tmp:
            out = Path(tmp) / "report.json"
            cmd = [sys.executable, str(SCRIPT), *base, "--image-shape", *map(str, shape), "--json", str(out)]
            print(f"[plot] scale {scale}: {shape[0]} x {shape[1]}", file=sys.stderr, flush=True)
            if subprocess.run(cmd).returncode not in (0, 2):  # 2: outputs disagree, the times still stand
                raise RuntimeError(f"the run at scale {scale} failed: {' '.join(cmd)}")
            reports[scale] = json.loads(out.read_text())
    Path(args.plot).with_suffix(".json").write_text(json.dumps(reports, indent=1) + "\n")
    plots.time_against_size(reports, args.plot, title=f"{reports[args.image_scale[0]]['device']}")
    print(f"wrote {args.plot} and {Path(args.plot).with_suffix('.json')}", file=sys.stderr)
    return 0


def run_benchmark(args) -> int:
    os.environ["JAX_PLATFORMS"] = "cpu"  # the parent only makes weights; workers pick their own platform
    user_env = {k: v for k, v in os.environ.items()}
    deviceless_run = args.deviceless is not None
    args.dtype = args.dtype or (["float32", "bfloat16"] if deviceless_run else ["float32"])
    args.remat = args.remat or (list(REMAT_MODES) if deviceless_run else ["none"])
    batches = args.batch_exams or ([1, 4] if deviceless_run else [1])
    if min(batches) < 1 or args.n_runs < 1 or args.threads < 1:
        raise ValueError("--batch-exams, --n-runs and --threads must be >= 1")
    cores = bc.parse_cores(args.cores, args.threads)
    if deviceless_run:
        if args.torch_ref or args.profile:
            raise ValueError("--deviceless compiles only: --torch-ref and --profile need a device")
        if not deviceless.plugin_available():
            raise ValueError(deviceless.PLUGIN_MISSING)
        args.batch_exams = batches
        return run_deviceless(args, cores, user_env)
    if len(batches) != 1:
        raise ValueError("--batch-exams takes one value except with --deviceless")
    args.batch_exams = batches[0]
    device = detect_device() if args.device == "auto" else args.device
    os.environ["GMIC_JAX_KERNELS"] = args.kernels  # read by the JAX workers when they trace
    if {"all", "none"} & set(args.torch_peers) and len(args.torch_peers) > 1:
        raise ValueError("--torch-peers: 'all' and 'none' stand alone")
    if args.torch_ref:
        tref.load_original(args.torch_ref)  # a clear error now rather than in a worker
        h, w = saliency_grid_shape(args.image_shape)
        if int(round(h * w * args.percent_t)) < 1:
            raise ValueError(
                f"--percent-t {args.percent_t}: on the {h}x{w} saliency grid of "
                f"{args.image_shape[0]}x{args.image_shape[1]} images the original's top-t pooling "
                f"averages round({h * w * args.percent_t:.2f}) = 0 values (NaN); use --percent-t >= "
                f"{0.5 / (h * w):.3g} or larger images"
            )
    configs = [(d, r) for d in args.dtype for r in args.remat]
    for _, remat in configs:  # --remat needs the model's support: fail before any work
        make_config(
            {
                "image_shape": args.image_shape,
                "crop_shape": args.crop_shape,
                "K": args.K,
                "percent_t": args.percent_t,
                "dtype": "float32",
                "remat": remat,
            }
        )

    workdir = Path(tempfile.mkdtemp(prefix="gmic_bench_"))
    try:
        return _run(args, device, cores, configs, workdir, user_env)
    finally:
        if args.keep_workdir:
            print(f"worker files and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args, device, cores, configs, workdir: Path, user_env) -> int:
    import numpy as np

    n_images = IMAGES_PER_EXAM * args.batch_exams
    cfg0 = make_config(
        {
            "image_shape": args.image_shape,
            "crop_shape": args.crop_shape,
            "K": args.K,
            "percent_t": args.percent_t,
            "dtype": "float32",
        }
    )
    state_dict, weights_source = bc.benchmark_weights(cfg0)
    np.savez(workdir / "weights.npz", **state_dict)
    x = np.random.default_rng(0).standard_normal((n_images, *args.image_shape)).astype(np.float32)
    np.save(workdir / "input.npy", x)
    del x, state_dict

    base = {
        "device": device,
        "image_shape": list(args.image_shape),
        "crop_shape": list(args.crop_shape),
        "K": args.K,
        "percent_t": args.percent_t,
        "threads": args.threads,
        "weights": str(workdir / "weights.npz"),
        "input": str(workdir / "input.npy"),
        "torch_ref": args.torch_ref,
        "precision": args.precision,
    }
    entries = [dict(impl="jax", dtype=d, remat=r) for d, r in configs]
    if args.torch_ref:
        peers = {"all": TORCH_PEERS, "none": ()}.get(args.torch_peers[0], args.torch_peers)
        for name in ("torch", *dict.fromkeys(peers)):
            entries.append(dict(impl=name, dtype=tref.peer_dtype(name), remat="none"))
            if reason := tref.peer_unavailable(name, device):
                entries[-1]["skipped"] = reason
    for e in entries:
        e["label"] = entry_label(e)
        e["tag"] = f"{e['impl']}_{e['dtype']}_{e['remat']}"

    workers_memory = {}  # phase -> tag -> resident memory of each worker at the end of the phase
    for phase in ("fwd", "train"):
        flags = args.xla_flags_fwd if phase == "fwd" else args.xla_flags_train
        pairs = []  # (entry, worker) of the rows that run
        try:
            for e in entries:
                if e.get("skipped"):
                    continue
                spec = {**base, **{k: e[k] for k in ("impl", "dtype", "remat")}, "phase": phase}
                env = bc.worker_env(args.threads, device, flags if e["impl"] == "jax" else "")
                # torch.compile starts from an empty cache, so that compile_s is a cold compile
                cache = {"TORCHINDUCTOR_CACHE_DIR": str(workdir / f"inductor_{e['tag']}_{phase}")}
                env = {**env, **({} if e["impl"] == "jax" else {"JAX_PLATFORMS": "cpu", **cache})}
                print(f"[{phase}] starting {e['label']} ...", file=sys.stderr, flush=True)
                w = bc.Worker(SCRIPT, spec, cores, env, workdir / f"{e['tag']}_{phase}.log")
                pairs.append((e, w))
                e[phase] = w.receive()  # setup, compile, (first training step: memory)
                if "skipped" in e[phase]:
                    e["skipped"] = f"{phase} phase: {e[phase]['skipped']}"
                    print(f"[{phase}] {e['label']} skipped: {e['skipped']}", file=sys.stderr, flush=True)
                    pairs.pop()[1].close()
            workers = [w for _, w in pairs]
            runs = timed_runs(workers, args.n_runs)
            workers_memory[phase] = {e["tag"]: bc.process_memory(w.proc.pid) for e, w in pairs}
            for (e, w), times in zip(pairs, runs):
                e[phase]["runs_ms"] = times
                e[phase]["saved"] = w.call("save", path=str(workdir / f"{e['tag']}_{phase}.npz"))["path"]
                if args.profile and e["impl"] == "jax":
                    e[phase]["profile"] = w.call("profile", path=str(workdir / f"trace_{e['tag']}_{phase}"))["summary"]
                print(
                    f"[{phase}] {e['label']}: median {bc.median_spread(times)[0]:.0f} ms ({args.n_runs} runs)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for _, w in pairs:
                w.close()

    agreement = agreements([e for e in entries if not e.get("skipped")])
    report = assemble(args, device, cores, entries, agreement, weights_source, n_images, user_env)
    report["details"]["workers_memory"] = workers_memory
    print(markdown(report))
    if args.profile:
        for e in entries:
            for phase in ("fwd", "train"):
                if "profile" in e[phase]:
                    print(f"\n### Profile: {e['label']} {'forward' if phase == 'fwd' else 'forward + backward'}\n")
                    print(e[phase]["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    bad = [
        t for t, a in agreement.items() if not a["forward"]["ok"] or (a["same_dtype"] and not a["training_step"]["ok"])
    ]
    if bad:
        print(
            f"memory_fwd_bwd: error: outputs disagree for {bad}: {json.dumps({t: agreement[t] for t in bad})}",
            file=sys.stderr,
        )
        if device == "gpu" and args.precision == "default":
            print(
                "memory_fwd_bwd: on a GPU both run float32 convolutions in TF32 by default (measured on an H200: "
                "max rel. error 1.6e-3 this way, 1.0e-6 with --precision highest); compare at --precision highest",
                file=sys.stderr,
            )
        return 2
    return 0


def agreements(entries: list[dict]) -> dict:
    """Each row's outputs against its reference: a JAX row against the original ("torch"); a PyTorch
    peer against the JAX row of its dtype, else against the original. float32 against float32 must
    agree exactly (every output, the same patches); a bfloat16 side is held to the bfloat16
    tolerance on the global network's outputs only (a near-tie may pick another patch)."""
    original = next((e for e in entries if e["impl"] == "torch"), None)
    if original is None:
        return {}
    out = {}
    for e in entries:
        if e is original:
            continue
        jax_row = next((j for j in entries if j["impl"] == "jax" and j["dtype"] == e["dtype"]), None)
        ref = original if e["impl"] == "jax" or jax_row is None else jax_row
        first, second = (ref, e) if ref["impl"] == "jax" else (e, ref)  # the JAX side first
        exact = e["dtype"] == ref["dtype"] == "float32"
        rtol = AGREE_RTOL["float32" if exact else "bfloat16"]
        out[e["tag"]] = {
            "against": ref["tag"],
            "same_dtype": e["dtype"] == ref["dtype"],
            "forward": compare_forward(first["fwd"]["saved"], second["fwd"]["saved"], rtol, exact=exact),
            "training_step": compare_training(first["train"]["saved"], second["train"]["saved"], rtol),
        }
    return out


def timed_runs(workers, n_runs: int) -> list[list[float]]:
    """One warm-up each, then `n_runs` timed runs of every worker in ABBA order (each round reversed),
    so that a drift of the machine falls on all alike; the times of workers[i] in element i (workers
    of the same implementation and phase, e.g. two dtypes, are told apart by position)."""
    for w in workers:
        w.call("run")
    runs = [[] for _ in workers]
    order = list(range(len(workers)))
    for i in range(n_runs):
        for k in order if i % 2 == 0 else order[::-1]:
            runs[k].append(workers[k].call("run")["ms"])
    return runs


def _cache_dir_note() -> str:
    from gmic_jax.xla_flags import compile_cache_dir

    path = compile_cache_dir()
    return "off" if path is None else str(path)


# =============================================================================== --deviceless
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


def run_deviceless(args, cores, user_env) -> int:
    base = {
        "impl": "jax",
        "deviceless": args.deviceless,
        "image_shape": list(args.image_shape),
        "crop_shape": list(args.crop_shape),
        "K": args.K,
        "percent_t": args.percent_t,
    }
    env = {**bc.worker_env(args.threads, "cpu", ""), **deviceless.WORKER_ENV, "GMIC_JAX_KERNELS": args.kernels}
    workdir = Path(tempfile.mkdtemp(prefix="gmic_deviceless_"))
    entries = []
    try:
        for config in deviceless_configs(args):
            spec = {**base, **config}
            tag = f"{config['phase']}_{config['dtype']}_{config['remat']}_b{config['batch_exams']}"
            print(f"[deviceless {args.deviceless}] compiling {tag} ...", file=sys.stderr, flush=True)
            worker = bc.Worker(SCRIPT, spec, cores, env, workdir / f"{tag}.log")
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
    results, details = [], []
    for e in entries:
        n = e["batch_exams"]
        base_flops = baseline.get((e["dtype"], n)) if e["phase"] == "train" else None
        results.append(
            {
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
        )
        details.append(
            {
                k: e[k]
                for k in (
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
            }
        )
    report = {
        "device": device,
        "versions": bc.versions(extra=(*bc.GPU_PACKAGES, "nvidia-cuda-nvcc-cu12")),
        "threads": args.threads,
        "image_shape": list(args.image_shape),
        "unit": UNIT,
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


def markdown_deviceless(report: dict) -> str:
    import hlo_report

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


def assemble(args, device, cores, entries, agreement, weights_source, n_images, user_env) -> dict:
    n = args.batch_exams
    results, details = [], []
    for e in entries:
        if e.get("skipped"):  # every key, its numbers None, and why
            head = {k: e[k] for k in ("impl", "dtype", "remat")}
            results.append({**dict.fromkeys(RESULT_KEYS), **head, "skipped": e["skipped"]})
            details.append({**head, "skipped": e["skipped"]})
            continue
        fwd, train = e["fwd"], e["train"]
        stem = 1 if e["impl"] == "jax" else 3  # gmic-jax folds the crop's channel repeat into the kernel
        layers = analytic.gmic_layers(
            n_images, tuple(args.image_shape), tuple(args.crop_shape), args.K, local_stem_channels=stem
        )
        fwd_med, fwd_spread = bc.median_spread(fwd["runs_ms"])
        bwd_med, bwd_spread = bc.median_spread(train["runs_ms"])
        params = fwd["params"]
        results.append(
            {
                "impl": e["impl"],
                "dtype": e["dtype"],
                "remat": e["remat"],
                "params": params["params"],
                "params_global": params["params_global"],
                "params_local": params["params_local"],
                "flops_fwd": fwd["flops"] / n,
                "flops_fwd_bwd": train["flops"] / n,
                "flops_fwd_analytic": analytic.forward_flops(layers) / n,
                "compile_s": train["compile_s"],
                "fwd_ms": fwd_med / n,
                "fwd_ms_spread": fwd_spread / n,
                "fwd_bwd_ms": bwd_med / n,
                "fwd_bwd_ms_spread": bwd_spread / n,
                "peak_mem_bytes": int(train["peak_mem_bytes"] / n),
                "compile_cache": train["compile_cache"],
            }
        )
        details.append(
            {
                "impl": e["impl"],
                "dtype": e["dtype"],
                "remat": e["remat"],
                "params_heads": params["params_heads"],
                "flops_fwd_bwd_analytic": analytic.fwd_bwd_flops(layers) / n,
                "flops_fwd_analytic_every_tap": analytic.forward_flops(layers, count_padding=True) / n,
                "flops_source": fwd["flops_source"],
                "compile_fwd_s": fwd["compile_s"],
                "compile_train_step_s": train["compile_s"],
                "compile_cache_fwd": fwd["compile_cache"],
                "xla_temp_bytes_fwd": fwd["xla_temp_bytes"],
                "xla_temp_bytes_train_step": train["xla_temp_bytes"],
                "peak_mem_method": train["mem_method"],
                "rss_before_step_bytes": train.get("rss_before_bytes"),
                "fwd_ms_runs": fwd["runs_ms"],
                "fwd_bwd_ms_runs": train["runs_ms"],
                "xla_flags_fwd": fwd["xla_flags"] if e["impl"] == "jax" else None,
                "xla_flags_train": train["xla_flags"] if e["impl"] == "jax" else None,
                "device_kind": fwd["device_kind"],
            }
        )
    kinds = {d["device_kind"] for d in details if d["impl"] == "jax"}
    if device == "cpu":
        device_name = f"{bc.cpu_name()} (CPU; {args.threads} threads pinned to cores {cores})"
    else:
        device_name = ", ".join(sorted(kinds))
    report = {
        "device": device_name,
        "versions": bc.versions(with_torch=bool(args.torch_ref), extra=bc.GPU_PACKAGES if device == "gpu" else ()),
        "threads": args.threads,
        "image_shape": list(args.image_shape),
        "unit": UNIT,
        "results": results,
        "details": {
            "batch_exams": n,
            "crop_shape": list(args.crop_shape),
            "K": args.K,
            "n_runs": args.n_runs,
            "cores": cores,
            "weights": weights_source,
            "input": "standard normal, seed 0",
            "cpu": bc.cpu_identity(),
            "kernels": args.kernels,
            "precision": args.precision,
            "compile_cache_dir": _cache_dir_note(),
            "per_result": details,
            "agreement": agreement,
            "user_xla_flags": user_env.get("XLA_FLAGS", ""),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "timing": "median and interquartile range of n runs after one warm-up; runs of the "
            "implementations alternate (ABBA)",
            "training_step": "forward + backward of the three heads' BCE, BatchNorm on batch statistics, "
            "no optimizer update",
        },
    }
    assert tuple(report)[:-1] == TOP_KEYS and all(map(has_result_keys, results))
    return report


def has_result_keys(row: dict) -> bool:
    """RESULT_KEYS in order, then only OPTIONAL_RESULT_KEYS."""
    n = len(RESULT_KEYS)
    return tuple(row)[:n] == RESULT_KEYS and set(tuple(row)[n:]) <= set(OPTIONAL_RESULT_KEYS)


def entry_label(e: dict) -> str:
    return f"{e['impl']} {e['dtype']}" + ("" if e["remat"] == "none" else f" remat={e['remat']}")


def _fmt_ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b not in (None, 0) else "-"


def markdown(report: dict) -> str:
    ran = [(r, d) for r, d in zip(report["results"], report["details"]["per_result"]) if not r.get("skipped")]
    res, det = [r for r, _ in ran], [d for _, d in ran]
    torch_i = next((i for i, r in enumerate(res) if r["impl"] == "torch"), None)
    labels = [entry_label(r) for r in res]
    cols = list(labels)
    if torch_i is not None:
        cols += [f"{labels[i]} / torch" for i in range(len(res)) if i != torch_i]
    G, MB = 1e9, 2**20
    rows = [
        ("parameters, total", lambda r, d: r["params"], "{:,}"),
        ("parameters, global network", lambda r, d: r["params_global"], "{:,}"),
        ("parameters, local network", lambda r, d: r["params_local"], "{:,}"),
        ("parameters, heads", lambda r, d: d["params_heads"], "{:,}"),
        ("GFLOP forward (XLA / torch counter)", lambda r, d: r["flops_fwd"] / G, "{:.1f}"),
        ("GFLOP forward, analytic", lambda r, d: r["flops_fwd_analytic"] / G, "{:.1f}"),
        ("GFLOP fwd+bwd (XLA / torch counter)", lambda r, d: r["flops_fwd_bwd"] / G, "{:.1f}"),
        ("GFLOP fwd+bwd, analytic", lambda r, d: d["flops_fwd_bwd_analytic"] / G, "{:.1f}"),
        ("compile forward (s)", lambda r, d: d["compile_fwd_s"], "{:.2f}"),
        ("compile training step (s)", lambda r, d: r["compile_s"], "{:.2f}"),
        ("compile cache, training step", lambda r, d: r["compile_cache"], "{}"),
        ("forward (ms)", lambda r, d: r["fwd_ms"], "{:.0f}"),
        ("forward spread, IQR (ms)", lambda r, d: r["fwd_ms_spread"], "{:.0f}"),
        ("forward + backward (ms)", lambda r, d: r["fwd_bwd_ms"], "{:.0f}"),
        ("forward + backward spread, IQR (ms)", lambda r, d: r["fwd_bwd_ms_spread"], "{:.0f}"),
        ("peak memory of a training step (MiB)", lambda r, d: r["peak_mem_bytes"] / MB, "{:.0f}"),
        (
            "XLA temp buffers, training step (MiB)",
            lambda r, d: (
                None
                if d["xla_temp_bytes_train_step"] is None
                else d["xla_temp_bytes_train_step"] / MB / report["details"]["batch_exams"]
            ),
            "{:.0f}",
        ),
    ]
    ratio_rows = {
        "GFLOP forward (XLA / torch counter)",
        "forward (ms)",
        "forward + backward (ms)",
        "peak memory of a training step (MiB)",
        "GFLOP fwd+bwd (XLA / torch counter)",
    }
    lines = [
        f"Device: {report['device']}  ",
        f"Unit: {report['unit']}, images {report['image_shape'][0]}x{report['image_shape'][1]}, "
        f"batch of {report['details']['batch_exams']} exam(s), {report['threads']} threads; "
        f"memory: {det[0]['peak_mem_method']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| per exam | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, get, fmt in rows:
        vals = [get(r, d) for r, d in zip(res, det)]
        cells = ["-" if v is None else fmt.format(v) for v in vals]
        if torch_i is not None:
            for i in range(len(res)):
                if i != torch_i:
                    cells.append(_fmt_ratio(vals[i], vals[torch_i]) if name in ratio_rows else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nCPU: {bc.cpu_name(report['details']['cpu'])}; kernels: {report['details']['kernels']}; "
        f"float32 precision: {report['details']['precision']}; "
        f"compile cache: {report['details']['compile_cache_dir']}"
    )
    for r in report["results"]:
        if r.get("skipped"):
            lines.append(f"\nSkipped: {entry_label(r)}: {r['skipped']}")
    lines += ["", "Times (ratio < 1: JAX faster):", *(f"* {line}" for line in tref.like_with_like(report["results"]))]
    for phase, mem in report["details"].get("workers_memory", {}).items():
        lines.append(
            f"\nWorkers alive together, {phase} phase: {len(mem)}, resident at its end "
            f"{sum(m['rss_bytes'] for m in mem.values()) / 2**30:.1f} GiB in all; largest high-water mark "
            f"{max((m['hwm_bytes'] for m in mem.values()), default=0) / 2**30:.1f} GiB"
        )
    for tag, a in report["details"]["agreement"].items():
        f, t = a["forward"], a["training_step"]
        lines.append("")
        lines.append(
            f"Agreement {tag} vs {a['against']}: forward {'OK' if f['ok'] else 'FAILED'} (max rel. error "
            f"{max(f['max_rel_err'].values()):.1e}, patch locations "
            f"{'identical' if f['patch_locations_equal'] else 'DIFFER'}); training step: loss rel. "
            f"error {t['loss_rel_err']:.1e}, gradients max rel. error {t['grad_max_rel_err']:.1e} "
            f"({t['grad_worst_key']}), median {t['grad_median_rel_err']:.1e}"
        )
    for d in det:
        if d["impl"] == "jax":
            lines.append(
                f"\nXLA_FLAGS of {entry_label(d)}: inference {d['xla_flags_fwd']!r}, training {d['xla_flags_train']!r}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
