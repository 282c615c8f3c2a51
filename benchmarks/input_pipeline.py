"""Input pipeline at steady state: images/s of the training pipeline per path and worker count.

    python benchmarks/input_pipeline.py --json input.json                  # ~15 min on a 2-core CPU
    python benchmarks/input_pipeline.py --simulate-step-ms 60 --json loop.json

Every figure comes from :func:`gmic_jax.data.pipeline.load_batches` -- the code training reads
through -- producing 2944 x 1920 uint16 training windows in batches of ``--batch`` images:

- ``cache``       -- plain windows memory-mapped from a ``gmic-jax cache`` directory;
- ``cache_noise`` -- a fresh draw of the original's window noise per (seed, epoch, example) from a
  cache built with ``--window-noise``, as training takes it: the band of the stored context's rows
  that holds the drawn crop, and its borders (the crop + resize runs on the device, before the step);
- ``cache_noise_host`` -- (only with ``--paths cache_noise_host``) the same draws cropped and resized
  on the host with PIL (the reference the device path is tested against);
- ``png``         -- 16-bit 3328 x 2560 PNGs through the original preprocessing (read, crop by
  erosion / largest component / dilation, best centre, window), as a manifest source does it;
- ``synthetic``   -- (only with ``--paths synthetic``) windows rendered by the synthetic data set
  (:class:`gmic_jax.data.synthetic.SyntheticLesions`, no cache: each image drawn anew).

Each path is timed with ``--workers`` (default 0 1 2; 0 = in this process, one prefetch thread)
in the same run: the first ``2 + workers x buffer`` batches are warm-up (worker start-up, filled
buffers), then ``--repeats`` consecutive windows of at least ``--images`` images are timed;
``images_per_s`` is their median, ``images`` all the timed images, ``images_per_s_per_core`` the
median divided by the ``processes`` busy loading (workers + 1: the workers and the process that
takes the batches). The data are ``--distinct`` synthetic images (default 16, read over and over:
the page cache is warm, as for a cache that fits in RAM).

``--simulate-step-ms MS`` runs the real training loop (:func:`gmic_jax.train.loop.train_and_evaluate`
on the ``--simulate-path`` cache, ``--simulate-batch`` images per step) with the device step
replaced by a wait of MS after the batch is on device, and reports per step (means over the
steps after warm-up) ``loader_wait_ms`` (waiting for the next batch), ``host_ms`` (the loop's
other host work; the device put runs on the pipeline's prefetch thread, so its cost shows in
``loader_wait_ms`` when it cannot keep up, and is also timed alone as ``details.device_put_ms``)
and ``input_bound`` (``loader_wait_ms`` > 5% of the step).

JSON (``--json``): {"machine": {...}, "results": [{"path", "workers", "images", "images_per_s",
"processes", "images_per_s_per_core"}], "loop": {"step_ms", "loader_wait_ms", "host_ms",
"input_bound"} (with --simulate-step-ms), "details": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grain
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gmic_jax, also where it is not installed

from gmic_jax.data.cache import CacheSource, build_cache  # noqa: E402
from gmic_jax.data.exam_list import save_exam_list  # noqa: E402
from gmic_jax.data.image import write_png  # noqa: E402
from gmic_jax.data.manifest import manifest_source  # noqa: E402
from gmic_jax.data.pipeline import load_batches  # noqa: E402
from gmic_jax.data.sources import ExamListSource  # noqa: E402
from gmic_jax.data.synthetic import SyntheticLesions  # noqa: E402
from gmic_jax.data.testing import breast_image, preprocessed_exam  # noqa: E402
from gmic_jax.preprocessing import SyntheticData  # noqa: E402
from gmic_jax.train.config_lib import load_config  # noqa: E402
from gmic_jax.train.input import TrainExamples  # noqa: E402
from gmic_jax.train.loop import StepTimes, train_and_evaluate  # noqa: E402
from gmic_jax.train.step import make_mesh, shard_array  # noqa: E402

WINDOW = (2944, 1920)
RAW_SHAPE = (3328, 2560)
PATHS = ("cache", "cache_noise", "png")  # measured by default
EXTRA_PATHS = ("synthetic", "cache_noise_host")  # measured when --paths names them
VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
BUFFER = 2  # batches each worker keeps ready (load_batches' default)
# One accelerator at the project's speed goal: 15 ms per exam of 4 images.
ACCELERATOR_IMAGES_PER_S = 4 / 0.015


def machine() -> dict:
    """The CPU (model name, family / model numbers, AMX), the load and the versions."""
    info: dict = {"cpu_model": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(
            cpu_model=fields.get("model name", info["cpu_model"]),
            cpu_family=int(fields.get("cpu family", -1)),
            cpu_model_number=int(fields.get("model", -1)),
            stepping=int(fields.get("stepping", -1)),
            amx=any(f.startswith("amx") for f in fields.get("flags", "").split()),
        )
    except (OSError, ValueError):
        pass
    info.update(
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)),
        load_average=[round(v, 2) for v in os.getloadavg()],
        python=platform.python_version(),
        numpy=np.__version__,
        jax=jax.__version__,
        grain=getattr(grain, "__version__", "?"),
        platform=platform.platform(),
    )
    return info


def write_data(root: Path, distinct: int, window=WINDOW, seed: int = 0):
    """``distinct`` raw PNGs + a manifest, and the same number of cropped PNGs + a preprocessed
    exam list (best centres), cached plain and with window-noise contexts."""
    rng = np.random.default_rng(seed)
    raw_shape = raw_shape_for(window)
    rows = ["path,patient,laterality,view,benign,malignant,split\n"]
    exams = []
    for i in range(distinct):
        e, view = divmod(i, 4)
        side, kind = VIEWS[view].split("-")
        write_png(root / f"raw{i}.png", breast_image(*raw_shape, seed=i, points_right=side == "L"))
        rows.append(f"raw{i}.png,p{e},{side},{kind},0,{i % 2},train\n")
        h = int(rng.integers(0.92 * window[0], 1.09 * window[0]))  # a breast's crop
        w = int(rng.integers(0.78 * window[1], 1.09 * window[1]))
        write_png(root / f"crop{i}.png", breast_image(h, w, seed=1000 + i))
        if view == 0:
            names, centers = {}, {}
        names[VIEWS[view]], centers[VIEWS[view]] = f"crop{i}", (h // 2, w // 3)
        if view == 3:
            exams.append(preprocessed_exam(names, centers))
    (root / "manifest.csv").write_text("".join(rows))
    save_exam_list(root / "exams.pkl", exams)
    source = ExamListSource(root / "exams.pkl", root, window_shape=window)
    for name, noise in (("cache", None), ("cache_noise", True)):
        count, failures = build_cache(source, root / name, shard_size=distinct, num_workers=1, window_noise=noise)
        if failures:
            raise RuntimeError(f"benchmark cache {name}: {failures[0]}")
    return root


def raw_shape_for(window) -> tuple:
    """A full-field image for ``window``: 3328 x 2560 for the model's 2944 x 1920."""
    return (round(window[0] * RAW_SHAPE[0] / WINDOW[0]), round(window[1] * RAW_SHAPE[1] / WINDOW[1]))


def sources(root: Path, window=WINDOW) -> dict:
    distinct = len(CacheSource(root / "cache"))
    return {
        "cache": CacheSource(root / "cache"),
        "cache_noise": CacheSource(root / "cache_noise"),
        "cache_noise_host": CacheSource(root / "cache_noise"),
        "png": manifest_source(
            root / "manifest.csv",
            window_shape=window,  # erosion steps scale too
            iterations=max(2, round(100 * window[0] / WINDOW[0])),
        ),
        "synthetic": SyntheticLesions(
            distinct, seed=0, split="train", spec=SyntheticData().spec(window), cache=False, with_masks=False
        ),
    }


class HostNoiseExamples:
    """Task (example, epoch) -> {image, label}: the window-noise draw made on the host with PIL
    (the reference the device path is tested against; ``cache_noise_host``)."""

    def __init__(self, source, seed: int):
        self.source, self.seed = source, seed

    def __call__(self, task) -> dict:
        example = self.source.noisy_example(task[0], task[1], self.seed, with_masks=False)
        return {"image": example["image"], "label": example["label"]}


def measure(source, path: str, workers: int, images: int, batch: int, repeats: int) -> dict:
    """Steady-state images/s of the training pipeline over ``source``: the median over ``repeats``
    consecutive windows of at least ``images`` images each, after warm-up (see the module doc)."""
    warmup = 2 + workers * BUFFER
    timed = -(-images // batch)
    n = len(source)
    # Training's tasks (example, epoch): a new epoch each pass over the data (fresh noise draws).
    plan = [
        tuple(((k * batch + r) % n, (k * batch + r) // n) for r in range(batch))
        for k in range(warmup + repeats * timed)
    ]
    if path == "cache_noise_host":
        examples = HostNoiseExamples(source, seed=0)
    else:
        examples = TrainExamples(source, seed=0, window_noise=path == "cache_noise")
    rates = []
    t_start = time.perf_counter()
    with load_batches(plan, examples, workers=workers) as batches:
        for _ in range(warmup):
            first = next(batches)
        t_warm = time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(timed):
                b = next(batches)
            rates.append(timed * batch / (time.perf_counter() - t0))
        key, shape = ("region", source.region_shape) if path == "cache_noise" else ("image", source[0]["image"].shape)
        if b["failures"] or tuple(first[key].shape) != (batch, *shape):
            raise RuntimeError(f"{path}: unexpected batch {first.get(key, np.zeros(0)).shape} / {b['failures']}")
        del first, b
    rate = statistics.median(rates)
    return {
        "path": path,
        "workers": workers,
        "images": repeats * timed * batch,
        "images_per_s": rate,
        "processes": workers + 1,
        "images_per_s_per_core": rate / (workers + 1),
        "_rates": rates,
        "_warmup_s": t_warm - t_start,
        "_load_average": [round(v, 2) for v in os.getloadavg()],
    }


def simulation_warmup(workers: int) -> int:
    """Steps not timed in the simulated loop: the first, and those the workers' buffers served."""
    return 1 + workers * BUFFER + 1


def simulate(
    root: Path, path: str, workers: int, step_ms: float, batch: int, steps: int, window=WINDOW
) -> tuple[dict, dict]:
    """The training loop with a simulated device step: ("loop" entry, details)."""
    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "synthetic.py"))
    config.data.source = "cache"
    config.data.train_cache = config.data.val_cache = str(root / path)
    config.data.window_noise = path == "cache_noise"
    config.data.balanced_sampling = False
    config.data.workers = workers
    config.data.image_shape = config.model.image_shape = tuple(window)  # the model takes the cache's windows
    config.batch_size = batch
    n = len(sources(root, window)[path])
    config.num_epochs = -(-steps * batch // n)
    config.eval.every_epochs = 0  # no evaluation: the loop's training steps only
    config.checkpoint_every_steps = 10**9
    config.log_every_steps = 10**9
    config.progress_bar = False

    def device_step(state, b):
        jax.block_until_ready(b)  # a real step waits for its input
        time.sleep(step_ms / 1000)
        return state, {"loss": np.float32(0), "grad_norm": np.float32(0), "finite": np.bool_(True)}

    class SimulatedDevice(StepTimes):  # a loop hook: the step replaced by device_step, its times kept
        def wrap_train_step(self, train_step):
            return device_step

    times = SimulatedDevice()
    with tempfile.TemporaryDirectory(dir=root) as workdir:
        train_and_evaluate(config, workdir, hooks=[times])
    steady = [t for t in times if t["step"] > simulation_warmup(workers)]

    def mean(key):
        return 1e3 * statistics.fmean(t[key] for t in steady)

    loop = {
        "step_ms": step_ms,
        "loader_wait_ms": mean("loader_wait_s"),
        "host_ms": mean("host_s"),
        "input_bound": mean("loader_wait_s") > 0.05 * step_ms,
    }
    # The device put alone, of a batch as the pipeline gives it (its prefetch thread puts each one).
    mesh = make_mesh()
    source = sources(root, window)[path]
    examples = TrainExamples(source, seed=0, window_noise=path == "cache_noise")
    with load_batches([tuple((i % n, 0) for i in range(batch))], examples, workers=workers) as one:
        images = next(one)["region" if path == "cache_noise" else "image"]
    puts = []
    for _ in range(5):
        t = time.perf_counter()
        shard_array(images, mesh).block_until_ready()
        puts.append(1e3 * (time.perf_counter() - t))
    del images
    details = {
        "path": path,
        "workers": workers,
        "batch": batch,
        "timed_steps": len(steady),
        "measured_step_ms": mean("step_s"),
        "median_loader_wait_ms": 1e3 * statistics.median(t["loader_wait_s"] for t in steady),
        "device_put_ms": statistics.median(puts),
        "device": str(jax.devices()[0]),
    }
    return loop, details


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS + EXTRA_PATHS)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=200, help="timed images per window (after warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per path and worker count (median)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch (an exam)")
    parser.add_argument("--distinct", type=int, default=16, help="distinct images, read over and over")
    parser.add_argument(
        "--window",
        type=int,
        nargs=2,
        default=list(WINDOW),
        metavar=("H", "W"),
        help="window size (raw images scale with it; smaller only to test this script)",
    )
    parser.add_argument(
        "--simulate-step-ms",
        type=float,
        default=None,
        metavar="MS",
        help="also run the training loop with the device step replaced by a wait of MS",
    )
    parser.add_argument("--simulate-path", default="cache", choices=["cache", "cache_noise"])
    parser.add_argument("--simulate-workers", type=int, default=2)
    parser.add_argument("--simulate-batch", type=int, default=16)
    parser.add_argument("--simulate-steps", type=int, default=40)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.distinct % 4 or args.distinct < 4:
        parser.error("--distinct must be a positive multiple of 4 (whole exams)")
    if args.simulate_steps < simulation_warmup(args.simulate_workers) + 5:
        parser.error(
            f"--simulate-steps must be at least {simulation_warmup(args.simulate_workers) + 5} "
            f"(warm-up + 5 timed steps)"
        )

    report: dict = {"machine": machine(), "results": []}
    window = tuple(args.window)
    details: dict = {
        "window": list(window),
        "raw_png": list(raw_shape_for(window)),
        "batch": args.batch,
        "distinct_images": args.distinct,
        "accelerator_images_per_s": ACCELERATOR_IMAGES_PER_S,
    }
    with tempfile.TemporaryDirectory(prefix="gmic-input-") as tmp:
        t = time.perf_counter()
        root = write_data(Path(tmp), args.distinct, window)
        details["data_s"] = time.perf_counter() - t
        srcs = sources(root, window)
        for path in args.paths:
            for workers in args.workers:
                r = measure(srcs[path], path, workers, args.images, args.batch, args.repeats)
                details.setdefault("runs", []).append({k.lstrip("_"): v for k, v in r.items()})
                report["results"].append({k: v for k, v in r.items() if not k.startswith("_")})
                print(
                    f"{path:12s} workers={workers}: {r['images_per_s']:8.2f} images/s, "
                    f"{r['images_per_s_per_core']:8.2f} per core ({r['processes']} busy) (median of "
                    f"{', '.join(f'{v:.2f}' for v in r['_rates'])}; {r['images']} images after a "
                    f"{r['_warmup_s']:.1f} s warm-up; load average {r['_load_average'][0]:.2f})",
                    flush=True,
                )
        if args.simulate_step_ms is not None:
            loop, sim = simulate(
                root,
                args.simulate_path,
                args.simulate_workers,
                args.simulate_step_ms,
                args.simulate_batch,
                args.simulate_steps,
                window,
            )
            report["loop"] = loop
            details["simulation"] = sim
            print(
                f"loop ({sim['path']}, {sim['workers']} workers, {sim['batch']} images/step, "
                f"step {loop['step_ms']:.0f} ms): loader_wait {loop['loader_wait_ms']:.1f} ms, "
                f"host {loop['host_ms']:.2f} ms, input_bound={loop['input_bound']} "
                f"(device put alone {sim['device_put_ms']:.1f} ms)",
                flush=True,
            )
    details["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["details"] = details
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
