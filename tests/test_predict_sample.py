"""gmic-jax predict end to end on the real sample exam (../shared/sample_exam), at full size, with
weights from ../shared/reference/recipe.py converted by `gmic-jax convert`.

One module-scoped run (plus one rerun) is shared by most assertions: a full-size forward costs
~1-2 s per image and ~10 s of compile on a 2-core CPU. The contract with older checkpoints: the
config.json files gmic-jax 730583d wrote (tests/fixtures/config_730583d_{convert,train_cache}.json)
with the same weights predict what 730583d predicted (tests/fixtures/sample_exam_730583d.json,
recorded there with the same command), to 1e-6. (Not bit for bit: whether the CLI's XLA:CPU flags
take effect depends on what ran first in the process; measured, they move outputs by < 1e-6.)
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmic_jax import predict as P
from gmic_jax.data import cropping
from gmic_jax.data.image import read_image
from gmic_jax.data.image_to_window import crop_flip_center
from gmic_jax.visualize import figure_size

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "sample_exam_730583d.json").read_text())
TOL = 1e-6


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
        rc = main(
            [
                "predict",
                "--exam-list",
                str(sample_exam_dir / "exam_list_before_cropping.pkl"),
                "--images",
                str(sample_exam_dir / "images"),
                "--segmentations",
                str(sample_exam_dir / "segmentation"),
                "--checkpoint",
                str(converted),
                "--output",
                str(out),
                "--no-progress",
                "--batch-size",
                "4",
                *extra,
            ]
        )
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
    assert header == [
        "image_index",
        "dice_benign",
        "dice_malignant",
        "pxap_benign",
        "pxap_malignant",
        "pointing_benign",
        "pointing_malignant",
        "roi_hit",
    ]
    assert [r[0] for r in rows] == ["0_R-CC", "0_R-MLO"]
    for r in rows:
        assert r[2] == r[4] == r[6] == ""  # no malignant lesion
        assert 0.0 <= float(r[1]) <= 1.0 and 0.0 < float(r[3]) <= 1.0 and r[5] in ("0", "1")
        assert 0.0 <= float(r[7]) <= 1.0


def test_windows_are_placed_at_the_original_best_centres(sample_exam_dir):
    """The one crop-flip-centre function (predict's raw-image path) finds the centres the original
    pipeline wrote for this exam."""
    expected = pickle.load(open(sample_exam_dir / "expected_exam_list.pkl", "rb"))[0]
    for view in VIEWS:
        pixels = read_image(sample_exam_dir / "images" / f"0_{view}.png").to_uint()
        direction = cropping.breast_direction(expected["horizontal_flip"], view[0])
        crop, _, center = crop_flip_center(pixels, view, direction)
        assert tuple(map(int, center)) == tuple(int(v) for v in expected["best_center"][view][0]), view
        assert tuple(map(int, crop.window_location)) == tuple(int(v) for v in expected["window_location"][view][0])


def _predict(sample_exam_dir, checkpoint, out, exam_list=None):
    from gmic_jax.cli import main

    return main(
        [
            "predict",
            "--exam-list",
            str(exam_list or sample_exam_dir / "exam_list_before_cropping.pkl"),
            "--images",
            str(sample_exam_dir / "images"),
            "--segmentations",
            str(sample_exam_dir / "segmentation"),
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(out),
            "--no-progress",
            "--batch-size",
            "4",
        ]
    )


def _assert_golden(out, breasts=None):
    """Every row of OUT's CSVs equals 730583d's for the same image (or breast), to TOL."""
    _, rows = read_csv(out / P.PREDICTIONS_CSV)
    assert rows and {r[0] for r in rows} <= set(GOLDEN["predictions"])
    for r in rows:
        np.testing.assert_allclose([float(v) for v in r[1:3]], GOLDEN["predictions"][r[0]], atol=TOL + 5e-7)
        saliency = np.load(out / P.SALIENCY_DIR / f"{r[0]}.npy").astype(np.float64)
        np.testing.assert_allclose(saliency.max(axis=(1, 2)), GOLDEN["saliency_max"][r[0]], atol=TOL)
        # every cell within TOL: the sum within TOL per cell
        np.testing.assert_allclose(saliency.sum(axis=(1, 2)), GOLDEN["saliency_sum"][r[0]], atol=TOL * saliency[0].size)
    _, rows = read_csv(out / P.BREAST_CSV)
    assert [f"{r[0]}/{r[1]}" for r in rows] == (breasts or list(GOLDEN["breast_predictions"]))
    for r in rows:
        key = f"0/{r[1]}"
        np.testing.assert_allclose([float(v) for v in r[2:4]], GOLDEN["breast_predictions"][key], atol=TOL + 5e-7)
    header, rows = read_csv(out / P.LOCALIZATION_CSV)
    golden_columns = ["dice_benign", "dice_malignant", "pxap_benign", "pxap_malignant", "roi_hit"]  # 730583d's
    for r in rows:
        row = dict(zip(header, r))
        expected = GOLDEN["localization"][r[0]]
        got = [row[c] for c in golden_columns]
        assert [v == "" for v in got] == [v is None for v in expected]
        np.testing.assert_allclose(
            [float(v) for v in got if v != ""], [v for v in expected if v is not None], atol=TOL + 5e-7
        )
        for c, name in enumerate(("benign", "malignant")):  # pointing: newer than the golden; defined with Dice
            assert (row[f"pointing_{name}"] == "") == (row[f"dice_{name}"] == "")
            assert row[f"pointing_{name}"] in ("", "0", "1")
    return rows


def test_predictions_are_those_of_730583d(runs):
    """The converter's checkpoint of today predicts what 730583d's did."""
    _assert_golden(runs[0])


def test_a_730583d_converter_config_predicts_as_730583d(sample_exam_dir, converted, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    shutil.copyfile(FIXTURES / "config_730583d_convert.json", old / "config.json")
    before = (old / "config.json").read_bytes()
    assert _predict(sample_exam_dir, old, tmp_path / "out") == 0
    assert len(_assert_golden(tmp_path / "out")) == 2
    assert (old / "config.json").read_bytes() == before  # read, never rewritten


def test_missing_views_with_a_730583d_training_run_config(sample_exam_dir, converted, tmp_path):
    """A cache-trained run's config.json of 730583d ("gmic" preprocessing, a training section) with
    the converted weights, on exams with a breast missing -- absent keys in one exam, empty lists
    in the other: every image there is is predicted as 730583d predicted it, exit status 0."""
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    shutil.copyfile(FIXTURES / "config_730583d_train_cache.json", old / "config.json")
    exam = pickle.load(open(sample_exam_dir / "exam_list_before_cropping.pkl", "rb"))[0]
    left_only = {k: v for k, v in exam.items() if not k.startswith("R-")}
    right_only = dict(exam, **{"L-CC": [], "L-MLO": []})
    with open(tmp_path / "exams.pkl", "wb") as f:
        pickle.dump([left_only, right_only], f)
    assert _predict(sample_exam_dir, old, tmp_path / "out", tmp_path / "exams.pkl") == 0
    assert not (tmp_path / "out" / P.FAILURES_TXT).exists()
    _, rows = read_csv(tmp_path / "out" / P.PREDICTIONS_CSV)
    assert [r[0] for r in rows] == ["0_L-CC", "0_L-MLO", "0_R-CC", "0_R-MLO"]
    locs = _assert_golden(tmp_path / "out", breasts=["0/L", "1/R"])
    assert [r[0] for r in locs] == ["0_R-CC", "0_R-MLO"]
