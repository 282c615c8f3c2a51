"""Held-out localisation check: a config trained and scored on synthetic data that a DIFFERENT
generator made, through the same path as a user's own data (manifest -> `gmic-jax cache` ->
`gmic-jax train` -> `gmic-jax evaluate`).

    python benchmarks/heldout_localization.py --out /tmp/heldout --variant standard [--seed 0]
    python benchmarks/heldout_localization.py --out /tmp/heldout-hard --variant hard

The embedded generator (gmic_jax/data/synthetic.py) is what configs/synthetic.py was designed
around. This one shares none of its code and draws other things:

* the breast: a superellipse of random exponent against the chest wall (either side of the raw
  image, the pipeline flips it), tissue as radiating ducts and ligaments over a two-scale density
  field, a skin line, and for MLO views a pectoral band with a straight edge;
* benign-like findings: lobulated masses (two to four overlapping smooth lobes) and cysts (a sharp
  round edge inside a thin dark halo);
* malignant-like findings: masses with indistinct, irregular margins (a radius with many random
  harmonics and a soft edge) and segmental calcifications (dots along a few branching lines; the
  mask is their closed region, as a radiologist outlines it).

``standard`` draws findings of the embedded generator's size range (0.2-0.6% of the image area)
and contrast; ``hard`` makes them smaller (0.1-0.3%) and fainter. Every image is clipped to its
densest tissue, so a finding is never the brightest thing in the image.

The script writes 16-bit PNGs, masks and a manifest, caches each split with `gmic-jax cache`
(checking that every finding survives the windowing), trains ``--config`` on the train/val caches
and evaluates the kept checkpoint on the test cache; it prints one JSON line with the test
metrics (AUC, Dice, pointing and its random baseline per class).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gmic_jax.data.cache import INDEX_NAME, CacheSource  # noqa: E402
from gmic_jax.data.image import write_png  # noqa: E402

SHAPE = (256, 192)  # raw image; the window of configs/synthetic.py
MAX_VALUE = 4095
VARIANTS = {
    "standard": dict(area=(0.002, 0.006), contrast=(0.22, 0.4)),
    "hard": dict(area=(0.001, 0.003), contrast=(0.12, 0.25)),
}
SPLIT_BREASTS = {"train": 400, "val": 100, "test": 100}
SPLIT_SEEDS = {"train": 101, "val": 202, "test": 303}


# --------------------------------------------------------------------------------------- tissue


def _field(rng, shape, sigma):
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest")
    return f / (f.std() + 1e-12)


def breast_tissue(rng, view):
    """(image in [0, 1], breast mask) of an empty breast against the left edge, nipple to the right."""
    H, W = SHAPE
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    top, bottom = H * rng.uniform(0.05, 0.12), H * rng.uniform(0.88, 0.95)
    cy, ay = (top + bottom) / 2, (bottom - top) / 2
    ax = W * rng.uniform(0.6, 0.82)
    p = rng.uniform(1.8, 2.6)
    r = (np.abs((yy - cy) / ay) ** p + (xx / ax) ** p) ** (1 / p)
    breast = r <= 1.0
    thickness = np.clip(1.0 - r**4, 0.0, 1.0) ** 0.5
    # Ducts and ligaments: thin lines radiating from the nipple towards the chest wall.
    lines = np.zeros(SHAPE)
    ny, nx = cy + rng.uniform(-0.1, 0.1) * ay, ax
    for _ in range(int(rng.integers(25, 45))):
        a = rng.uniform(-0.6, 0.6) * math.pi + math.pi  # towards the left
        length = ax * rng.uniform(0.3, 1.0)
        along = (xx - nx) * math.cos(a) + (yy - ny) * math.sin(a)
        across = -(xx - nx) * math.sin(a) + (yy - ny) * math.cos(a)
        width = rng.uniform(0.6, 1.6)
        lines += (
            np.exp(-0.5 * (across / width) ** 2) * (along > 0) * np.clip(1 - along / length, 0, 1) * rng.uniform(0.3, 1)
        )
    lines = ndimage.gaussian_filter(lines, 0.7)
    density = 0.6 * _field(rng, SHAPE, 9.0) + 0.4 * _field(rng, SHAPE, 3.0)
    gland = np.exp(-(((xx - 0.45 * ax) / (0.5 * ax)) ** 2) - ((yy - cy) / (0.8 * ay)) ** 2)
    density = 1 / (1 + np.exp(-(density + 1.6 * gland - rng.uniform(0.8, 1.4)) * 1.5))
    image = thickness * (0.3 + 0.35 * density + 0.12 * np.clip(lines, 0, 1.5))
    skin = breast & ~ndimage.binary_erosion(breast, iterations=2)
    image = np.where(skin, np.maximum(image, 0.45), image)
    if view == "MLO":  # pectoral band: a straight edge across the top left, brighter towards the wall
        edge = H * rng.uniform(0.3, 0.45) * (1 - xx / (W * rng.uniform(0.22, 0.32)))
        band = (yy < edge) & breast
        image = np.where(band, 0.62 + 0.12 * (1 - xx / W) + 0.02 * density, image)
    return np.where(breast, image, 0.0), breast


# ------------------------------------------------------------------------------------- findings


def _grid(c, half):
    H, W = SHAPE
    y0, y1 = max(0, int(c[0] - half)), min(H, int(c[0] + half) + 2)
    x0, x1 = max(0, int(c[1] - half)), min(W, int(c[1] + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return (slice(y0, y1), slice(x0, x1)), yy - c[0], xx - c[1]


def lobulated_mass(rng, c, radius):
    win, dy, dx = _grid(c, 2.2 * radius)
    lobes = int(rng.integers(2, 5))
    lobe_r = radius * rng.uniform(0.55, 0.75, lobes)
    angles = rng.uniform(0, 2 * np.pi, lobes)
    off = radius * rng.uniform(0.25, 0.5, lobes)
    dist = np.min(
        [np.hypot(dy - o * math.sin(a), dx - o * math.cos(a)) / lr for a, o, lr in zip(angles, off, lobe_r)], axis=0
    )
    return win, 1 / (1 + np.exp((dist - 1) / 0.07)), dist <= 1


def cyst(rng, c, radius):
    win, dy, dx = _grid(c, 1.8 * radius)
    e = rng.uniform(0.85, 1.15)
    d = np.hypot(dy * e, dx / e) / radius
    body = 1 / (1 + np.exp((d - 1) / 0.03))
    halo = -0.35 * np.exp(-0.5 * ((d - 1.12) / 0.06) ** 2)
    return win, body + halo, d <= 1


def indistinct_mass(rng, c, radius):
    win, dy, dx = _grid(c, 2.0 * radius)
    ang = np.arctan2(dy, dx)
    rad = np.ones_like(ang)
    for k in range(2, 13):
        rad += rng.uniform(0, 0.35 / k**0.7) * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
    d = np.hypot(dy, dx) / (radius * rad)
    density = 1 / (1 + np.exp((d - 1) / 0.18)) * (0.8 + 0.2 * ndimage.gaussian_filter(rng.random(d.shape), 1.0))
    return win, density, d <= 1


def segmental_calcifications(rng, c, radius):
    win, dy, dx = _grid(c, 1.6 * radius)
    density = np.zeros_like(dy)
    region = np.zeros(dy.shape, bool)
    dot = max(0.6, 0.08 * radius)
    base = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 4))):  # branches from the centre
        a = base + rng.uniform(-0.7, 0.7)
        y, x = 0.0, 0.0
        for _ in range(int(rng.integers(4, 8))):
            step = radius * rng.uniform(0.15, 0.3)
            a += rng.uniform(-0.4, 0.4)
            y, x = y + step * math.sin(a), x + step * math.cos(a)
            if math.hypot(y, x) > 1.3 * radius:
                break
            d2 = ((dy - y) ** 2 + (dx - x) ** 2) / (dot * rng.uniform(0.7, 1.4)) ** 2
            density = np.maximum(density, np.exp(-0.5 * d2))
            region |= d2 <= (3.0 * 1.0) ** 2
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(region, iterations=3))
    return win, 2.0 * density, mask


FINDINGS = {0: (lobulated_mass, cyst), 1: (indistinct_mass, segmental_calcifications)}


def render(rng, label, view, variant):
    """(raw uint16 image, masks (2, H, W) bool) of one view of a breast with ``label``."""
    spec = VARIANTS[variant]
    tissue, breast = breast_tissue(rng, view)
    densest = float(tissue.max())
    lesion = np.zeros(SHAPE)
    masks = np.zeros((2,) + SHAPE, bool)
    inside = ndimage.binary_erosion(breast, iterations=14)
    for cls in (0, 1):
        if not label[cls]:
            continue
        draw = FINDINGS[cls][int(rng.integers(2))]
        radius = math.sqrt(rng.uniform(*spec["area"]) * SHAPE[0] * SHAPE[1] / math.pi)
        ys, xs = np.nonzero(inside)
        k = int(rng.integers(len(ys)))
        win, density, m = draw(rng, (ys[k] + rng.uniform(-0.5, 0.5), xs[k] + rng.uniform(-0.5, 0.5)), radius)
        contrast = rng.uniform(*spec["contrast"])
        lesion[win] = np.where(np.abs(contrast * density) > np.abs(lesion[win]), contrast * density, lesion[win])
        masks[cls][win] |= m & breast[win]
    image = tissue + lesion * breast + 0.012 * rng.standard_normal(SHAPE) * breast
    image = np.clip(image, 0.0, densest) * breast
    return np.rint(image * MAX_VALUE).astype(np.uint16), masks


# ------------------------------------------------------------------------------------- data set


def make_dataset(out: Path, variant: str, seed: int = 0, breasts=None) -> Path:
    """PNGs, masks and manifest.csv under ``out``; returns the manifest's path."""
    breasts = breasts or SPLIT_BREASTS
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for split, n in breasts.items():
        for b in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_SEEDS[split], b]))
            label = (rng.random() < 0.35, rng.random() < 0.35)
            side = "LR"[b % 2]
            patient = f"{split}{b:04d}"
            for view in ("CC", "MLO"):
                image, masks = render(rng, label, view, variant)
                if side == "R":  # stored as a right breast: against the right edge
                    image, masks = image[:, ::-1], masks[:, :, ::-1]
                name = f"{patient}_{side}_{view}"
                write_png(out / "images" / f"{name}.png", image)
                cells = {}
                for cls, cname in enumerate(("benign", "malignant")):
                    if label[cls]:
                        if not masks[cls].any():
                            raise RuntimeError(f"{name}: the {cname} finding lies outside the breast")
                        write_png(out / "masks" / f"{name}_{cname}.png", masks[cls].astype(np.uint8) * 255)
                        cells[cname] = f"masks/{name}_{cname}.png"
                rows.append(
                    dict(
                        path=f"images/{name}.png",
                        patient=patient,
                        laterality=side,
                        view=view,
                        benign=int(label[0]),
                        malignant=int(label[1]),
                        split=split,
                        mask_benign=cells.get("benign", ""),
                        mask_malignant=cells.get("malignant", ""),
                    )
                )
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _cli(*args, log=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gmic_jax.cli", *map(str, args)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n" + r.stdout[-20000:] + r.stderr[-20000:] + "\n")
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def check_cache(cache_dir: Path):
    """Every positive window keeps a non-empty mask of its class (nothing cut off by the windowing)."""
    src = CacheSource(str(cache_dir))
    lost = []
    for i in range(len(src)):
        e = src[i]
        for c in range(2):
            if e["label"][c] > 0 and not e["mask"][..., c].any():
                lost.append((str(e["image_id"]), c))
    if lost:
        raise RuntimeError(f"{cache_dir}: {len(lost)} finding(s) lost by the windowing, e.g. {lost[:3]}")
    return len(src)


def make_caches(out: Path, variant: str, data_seed: int, log: Path) -> dict:
    """The data set under out/data and one `gmic-jax cache` per split under out/cache (each reused
    when there); returns the caches' directories by split."""
    data = out / "data"
    if not (data / "manifest.csv").exists():
        make_dataset(data, variant, data_seed)
    caches = {}
    for split in SPLIT_BREASTS:
        caches[split] = out / "cache" / split
        if not (caches[split] / INDEX_NAME).exists():
            _cli(
                "cache",
                "--source",
                "manifest",
                "--manifest",
                data / "manifest.csv",
                "--split",
                split,
                "--window-shape",
                *SHAPE,
                "--iterations",
                10,
                "--num-workers",
                1,
                "--no-progress",
                "--output",
                caches[split],
                log=log,
            )
        check_cache(caches[split])
    return caches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="standard")
    ap.add_argument("--config", default="configs/synthetic.py")
    ap.add_argument("--seed", type=int, default=0, help="training seed (--config.seed)")
    ap.add_argument("--data-seed", type=int, default=0, help="generator seed")
    args, overrides = ap.parse_known_args(argv)  # the rest: --config.FIELD=VALUE for training
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = overrides
    out = args.out.absolute()
    log = out / "log.txt"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    caches = make_caches(out, args.variant, args.data_seed, log)
    t_data = time.time() - t0
    run = out / f"run_seed{args.seed}"
    t1 = time.time()
    _cli(
        "train",
        "--config",
        args.config,
        "--workdir",
        run,
        f"--config.seed={args.seed}",
        "--config.data.source=cache",
        f"--config.data.train_cache={caches['train']}",
        f"--config.data.val_cache={caches['val']}",
        "--config.progress_bar=False",
        *args.overrides,
        log=log,
    )
    t_train = time.time() - t1
    ev = out / f"eval_seed{args.seed}"
    _cli("evaluate", "--checkpoint", run, "--data", f"cache:{caches['test']}", "--output", ev, log=log)
    metrics = json.loads((ev / "metrics.json").read_text())
    keys = (
        "auc_malignant",
        "auc_benign",
        "dice_malignant",
        "dice_benign",
        "pointing_malignant",
        "pointing_malignant_random",
        "pointing_benign",
        "pointing_benign_random",
        "roi_hit_rate",
    )
    split = metrics["split"]  # evaluate's keys carry the split it scored: test_auc_malignant, ...
    summary = {
        "variant": args.variant,
        "config": args.config,
        "seed": args.seed,
        "overrides": args.overrides,
        "split": split,
        "checkpoint_step": metrics.get("checkpoint_step"),
        "test": {k: metrics.get(f"{split}_{k}") for k in keys},
        "data_s": round(t_data, 1),
        "train_s": round(t_train, 1),
    }
    (out / f"summary_seed{args.seed}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
