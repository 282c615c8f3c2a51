"""gmic-jax predict end to end on the real sample exam (../shared/sample_exam), at full size, with
weights from ../shared/reference/recipe.py converted by `gmic-jax convert`.

One module-scoped run (plus one rerun) is shared by every assertion: a full-size forward costs
~1-2 s per image and ~10 s of compile on a 2-core CPU.
"""
from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
from PIL import Image

from gmic_jax import predict as P
from gmic_jax.data import cropping
from gmic_jax.data.image import read_image
from gmic_jax.visualize import figure_size

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def converted(reference_dir, tmp_path_factory):
    from recipe import reference_weights

    from gmic_jax.cli import main

    root = tmp_path_factory.mktemp("converted")
    np.savez(root / "model_1.npz", **reference_weights(3))
    assert main(["convert", str(root / "model_1.npz"), "--out", str(root / "model_1")]) == 0
    return root / "model_1"


@pytest.fixture(scope="module")
def runs(sample_exam_dir, converted, tmp_path_factory):
    from gmic_jax.cli import main

    outs = []
    for i, extra in enumerate((["--visualize"], [])):
        out = tmp_path_factory.mktemp(f"sample{i}")
        rc = main(["predict", "--exam-list", str(sample_exam_dir / "exam_list_before_cropping.pkl"),
                   "--images", str(sample_exam_dir / "images"), "--segmentations",
                   str(sample_exam_dir / "segmentation"), "--checkpoint", str(converted),
                   "--output", str(out), "--no-progress", "--batch-size", "4", *extra])
        assert rc == 0
        outs.append(out)
    return outs


def test_predictions_csv_has_the_original_columns_and_four_rows(runs):
    header, rows = read_csv(runs[0] / P.PREDICTIONS_CSV)
    assert header == ["image_index", "benign_pred", "malignant_pred", "benign_label", "malignant_label"]
    assert [r[0] for r in rows] == ["0_L-CC", "0_R-CC", "0_L-MLO", "0_R-MLO"]
    # The exam's labels: a benign finding in the right breast.
    assert [r[3:] for r in rows] == [["0", "0"], ["1", "0"], ["0", "0"], ["1", "0"]]
    preds = np.array([[float(v) for v in r[1:3]] for r in rows])
    assert np.all((preds > 0) & (preds < 1)) and len(np.unique(preds[:, 1])) == 4
    header, rows = read_csv(runs[0] / P.BREAST_CSV)
    assert [r[:2] for r in rows] == [["0", "L"], ["0", "R"]]


def test_rerun_gives_identical_numbers(runs):
    for name in (P.PREDICTIONS_CSV, P.BREAST_CSV, P.LOCALIZATION_CSV):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    for view in VIEWS:
        a = np.load(runs[0] / P.SALIENCY_DIR / f"0_{view}.npy")
        b = np.load(runs[1] / P.SALIENCY_DIR / f"0_{view}.npy")
        assert a.shape == (2, 46, 30) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_visualize_writes_one_png_per_view(runs):
    pngs = sorted((runs[0] / P.VISUALIZATION_DIR).glob("*.png"))
    assert [p.name for p in pngs] == sorted(f"0_{v}.png" for v in VIEWS)
    for p in pngs:
        assert Image.open(p).size == (3000, 500) == figure_size((2944, 1920), (256, 256), 6)
    assert not (runs[1] / P.VISUALIZATION_DIR).exists()


def test_localization_for_the_two_benign_segmentations(runs):
    header, rows = read_csv(runs[0] / P.LOCALIZATION_CSV)
    assert header == ["image_index", "dice_benign", "dice_malignant", "pxap_benign", "pxap_malignant", "roi_hit"]
    assert [r[0] for r in rows] == ["0_R-CC", "0_R-MLO"]
    for r in rows:
        assert r[2] == r[4] == ""  # no malignant lesion
        assert 0.0 <= float(r[1]) <= 1.0 and 0.0 < float(r[3]) <= 1.0 and 0.0 <= float(r[5]) <= 1.0


def test_windows_are_placed_at_the_original_best_centres(sample_exam_dir):
    """predict's raw-image path finds the centres the original pipeline wrote for this exam."""
    expected = pickle.load(open(sample_exam_dir / "expected_exam_list.pkl", "rb"))[0]
    prep = P.Preprocessing()
    for view in VIEWS:
        pixels = read_image(sample_exam_dir / "images" / f"0_{view}.png").to_uint()
        direction = cropping.breast_direction(expected["horizontal_flip"], view[0])
        _, center = P.original_source(pixels, view, direction, prep)
        assert center == tuple(int(v) for v in expected["best_center"][view][0]), view
