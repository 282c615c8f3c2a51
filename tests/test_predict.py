"""gmic-jax predict on small synthetic exams with a small model: outputs, batching, ensembles, TTA,
the input modes (exam list raw / preprocessed, DICOM) and every kind of bad input."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gmic_jax import GMIC, GMICConfig, init_variables, metrics
from gmic_jax import predict as P
from gmic_jax.checkpoint import CheckpointError, save_checkpoint
from gmic_jax.data import cropping
from gmic_jax.data.exam_list import save_exam_list
from gmic_jax.data.image import write_png
from gmic_jax.data.image_to_window import crop_flip_center, gmic_window
from gmic_jax.data.testing import breast_image, corrupt_copy
from gmic_jax.data.window import place_window
from gmic_jax.preprocessing import Preprocessing, SyntheticData, normalize_images
from gmic_jax.visualize import figure_size

CFG = GMICConfig(image_shape=(256, 192), crop_shape=(48, 48), K=3, percent_t=0.05)
PREP = Preprocessing("original", (256, 192), "standardize", iterations=3, buffer_size=4)
VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
GRID = (4, 3)  # saliency grid of a 256 x 192 window
# Same images through differently shaped (batch size, ensemble, devices) compiled functions: XLA
# picks other convolution tilings, so float32 sums are reassociated; measured here up to 2e-6
# relative. A real dependence on the batch (statistics over it, padding rows leaking in) moves
# outputs by orders of magnitude more (images here differ from each other by > 1e-3).
FLOAT_TOL = dict(rtol=1e-5, atol=1e-6)


def random_variables(config: GMICConfig, seed: int):
    """Variables of GMIC(config) with He-scaled random weights and non-trivial batch statistics,
    made in numpy from the parameter shapes (no compile: init on this CPU takes ~30 s)."""
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return (0.5 + rng.random(s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def write_exams(root: Path, exams_spec, seed: int = 0, shape=(300, 220)):
    """Stored 16-bit PNGs (``shape``) + an exam list. ``exams_spec``: per exam, {view: number of images}.
    horizontal_flip 'NO': left breasts point right, right breasts point left (as stored)."""
    images = root / "images"
    exams = []
    for e, counts in enumerate(exams_spec):
        exam = {
            "horizontal_flip": "NO",
            "cancer_label": {
                "left_benign": 0,
                "left_malignant": e % 2,
                "right_benign": 1,
                "right_malignant": 0,
                "benign": 1,
                "malignant": e % 2,
                "unknown": 0,
            },
        }
        for k, view in enumerate(VIEWS):
            names = []
            for j in range(counts.get(view, 1)):
                name = f"{e}_{view}" + (f"_{j}" if j else "")
                img = breast_image(*shape, seed=seed + 100 * e + 10 * k + j, points_right=view[0] == "L")
                write_png(images / f"{name}.png", img)
                names.append(name)
            exam[view] = names
        exams.append(exam)
    save_exam_list(root / "exams.pkl", exams)
    return root / "exams.pkl", images


@functools.lru_cache(maxsize=None)
def direct_apply(config: GMICConfig):
    """jit(GMIC(config).apply) -> y_fusion, one per config for the whole module (compiles are slow)."""
    return jax.jit(lambda v, x: GMIC(config).apply(v, x)["y_fusion"])


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def preds_of(result):
    return {r["image_index"]: np.array([r["benign_pred"], r["malignant_pred"]]) for r in result.predictions}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    save_checkpoint(root / "a", CFG, random_variables(CFG, 0), PREP)
    save_checkpoint(root / "b", CFG.replace(percent_t=0.2), random_variables(CFG, 1), PREP)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two exams, nine images (exam 0 has two L-CC images): batches of 4 leave the last one padded.
    Segmentations (window frame): a benign lesion on 0_R-CC, a malignant one on 1_L-MLO."""
    root = tmp_path_factory.mktemp("exams")
    exam_list, images = write_exams(root, [{"L-CC": 2}, {}])
    seg = root / "segmentations"
    benign = np.zeros(CFG.image_shape, np.uint8)
    benign[100:130, 40:80] = 255
    malignant = np.zeros(CFG.image_shape, np.uint8)
    malignant[30:50, 20:35] = 255
    malignant[200:215, 100:120] = 255
    write_png(seg / "0_R-CC_benign.png", benign)
    write_png(seg / "1_L-MLO_malignant.png", malignant)
    return {"root": root, "exam_list": exam_list, "images": images, "seg": seg}


@pytest.fixture(scope="module")
def baseline(checkpoints, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    result = P.predict(
        [checkpoints[0]],
        out,
        exam_list=data["exam_list"],
        images_dir=data["images"],
        visualize=True,
        segmentations_dir=data["seg"],
        batch_size=4,
        workers=2,
        progress=False,
    )
    return result, out


def test_outputs(baseline, data):
    result, out = baseline
    assert result.ok and not (out / P.FAILURES_TXT).exists()
    header, rows = read_csv(out / P.PREDICTIONS_CSV)
    assert header == ["image_index", "benign_pred", "malignant_pred", "benign_label", "malignant_label"]
    names = [r[0] for r in rows]
    assert names == ["0_L-CC", "0_L-CC_1", "0_R-CC", "0_L-MLO", "0_R-MLO", "1_L-CC", "1_R-CC", "1_L-MLO", "1_R-MLO"]
    by_name = {r[0]: r for r in rows}
    assert by_name["1_L-MLO"][3:] == ["0", "1"] and by_name["0_R-CC"][3:] == ["1", "0"]
    preds = preds_of(result)
    for r in rows:
        assert np.allclose([float(r[1]), float(r[2])], preds[r[0]], atol=5e-7)
        assert 0.0 < float(r[1]) < 1.0 and 0.0 < float(r[2]) < 1.0
    assert len({tuple(np.round(p, 6)) for p in preds.values()}) == len(preds)  # every image its own

    # Breast level: mean of the breast's CC and MLO (CC itself the mean of exam 0's two L-CC images).
    header, rows = read_csv(out / P.BREAST_CSV)
    assert header == ["exam", "breast", "benign_pred", "malignant_pred", "benign_label", "malignant_label"]
    assert [(r[0], r[1]) for r in rows] == [("0", "L"), ("0", "R"), ("1", "L"), ("1", "R")]
    left0 = ((preds["0_L-CC"] + preds["0_L-CC_1"]) / 2 + preds["0_L-MLO"]) / 2
    assert np.allclose([float(v) for v in rows[0][2:4]], left0, atol=5e-7)
    assert np.allclose([float(v) for v in rows[3][2:4]], (preds["1_R-CC"] + preds["1_R-MLO"]) / 2, atol=5e-7)
    assert rows[2][4:] == ["0", "1"] and rows[1][4:] == ["1", "0"]

    # Saliency maps: (2, h, w) float32, benign then malignant, in [0, 1].
    saliency = {p.stem: np.load(p) for p in (out / P.SALIENCY_DIR).glob("*.npy")}
    assert sorted(saliency) == sorted(names)
    for s in saliency.values():
        assert s.shape == (2, *GRID) and s.dtype == np.float32 and 0 <= s.min() and s.max() <= 1
    assert not np.array_equal(saliency["0_L-CC"][0], saliency["0_L-CC"][1])

    # One figure per image, of the documented size.
    pngs = sorted((out / P.VISUALIZATION_DIR).glob("*.png"))
    assert [p.stem for p in pngs] == sorted(names)
    for p in pngs:
        assert Image.open(p).size == figure_size(CFG.image_shape, CFG.crop_shape, CFG.K) == (2100, 440)


def test_localization_csv(baseline, data):
    result, out = baseline
    header, rows = read_csv(out / P.LOCALIZATION_CSV)
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
    assert [r[0] for r in rows] == ["0_R-CC", "1_L-MLO"]  # only images with a lesion
    benign_row, malignant_row = rows
    assert benign_row[2] == benign_row[4] == benign_row[6] == ""  # no malignant lesion: undefined
    assert malignant_row[1] == malignant_row[3] == malignant_row[5] == ""
    # Recompute from the written saliency map with the training metrics.
    for row, name, c, seg in (
        (benign_row, "0_R-CC", 0, "0_R-CC_benign"),
        (malignant_row, "1_L-MLO", 1, "1_L-MLO_malignant"),
    ):
        sal = np.load(out / P.SALIENCY_DIR / f"{name}.npy")[c]
        mask = np.asarray(Image.open(data["seg"] / f"{seg}.png")) > 0
        assert float(row[1 + c]) == pytest.approx(metrics.dice(sal, mask), abs=1e-6)
        assert float(row[3 + c]) == pytest.approx(metrics.pxap(sal, mask), abs=1e-6)
        assert row[5 + c] == str(int(metrics.pointing_hit(sal, mask)))  # "1" or "0"
        assert 0.0 <= float(row[7]) <= 1.0
    # The malignant mask has two lesions: the hit rate is a multiple of 1/2.
    assert float(malignant_row[7]) in (0.0, 0.5, 1.0)


def test_predictions_do_not_depend_on_batch_size(baseline, checkpoints, data, tmp_path):
    result, out = baseline
    one = P.predict(
        [checkpoints[0]],
        tmp_path,
        exam_list=data["exam_list"],
        images_dir=data["images"],
        batch_size=1,
        workers=0,
        progress=False,
    )
    a, b = preds_of(result), preds_of(one)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], **FLOAT_TOL)
        np.testing.assert_allclose(
            np.load(tmp_path / P.SALIENCY_DIR / f"{k}.npy"), np.load(out / P.SALIENCY_DIR / f"{k}.npy"), **FLOAT_TOL
        )


def test_outputs_do_not_depend_on_the_number_of_loader_processes(baseline, checkpoints, data, tmp_path):
    """The baseline loads its images in 2 worker processes; loaded in this process (workers=0)
    every output is the same, bit for bit (the same windows through the same compiled function)."""
    result, out = baseline
    again = P.predict(
        [checkpoints[0]],
        tmp_path,
        exam_list=data["exam_list"],
        images_dir=data["images"],
        segmentations_dir=data["seg"],
        batch_size=4,
        workers=0,
        progress=False,
    )
    assert again.ok and again.predictions == result.predictions and again.localization == result.localization
    for name in (P.PREDICTIONS_CSV, P.BREAST_CSV, P.LOCALIZATION_CSV):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    names = sorted(p.name for p in (out / P.SALIENCY_DIR).glob("*.npy"))
    assert names == sorted(p.name for p in (tmp_path / P.SALIENCY_DIR).glob("*.npy")) and len(names) == 9
    for name in names:
        np.testing.assert_array_equal(np.load(tmp_path / P.SALIENCY_DIR / name), np.load(out / P.SALIENCY_DIR / name))


def test_ensemble_is_mean_of_single_models(baseline, checkpoints, data, tmp_path):
    single_a = preds_of(baseline[0])
    single_b = preds_of(
        P.predict(
            [checkpoints[1]], tmp_path / "b", exam_list=data["exam_list"], images_dir=data["images"], progress=False
        )
    )
    both = P.predict(
        list(checkpoints), tmp_path / "ab", exam_list=data["exam_list"], images_dir=data["images"], progress=False
    )
    ens = preds_of(both)
    for k in ens:
        np.testing.assert_allclose(ens[k], (single_a[k] + single_b[k]) / 2, **FLOAT_TOL)
        np.testing.assert_allclose(both.per_model[k], np.stack([single_a[k], single_b[k]]), **FLOAT_TOL)
        assert np.abs(ens[k] - single_a[k]).max() > 1e-3 and np.abs(ens[k] - single_b[k]).max() > 1e-3
    # Saliency maps and figures are the first model's.
    for k in ens:
        np.testing.assert_allclose(
            np.load(tmp_path / "ab" / P.SALIENCY_DIR / f"{k}.npy"),
            np.load(baseline[1] / P.SALIENCY_DIR / f"{k}.npy"),
            **FLOAT_TOL,
        )


def test_load_image_is_the_original_pipeline(data):
    """An exam-list image goes through gmic_window, flipped by horizontal_flip; gmic_window places
    the crop and centre of crop_flip_center (also behind gmic-jax preprocess)."""
    from gmic_jax.data.image import read_image

    for view in VIEWS:
        path = data["images"] / f"1_{view}.png"
        loaded = P.load_image(P.ImageTask(f"1_{view}", view, str(path), horizontal_flip="NO"), PREP)
        pixels = read_image(path).to_uint()
        direction = cropping.breast_direction("NO", view[0])
        expected, _ = gmic_window(
            pixels,
            view,
            direction=direction,
            window_shape=PREP.window_shape,
            iterations=PREP.iterations,
            buffer_size=PREP.buffer_size,
        )
        assert loaded.window.dtype == np.float32 and loaded.window.shape == PREP.window_shape
        np.testing.assert_array_equal(loaded.window, expected)
        _, flipped, center = crop_flip_center(
            pixels, view, direction, PREP.window_shape, PREP.iterations, PREP.buffer_size
        )
        np.testing.assert_array_equal(place_window(flipped, view, center, PREP.window_shape), expected)
        # Without horizontal_flip (DICOM) the orientation is read off the image: the same here.
        guessed = P.load_image(P.ImageTask(f"1_{view}", view, str(path)), PREP)
        np.testing.assert_array_equal(guessed.window, expected)


def test_preprocessed_mode_reads_cropped_images(baseline, checkpoints, data, tmp_path):
    """gmic-jax preprocess layout (stored crops, not flipped + best_center) gives the same windows."""
    from gmic_jax.data.exam_list import load_exam_list

    exams = load_exam_list(data["exam_list"])
    for exam in exams:
        exam["best_center"] = {}
        for view in VIEWS:
            exam["best_center"][view] = []
            for name in exam[view]:
                pixels = np.asarray(Image.open(data["images"] / f"{name}.png")).astype(np.uint16)
                direction = cropping.breast_direction("NO", view[0])
                _, source, center = crop_flip_center(
                    pixels, view, direction, PREP.window_shape, PREP.iterations, PREP.buffer_size
                )
                stored = source[:, ::-1] if direction == "left" else source
                write_png(tmp_path / "cropped" / f"{name}.png", np.ascontiguousarray(stored))
                exam["best_center"][view].append(tuple(np.int64(v) for v in center))
    save_exam_list(tmp_path / "exams.pkl", exams)
    result = P.predict(
        [checkpoints[0]],
        tmp_path / "out",
        exam_list=tmp_path / "exams.pkl",
        images_dir=tmp_path / "cropped",
        preprocessed=True,
        progress=False,
    )
    assert result.ok
    base = preds_of(baseline[0])
    for k, v in preds_of(result).items():
        np.testing.assert_array_equal(v, base[k])

    # Without best_center, --preprocessed names the exam and the exam list.
    del exams[1]["best_center"]
    save_exam_list(tmp_path / "exams2.pkl", exams)
    result = P.predict(
        [checkpoints[0]],
        tmp_path / "out2",
        exam_list=tmp_path / "exams2.pkl",
        images_dir=tmp_path / "cropped",
        preprocessed=True,
        progress=False,
    )
    assert [r["image_index"][0] for r in result.predictions] == ["0"] * 5
    assert len(result.failures) == 1 and "exam 1" in str(result.failures[0])
    assert "exams2.pkl" in str(result.failures[0]) and "best_center" in str(result.failures[0])


# ------------------------------------------------------------------------------------------- TTA


def test_tta_draws_the_papers_augmentation_for_a_checkpoint_without_training_record(
    baseline, checkpoints, data, tmp_path
):
    """A converted-style checkpoint records no training augmentation: --tta draws the paper's
    ranges on device (gmic_jax.augment.tta_augment), keyed by (seed, image name, draw)."""
    from gmic_jax.augment import AugmentConfig, augment_batch
    from gmic_jax.checkpoint import load_checkpoint
    from gmic_jax.data.exam_list import load_exam_list

    save_exam_list(tmp_path / "exam1.pkl", load_exam_list(data["exam_list"])[1:])  # 4 images
    kw = dict(exam_list=tmp_path / "exam1.pkl", images_dir=data["images"], progress=False)
    r1 = P.predict([checkpoints[0]], tmp_path / "s0", tta=2, seed=0, **kw)
    r2 = P.predict([checkpoints[0]], tmp_path / "s0b", tta=2, seed=0, workers=0, **kw)
    r3 = P.predict([checkpoints[0]], tmp_path / "s1", tta=2, seed=1, **kw)
    p1, p2, p3, p0 = preds_of(r1), preds_of(r2), preds_of(r3), preds_of(baseline[0])
    assert sorted(p1) == ["1_L-CC", "1_L-MLO", "1_R-CC", "1_R-MLO"]
    for k in p1:
        np.testing.assert_array_equal(p2[k], p1[k])  # seeded
    assert max(np.abs(p1[k] - p3[k]).max() for k in p1) > 1e-4  # another seed, other draws
    assert max(np.abs(p1[k] - p0[k]).max() for k in p1) > 1e-4  # TTA changes the prediction
    # Saliency maps stay those of the un-augmented window.
    np.testing.assert_allclose(
        np.load(tmp_path / "s0" / P.SALIENCY_DIR / "1_R-CC.npy"),
        np.load(baseline[1] / P.SALIENCY_DIR / "1_R-CC.npy"),
        **FLOAT_TOL,
    )

    # Independently: the documented draws through the model, averaged.
    config, variables = load_checkpoint(checkpoints[0])
    task = P.ImageTask("1_R-CC", "R-CC", str(data["images"] / "1_R-CC.png"), horizontal_flip="NO")
    x = np.asarray(normalize_images(P.load_image(task, PREP).window[None, ..., None]))
    base = jax.random.key(0)
    h = zlib.crc32(b"1_R-CC") & 0x7FFFFFFF
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base, h), d) for d in (1, 2)])
    xa = augment_batch(keys, jnp.repeat(x, 2, axis=0), AugmentConfig())
    y = np.asarray(direct_apply(config)(variables, jnp.concatenate([xa, xa])))  # 4 rows: shared compile
    np.testing.assert_allclose(p1["1_R-CC"], y[:2].mean(axis=0), **FLOAT_TOL)


def test_missing_views_and_unknown_labels(baseline, checkpoints, data, tmp_path, capsys):
    """One breast absent (keys deleted), one view empty, a label unknown: every image there is is
    predicted, breast rows only for breasts with images, unknown cells empty, exit status 0."""
    from gmic_jax.cli import main
    from gmic_jax.data.exam_list import load_exam_list

    exams = load_exam_list(data["exam_list"])
    del exams[0]["R-CC"], exams[0]["R-MLO"]  # exam 0: the right breast is absent
    exams[1]["L-CC"] = []  # exam 1: no left CC
    del exams[1]["cancer_label"]["right_malignant"]  # exam 1: right malignant label unknown
    save_exam_list(tmp_path / "exams.pkl", exams)
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            "--exam-list",
            str(tmp_path / "exams.pkl"),
            "--images",
            str(data["images"]),
            "--checkpoint",
            str(checkpoints[0]),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and not (out / P.FAILURES_TXT).exists()
    assert "2 exam(s), 6 image(s)" in capsys.readouterr().out
    _, rows = read_csv(out / P.PREDICTIONS_CSV)
    assert [r[0] for r in rows] == ["0_L-CC", "0_L-CC_1", "0_L-MLO", "1_R-CC", "1_L-MLO", "1_R-MLO"]
    base = preds_of(baseline[0])
    for r in rows:  # the same numbers as with the full exams
        np.testing.assert_allclose([float(r[1]), float(r[2])], base[r[0]], atol=5e-7 + 1e-6)
    labels = {r[0]: r[3:] for r in rows}
    assert labels["1_R-CC"] == labels["1_R-MLO"] == ["1", ""] and labels["1_L-MLO"] == ["0", "1"]
    _, breast_rows = read_csv(out / P.BREAST_CSV)
    assert [r[:2] for r in breast_rows] == [["0", "L"], ["1", "L"], ["1", "R"]]
    assert np.allclose([float(v) for v in breast_rows[1][2:4]], base["1_L-MLO"], atol=2e-6)  # only its MLO
    assert breast_rows[2][4:] == ["1", ""]
    assert sorted(p.stem for p in (out / P.SALIENCY_DIR).glob("*.npy")) == sorted(r[0] for r in rows)


# ------------------------------------------------------------------------------------ bad input


def _bad_exam_list(root: Path, case: str):
    exam_list, images = write_exams(root, [{}, {}])
    from gmic_jax.data.exam_list import load_exam_list

    exams = load_exam_list(exam_list)
    if case == "missing":
        os.remove(images / "1_R-MLO.png")
        return exam_list, images, "1_R-MLO.png", "not found"
    if case == "corrupt":
        corrupt_copy(images / "1_L-CC.png", root / "tmp.png", 0.3)
        shutil.move(root / "tmp.png", images / "1_L-CC.png")
        return exam_list, images, "1_L-CC.png", "corrupt or truncated PNG"
    if case == "schema":
        exams[1]["horizontal_flip"] = "MAYBE"
        save_exam_list(exam_list, exams)
        return exam_list, images, "exams.pkl", "horizontal_flip must be 'YES' or 'NO', got 'MAYBE'"
    if case == "no image":
        for view in VIEWS:
            exams[1][view] = []
        save_exam_list(exam_list, exams)
        return exam_list, images, "exams.pkl", "no image: every view"
    if case == "blank":
        write_png(images / "1_L-MLO.png", np.zeros((300, 220), np.uint16))
        return exam_list, images, "1_L-MLO.png", "no breast found"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "corrupt", "schema", "blank", "no image"])
def test_bad_input_names_exam_and_file_and_keeps_the_other_exams(case, checkpoints, tmp_path, capsys):
    from gmic_jax.cli import main

    exam_list, images, file_part, problem = _bad_exam_list(tmp_path, case)
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            "--exam-list",
            str(exam_list),
            "--images",
            str(images),
            "--checkpoint",
            str(checkpoints[0]),
            "--output",
            str(out),
            "--no-progress",
            "--workers",
            "2" if case == "corrupt" else "0",
        ]
    )  # a bad file in a worker process, too
    assert rc == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "exam 1" in line and file_part in line and problem in line, line
    # Only exam 0, complete rows only, everywhere.
    header, rows = read_csv(out / P.PREDICTIONS_CSV)
    assert [r[0] for r in rows] == ["0_L-CC", "0_R-CC", "0_L-MLO", "0_R-MLO"]
    assert all(all(cell != "" for cell in r) for r in rows)
    _, breast_rows = read_csv(out / P.BREAST_CSV)
    assert [r[0] for r in breast_rows] == ["0", "0"]
    assert sorted(p.stem for p in (out / P.SALIENCY_DIR).glob("*.npy")) == sorted(r[0] for r in rows)
    assert "exam 1" in (out / P.FAILURES_TXT).read_text()


def test_unreadable_exam_list(checkpoints, tmp_path, capsys):
    from gmic_jax.cli import main

    (tmp_path / "exams.pkl").write_bytes(b"not a pickle")
    rc = main(
        [
            "predict",
            "--exam-list",
            str(tmp_path / "exams.pkl"),
            "--images",
            str(tmp_path),
            "--checkpoint",
            str(checkpoints[0]),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 1
    assert "exams.pkl: malformed exam list" in capsys.readouterr().err
    _, rows = read_csv(tmp_path / "out" / P.PREDICTIONS_CSV)
    assert rows == []


def test_checkpoint_of_another_architecture(checkpoints, data, tmp_path, capsys):
    from gmic_jax.cli import main

    bad = tmp_path / "resnet34"
    shutil.copytree(checkpoints[0], bad)
    doc = json.loads((bad / "config.json").read_text())
    doc["model"]["local_net"] = "resnet34"
    (bad / "config.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    (out).mkdir()
    (out / P.PREDICTIONS_CSV).write_text("stale\n")  # a stale output must not survive
    rc = main(
        [
            "predict",
            "--exam-list",
            str(data["exam_list"]),
            "--images",
            str(data["images"]),
            "--checkpoint",
            str(checkpoints[0]),
            "--checkpoint",
            str(bad),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "not those of the architecture" in err and "local_net=resnet34" in err
    assert "dn_resnet" in err
    assert not (out / P.PREDICTIONS_CSV).exists() and (out / P.FAILURES_TXT).exists()

    # Ensemble members that take different windows.
    other = tmp_path / "other"
    save_checkpoint(
        other,
        CFG.replace(image_shape=(128, 96)),
        random_variables(CFG, 2),
        dataclasses.replace(PREP, window_shape=(128, 96)),
    )
    with pytest.raises(CheckpointError, match="an ensemble needs one input"):
        P.load_models([checkpoints[0], other])
    # A config.json whose window is not the model's.
    doc = json.loads((other / "config.json").read_text())
    doc["preprocessing"]["window_shape"] = [256, 192]
    (other / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="window_shape \\[256, 192\\] differs from the model's image_shape"):
        P.load_models([other])
    with pytest.raises(CheckpointError, match="not a gmic-jax checkpoint"):
        P.load_models([tmp_path])


# ----------------------------------------------------------------------------------------- DICOM


def _write_study(root: Path, study_uid: str, seed: int, views=VIEWS, view_positions=None):
    import pydicom

    from gmic_jax.data.testing import write_dicom

    paths = []
    for k, view in enumerate(views):
        pixels = breast_image(300, 220, seed=seed + 10 * k, points_right=view[0] == "L")
        position = (view_positions or {}).get(view, view[2:])
        path = write_dicom(root / f"{view}.dcm", pixels, laterality=view[0], view=position, bits_stored=12)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_dicom_mode_groups_by_study_and_matches_exam_list_mode(checkpoints, tmp_path, capsys):
    from gmic_jax.cli import main

    pytest.importorskip("pydicom")
    root = tmp_path / "dicom"
    _write_study(root / "a", "1.2.3.1", seed=0)
    _write_study(root / "b", "1.2.3.2", seed=0, views=("R-CC", "R-MLO"), view_positions={"R-MLO": "LM"})
    _write_study(root / "c", "1.2.3.3", seed=50, views=("L-CC", "L-MLO"))
    (root / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    out = tmp_path / "out"
    rc = main(
        ["predict", "--dicom", str(root), "--checkpoint", str(checkpoints[0]), "--output", str(out), "--no-progress"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "exam 1.2.3.2:" in err and "R-MLO.dcm" in err and "unknown view" in err and "'LM'" in err
    assert "junk.dcm" in err
    header, rows = read_csv(out / P.PREDICTIONS_CSV)
    assert [r[0] for r in rows] == ["a__L-CC", "a__R-CC", "a__L-MLO", "a__R-MLO", "c__L-CC", "c__L-MLO"]
    assert all(r[3] == r[4] == "" for r in rows)  # labels unknown
    _, breast_rows = read_csv(out / P.BREAST_CSV)
    assert [r[:2] for r in breast_rows] == [["1.2.3.1", "L"], ["1.2.3.1", "R"], ["1.2.3.3", "L"]]

    # One file is a study of one image.
    exams, failures = P.exams_from_dicom(root / "c" / "L-MLO.dcm")
    assert not failures and [(e.exam_id, [t.image_index for t in e.images]) for e in exams] == [("1.2.3.3", ["L-MLO"])]

    # Same pixels through the exam-list path (flip from horizontal_flip instead of the image): same numbers.
    exam_list, images = write_exams(tmp_path / "png", [{}], seed=0)
    ref = P.predict([checkpoints[0]], tmp_path / "ref", exam_list=exam_list, images_dir=images, progress=False)
    ref_preds = preds_of(ref)
    for r in rows[:4]:
        view = r[0].split("__")[1]
        np.testing.assert_allclose([float(r[1]), float(r[2])], ref_preds[f"0_{view}"], atol=5e-7)


# ------------------------------------------------------------------------------- CLI, devices


def test_cli_reports_exams_per_second(checkpoints, data, tmp_path, capsys):
    from gmic_jax.cli import main

    rc = main(
        [
            "predict",
            "--exam-list",
            str(data["exam_list"]),
            "--images",
            str(data["images"]),
            "--checkpoint",
            str(checkpoints[0]),
            "--output",
            str(tmp_path),
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "2 exam(s), 9 image(s)" in captured.out and "exams/s" in captured.out
    assert "predict" in captured.err and "9/9" in captured.err  # the progress bar
    assert (
        main(
            [
                "predict",
                "--exam-list",
                str(data["exam_list"]),
                "--checkpoint",
                str(checkpoints[0]),
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )


def test_cli_tta_is_the_mean_of_the_seeded_draws(baseline, checkpoints, data, tmp_path):
    """`gmic-jax predict --tta 2 --seed 5`: every image's predictions.csv row is the mean of its two
    draws keyed fold_in(fold_in(key(5), crc32(name)), d), d = 1, 2 (the paper's augmentation: the
    checkpoint records no training), computed here; not the plain prediction."""
    from gmic_jax.augment import AugmentConfig, augment_batch
    from gmic_jax.checkpoint import load_checkpoint
    from gmic_jax.cli import main
    from gmic_jax.data.exam_list import load_exam_list

    save_exam_list(tmp_path / "exam1.pkl", load_exam_list(data["exam_list"])[1:])  # 4 images
    assert (
        main(
            [
                "predict",
                "--exam-list",
                str(tmp_path / "exam1.pkl"),
                "--images",
                str(data["images"]),
                "--checkpoint",
                str(checkpoints[0]),
                "--output",
                str(tmp_path / "out"),
                "--tta",
                "2",
                "--seed",
                "5",
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    _, rows = read_csv(tmp_path / "out" / P.PREDICTIONS_CSV)
    assert json.loads((tmp_path / "out" / P.RUN_JSON).read_text())["tta"] == 2
    config, variables = load_checkpoint(checkpoints[0])
    plain = preds_of(baseline[0])
    assert [r[0] for r in rows] == ["1_L-CC", "1_R-CC", "1_L-MLO", "1_R-MLO"]
    for name, benign, malignant in (r[:3] for r in rows):
        task = P.ImageTask(name, name[2:], str(data["images"] / f"{name}.png"), horizontal_flip="NO")
        x = np.asarray(normalize_images(P.load_image(task, PREP).window[None, ..., None]))
        h = zlib.crc32(name.encode()) & 0x7FFFFFFF
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(5), h), d) for d in (1, 2)])
        xa = augment_batch(keys, jnp.repeat(x, 2, axis=0), AugmentConfig())
        y = np.asarray(direct_apply(config)(variables, jnp.concatenate([xa, xa])))  # 4 rows: shared compile
        # The CSV holds 6 decimals: 5e-7 of rounding on top of FLOAT_TOL.
        np.testing.assert_allclose([float(benign), float(malignant)], y[:2].mean(axis=0), rtol=1e-5, atol=1.5e-6)
        assert np.abs(y[:2].mean(axis=0) - plain[name]).max() > 1e-4  # the draws change the prediction


def test_cli_preprocess_then_predict_preprocessed_equals_the_raw_images(tmp_path):
    """`gmic-jax preprocess` (the original's cropping and centres, for the original's 2944 x 1920
    window) then `gmic-jax predict --preprocessed` on its output: the same predictions and saliency
    maps as `gmic-jax predict` on the stored images with a checkpoint of that preprocessing (a
    narrow model at the original's window size, so that the centres preprocess finds are the ones
    it needs)."""
    from gmic_jax.cli import main
    from gmic_jax.data.exam_list import load_exam_list

    config = GMICConfig(global_blocks=(1,) * 5, global_widths=(4,) * 5, K=2, crop_shape=(32, 32))
    assert config.image_shape == Preprocessing().window_shape
    save_checkpoint(tmp_path / "ckpt", config, random_variables(config, 7), Preprocessing())
    # One exam of 4 images whose breasts are taller than the window (so that the window's place, the
    # centre, matters) and wide enough for the original's 100 erosions (the module's are too small).
    exam_list, images = write_exams(tmp_path / "stored", [{}], seed=11, shape=(4800, 400))
    assert (
        main(
            [
                "preprocess",
                "--exam-list",
                str(exam_list),
                "--images",
                str(images),
                "--output",
                str(tmp_path / "pre"),
                "--num-workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert all("best_center" in exam for exam in load_exam_list(tmp_path / "pre" / "exam_list.pkl"))
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert (
        main(
            [
                "predict",
                "--exam-list",
                str(exam_list),
                "--images",
                str(images),
                "--output",
                str(tmp_path / "raw"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--exam-list",
                str(tmp_path / "pre" / "exam_list.pkl"),
                "--preprocessed",
                "--images",
                str(tmp_path / "pre" / "cropped_images"),
                "--output",
                str(tmp_path / "pre_out"),
                *common,
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "pre_out" / P.RUN_JSON).read_text())["preprocessed"] is True
    # The same windows through the same compiled function: equal to the last bit.
    raw_header, raw_rows = read_csv(tmp_path / "raw" / P.PREDICTIONS_CSV)
    assert read_csv(tmp_path / "pre_out" / P.PREDICTIONS_CSV) == (raw_header, raw_rows)
    for name in (r[0] for r in raw_rows):
        np.testing.assert_array_equal(
            np.load(tmp_path / "pre_out" / P.SALIENCY_DIR / f"{name}.npy"),
            np.load(tmp_path / "raw" / P.SALIENCY_DIR / f"{name}.npy"),
        )
    # The images' predictions differ from each other: a window placed elsewhere would show.
    assert len({tuple(r[1:3]) for r in raw_rows}) == len(raw_rows)


def test_predictions_split_over_four_devices_equal_one_device(baseline, checkpoints, data, tmp_path):
    script = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_num_cpu_devices", 4)
        import json
        from gmic_jax import predict as P
        assert len(jax.local_devices()) == 4
        r = P.predict([{str(checkpoints[0])!r}], {str(tmp_path)!r}, exam_list={str(data["exam_list"])!r},
                      images_dir={str(data["images"])!r}, batch_size=4, progress=False)
        print(json.dumps({{row["image_index"]: [row["benign_pred"], row["malignant_pred"]] for row in r.predictions}}))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    base = preds_of(baseline[0])
    assert got.keys() == base.keys()
    for k in base:
        np.testing.assert_allclose(got[k], base[k], **FLOAT_TOL)


# ----------------------------------------------------- window preprocessing (synthetic data)


def write_synthetic_exam(root: Path, seed: int, split: str = "val", exam: int = 0, shape=(256, 192)):
    """Breasts 2*exam (left) and 2*exam + 1 (right) of the synthetic data as an exam list of
    windows (PNG), with their lesion masks as segmentations."""
    from gmic_jax.data.synthetic import SyntheticSpec, render

    spec = SyntheticSpec(image_shape=shape)
    entry = {"horizontal_flip": "NO", "cancer_label": {}}
    for index in range(4 * exam, 4 * exam + 4):
        ex = render(seed, split, index, spec)
        view, name = str(ex["view"]), f"syn{exam}_{ex['view']}"
        write_png(root / "images" / f"{name}.png", ex["image"][..., 0])
        for c, cls in enumerate(("benign", "malignant")):
            if ex["mask"][..., c].any():
                write_png(root / "segmentations" / f"{name}_{cls}.png", ex["mask"][..., c] * np.uint8(255))
            entry["cancer_label"][f"{'left' if view[0] == 'L' else 'right'}_{cls}"] = int(ex["label"][c])
        entry[view] = [name]
    save_exam_list(root / "exams.pkl", [entry])
    return root / "exams.pkl", root / "images", root / "segmentations"


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A checkpoint as a synthetic training workdir records it (preprocessing 'window' with its
    synthetic data, the training config's augment section)."""
    from gmic_jax.checkpoint import write_config

    d = tmp_path_factory.mktemp("synthetic_ckpt")
    prep = Preprocessing("window", (256, 192), synthetic=SyntheticData(seed=0))
    save_checkpoint(d, CFG, random_variables(CFG, 5), prep)
    augment = {
        "enabled": True,
        "flip": False,
        "rotation_deg": 5.0,
        "translation": 0.05,
        "scale": [0.9, 1.1],
        "shear_deg": 0.0,
        "noise_sigma": 0.01,
    }
    write_config(d, CFG, prep, train={"augment": augment, "seed": 0})
    return d


def test_window_preprocessing_and_on_device_tta(synthetic_checkpoint, tmp_path):
    from gmic_jax.augment import AugmentConfig, augment_batch
    from gmic_jax.checkpoint import load_checkpoint

    exam_list, images, seg = write_synthetic_exam(tmp_path, seed=3)
    kw = dict(exam_list=exam_list, images_dir=images, progress=False)
    plain = P.predict([synthetic_checkpoint], tmp_path / "plain", segmentations_dir=seg, **kw)
    assert plain.ok and len(plain.predictions) == 4

    # 'synthetic' = the files are the windows: only normalised, no crop, no flip.
    config, variables = load_checkpoint(synthetic_checkpoint)
    names = [r["image_index"] for r in plain.predictions]
    x = np.stack([np.asarray(Image.open(images / f"{n}.png"), np.float32) for n in names])[..., None]
    x = np.asarray(normalize_images(x, "standardize"))
    apply = direct_apply(config)
    direct = np.asarray(apply(variables, x))
    np.testing.assert_allclose(np.stack([preds_of(plain)[n] for n in names]), direct, **FLOAT_TOL)

    # TTA on device with the augmentation the training config recorded; seeded per image and draw.
    t1 = preds_of(P.predict([synthetic_checkpoint], tmp_path / "t1", tta=2, seed=7, **kw))
    t2 = preds_of(P.predict([synthetic_checkpoint], tmp_path / "t2", tta=2, seed=7, workers=0, **kw))
    for k in t1:
        np.testing.assert_array_equal(t2[k], t1[k])
    assert max(np.abs(t1[k] - preds_of(plain)[k]).max() for k in t1) > 1e-4
    # Independently, from the documented keys. With 3 rows per image and batches of 4, the second
    # image straddles a batch boundary: a key tied to the row's position would show here.
    aug = AugmentConfig(
        flip=False, rotation_deg=5.0, translation=0.05, scale=(0.9, 1.1), shear_deg=0.0, noise_sigma=0.01
    )
    base = jax.random.key(7)
    for i, n in enumerate(names[:2]):
        h = zlib.crc32(n.encode()) & 0x7FFFFFFF
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base, h), d) for d in (1, 2)])
        xa = augment_batch(keys, jnp.repeat(x[i : i + 1], 2, axis=0), aug)
        y = np.asarray(apply(variables, jnp.concatenate([xa, x[:2]])))  # 4 rows: the shared compile
        np.testing.assert_allclose(t1[n], y[:2].mean(axis=0), **FLOAT_TOL)

    # The masks are in the window frame: localization rows for the images with a finding.
    with_lesion = [n for n in names if any((seg / f"{n}_{c}.png").exists() for c in ("benign", "malignant"))]
    assert [r["image_index"] for r in plain.localization] == with_lesion

    # A window of another size is an error naming the file; the exam is left out.
    write_png(images / f"{names[1]}.png", np.zeros((100, 80), np.uint16))
    bad = P.predict([synthetic_checkpoint], tmp_path / "bad", **kw)
    assert bad.predictions == [] and "exam 0" in str(bad.failures[0])
    assert f"{names[1]}.png" in str(bad.failures[0]) and "takes 256x192 windows" in str(bad.failures[0])


def test_synthetic_exams_for_a_synthetic_checkpoint(synthetic_checkpoint, checkpoints, tmp_path):
    """--synthetic N renders the held-out exams the checkpoint's data section describes; the same
    exam written to files and read as an exam list gives the same numbers."""
    from gmic_jax.data.synthetic import SyntheticSpec, breast_labels

    out = tmp_path / "syn"
    result = P.predict([synthetic_checkpoint], out, synthetic=1, visualize=True, progress=False)
    assert result.ok
    names = [r["image_index"] for r in result.predictions]
    assert names == ["synthetic0_L-CC", "synthetic0_R-CC", "synthetic0_L-MLO", "synthetic0_R-MLO"]
    spec = SyntheticSpec(image_shape=(256, 192))
    for r in result.predictions:
        breast = 0 if r["image_index"].split("_")[1][0] == "L" else 1
        assert (r["benign_label"], r["malignant_label"]) == tuple(breast_labels(0, "test", breast, spec))
    assert len(list((out / P.VISUALIZATION_DIR).glob("*.png"))) == 4
    assert (out / P.LOCALIZATION_CSV).exists()

    exam_list, images, seg = write_synthetic_exam(tmp_path / "files", seed=0, split="test")
    files = P.predict(
        [synthetic_checkpoint],
        tmp_path / "files_out",
        exam_list=exam_list,
        images_dir=images,
        segmentations_dir=seg,
        progress=False,
    )
    same = {r["image_index"].replace("syn0", "synthetic0"): r for r in files.predictions}
    for r in result.predictions:
        assert (r["benign_pred"], r["malignant_pred"]) == (
            same[r["image_index"]]["benign_pred"],
            same[r["image_index"]]["malignant_pred"],
        )
    assert [r["image_index"].replace("syn0", "synthetic0") for r in files.localization] == [
        r["image_index"] for r in result.localization
    ]

    with pytest.raises(ValueError, match="trained on synthetic data"):
        P.predict([checkpoints[0]], tmp_path / "no", synthetic=1, progress=False)
