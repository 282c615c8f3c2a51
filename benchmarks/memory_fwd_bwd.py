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
import json
import sys
from pathlib import Path

# The modules beside this script (run as `python benchmarks/memory_fwd_bwd.py`, its directory is on
# sys.path already) and the gmic_jax of this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The programs of this benchmark, each in its own module: fwd_bwd_workers (a worker per
# implementation and phase), fwd_bwd_driver (the parent: inputs, workers, ABBA timing, agreement),
# fwd_bwd_report (the JSON and the markdown), deviceless (--deviceless: compile for a GPU without one).
import deviceless  # noqa: E402
import fwd_bwd_driver as driver  # noqa: E402
import fwd_bwd_workers  # noqa: E402

# XLA flags of the inference and of the training worker when none are given on the command line.
INFERENCE_XLA_FLAGS = ""
TRAINING_XLA_FLAGS = ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Defaults are shown in brackets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(p)
    _add_run_arguments(p)
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


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Where it runs and what: device or deviceless target, dtypes, remat policies, batch, kernels,
    the model's shapes and float32 precision."""
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
        choices=driver.REMAT_MODES,
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


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """How it is measured: runs, threads and cores, the PyTorch rows, XLA flags, profiling."""
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
        choices=(*driver.TORCH_PEERS, "all", "none"),
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return fwd_bwd_workers.run_worker(json.loads(args.worker))
    try:
        if args.plot:
            return driver.run_sizes(args, sys.argv[1:] if argv is None else list(argv))
        return driver.run_benchmark(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"memory_fwd_bwd: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
