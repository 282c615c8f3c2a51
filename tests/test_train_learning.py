"""Learning, by fixed steps and seed: configs/synthetic_tiny.py trained from image-level labels
only, then scored on held-out synthetic images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gmic_jax import metrics as M
from gmic_jax.train.config_lib import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Measured by this module (fixed seeds; 2-core AMD EPYC (family 25 model 17), 3 passed in 5 min 39 s wall while a
# test run shared the cores; jax 0.10.2): the kept record (step 200; 200 validation images) has Dice malignant
# 0.308, PxAP malignant 0.411, pointing malignant 0.929 and benign 0.657 (of the 70 images with a finding of each
# class; uniform-random maps: 0.025 / 0.018); the 200 held-out test images give Dice malignant 0.319, PxAP
# malignant 0.409. The test asks for half of each measured value: a run that localises as this one did passes
# with room for another CPU's rounding, and maps that do not localise fail by far (uniform-random maps: pointing
# 0.02, Dice 0.0099 (benchmarks/RESULTS.md), PxAP about the findings' share of the pixels, 0.2-0.6% per finding).
MEASURED = {"val_dice_malignant": 0.308, "val_pxap_malignant": 0.411, "val_pointing_benign": 0.657}
MEASURED_TEST = {"val_dice_malignant": 0.319, "val_pxap_malignant": 0.409}
MARGIN = 0.5


def random_patch_locations(rng: np.random.Generator, n: int, image_shape, crop_shape, K: int):
    """(n, K, 2) uniform-random crop upper-left corners inside the image (the baseline for ROI hits)."""
    H, W = image_shape
    ch, cw = crop_shape
    rows = rng.integers(0, max(H - ch, 0) + 1, size=(n, K))
    cols = rng.integers(0, max(W - cw, 0) + 1, size=(n, K))
    return np.stack([rows, cols], axis=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gmic_jax.train.loop import train_and_evaluate

    config = load_config(str(CONFIGS / "synthetic_tiny.py"))
    workdir = tmp_path_factory.mktemp("tiny")
    record = train_and_evaluate(config, workdir)
    return config, workdir, record


def test_synthetic_tiny_learns_to_find_malignant_findings(trained):
    import jax

    from gmic_jax import load_checkpoint
    from gmic_jax.train.evaluate import evaluate
    from gmic_jax.train.step import make_mesh

    config, workdir, record = trained
    print("final record:", record)
    assert record["val_auc_malignant"] >= 0.85
    assert "val_roi_hit_rate" in record  # asserted on the held-out images below
    cfg, variables = load_checkpoint(workdir)  # the best step
    # Held-out images the run never saw (the 'test' split), more of them for a stable rate.
    from gmic_jax.data.synthetic import SyntheticLesions, SyntheticSpec

    test = SyntheticLesions(
        200,
        seed=config.data.seed,
        split="test",
        cache=False,
        spec=SyntheticSpec(image_shape=tuple(config.data.image_shape)),
    )
    metrics, details = evaluate(cfg, variables, test, make_mesh(jax.devices()[:1]), batch_size=50)
    print("per-head:", {k: v for k, v in details.items() if k.startswith("auc_")}, metrics)
    assert metrics["val_auc_malignant"] >= 0.85
    # The malignant saliency map overlaps the findings: Dice (thresholded map) and PxAP (ranking).
    for key, measured in MEASURED_TEST.items():
        assert metrics[key] >= MARGIN * measured, (key, metrics[key], measured)
    # The local network alone, on the patches the saliency maps chose.
    assert details["auc_local_malignant"] >= 0.8
    # ROI hit rate against K uniformly random patches on the same masks (50 draws).
    masks = np.stack([test[i]["mask"] for i in range(len(test))])
    rng = np.random.default_rng(0)
    random_rates = []
    for _ in range(50):
        locs = random_patch_locations(rng, len(test), masks.shape[1:3], cfg.crop_shape, cfg.K)
        hits = [M.roi_hits(masks[i], locs[i], cfg.crop_shape) for i in range(len(test))]
        random_rates.append(sum(h for h, _ in hits) / sum(t for _, t in hits))
    rate = metrics["val_roi_hit_rate"]
    print("roi hit rate", rate, "random mean", np.mean(random_rates), "p95", np.percentile(random_rates, 95))
    # Well above random patches: beyond 95% of random draws and 1.5x their mean.
    assert rate > np.percentile(random_rates, 95)
    assert rate >= 1.5 * np.mean(random_rates)


def _kept_record_and_random_rates(trained, c):
    """The record the run keeps (its selection rule: gmic_jax.checkpoint.select_checkpoint) and
    2000 pointing rates of uniform-random maps over the validation images with a class-c finding."""
    from gmic_jax.checkpoint import select_checkpoint
    from gmic_jax.data.synthetic import SyntheticLesions, SyntheticSpec
    from gmic_jax.models.global_net import saliency_grid_shape

    config, workdir, record = trained
    records = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    kept = records[select_checkpoint(workdir).step]
    val = SyntheticLesions(
        config.data.num_val,
        seed=config.data.seed,
        split="val",
        cache=False,
        spec=SyntheticSpec(image_shape=tuple(config.data.image_shape)),
    )
    grid = saliency_grid_shape(tuple(config.model.image_shape), tuple(config.model.global_strides))
    tables = [M.pointing_cells(m, grid) for m in (val[i]["mask"][..., c] for i in range(len(val))) if m.any()]
    name = M.CLASSES[c]
    assert np.mean([t.mean() for t in tables]) == pytest.approx(kept[f"val_pointing_{name}_random"])
    rates = M.random_pointing_rates(tables, np.random.default_rng(c), 2000)
    print(
        "kept record:",
        kept,
        f"\n{name} pointing",
        kept[f"val_pointing_{name}"],
        "random maps: mean",
        rates.mean(),
        "p99",
        np.percentile(rates, 99),
    )
    return kept, rates


def test_synthetic_tiny_malignant_saliency_points_at_the_findings(trained):
    """The malignant map's peak falls on the malignant finding in at least 60% of the validation
    images (the kept record), above the 99th percentile of uniform-random maps (2000 draws), and
    the map overlaps the findings (Dice, PxAP) at least half as well as the measured run's."""
    kept, rates = _kept_record_and_random_rates(trained, 1)
    assert kept["val_pointing_malignant"] >= 0.6
    assert kept["val_pointing_malignant"] > np.percentile(rates, 99)
    for key in ("val_dice_malignant", "val_pxap_malignant"):
        assert kept[key] >= MARGIN * MEASURED[key], (key, kept[key], MEASURED[key])


def test_synthetic_tiny_benign_saliency_points_at_the_findings(trained):
    """The benign map's peak falls on the benign finding in at least half as many validation images
    as in the measured run (0.657: at least 0.33), and more often than the 99th percentile of
    uniform-random maps (2000 draws; 0.07) over the validation images with a benign finding."""
    kept, rates = _kept_record_and_random_rates(trained, 0)
    assert kept["val_pointing_benign"] >= MARGIN * MEASURED["val_pointing_benign"]
    assert kept["val_pointing_benign"] > np.percentile(rates, 99)
