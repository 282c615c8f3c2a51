"""The one exam-list reader (gmic_jax.data.exam_list.read_exam_list) and the rules every user of it
follows: missing views, unknown labels, segmentation names, PNG or DICOM images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gmic_jax.data.cache import CacheSource, build_cache
from gmic_jax.data.exam_list import find_image, read_exam_list, save_exam_list
from gmic_jax.data.image import DataError, write_png
from gmic_jax.data.sources import ExamListSource
from gmic_jax.data.testing import breast_image, write_dicom

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
WINDOW = (40, 32)
LABELS = {"left_benign": 0, "left_malignant": 1, "right_benign": 1, "right_malignant": 0}


def _exam(prefix, views=VIEWS, **extra):
    exam = {"horizontal_flip": "NO", "cancer_label": dict(LABELS)}
    for v in views:
        exam[v] = [f"{prefix}_{v}"]
    exam.update(extra)
    return exam


def test_views_labels_and_segmentation_names(tmp_path):
    exams = [
        _exam("full", **{"R-CC_benign_seg": ["lesion7"], "R-CC_malignant_seg": [""]}),
        _exam("left", views=("L-CC", "L-MLO")),  # right views absent
        dict(_exam("empty"), **{"R-CC": [], "R-MLO": []}),  # right views empty
        dict(_exam("nolabel"), cancer_label={"left_benign": 1}),  # three labels unknown
        dict(_exam("none"), **{v: [] for v in VIEWS}),  # no image at all
        dict(_exam("bad"), cancer_label={"left_benign": "yes"}),
        ["not", "a", "dict"],
    ]
    save_exam_list(tmp_path / "exams.pkl", exams)
    good, errors = read_exam_list(tmp_path / "exams.pkl")
    assert [e.index for e in good] == [0, 1, 2, 3]
    assert [e.exam for e in errors] == [4, 5, 6]
    assert all(str(tmp_path / "exams.pkl") in str(e) for e in errors)
    assert "exam 4: no image: every view" in str(errors[0])
    assert "exam 5: cancer_label['left_benign'] must be a number, got 'yes'" in str(errors[1])
    assert "exam 6: a list, not a dict" in str(errors[2])

    full, left, empty, nolabel = good
    assert [i.name for i in full.images] == ["full_L-CC", "full_R-CC", "full_L-MLO", "full_R-MLO"]
    assert [i.view for i in left.images] == ["L-CC", "L-MLO"] == [i.view for i in empty.images]
    assert full.images[1].label == (1.0, 0.0) and full.images[0].label == (0.0, 1.0)
    # One segmentation-name rule: the exam's name when it is given, else <image>_<class>.
    assert full.images[1].segmentations == ("lesion7", "full_R-CC_malignant")
    assert full.images[0].segmentations == ("full_L-CC_benign", "full_L-CC_malignant")
    # Unknown labels are NaN, per breast.
    assert nolabel.breast_labels["L"][0] == 1.0 and math.isnan(nolabel.breast_labels["L"][1])
    assert all(math.isnan(v) for v in nolabel.breast_labels["R"])


def test_find_image_takes_png_or_dicom(tmp_path):
    write_png(tmp_path / "a.png", np.ones((4, 4), np.uint16))
    write_dicom(tmp_path / "b.dcm", np.ones((4, 4), np.uint16))
    assert find_image(tmp_path, "a").endswith("a.png") and find_image(tmp_path, "b").endswith("b.dcm")
    with pytest.raises(DataError, match="c.png: image not found"):
        find_image(tmp_path, "c")


@pytest.fixture
def preprocessed(tmp_path):
    """A preprocessed exam list (windows at fixed centres) with one missing breast and one image
    of unknown label."""
    images = tmp_path / "images"
    exams = [_exam("a"), _exam("b", views=("L-CC", "L-MLO"))]
    exams[1]["cancer_label"] = {"left_benign": 0}  # left_malignant unknown
    for exam in exams:
        exam["best_center"] = {}
        for v in VIEWS:
            if v in exam:
                write_png(images / f"{exam[v][0]}.png", breast_image(40, 30, seed=len(v), points_right=v[0] == "L"))
                exam["best_center"][v] = [(np.int64(20), np.int64(10))]
    save_exam_list(tmp_path / "exams.pkl", exams)
    return tmp_path / "exams.pkl", images


def test_exam_list_source_refuses_an_image_without_label(preprocessed, tmp_path):
    exam_list, images = preprocessed
    source = ExamListSource(exam_list, images, window_shape=WINDOW)
    assert [item.name for item in source.items] == ["a_L-CC", "a_R-CC", "a_L-MLO", "a_R-MLO", "b_L-CC", "b_L-MLO"]
    np.testing.assert_array_equal(source[1]["label"], [1, 0])
    with pytest.raises(DataError) as err:
        source[4]
    assert "exam 1" in str(err.value) and "b_L-CC.png" in str(err.value) and "has no label" in str(err.value)
    # The cache refuses those images (failures naming exam and file) and caches the others.
    count, failures = build_cache(source, tmp_path / "cache")
    assert count == 4 and len(failures) == 2
    assert "exam 1" in str(failures[0]) and "b_L-CC.png" in str(failures[0])
    assert "b_L-MLO.png" in (tmp_path / "cache" / "failures.txt").read_text()
    with pytest.raises(DataError, match="incomplete"):
        CacheSource(tmp_path / "cache")


def test_cache_records_the_canonical_preprocessing(preprocessed, tmp_path):
    exam_list, images = preprocessed
    exams = read_exam_list(exam_list)[0][:1]
    save_exam_list(tmp_path / "one.pkl", [exams[0].entry])
    assert build_cache(ExamListSource(tmp_path / "one.pkl", images, window_shape=WINDOW), tmp_path / "c") == (4, [])
    assert CacheSource(tmp_path / "c").metadata["preprocessing"] == "original"
