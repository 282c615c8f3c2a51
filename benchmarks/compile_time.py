"""Cold and warm compile of GMIC's training step (the forward + backward of memory_fwd_bwd.py),
each in a fresh process, split into tracing, lowering and XLA compilation (or cache load).

    python benchmarks/compile_time.py --json compile.json            # 2944 x 1920, 1 exam, CPU

    python benchmarks/compile_time.py --device gpu --rounds 1 --dtype bfloat16 --json compile.json

Per round, fresh worker processes, in this order:
* cold, cache off        (GMIC_JAX_COMPILE_CACHE=off): what a first run without the cache costs;
* cold, cache miss       (an empty cache directory): the same, plus writing the cache entry; this
                         worker also serialises its executable (jax.experimental.serialize_executable);
* warm, cache hit        (the directory the miss just filled): what every later run costs: tracing
                         and lowering (the cache key is a hash of the lowered program), then a load;
* warm, serialised       the executable the miss wrote, loaded without tracing or lowering: what a
                         cache keyed by the configuration and the code version would cost;
* GPU only: cold, autotuning cached  (a directory holding only the XLA autotuning results the miss
                         wrote, `jax_persistent_cache_enable_xla_caches`): a changed program whose
                         kernels were tuned before, e.g. after an edit of the code.
Times are medians over --rounds rounds; the JSON has every round. The XLA flags are the CLI's
(gmic_jax.xla_flags); --xla-flags adds more (to try a flag's effect on compile time).

--profile adds one more cold worker (cache off) with XLA's compile timers logged
(TF_CPP_VMODULE=cpu_compiler=1,hlo_pass_pipeline=1) and splits its XLA compile of the training
step into the HLO passes (the slowest by name) and the backend (LLVM code generation of the
fusions, thunks): where a cold compile goes. The logging itself costs a little time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import serialize_executable  # noqa: E402

from gmic_jax import GMIC, init_variables  # noqa: E402
from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache  # noqa: E402

SCRIPT = Path(__file__).resolve()
KINDS = ("cold, cache off", "cold, cache miss", "warm, cache hit", "warm, serialised")
AUTOTUNE_KIND = "cold, autotuning cached"  # GPU only
# The subdirectory of the compilation cache where JAX points XLA's per-fusion autotuning cache.
AUTOTUNE_DIR = "xla_gpu_per_fusion_autotune_cache_dir"
# --kinds: short names of the kinds; every kind but "off" uses what the "miss" worker wrote.
KIND_NAMES = dict(zip(("off", "miss", "hit", "serialised", "autotuned"), (*KINDS, AUTOTUNE_KIND)))
EXPECTED_CACHE = {KINDS[0]: "off", KINDS[1]: "miss", KINDS[2]: "hit", KINDS[3]: "serialised", AUTOTUNE_KIND: "miss"}
PROFILE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "cpu_compiler=1,hlo_pass_pipeline=1"}
_US = r"time: [^(]*\((\d+) us\)"


def xla_compile_profile(log: str, top: int = 12) -> dict:
    """XLA:CPU's compile timers (logged under PROFILE_ENV) of the module whose HLO passes took longest:
    {"module", "hlo_passes_s", "backend_s", "passes": [(pass name, seconds summed, calls)] slowest first}."""
    module, per_module = (
        None,
        collections.defaultdict(
            lambda: {
                "hlo_passes_s": 0.0,
                "backend_s": 0.0,
                "passes": collections.Counter(),
                "calls": collections.Counter(),
            }
        ),
    )
    for line in log.splitlines():
        if m := re.search(r"Running HLO pass pipeline on module (\S+?):", line):
            module = m.group(1)
        elif (m := re.search(r"HLO pass: (\S+) " + _US, line)) and module is not None:
            per_module[module]["passes"][m.group(1)] += int(m.group(2)) / 1e6
            per_module[module]["calls"][m.group(1)] += 1
        elif m := re.search(r"Running HLO passes on \[(\S+)\] for CPU " + _US, line):
            per_module[m.group(1)]["hlo_passes_s"] += int(m.group(2)) / 1e6
        elif m := re.search(r"Compiling \[(\S+)\] for CPU using JIT " + _US, line):
            per_module[m.group(1)]["backend_s"] += int(m.group(2)) / 1e6
    if not per_module:
        raise RuntimeError("no XLA compile timers in the worker's log: did TF_CPP_VMODULE reach it?")
    name, info = max(per_module.items(), key=lambda kv: kv[1]["hlo_passes_s"])
    return {
        "module": name,
        "hlo_passes_s": info["hlo_passes_s"],
        "backend_s": info["backend_s"],
        "passes": [(k, v, info["calls"][k]) for k, v in info["passes"].most_common(top)],
    }


def probe_loss(compiled, spec: dict) -> float:
    """The loss of a compiled training step at the model's initial variables, on ones for images
    and targets (--check-loaded): the loaded executable must compute what the traced one did."""
    cfg = bc.make_config(spec)
    variables = init_variables(cfg, jax.random.key(0))
    n = bc.IMAGES_PER_EXAM * spec["batch_exams"]
    x, y = jnp.ones((n, *cfg.image_shape, 1), jnp.float32), jnp.ones((n, 2), jnp.float32)
    (loss, _), _ = compiled(variables["params"], variables["batch_stats"], x, y, jax.random.key(0))
    return float(loss)


def run_worker(spec: dict) -> int:
    def ready():
        apply_cpu_defaults()
        enable_compile_cache()
        if spec.get("load_from"):  # no tracing, no lowering: read and load the executable
            return load_serialised(spec)
        return trace_lower_compile(spec)

    return bc.serve(lambda msg: {}, ready)


def load_serialised(spec: dict) -> dict:
    """Load the executable spec["load_from"] (written by the "miss" worker) and time it."""
    t0 = time.perf_counter()
    payload = pickle.loads(Path(spec["load_from"]).read_bytes())
    compiled = serialize_executable.deserialize_and_load(*payload)
    load_s = time.perf_counter() - t0
    return {
        "loss": probe_loss(compiled, spec) if spec.get("check_loaded") else None,
        "trace_s": 0.0,
        "lower_s": 0.0,
        "compile_s": load_s,
        "total_s": load_s,
        "compile_cache": "serialised",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def trace_lower_compile(spec: dict) -> dict:
    """Trace, lower and compile the training step on abstract inputs, each phase timed; the
    executable goes to spec["serialize_to"] when given."""
    cfg = bc.make_config(spec)
    variables = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    n = bc.IMAGES_PER_EXAM * spec["batch_exams"]
    args = (
        variables["params"],
        variables["batch_stats"],
        jax.ShapeDtypeStruct((n, *cfg.image_shape, 1), jnp.float32),
        jax.ShapeDtypeStruct((n, 2), jnp.float32),
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    fn = jax.jit(bc.make_grad_fn(GMIC(cfg), train=True))
    with bc.CompileCacheEvents() as cache:
        t0 = time.perf_counter()
        traced = fn.trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
    if spec.get("serialize_to"):
        Path(spec["serialize_to"]).write_bytes(pickle.dumps(serialize_executable.serialize(compiled)))
    return {
        "loss": probe_loss(compiled, spec) if spec.get("check_loaded") else None,
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "compile_s": t3 - t2,
        "total_s": t3 - t0,
        "compile_cache": cache.status,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "device_kind": jax.devices()[0].device_kind,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three kinds [3]")
    p.add_argument("--image-shape", type=int, nargs=2, default=(2944, 1920), metavar=("H", "W"))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--percent-t", type=float, default=0.02)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--batch-exams", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where to compile [cpu]")
    p.add_argument(
        "--kinds",
        nargs="+",
        choices=tuple(KIND_NAMES),
        default=None,
        help="which kinds run (see above; all but 'off' need 'miss'; 'autotuned' only on GPU) "
        "[off miss hit serialised, and autotuned on GPU]",
    )
    p.add_argument("--xla-flags", default="", help="extra XLA flags of the workers")
    p.add_argument(
        "--profile", action="store_true", help="also split one cold compile into XLA's passes and backend [off]"
    )
    p.add_argument(
        "--check-loaded",
        action="store_true",
        help="run the compiled and the loaded executables once after timing and compare their losses "
        "(small images: a full-size CPU step takes seconds) [off]",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker is not None:
        return run_worker(json.loads(args.worker))
    spec = {**bc.model_spec(args), "check_loaded": args.check_loaded}
    cores = bc.parse_cores(None, args.threads)
    kinds = tuple(KIND_NAMES[k] for k in args.kinds) if args.kinds else None
    kinds = kinds or ((*KINDS, AUTOTUNE_KIND) if args.device == "gpu" else KINDS)
    if len(kinds) > 1 and KINDS[1] not in kinds or AUTOTUNE_KIND in kinds and args.device != "gpu":
        p.error("--kinds: every kind but 'off' needs 'miss'; 'autotuned' needs --device gpu")
    kinds = tuple(k for k in (*KINDS, AUTOTUNE_KIND) if k in kinds)  # the miss runs before what needs it
    runs, profile = measure(args, spec, cores, kinds)
    report = assemble(args, spec, cores, kinds, runs, profile)
    print(markdown(report, kinds))
    if not checks_pass(args, kinds, runs):
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def measure(args, spec: dict, cores, kinds) -> tuple[dict, dict | None]:
    """Every kind once per round, each in a fresh worker, then (--profile) the cold compile with
    XLA's timers logged: the workers' results by kind, and the profile or None."""
    tmp = Path(tempfile.mkdtemp(prefix="gmic_compile_time_"))
    runs = {k: [] for k in kinds}
    try:
        for r in range(args.rounds):
            cache, exe, autotuned = tmp / f"cache{r}", tmp / f"exe{r}.pkl", tmp / f"autotune{r}"
            plan = {
                KINDS[0]: ("off", {}),
                KINDS[1]: (cache, {"serialize_to": str(exe)}),
                KINDS[2]: (cache, {}),
                KINDS[3]: ("off", {"load_from": str(exe)}),
                AUTOTUNE_KIND: (autotuned, {}),
            }
            for kind in kinds:
                if kind == AUTOTUNE_KIND:  # the miss's autotuning results, none of its executables
                    shutil.copytree(cache / AUTOTUNE_DIR, autotuned / AUTOTUNE_DIR)
                cache_env, extra = plan[kind]
                env = bc.worker_env(
                    args.threads, args.device, args.xla_flags, {"GMIC_JAX_COMPILE_CACHE": str(cache_env)}
                )
                worker = bc.Worker(SCRIPT, {**spec, **extra}, cores, env, tmp / f"{r}.log")
                try:
                    runs[kind].append(worker.receive())
                finally:
                    worker.close()
                print(
                    f"[round {r}] {kind}: {runs[kind][-1]['total_s']:.2f} s ({runs[kind][-1]['compile_cache']})",
                    file=sys.stderr,
                    flush=True,
                )
        profile = None
        if args.profile:
            env = bc.worker_env(
                args.threads, args.device, args.xla_flags, {"GMIC_JAX_COMPILE_CACHE": "off", **PROFILE_ENV}
            )
            worker = bc.Worker(SCRIPT, spec, cores, env, tmp / "profile.log")
            try:
                profile = {**worker.receive()}
            finally:
                worker.close()
            profile.update(xla_compile_profile((tmp / "profile.log").read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runs, profile


def assemble(args, spec: dict, cores, kinds, runs: dict, profile: dict | None) -> dict:
    """The JSON report: the device, versions, the spec, every round's results and their medians."""
    med = {
        k: {f: statistics.median(x[f] for x in v) for f in ("trace_s", "lower_s", "compile_s", "total_s")}
        for k, v in runs.items()
    }
    device = f"{bc.cpu_name()} (CPU; {args.threads} threads pinned to cores {cores})"
    if args.device == "gpu":
        device = f"{runs[kinds[0]][0]['device_kind']} (compiled on {device})"
    return {
        "device": device,
        "cpu": bc.cpu_identity(),
        "versions": bc.versions(extra=bc.GPU_PACKAGES if args.device == "gpu" else ()),
        "spec": spec,
        "rounds": args.rounds,
        "xla_flags": runs[kinds[0]][0]["xla_flags"],
        "median": med,
        "runs": runs,
        "profile": profile,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown(report: dict, kinds) -> str:
    med, profile = report["median"], report["profile"]
    lines = [
        f"Device: {report['device']}  ",
        f"XLA_FLAGS: {report['xla_flags']!r}; medians of {report['rounds']} rounds, each kind in a fresh process",
        "",
        "| training step | trace (s) | lower (s) | XLA compile / cache load (s) | total (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in kinds:
        m = med[kind]
        lines.append(
            f"| {kind} | {m['trace_s']:.2f} | {m['lower_s']:.2f} | {m['compile_s']:.2f} | {m['total_s']:.2f} |"
        )
    if profile:
        other = profile["compile_s"] - profile["hlo_passes_s"] - profile["backend_s"]
        lines += [
            "",
            f"Where one cold compile goes (cache off, XLA timers logged; module {profile['module']}): "
            f"trace {profile['trace_s']:.2f} s, lower {profile['lower_s']:.2f} s, XLA compile "
            f"{profile['compile_s']:.2f} s = HLO passes {profile['hlo_passes_s']:.2f} s + backend (LLVM code "
            f"generation, thunks) {profile['backend_s']:.2f} s + rest {other:.2f} s",
            "",
            "| slowest HLO passes | s | calls |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {sec:.3f} | {calls} |" for name, sec, calls in profile["passes"]]
    return "\n".join(lines)


def checks_pass(args, kinds, runs: dict) -> bool:
    """Each kind went through the cache as expected; with --check-loaded, the loaded executable
    computes the compiled one's loss. Says what failed on stderr."""
    statuses = {k: sorted({x["compile_cache"] for x in v}) for k, v in runs.items()}
    if statuses != {k: [EXPECTED_CACHE[k]] for k in kinds}:
        print(f"compile_time: error: unexpected cache behaviour {statuses}", file=sys.stderr)
        return False
    if (
        args.check_loaded
        and KINDS[3] in kinds
        and any(a["loss"] != b["loss"] for a, b in zip(runs[KINDS[1]], runs[KINDS[3]], strict=True))
    ):
        print("compile_time: error: the loaded executable's loss differs from the compiled one's", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
