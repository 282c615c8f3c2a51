"""The parent side of memory_fwd_bwd.py: checks the command line, writes the weights and images
every worker loads, starts one worker per implementation and phase (all of a phase alive together),
times them in ABBA order, checks that their outputs agree, and prints / writes the report
(fwd_bwd_report.py). --plot runs the whole benchmark once per image size; --deviceless goes to
deviceless.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_common as bc
import deviceless
import fwd_bwd_report as report_lib
import numpy as np
import plots
import torch_reference as tref

from gmic_jax.config import REMAT_POLICIES
from gmic_jax.models.global_net import saliency_grid_shape

# --torch-peers: the PyTorch configurations beside the original (torch_reference.PEERS).
TORCH_PEERS = tuple(name for name in tref.PEERS if name != "torch")
REMAT_MODES = tuple(REMAT_POLICIES)
# Agreement of the two implementations' forward outputs (max abs error / max abs value).
AGREE_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}
# The entry point, which each worker runs with --worker.
SCRIPT = Path(__file__).resolve().with_name("memory_fwd_bwd.py")


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
        return deviceless.run_deviceless(args, cores, user_env, SCRIPT)
    if len(batches) != 1:
        raise ValueError("--batch-exams takes one value except with --deviceless")
    args.batch_exams = batches[0]
    device = ("gpu" if bc.gpu_count() else "cpu") if args.device == "auto" else args.device
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
    for _, remat in configs:  # a config GMICConfig rejects fails here, before any work
        bc.make_config(
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
    n_images = bc.IMAGES_PER_EXAM * args.batch_exams
    weights_source = _write_inputs(args, workdir, n_images)
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
    entries = _entries(args, device, configs)
    workers_memory = {}  # phase -> tag -> resident memory of each worker at the end of the phase
    for phase in ("fwd", "train"):
        workers_memory[phase] = _run_phase(args, phase, entries, base, device, cores, workdir)
    agreement = agreements([e for e in entries if not e.get("skipped")])
    report = report_lib.assemble(args, device, cores, entries, agreement, weights_source, n_images, user_env)
    report["details"]["workers_memory"] = workers_memory
    print(report_lib.markdown(report))
    if args.profile:
        for e in entries:
            for phase in ("fwd", "train"):
                if "profile" in e[phase]:
                    print(f"\n### Profile: {e['label']} {'forward' if phase == 'fwd' else 'forward + backward'}\n")
                    print(e[phase]["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return _exit_status(agreement, device, args.precision)


def _write_inputs(args, workdir: Path, n_images: int) -> str:
    """The weights (weights.npz) and images (input.npy) every worker loads; returns where the weights come from."""
    cfg = bc.make_config(
        {
            "image_shape": args.image_shape,
            "crop_shape": args.crop_shape,
            "K": args.K,
            "percent_t": args.percent_t,
            "dtype": "float32",
        }
    )
    state_dict, weights_source = bc.benchmark_weights(cfg)
    np.savez(workdir / "weights.npz", **state_dict)
    x = np.random.default_rng(0).standard_normal((n_images, *args.image_shape)).astype(np.float32)
    np.save(workdir / "input.npy", x)
    return weights_source


def _entries(args, device, configs) -> list[dict]:
    """One row per JAX configuration, then the original and the peers asked for (a peer that cannot
    run here marked "skipped")."""
    entries = [dict(impl="jax", dtype=d, remat=r) for d, r in configs]
    if args.torch_ref:
        peers = {"all": TORCH_PEERS, "none": ()}.get(args.torch_peers[0], args.torch_peers)
        for name in ("torch", *dict.fromkeys(peers)):
            entries.append(dict(impl=name, dtype=tref.peer_dtype(name), remat="none"))
            if reason := tref.peer_unavailable(name, device):
                entries[-1]["skipped"] = reason
    for e in entries:
        e["label"] = report_lib.entry_label(e)
        e["tag"] = f"{e['impl']}_{e['dtype']}_{e['remat']}"
    return entries


def _run_phase(args, phase: str, entries: list[dict], base: dict, device, cores, workdir: Path) -> dict:
    """Every row that runs, in a worker of its own, all alive together: setup and compile, timed runs
    in ABBA order, outputs saved (and profiled); each row's results go into e[phase]. Returns the
    workers' resident memory at the end of the phase, by tag."""
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
        workers_memory = {e["tag"]: bc.process_memory(w.proc.pid) for e, w in pairs}
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
    return workers_memory


def _exit_status(agreement: dict, device: str, precision: str) -> int:
    """2 (and why, on stderr) when a row's outputs disagree with its reference, else 0."""
    bad = [
        t for t, a in agreement.items() if not a["forward"]["ok"] or (a["same_dtype"] and not a["training_step"]["ok"])
    ]
    if bad:
        print(
            f"memory_fwd_bwd: error: outputs disagree for {bad}: {json.dumps({t: agreement[t] for t in bad})}",
            file=sys.stderr,
        )
        if device == "gpu" and precision == "default":
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


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a - b), initial=0.0))


def compare_forward(jax_npz, torch_npz, rtol: float, exact: bool = True) -> dict:
    """Outputs of the two implementations on the same weights and images. `exact` (float32): every
    output within rtol and the same patch locations. Otherwise (bfloat16 against the original's
    float32) only the global network's outputs are held to rtol: a patch chosen differently on a
    near-tie changes everything downstream of it."""
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
