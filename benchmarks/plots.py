"""Figures of the benchmarks. matplotlib is optional (not a dependency of gmic-jax): it is imported
inside the function that draws, so that the benchmarks run without it."""

from __future__ import annotations


def cost_against_work(series: dict, path, title: str = "") -> None:
    """Cost against work: compiled memory (GiB per exam) and bound (ms per exam) of a program
    against exams per batch (image scale 1) and against image size (times the paper's pixels, 1
    exam per batch), one line per series (e.g. remat policy). `series` maps a label to points
    {"batch_exams", "image_scale", "memory_gib", "bound_ms"}; the PNG is written to `path`."""
    import matplotlib  # optional: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharey="row")
    for label, points in series.items():
        by_batch = sorted((p["batch_exams"], p) for p in points if p["image_scale"] == 1.0)
        by_size = sorted((p["image_scale"], p) for p in points if p["batch_exams"] == 1)
        for col, pts in enumerate((by_batch, by_size)):
            x = [k for k, _ in pts]
            axes[0][col].plot(x, [p["memory_gib"] for _, p in pts], marker="o", label=label)
            axes[1][col].plot(x, [p["bound_ms"] for _, p in pts], marker="o", label=label)
    axes[0][0].set_ylabel("compiled memory (GiB / exam)")
    axes[1][0].set_ylabel("roofline bound (ms / exam)")
    axes[1][0].set_xlabel("exams per batch (image 2944 x 1920)")
    axes[1][1].set_xlabel("image pixels / 2944 x 1920's (1 exam per batch)")
    axes[1][0].set_xscale("log", base=2)
    axes[0][0].set_xscale("log", base=2)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(title="remat", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def time_against_size(reports: dict, path, title: str = "") -> None:
    """Forward and forward + backward time per exam against image pixels, one line per row of
    memory_fwd_bwd.py's reports ({image scale: report}; rows told apart by impl, dtype, remat;
    skipped rows left out). Returns the lines drawn: {label: [(megapixels, fwd s, fwd+bwd s)]}."""
    import matplotlib  # optional: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    lines: dict[str, list] = {}
    for report in reports.values():
        h, w = report["image_shape"]
        for r in report["results"]:
            if r.get("skipped"):
                continue
            label = f"{r['impl']} {r['dtype']}" + ("" if r.get("remat", "none") == "none" else f" {r['remat']}")
            lines.setdefault(label, []).append((h * w / 1e6, r["fwd_ms"] / 1e3, r["fwd_bwd_ms"] / 1e3))
    for label, pts in lines.items():
        pts.sort()
        for ax, i in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=label)
    axes[0].set_title("forward", fontsize=9)
    axes[1].set_title("forward + backward", fontsize=9)
    axes[0].set_ylabel("s per exam (4 images)")
    for ax in axes:
        ax.set_xlabel("megapixels per image")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return lines
