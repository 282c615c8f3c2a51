"""The original inference preprocessing: cropping, best centre, window placement, the CLI."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from gmic_jax.data import centers, cropping, window
from gmic_jax.data.crop_exam_list import preprocess_exam_list
from gmic_jax.data.exam_list import PREPROCESSING_KEYS, load_exam_list
from gmic_jax.data.image import DataError, read_png_array, write_png
from gmic_jax.data.testing import breast_image, corrupt_copy

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")


def _structure(value):
    """Nested types and values, to compare exactly (np.int64 vs int matters)."""
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_structure(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in value.items()))
    return (type(value).__name__, value)


@pytest.fixture(scope="module")
def sample_output(sample_exam_dir, tmp_path_factory):
    from gmic_jax.cli import main

    out = tmp_path_factory.mktemp("preprocessed")
    rc = main(
        [
            "preprocess",
            "--exam-list",
            str(sample_exam_dir / "exam_list_before_cropping.pkl"),
            "--images",
            str(sample_exam_dir / "images"),
            "--output",
            str(out),
            "--num-workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_sample_exam_matches_original_exactly(sample_exam_dir, sample_output):
    expected = pickle.load(open(sample_exam_dir / "expected_exam_list.pkl", "rb"))
    got = load_exam_list(sample_output / "exam_list.pkl")
    assert len(got) == len(expected) == 1
    for key in PREPROCESSING_KEYS:
        assert _structure(got[0][key]) == _structure(expected[0][key]), key
    assert list(got[0]) == list(expected[0])  # same keys, same order
    for key in expected[0]:
        if key not in PREPROCESSING_KEYS:
            assert got[0][key] == expected[0][key]


def test_cropped_images_and_pickle_round_trip(sample_exam_dir, sample_output):
    exam = load_exam_list(sample_output / "exam_list.pkl")[0]
    for view in VIEWS:
        name = exam[view][0]
        top, bottom, left, right = (int(v) for v in exam["window_location"][view][0])
        original = read_png_array(sample_exam_dir / "images" / f"{name}.png")
        cropped = read_png_array(sample_output / "cropped_images" / f"{name}.png")
        assert cropped.dtype == np.uint16
        np.testing.assert_array_equal(cropped, original[top:bottom, left:right])
    # The original unpickles with plain pickle: round trip keeps key names and numpy types.
    again = pickle.loads(pickle.dumps(load_exam_list(sample_output / "exam_list.pkl")))
    assert _structure(again) == _structure(load_exam_list(sample_output / "exam_list.pkl"))


def test_windows_deterministic_and_normalised(sample_output):
    from gmic_jax.data.image import read_image
    from gmic_jax.preprocessing import normalize_images

    exam = load_exam_list(sample_output / "exam_list.pkl")[0]
    for view in ("R-CC", "L-MLO"):
        path = sample_output / "cropped_images" / f"{exam[view][0]}.png"
        center = exam["best_center"][view][0]
        raw, again = (
            window.place_window(
                window.flip_for_model(read_image(path).pixels, view, exam["horizontal_flip"]), view, center
            )
            for _ in range(2)
        )
        assert raw.shape == (2944, 1920) and raw.dtype == np.float32
        np.testing.assert_array_equal(raw, again)
        a = np.asarray(normalize_images(raw[None, ..., None], "standardize"))[0, ..., 0]
        assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-4
        cropped = read_png_array(path).astype(np.float32)
        # flipped R view (horizontal_flip NO); narrow image: content starts at column 0
        flipped = cropped[:, ::-1] if view[0] == "R" else cropped
        h, w = cropped.shape
        if view.endswith("CC"):  # CC: padding split above and below
            top = (2944 - h) // 2
            np.testing.assert_array_equal(raw[top : top + h, :w], flipped)
            assert not raw[:top].any() and not raw[top + h :].any()
        else:  # MLO: padding only below
            np.testing.assert_array_equal(raw[:h, :w], flipped)
            assert not raw[h:].any()
        assert not raw[:, w:].any()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_erode_dilate_equal_iterated_cross(seed, k):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((24, 19)) < 0.7) | (rng.random((24, 19)) < 0.1)
    np.testing.assert_array_equal(cropping.erode(mask, k), ndimage.binary_erosion(mask, iterations=k))
    np.testing.assert_array_equal(cropping.dilate(mask, k), ndimage.binary_dilation(mask, iterations=k))


def test_largest_component_first_on_ties():
    mask = np.zeros((5, 9), bool)
    mask[1:3, 0:2] = True  # 4 px, label 1
    mask[1:3, 5:7] = True  # 4 px, label 2
    mask[4, 8] = True
    assert cropping.largest_component(mask)[1, 0] and not cropping.largest_component(mask)[1, 5]


def test_crop_info_hand_checked():
    img = np.zeros((40, 30), np.uint16)
    img[10:31, 0:12] = 5  # breast against the left edge, pointing right
    img[2, :] = 9  # a one-pixel line: removed by the erosion
    info = cropping.crop_info(img, "right", iterations=2, buffer_size=3)
    assert tuple(map(int, info.window_location)) == (7, 34, 0, 15)
    assert int(info.distance_from_starting_side) == 0
    # The image edge counts as background: 2 erosions leave rows 12..28 x columns 2..9, and 2 cross
    # dilations give back rows 10..30 x columns 0..11 with diamond-cut corners.
    assert info.bottommost_points == (23, (2, 9))  # row 30 - 7: only columns 2..9 reach it
    # column 11 is set on rows 12..28 (5..21 in the crop); search starts at row int(27 / 3) = 9
    assert info.rightmost_points == ((9, 21), 11)
    left = cropping.crop_info(img[:, ::-1], "left", iterations=2, buffer_size=3)
    assert tuple(map(int, left.window_location)) == (7, 34, 15, 30)
    # Mirrored points are measured from the crop's right edge as width - x (the original's
    # convention), i.e. one more than the un-mirrored column index.
    assert left.rightmost_points == ((9, 21), 12)
    assert left.bottommost_points == (23, (3, 10))


def _brute_force_cc_center(image, rightmost_x, window_shape):
    wh, ww = window_shape
    h, w = image.shape
    x = rightmost_x - ww // 2 - 1
    if h <= wh:
        return h // 2, x
    best, best_y = -1, None
    for y in range(wh // 2, h - (wh - wh // 2) + 1):
        top, left = y - wh // 2, x - ww // 2
        dy, dx = max(0, -top), max(0, -left)
        top, left = top + dy, left + dx
        count = int((image[top : min(top + wh, h), left : min(left + ww, w)] > 0).sum())
        if count > best or (count == best and abs(y - h // 2) < abs(best_y - h // 2)):
            best, best_y = count, y
    return best_y, x


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(21, 60), st.integers(5, 30))
def test_cc_center_matches_brute_force(seed, h, w):
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w)) < 0.3).astype(np.uint16) * (rng.random((h, w)) < rng.random())
    rightmost = int(rng.integers(0, w))
    got = centers.best_center(image, "CC", ((0, 0), rightmost), (0, (0, 0)), window_shape=(20, 8))
    assert tuple(map(int, got)) == _brute_force_cc_center(image, rightmost, (20, 8))


def test_mlo_center_uses_last_nonzero_row():
    image = np.zeros((50, 12), np.uint16)
    image[:30, :5] = 1
    c = centers.best_center(image, "MLO", ((0, 0), 5), (45, (0, 4)), window_shape=(20, 8))
    assert tuple(map(int, c)) == (29 - 10 - 1, 5 - 4 - 1)


@pytest.mark.parametrize(
    "view,shape,center,expected_rows",
    [
        ("L-CC", (7, 5), (3, 2), (3, 10)),  # extra 6: padded 3 above, 3 below
        ("L-CC", (8, 5), (3, 2), (2, 10)),  # extra 5: 2 above, 3 below
        ("L-MLO", (7, 5), (3, 2), (0, 7)),  # padded below only
    ],
)
def test_place_window_padding(view, shape, center, expected_rows):
    pixels = np.arange(1, 1 + shape[0] * shape[1], dtype=np.float32).reshape(shape)
    out = window.place_window(pixels, view, center, window_shape=(13, 8))
    r0, r1 = expected_rows
    np.testing.assert_array_equal(out[r0:r1, :5], pixels)
    assert out.sum() == pixels.sum()


def test_place_window_moves_inside():
    pixels = np.arange(30 * 20, dtype=np.float32).reshape(30, 20)
    out = window.place_window(pixels, "R-CC", (-100, 500), window_shape=(10, 8))
    np.testing.assert_array_equal(out, pixels[0:10, 12:20])


def _make_images(folder, names_views, size=(600, 400)):
    for i, (name, view) in enumerate(names_views):
        # horizontal_flip 'NO': L breasts point right (against the left edge), R point left
        write_png(folder / f"{name}.png", breast_image(*size, seed=i, points_right=view[0] == "L"))


def _exam(prefix, flip="NO"):
    exam = {"horizontal_flip": flip, "cancer_label": {"benign": 0, "malignant": 0}}
    for v in VIEWS:
        exam[v] = [f"{prefix}_{v}"]
    return exam


def test_batch_bad_inputs_reported_rest_processed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    exams = [
        _exam("good"),
        _exam("blank"),
        _exam("cut"),
        _exam("noview"),
        "not an exam",
        _exam("badview"),
        _exam("empty"),
        _exam("oneside"),
    ]
    del exams[3]["R-MLO"]  # a missing view is no image, not an error
    exams[5]["R-CC"] = "badview_R-CC"  # not a list
    for v in VIEWS:
        exams[6][v] = []  # no image at all
    exams[7]["R-CC"], exams[7]["R-MLO"] = [], []  # one breast only (empty lists)
    for exam in exams[:4] + exams[7:]:
        _make_images(images, [(exam[v][0], v) for v in VIEWS if exam.get(v)])
    write_png(images / "blank_L-MLO.png", np.zeros((600, 400), np.uint16))
    corrupt_copy(images / "cut_R-CC.png", images / "cut_R-CC.png", 0.4)
    exam_list = tmp_path / "exams.pkl"
    exam_list.write_bytes(pickle.dumps(exams))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "exam_list.pkl").write_bytes(b"stale")  # a stale complete-looking output must go

    from gmic_jax.cli import main

    rc = main(
        [
            "preprocess",
            "--exam-list",
            str(exam_list),
            "--images",
            str(images),
            "--output",
            str(out),
            "--num-workers",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 1
    assert not (out / "exam_list.pkl").exists()
    failures = (out / "failures.txt").read_text()
    assert "blank_L-MLO.png: blank image" in failures
    assert "cut_R-CC.png: corrupt or truncated PNG" in failures
    assert "exams.pkl: malformed exam list: exam 4: a str, not a dict" in failures
    assert "exam 5: view 'R-CC' must be a list of image names" in failures
    assert "exam 6: no image: every view" in failures
    assert "exam 3" not in failures and "exam 7" not in failures
    assert len(failures.splitlines()) == 5
    partial = load_exam_list(out / "exam_list.partial.pkl")
    assert [e["L-CC"][0] for e in partial] == ["good_L-CC", "noview_L-CC", "oneside_L-CC"]
    assert all(k in partial[0] for k in PREPROCESSING_KEYS)
    # The views an exam has are preprocessed; an absent view stays absent, an empty one empty.
    assert "R-MLO" not in partial[1] and all("R-MLO" not in partial[1][k] for k in PREPROCESSING_KEYS)
    assert all(len(partial[1][k][v]) == 1 for k in PREPROCESSING_KEYS for v in ("L-CC", "R-CC", "L-MLO"))
    assert all(partial[2][k]["R-CC"] == [] == partial[2][k]["R-MLO"] for k in PREPROCESSING_KEYS)
    for v in VIEWS:
        assert (out / "cropped_images" / f"good_{v}.png").exists()
    assert not (out / "cropped_images" / "noview_R-MLO.png").exists()
    assert (out / "cropped_images" / "cut_L-CC.png").exists()  # the exam's other images were processed


def test_malformed_exam_list_file(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    done, failures = preprocess_exam_list(bad, tmp_path, tmp_path / "out")
    assert done == [] and "bad.pkl: malformed exam list: not a readable pickle" in str(failures[0])
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    _, failures = preprocess_exam_list(tmp_path / "dict.pkl", tmp_path, tmp_path / "out")
    assert "expected a list of exams, got dict" in str(failures[0])
    assert not (tmp_path / "out" / "exam_list.pkl").exists()

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, ("/nonexistent",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match="refusing to load shutil.rmtree"):
        load_exam_list(tmp_path / "evil.pkl")


def test_horizontal_flip_yes_flips_left_views():
    """'NO' treats R views as pointing left, 'YES' treats L views so: same results for one image."""
    from gmic_jax.data.crop_exam_list import preprocess_image

    img = breast_image(600, 400, seed=3, points_right=False)
    cropped_r, r_no = preprocess_image(img, "R-CC", "NO")
    cropped_l, l_yes = preprocess_image(img, "L-CC", "YES")
    np.testing.assert_array_equal(cropped_r, cropped_l)
    assert _structure(r_no) == _structure(l_yes)
    _, l_no = preprocess_image(img, "L-CC", "NO")  # wrong orientation: the chest-wall side differs
    assert int(l_no["window_location"][3]) != int(r_no["window_location"][3]) or _structure(
        l_no["best_center"]
    ) != _structure(r_no["best_center"])
