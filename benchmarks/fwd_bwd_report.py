"""The report of memory_fwd_bwd.py: the JSON (its keys are the contract of issue 24: TOP_KEYS, then
one row of RESULT_KEYS per implementation and configuration, then "details") and its markdown
table, per exam of 4 images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bench_common as bc
import flops as analytic
import torch_reference as tref

from gmic_jax.xla_flags import compile_cache_dir

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
TOP_KEYS = ("device", "versions", "threads", "image_shape", "unit", "results")


def assemble(args, device, cores, entries, agreement, weights_source, n_images, user_env) -> dict:
    n = args.batch_exams
    results, details = [], []
    for e in entries:
        result, detail = _result_and_detail(e, args, n_images)
        results.append(result)
        details.append(detail)
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
        "unit": bc.UNIT,
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


def _result_and_detail(e: dict, args, n_images: int) -> tuple[dict, dict]:
    """One entry's row of "results" (per exam) and of details.per_result."""
    n = args.batch_exams
    if e.get("skipped"):  # every key, its numbers None, and why
        head = {k: e[k] for k in ("impl", "dtype", "remat")}
        return {**dict.fromkeys(RESULT_KEYS), **head, "skipped": e["skipped"]}, {**head, "skipped": e["skipped"]}
    fwd, train = e["fwd"], e["train"]
    stem = 1 if e["impl"] == "jax" else 3  # gmic-jax folds the crop's channel repeat into the kernel
    layers = analytic.gmic_layers(
        n_images, tuple(args.image_shape), tuple(args.crop_shape), args.K, local_stem_channels=stem
    )
    fwd_med, fwd_spread = bc.median_spread(fwd["runs_ms"])
    bwd_med, bwd_spread = bc.median_spread(train["runs_ms"])
    params = fwd["params"]
    result = {
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
    detail = {
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
    return result, detail


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
    for name, get, fmt in _table_rows(report["details"]["batch_exams"]):
        vals = [get(r, d) for r, d in zip(res, det)]
        cells = ["-" if v is None else fmt.format(v) for v in vals]
        if torch_i is not None:
            for i in range(len(res)):
                if i != torch_i:
                    cells.append(_fmt_ratio(vals[i], vals[torch_i]) if name in RATIO_ROWS else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _notes(report, det))


# The table's rows that get a "/ torch" ratio column.
RATIO_ROWS = {
    "GFLOP forward (XLA / torch counter)",
    "forward (ms)",
    "forward + backward (ms)",
    "peak memory of a training step (MiB)",
    "GFLOP fwd+bwd (XLA / torch counter)",
}


def _table_rows(batch_exams: int) -> list[tuple]:
    """(name, value of a result row and its details, format) of each line of the table."""
    G, MB = 1e9, 2**20
    return [
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
                None if d["xla_temp_bytes_train_step"] is None else d["xla_temp_bytes_train_step"] / MB / batch_exams
            ),
            "{:.0f}",
        ),
    ]


def _notes(report: dict, det: list[dict]) -> list[str]:
    """The lines under the table: CPU and settings, skipped rows, like-with-like times, the
    workers' memory, the agreement checks, each JAX row's XLA_FLAGS."""
    lines = [
        f"\nCPU: {bc.cpu_name(report['details']['cpu'])}; kernels: {report['details']['kernels']}; "
        f"float32 precision: {report['details']['precision']}; "
        f"compile cache: {report['details']['compile_cache_dir']}"
    ]
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
    return lines


def _cache_dir_note() -> str:
    path = compile_cache_dir()
    return "off" if path is None else str(path)
