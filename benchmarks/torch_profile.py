"""Where the time of a PyTorch peer of GMIC goes, by part of the model, forward and backward.

    python benchmarks/torch_profile.py --torch-ref PATH --peer torch_compile_channels_last --json prof.json

The original model (torch_reference.TorchGMIC, with the options of one of torch_reference.PEERS)
runs at 2944 x 1920 on the same weights and images as benchmarks/memory_fwd_bwd.py; torch.profiler
records one forward (eval, no gradient) and one training step (forward + backward of the three
heads' BCE, BatchNorm on batch statistics) after a warm-up and `--n-runs` timed runs of each.

Parts: the global network's stem (conv + max-pool), its five stages, its final BatchNorm + ReLU,
the saliency head, the local network's stem (conv, BatchNorm, ReLU, max-pool) and its four layers;
"other" is the rest of the wall time (patch selection in numpy, crop copies, attention, heads,
loss, the local network's mean pooling). Forward hooks on those modules open and close a
`record_function` range around each call, so a part's forward time is the wall time of its calls.
Backward: every autograd node evaluated in the backward pass carries the sequence number of the
forward op that made it; that op lies in one part's range, and the node's time is that part's
backward time.

The hooks must run outside compiled code, so with `compile` each part's modules are compiled on
their own here (torch.compile of each stage, of the stem's modules, ...), where
memory_fwd_bwd.py compiles each network whole: fusions across a part boundary are lost. The
script times this variant (median of `--n-runs` without the profiler) so that it can be set
against memory_fwd_bwd.py's row of the same peer.

Times are wall times of the calling thread (PyTorch's ops use all `--threads` inside), unlike
memory_fwd_bwd.py --profile's JAX summary, which sums XLA op times over threads.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
import numpy as np  # noqa: E402
import torch_reference as tref  # noqa: E402

from gmic_jax import GMICConfig  # noqa: E402
from gmic_jax.models.global_net import saliency_grid_shape  # noqa: E402

# part -> the modules (attribute paths in the original GMIC module) it runs, in the order called.
PARTS = {
    "global stem": ("ds_net.first_conv", "ds_net.first_pool"),
    **{f"global stage {i}": (f"ds_net.layer_list.{i}",) for i in range(5)},
    "global final BN + ReLU": ("ds_net.final_bn", "ds_net.relu"),
    "saliency head": ("left_postprocess_net",),
    "local stem": ("dn_resnet.conv1", "dn_resnet.bn1", "dn_resnet.relu", "dn_resnet.maxpool"),
    **{f"local layer{i}": (f"dn_resnet.layer{i}",) for i in range(1, 5)},
}
_BACKWARD = "autograd::engine::evaluate_function: "


def mark_parts(model, torch) -> None:
    """A `record_function(part)` range from the first module's call to the last one's return."""
    for part, paths in PARTS.items():
        first, last = model.get_submodule(paths[0]), model.get_submodule(paths[-1])
        open_ranges = []

        def enter(module, args, part=part, open_ranges=open_ranges):
            rf = torch.profiler.record_function(part)
            rf.__enter__()
            open_ranges.append(rf)

        def leave(module, args, out, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        first.register_forward_pre_hook(enter)
        last.register_forward_hook(leave)


def compile_parts(model, torch) -> None:
    """torch.compile of every module of PARTS (15 compiled methods: the recompile limit is raised)."""
    tref.raise_recompile_limit(torch)
    for paths in PARTS.values():
        for path in paths:
            module = model.get_submodule(path)
            module.forward = torch.compile(module.forward)


def by_part(events, wall_ms: float) -> dict[str, float]:
    """{'<part> forward' | '<part> backward': ms} of one profiled call; 'other' = the wall time left."""
    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PARTS)
    out = collections.Counter()
    for start, end, name in ranges:
        out[f"{name} forward"] += (end - start) / 1e3

    def part_at(t):
        for start, end, name in ranges:
            if start <= t <= end:
                return name
        return None

    seq_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(_BACKWARD) and e.name not in PARTS:
            part = part_at(e.time_range.start)
            if part is not None:
                seq_part.setdefault(e.sequence_nr, part)
    for e in events:
        if e.name.startswith(_BACKWARD):
            seq = e.sequence_nr
            if seq < 0:
                seq = next((c.sequence_nr for c in e.cpu_children if c.sequence_nr >= 0), -1)
            part = seq_part.get(seq)
            out[f"{part} backward" if part else "other backward"] += e.cpu_time_total / 1e3
    out["other"] = wall_ms - sum(out.values())
    return dict(out)


def measure(ref, x, y, phase: str, n_runs: int) -> dict:
    torch = ref.torch

    def call():
        if phase == "fwd":
            ref.forward(x)
        else:
            ref.train_step(x, y)
        ref.sync()

    t0 = time.perf_counter()
    call()  # compiles, when compiled
    first_s = time.perf_counter() - t0
    runs = []
    for _ in range(n_runs):
        t0 = time.perf_counter()
        call()
        runs.append((time.perf_counter() - t0) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = (time.perf_counter() - t0) * 1e3
    return {
        "first_call_s": first_s,
        "runs_ms": runs,
        "median_ms": statistics.median(runs),
        "profiled_ms": wall,
        "parts_ms": by_part(prof.events(), wall),
    }


def markdown(report: dict) -> str:
    fwd, train = report["fwd"], report["train"]
    lines = [
        f"{report['peer']} ({'parts compiled one by one' if report['compiled'] else 'eager'}), "
        f"{report['device']}, {report['threads']} threads",
        f"forward median {fwd['median_ms']:.0f} ms, forward + backward median {train['median_ms']:.0f} ms "
        f"({report['n_runs']} runs; first calls {fwd['first_call_s']:.1f} s / {train['first_call_s']:.1f} s)",
        "",
        "| part | forward (inference) ms | training: forward ms | training: backward ms |",
        "|---|---:|---:|---:|",
    ]
    for part in [*PARTS, "other"]:
        get = lambda d, k: d["parts_ms"].get(k, 0.0)  # noqa: E731
        fwd_key = "other" if part == "other" else f"{part} forward"
        lines.append(
            f"| {part} | {get(fwd, fwd_key):.0f} | {get(train, fwd_key):.0f} | {get(train, f'{part} backward'):.0f} |"
        )
    lines.append(
        f"| total (profiled call) | {fwd['profiled_ms']:.0f} | {train['profiled_ms']:.0f} (forward + backward) | |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-ref", required=True, metavar="PATH", help="checkout of the original GMIC release")
    p.add_argument("--peer", choices=tuple(tref.PEERS), default="torch_compile_channels_last", help="[%(default)s]")
    p.add_argument("--image-shape", type=int, nargs=2, default=(2944, 1920), metavar=("H", "W"))
    p.add_argument("--crop-shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--percent-t", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    p.add_argument("--n-runs", type=int, default=3, help="timed runs of each phase before the profiled one [3]")
    p.add_argument("--json", default=None, metavar="OUT.json")
    args = p.parse_args(argv)
    cfg = GMICConfig(
        image_shape=tuple(args.image_shape),
        crop_shape=tuple(args.crop_shape),
        K=args.K,
        percent_t=args.percent_t,
    )
    state_dict, weights_source = bc.benchmark_weights(cfg)
    options = dict(tref.PEERS[args.peer])
    compiled = options.pop("compile", False)
    ref = tref.TorchGMIC(
        args.torch_ref,
        state_dict,
        image_shape=args.image_shape,
        crop_shape=args.crop_shape,
        K=args.K,
        percent_t=args.percent_t,
        cam_size=saliency_grid_shape(args.image_shape),
        threads=args.threads,
        **options,
    )
    if compiled:
        compile_parts(ref.model, ref.torch)
    mark_parts(ref.model, ref.torch)
    x = np.random.default_rng(0).standard_normal((4, *args.image_shape)).astype(np.float32)  # as memory_fwd_bwd
    x = ref.to_input(x[..., None])
    y = ref.torch.from_numpy(bc.targets(4))
    report = {
        "peer": args.peer,
        "compiled": compiled,
        "device": bc.cpu_name(),
        "threads": args.threads,
        "versions": bc.versions(with_torch=True),
        "weights": weights_source,
        "n_runs": args.n_runs,
        "fwd": measure(ref, x, y, "fwd", args.n_runs),
        "train": measure(ref, x, y, "train", args.n_runs),
    }
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
