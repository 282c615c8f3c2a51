"""The real `gmic-jax train` loop at the paper's size: exams/s, step time, input wait, compile, memory.

    python benchmarks/train_e2e.py --steps 3 --dtype float32 --exams-per-device 1 --json cpu.json   # CPU
    python benchmarks/train_e2e.py --device gpu --steps 20 --dtype bfloat16 --exams-per-device 1 2 4 --json gpu.json

Every configuration runs :func:`gmic_jax.train.loop.train_and_evaluate` -- the loop `gmic-jax train`
runs, nothing replaced -- with ``configs/nyu_paper.py`` (``--config``): Grain input from a
`gmic-jax cache` with the original's window noise (``data.window_noise=True``), the project's
data-parallel step with Adam, asynchronous Orbax checkpoints every ``--checkpoint-every`` steps,
TensorBoard logging; evaluation off (``eval.every_epochs=0``). The grid is ``--dtype`` x
``--exams-per-device`` x ``--remat`` (GMICConfig ``dtype``, ``remat``: ``config.model.dtype`` /
``config.model.remat``); an exam is 4 images, so ``batch_size = 4 x exams x devices``. Further
``--config.FIELD=VALUE`` overrides apply last, as on the CLI.

The data: ``--distinct`` breast-like crops (gmic_jax.data.testing.breast_image; 0.13-0.57 s to render
and 0.26-0.28 s to write one at 2944 x 1920 on the shared 2-core AMD EPYC) in a preprocessed exam list
whose exams reuse them (left breast malignant, right without findings: half the images positive, so balanced
sampling takes every image each epoch), cached with window-noise contexts
(gmic_jax.data.cache.build_cache, as ``gmic-jax cache --window-noise``). The cache holds as many
images as the largest batch of the grid; ``--data-dir`` keeps it for the next run.

Each configuration runs in a fresh process (own compile, own peak memory) that trains ``--steps``
timed steps after the first: the first step's time is ``compile_s`` (compiling the step + running
it once), the timed steps give (from the loop's own per-step clock, ``step_times``):

- ``step_ms``: median (``step_ms_iqr``: interquartile range) of the whole iteration -- waiting for
  the batch, the step until its metrics are on the host, and the loop's host work (logging,
  starting a checkpoint);
- ``device_step_ms``, ``loader_wait_ms``, ``host_ms``: means of the three parts;
- ``exams_per_s``: exams of the timed steps / their summed time;
- ``input_bound``: ``loader_wait_ms`` > 5% of the mean iteration;
- memory: on GPU the device's ``peak_bytes_in_use``; on CPU the process's peak resident memory.
  ``compiled_*_bytes`` (XLA's buffer assignment of the loop's own jitted step, compiled ahead of
  time for the same device: arguments, temporaries, outputs) where that compile is cheap (the
  persistent compilation cache is on: the run loaded or stored the program), and always for a
  configuration that does not fit.

A configuration that runs out of device memory (XLA's RESOURCE_EXHAUSTED) is a row with
``fits: false``, the error's text and the compiled bytes beside it; the next configuration runs.
Another failure is a row with ``error`` and makes the exit status 1. The JSON is rewritten after
every configuration (a run cut short keeps what it measured).

``--profile-steps A:B`` passes ``config.profile_steps`` (the jax.profiler trace of steps A..B,
1-based, README "Profiling a training run"); the workdirs are then kept under ``--workdir``.

JSON (``--json``): {"machine": {...}, "results": [{"dtype", "exams_per_device", "devices", "remat",
"steps", "exams_per_s", "step_ms", "loader_wait_ms", "input_bound", "compile_s", ...}], "details"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))  # gmic_jax of this checkout, also where it is not installed

import bench_common as bc  # noqa: E402

SCRIPT = Path(__file__).resolve()
WINDOW = (2944, 1920)
VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
IMAGES_PER_EXAM = 4
DEFAULT_CONFIG = REPO / "configs" / "nyu_paper.py"
DEFAULT_PROFILE_WORKDIR = Path("runs") / "train_e2e"
# The keys other checks read (tests/test_benchmarks.py), first in every row.
RESULT_KEYS = (
    "dtype",
    "exams_per_device",
    "devices",
    "remat",
    "steps",
    "exams_per_s",
    "step_ms",
    "loader_wait_ms",
    "input_bound",
    "compile_s",
)
INPUT_BOUND_SHARE = 0.05


# =============================================================================== data
def render_data(root: Path, window, distinct: int, images: int) -> dict:
    """``distinct`` crops rendered around ``window`` and an exam list of ``images`` images (exams of
    4 views reusing them), cached with window-noise contexts in ``root/cache``; returns details."""
    import numpy as np

    from gmic_jax.data.cache import build_cache
    from gmic_jax.data.exam_list import save_exam_list
    from gmic_jax.data.image import write_png
    from gmic_jax.data.sources import ExamListSource
    from gmic_jax.data.testing import breast_image, preprocessed_exam

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes, render_s, write_s = [], [], []
    for i in range(distinct):
        h = int(rng.integers(0.92 * window[0], 1.09 * window[0]))  # a breast's crop, as preprocessing leaves it
        w = int(rng.integers(0.78 * window[1], 1.09 * window[1]))
        t0 = time.perf_counter()
        pixels = breast_image(h, w, seed=1000 + i)
        t1 = time.perf_counter()
        write_png(root / f"crop{i}.png", pixels)
        render_s.append(t1 - t0)
        write_s.append(time.perf_counter() - t1)
        shapes.append((h, w))
    exams = []
    for e in range(images // IMAGES_PER_EXAM):
        crops = {view: (e * IMAGES_PER_EXAM + v) % distinct for v, view in enumerate(VIEWS)}
        centers = {view: (shapes[i][0] // 2, shapes[i][1] // 3) for view, i in crops.items()}
        exams.append(preprocessed_exam({view: f"crop{i}" for view, i in crops.items()}, centers))
    save_exam_list(root / "exams.pkl", exams)
    t0 = time.perf_counter()
    source = ExamListSource(root / "exams.pkl", root, window_shape=window)
    count, failures = build_cache(source, root / "cache", shard_size=images, num_workers=1, window_noise=True)
    if failures:
        raise RuntimeError(f"benchmark cache: {failures[0]}")
    return {
        "render_s_per_image": statistics.median(render_s),
        "write_png_s_per_image": statistics.median(write_s),
        "cache_s": time.perf_counter() - t0,
        "cache_images": count,
    }


def ensure_data(root: Path, window, distinct: int, images: int) -> dict:
    """Reuse ``root/cache`` when it holds windows of this size with contexts and enough images."""
    index = root / "cache" / "index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        if (
            tuple(doc.get("window_shape", ())) == tuple(window)
            and doc.get("num_examples", 0) >= images
            and "window_noise" in doc
        ):
            return {"reused": str(root / "cache"), "cache_images": doc["num_examples"]}
    t0 = time.perf_counter()
    details = render_data(root, window, distinct, images)
    details["data_s"] = time.perf_counter() - t0
    return details


# =============================================================================== worker side
class CapturedStep:
    """The loop's jitted training step, and the abstract (shape, dtype, sharding) of its first
    arguments: what compiling it ahead of time for its memory needs."""

    def __init__(self, fn):
        self.fn, self.args = fn, None

    def __call__(self, state, batch):
        if self.args is None:
            import jax

            self.args = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, batch)
            )
        return self.fn(state, batch)

    def compiled_memory(self) -> dict:
        t0 = time.perf_counter()
        mem = self.fn.lower(*self.args).compile().memory_analysis()
        compile_s = time.perf_counter() - t0
        return {
            "compiled_arg_bytes": int(mem.argument_size_in_bytes),
            "compiled_temp_bytes": int(mem.temp_size_in_bytes),
            "compiled_out_bytes": int(mem.output_size_in_bytes),
            "compiled_alias_bytes": int(mem.alias_size_in_bytes),
            "compiled_memory_compile_s": compile_s,
        }


def out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def make_config(spec: dict):
    from gmic_jax.train.config_lib import apply_overrides, load_config

    config = load_config(spec["config"])
    config.data.source = "cache"
    config.data.train_cache = config.data.val_cache = spec["cache"]
    config.data.window_noise = True
    config.model.image_shape = tuple(spec["window"])
    config.model.dtype = spec["dtype"]
    config.model.remat = spec["remat"]
    config.batch_size = IMAGES_PER_EXAM * spec["exams_per_device"] * spec["devices"]
    config.eval.every_epochs = 0
    config.checkpoint_every_steps = spec["checkpoint_every"]
    config.progress_bar = False
    config.profile_steps = spec.get("profile_steps") or ""
    if spec.get("workers") is not None:
        config.data.workers = spec["workers"]
    apply_overrides(config, spec.get("overrides", []))
    # The run: the first step + `steps` timed ones, in whole epochs (each epoch: every cached image).
    images = spec["cache_images"]
    steps_per_epoch = images // config.batch_size
    config.num_epochs = -(-(spec["steps"] + 1) // steps_per_epoch)
    return config


def run_configuration(spec: dict) -> dict:
    """One configuration in this (fresh) process: train, and read the loop's per-step times."""
    from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache

    apply_cpu_defaults()
    enable_compile_cache()  # as the CLI: GMIC_JAX_COMPILE_CACHE=DIR or off
    import jax

    if spec["device"] == "cpu":
        jax.config.update("jax_num_cpu_devices", int(spec["devices"]))
    from gmic_jax import logs
    from gmic_jax.train.loop import StepTimes, train_and_evaluate

    logs.configure()
    devices = jax.devices()
    if len(devices) != spec["devices"]:
        raise ValueError(f"{spec['devices']} devices asked for, {len(devices)} in use: {devices}")
    captured: list[CapturedStep] = []

    class Capture(StepTimes):  # a loop hook: the per-step times, and the loop's jitted step captured
        def wrap_train_step(self, train_step):
            captured.append(CapturedStep(train_step))
            return captured[-1]

    config = make_config(spec)
    row: dict = {
        "batch_size": config.batch_size,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
    }
    times = Capture()
    workdir = spec.get("workdir")
    keep = workdir is not None
    if not keep:
        workdir = tempfile.mkdtemp(prefix="gmic-e2e-")
    t0 = time.perf_counter()
    try:
        with bc.CompileCacheEvents() as cache:
            train_and_evaluate(config, workdir, hooks=[times])
        row.update(fits=True, compile_cache=cache.status)
    except Exception as e:  # noqa: BLE001 -- reported in the row
        if not out_of_memory(e):
            raise
        row.update(fits=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    if times:
        first = times[0]
        row.update(compile_s=first["step_s"], first_loader_wait_s=first["loader_wait_s"])
    timed = [t for t in times if t["step"] > times[0]["step"]][: spec["steps"]] if times else []
    if timed:
        iteration = [t["loader_wait_s"] + t["step_s"] + t["host_s"] for t in timed]
        median, iqr = bc.median_spread(iteration)
        loader_wait = statistics.fmean(t["loader_wait_s"] for t in timed)
        exams = spec["exams_per_device"] * spec["devices"]
        row.update(
            steps=len(timed),
            exams_per_s=exams * len(timed) / sum(iteration),
            step_ms=1e3 * median,
            step_ms_iqr=1e3 * iqr,
            device_step_ms=1e3 * statistics.fmean(t["step_s"] for t in timed),
            loader_wait_ms=1e3 * loader_wait,
            host_ms=1e3 * statistics.fmean(t["host_s"] for t in timed),
            input_bound=loader_wait > INPUT_BOUND_SHARE * statistics.fmean(iteration),
            step_times=[{k: round(v, 6) if isinstance(v, float) else v for k, v in t.items()} for t in times],
        )
    stats = [d.memory_stats() or {} for d in devices]
    if any("peak_bytes_in_use" in s for s in stats):
        row["peak_bytes"] = max(int(s.get("peak_bytes_in_use", 0)) for s in stats)
        row["bytes_limit"] = min(int(s.get("bytes_limit", 0)) for s in stats)
    else:
        row["peak_rss_bytes"] = bc._status_kb("VmHWM")
    # Compiled memory of the loop's step: cheap where the persistent cache holds the program (the run
    # loaded or wrote it), and always asked for a configuration that does not fit (what it needed).
    cached = row.get("compile_cache") in ("hit", "miss")
    if captured and captured[-1].args is not None and (not row["fits"] or cached):
        try:
            row.update(captured[-1].compiled_memory())
        except Exception as e:  # noqa: BLE001 -- reported in the row
            row["compiled_memory_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    elif captured and captured[-1].args is not None:
        row["compiled_memory"] = "not read: the persistent compilation cache is off (a second compile)"
    return row


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = Path(spec["out"])
    try:
        row = run_configuration(spec)
    except Exception as e:  # noqa: BLE001 -- the parent reports it
        import traceback

        traceback.print_exc()
        row = {"fits": None, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    out.write_text(json.dumps(row))
    return 0


# =============================================================================== parent side
def configuration_name(dtype: str, exams: int, devices: int, remat: str) -> str:
    return f"{dtype}_e{exams}_d{devices}_remat-{remat}"


def run_worker(spec: dict, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="gmic-e2e-row-") as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--worker", json.dumps({**spec, "out": str(out)})],
            env=env,
            stdout=sys.stderr,  # stdout carries the table only
            cwd=REPO,
        )
        if not out.is_file():
            return {"fits": None, "error": f"the worker exited with status {proc.returncode} and wrote no result"}
        return json.loads(out.read_text())


def machine(device: str) -> dict:
    info = {
        "cpu": bc.cpu_identity(),
        "cpu_name": bc.cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "versions": bc.versions(extra=("grain", "orbax-checkpoint", *bc.GPU_PACKAGES)),
        "device": device,
    }
    if device == "gpu":
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Device: {report['details'].get('device_kind', m['device'])}; CPU: {m['cpu_name']}; "
        f"jax {m['versions'].get('jax')}; window {report['details']['window'][0]} x {report['details']['window'][1]}; "
        f"load average at start {m['load_average_start']}",
        "",
        "| dtype | exams/device | devices | remat | steps | exams/s | step ms (IQR) | device step ms "
        "| loader wait ms | host ms | input bound | compile s | peak memory MiB | compiled temp MiB | fits |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        bound = "-" if r.get("input_bound") is None else r["input_bound"]
        peak = r.get("peak_bytes", r.get("peak_rss_bytes"))
        temp = r.get("compiled_temp_bytes")
        lines.append(
            f"| {r['dtype']} | {r['exams_per_device']} | {r['devices']} | {r['remat']} | {_fmt(r.get('steps'), 'd')} "
            f"| {_fmt(r.get('exams_per_s'), '.3g')} | {_fmt(r.get('step_ms'), '.1f')} "
            f"({_fmt(r.get('step_ms_iqr'), '.1f')}) "
            f"| {_fmt(r.get('device_step_ms'), '.1f')} | {_fmt(r.get('loader_wait_ms'), '.1f')} "
            f"| {_fmt(r.get('host_ms'), '.1f')} | {bound} | {_fmt(r.get('compile_s'), '.1f')} "
            f"| {_fmt(None if peak is None else peak / 2**20, '.0f')} "
            f"| {_fmt(None if temp is None else temp / 2**20, '.0f')} | {r.get('fits')} |"
        )
    notes = [
        f"- {configuration_name(r['dtype'], r['exams_per_device'], r['devices'], r['remat'])}: {r['error'][:300]}"
        for r in report["results"]
        if r.get("error")
    ]
    if notes:
        lines += ["", "Errors:", *notes]
    lines.append("")
    lines.append(
        "peak memory: the device's peak_bytes_in_use (GPU) or the process's peak resident memory (CPU); "
        "step ms: the whole loop iteration (input wait + step + host work), median of the timed steps"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from gmic_jax.train.config_lib import ConfigError, parse_profile_steps, split_config_args

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Further --config.FIELD=VALUE overrides apply to every run."
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration, after the first")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--exams-per-device", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--remat", nargs="+", default=["none"], help="GMICConfig.remat policies (README)")
    parser.add_argument("--devices", type=int, default=1, help="devices of each run (CPU: forced host devices)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="config.checkpoint_every_steps")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the training config [configs/nyu_paper.py]")
    parser.add_argument("--window", type=int, nargs=2, default=list(WINDOW), metavar=("H", "W"))
    parser.add_argument("--distinct", type=int, default=4, help="distinct images rendered (reused across exams)")
    parser.add_argument("--data-dir", help="keep (and reuse) the rendered data and cache here")
    parser.add_argument("--workers", type=int, default=None, help="config.data.workers [the config's default]")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each run [usable cores]")
    parser.add_argument("--profile-steps", default="", metavar="A:B", help="config.profile_steps (1-based, inclusive)")
    parser.add_argument(
        "--workdir",
        help=f"keep each run's workdir under DIR/<configuration> "
        f"[temporary; {DEFAULT_PROFILE_WORKDIR} with --profile-steps]",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--worker" in argv:
        return worker_main(argv[argv.index("--worker") + 1])
    try:
        rest, overrides = split_config_args(list(argv))
        parse_profile_steps(getattr(parser.parse_known_args(rest)[0], "profile_steps", ""))
    except ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.distinct < 1:
        parser.error("--distinct must be at least 1")
    window = tuple(args.window)
    workdir_root = Path(args.workdir) if args.workdir else (DEFAULT_PROFILE_WORKDIR if args.profile_steps else None)
    grid = [(d, e, r) for d in args.dtype for e in args.exams_per_device for r in args.remat]
    if workdir_root is not None:
        for d, e, r in grid:
            existing = workdir_root / configuration_name(d, e, args.devices, r)
            if existing.exists() and any(existing.iterdir()):
                parser.error(f"{existing} is not empty (a run there would resume): remove it or give another --workdir")
    largest = max(IMAGES_PER_EXAM * e * args.devices for e in args.exams_per_device)
    images = max(largest, -(-args.distinct // IMAGES_PER_EXAM) * IMAGES_PER_EXAM)
    images = -(-images // largest) * largest  # whole batches of every size in the grid: each epoch is every image
    for e in args.exams_per_device:
        if images % (IMAGES_PER_EXAM * e * args.devices):
            parser.error(f"--exams-per-device {args.exams_per_device}: the batch sizes must divide {images} images")

    report: dict = {"machine": machine(args.device), "results": [], "details": {}}
    details = report["details"]
    details.update(
        window=list(window),
        config=str(Path(args.config).resolve().relative_to(REPO))
        if Path(args.config).resolve().is_relative_to(REPO)
        else args.config,
        overrides=overrides,
        checkpoint_every=args.checkpoint_every,
        distinct_images=args.distinct,
        profile_steps=args.profile_steps,
    )
    threads = args.threads or len(os.sched_getaffinity(0))
    env = bc.worker_env(threads, args.device)
    if args.device == "gpu" and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(args.devices))

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    status = 0
    with tempfile.TemporaryDirectory(prefix="gmic-e2e-data-") as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        t0 = time.perf_counter()
        details["data"] = ensure_data(root, window, args.distinct, images)
        print(
            f"data: {images} cached images of {window[0]} x {window[1]} in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        for dtype, exams, remat in grid:
            name = configuration_name(dtype, exams, args.devices, remat)
            spec = {
                "config": args.config,
                "cache": str(root / "cache"),
                "cache_images": images,
                "window": list(window),
                "device": args.device,
                "dtype": dtype,
                "exams_per_device": exams,
                "devices": args.devices,
                "remat": remat,
                "steps": args.steps,
                "checkpoint_every": args.checkpoint_every,
                "profile_steps": args.profile_steps,
                "workers": args.workers,
                "overrides": overrides,
                "workdir": None if workdir_root is None else str(workdir_root / name),
            }
            print(f"=== {name}: {args.steps} timed steps", file=sys.stderr, flush=True)
            got = run_worker(spec, env)
            row = {
                "dtype": dtype,
                "exams_per_device": exams,
                "devices": args.devices,
                "remat": remat,
                "steps": got.pop("steps", 0),
                **{k: got.pop(k, None) for k in RESULT_KEYS[5:]},
                **got,
            }
            if row.get("error") and row.get("fits") is not False:
                status = 1
            if row.get("device_kind"):
                details.setdefault("device_kind", row["device_kind"])
            report["results"].append(row)
            report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            write()
            print(
                f"=== {name}: "
                + (
                    f"{row['exams_per_s']:.3g} exams/s, step {row['step_ms']:.0f} ms, compile {row['compile_s']:.1f} s"
                    if row.get("exams_per_s")
                    else f"fits={row.get('fits')} {row.get('error', '')[:200]}"
                ),
                file=sys.stderr,
                flush=True,
            )
    print(markdown(report))
    write()
    return status


if __name__ == "__main__":
    sys.exit(main())
