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
