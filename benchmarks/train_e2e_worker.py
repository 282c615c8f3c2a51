"""The worker side of train_e2e.py: one configuration in a fresh process, through the real
`gmic_jax.train.loop.train_and_evaluate`, its per-step times and peak memory read back, and the
compiled memory of the loop's own step (captured by a loop hook's `wrap_train_step`).
The parent runs `train_e2e.py --worker SPEC_JSON`; the row goes to the file SPEC["out"].
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import bench_common as bc
import jax

from gmic_jax import logs
from gmic_jax.train.config_lib import apply_overrides, load_config
from gmic_jax.train.loop import StepTimes, train_and_evaluate
from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache

# A step's input wait above this share of the mean iteration makes the run input bound.
INPUT_BOUND_SHARE = 0.05


class CapturedStep:
    """The loop's jitted training step, and the abstract (shape, dtype, sharding) of its first
    arguments: what compiling it ahead of time for its memory needs."""

    def __init__(self, fn):
        self.fn, self.args = fn, None

    def __call__(self, state, batch):
        if self.args is None:
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
    """The training config of a worker spec: the --config file, the benchmark's cache, dtype, remat,
    batch and epochs, then the command line's overrides."""
    config = load_config(spec["config"])
    config.data.source = "cache"
    config.data.train_cache = config.data.val_cache = spec["cache"]
    config.data.window_noise = True
    config.model.image_shape = tuple(spec["window"])
    config.model.dtype = spec["dtype"]
    config.model.remat = spec["remat"]
    config.batch_size = bc.IMAGES_PER_EXAM * spec["exams_per_device"] * spec["devices"]
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
    apply_cpu_defaults()
    enable_compile_cache()  # as the CLI: GMIC_JAX_COMPILE_CACHE=DIR or off
    if spec["device"] == "cpu":
        jax.config.update("jax_num_cpu_devices", int(spec["devices"]))
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
    row.update(step_time_stats(times, spec))
    row.update(peak_memory(devices))
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


def step_time_stats(times: list[dict], spec: dict) -> dict:
    """The first step's time (compile_s) and the statistics of the `spec["steps"]` timed steps after it."""
    row = {}
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
    return row


def peak_memory(devices) -> dict:
    """The devices' peak_bytes_in_use (GPU) or else this process's peak resident memory (CPU)."""
    stats = [d.memory_stats() or {} for d in devices]
    if any("peak_bytes_in_use" in s for s in stats):
        return {
            "peak_bytes": max(int(s.get("peak_bytes_in_use", 0)) for s in stats),
            "bytes_limit": min(int(s.get("bytes_limit", 0)) for s in stats),
        }
    return {"peak_rss_bytes": bc._status_kb("VmHWM")}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = Path(spec["out"])
    try:
        row = run_configuration(spec)
    except Exception as e:  # noqa: BLE001 -- the parent reports it
        traceback.print_exc()
        row = {"fits": None, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    out.write_text(json.dumps(row))
    return 0
