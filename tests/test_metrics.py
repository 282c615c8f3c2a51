"""Evaluation metrics against hand-computed values and direct pixel-level definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score

from gmic_jax import metrics as M


def test_auc_prauc_and_undefined_cases():
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc([1, 1], [0.1, 0.2]) is None
    assert M.pr_auc([0, 0], [0.1, 0.2]) is None
    assert M.pr_auc([0, 1, 1], [0.1, 0.9, 0.5]) == pytest.approx(1.0)
    out = M.classification_metrics(np.array([[0.2, 0.9], [0.1, 0.1]]), np.array([[0, 1], [0, 0]]))
    assert "val_auc_benign" not in out and out["val_auc_malignant"] == 1.0


def test_breast_level_is_the_mean_of_views():
    scores = np.array([[0.1, 0.9], [0.3, 0.1], [0.5, 0.5], [0.7, 0.2]])
    labels = np.array([[0, 1], [0, 0], [1, 0], [1, 0]])
    s, lab = M.breast_level(scores, labels, ["a", "a", "b", "b"])
    np.testing.assert_allclose(s, [[0.2, 0.5], [0.6, 0.35]])
    np.testing.assert_array_equal(lab, [[0, 1], [1, 0]])
    out = M.classification_metrics(scores, labels, ["a", "a", "b", "b"])
    assert "val_breast_auc_malignant" in out and out["val_breast_auc_malignant"] == 1.0


def test_upsample_nearest_and_dice():
    g = np.array([[0.0, 1.0], [0.2, 0.7]])
    up = M.upsample_nearest(g, (4, 6))
    np.testing.assert_array_equal(up[:2, :3], 0.0)
    np.testing.assert_array_equal(up[:2, 3:], 1.0)
    np.testing.assert_array_equal(up[2:, 3:], 0.7)
    # Odd sizes: source index floor(i * h / H).
    up = M.upsample_nearest(np.arange(3.0)[None], (1, 7))
    np.testing.assert_array_equal(up[0], [0, 0, 0, 1, 1, 2, 2])
    mask = np.zeros((4, 6), np.uint8)
    mask[0:2, 2:4] = 1  # 4 pixels, 2 of them under the 1.0 cell
    # Predicted: the 6 pixels of cell (0,1) and 6 of cell (1,1): 12; overlap 2 -> 2*2/(12+4)
    assert M.dice(g, mask) == pytest.approx(4 / 16)


def test_pxap_on_the_grid_equals_pixel_level_average_precision():
    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = rng.integers(2, 6, size=2)
        H, W = rng.integers(h, 40), rng.integers(w, 40)
        g = rng.random((h, w))
        if trial % 3 == 0:
            g = np.round(g, 1)  # ties between cells
        mask = np.zeros((H, W), np.uint8)
        r, c = rng.integers(0, H), rng.integers(0, W)
        mask[r : r + rng.integers(1, 8), c : c + rng.integers(1, 8)] = 1
        direct = average_precision_score(mask.ravel(), M.upsample_nearest(g, (H, W)).ravel())
        assert M.pxap(g, mask) == pytest.approx(direct, abs=1e-12)
    with pytest.raises(ValueError, match="undefined"):
        M.pxap(g, np.zeros((H, W)))


def test_roi_hits_counts_lesions_covered_at_least_70_percent():
    mask = np.zeros((40, 40, 2), np.uint8)
    mask[2:6, 2:6, 0] = 1  # lesion A (benign, 16 px)
    mask[20:30, 20:22, 1] = 1  # lesion B (malignant, 10 rows x 2 cols)
    mask[35:38, 35:38, 1] = 1  # lesion C (malignant, 9 px)
    assert M.roi_hits(mask, np.array([[0, 0]]), (8, 8)) == (1, 3)  # A only
    assert M.roi_hits(mask, np.array([[0, 0], [33, 33]]), (8, 8)) == (2, 3)  # A and C
    assert M.roi_hits(mask, np.array([[20, 20]]), (7, 2)) == (1, 3)  # B: 7/10 = 70% -> hit
    assert M.roi_hits(mask, np.array([[20, 20]]), (6, 2)) == (0, 3)  # B: 60% -> miss
    # Coverage is the union of the patches: two crops of 4 rows each cover 8/10 of B.
    assert M.roi_hits(mask, np.array([[20, 20], [24, 20]]), (4, 2)) == (1, 3)
    assert M.roi_hits(mask, np.array([[20, 20], [20, 20]]), (4, 2)) == (0, 3)
    # Crops clipped at the image border still count what they cover.
    assert M.roi_hits(mask, np.array([[34, 34]]), (16, 16)) == (1, 3)


def test_accumulator_averages_over_lesion_images():
    sal = np.zeros((2, 2, 2, 2))
    sal[0, 0, 0, 1] = 1.0
    masks = np.zeros((2, 8, 8, 2), np.uint8)
    masks[0, 0:4, 0:4, 1] = 1  # image 0: malignant lesion exactly the saliency cell
    masks[1, 4:8, 4:8, 1] = 1  # image 1: malignant lesion, saliency elsewhere (all zero)
    acc = M.LocalizationAccumulator((4, 4))
    acc.update(sal[:1], masks[:1], np.zeros((1, 1, 2), int))  # batch by batch
    acc.update(sal[1:], masks[1:], np.zeros((1, 1, 2), int))
    out = acc.result()
    assert out["val_dice_malignant"] == pytest.approx(0.5)  # 1.0 and 0.0
    assert "val_dice_benign" not in out
    assert out["val_roi_hit_rate"] == pytest.approx(0.5)
    assert out["val_pxap_malignant"] == pytest.approx((1.0 + 0.25) / 2)  # image 1: all tied -> prevalence


# ---------------------------------------------------------------------------- pointing


def _reference_pointing(saliency, mask):
    """(hit, random share) straight from the definition: scan for the first largest cell in
    row-major order, its centre in exact fractions, the mask dilated by scipy with the box."""
    import math
    from fractions import Fraction

    from scipy import ndimage

    h, w = saliency.shape
    H, W = mask.shape
    ry, rx = math.ceil(Fraction(H, 2 * h)), math.ceil(Fraction(W, 2 * w))
    dilated = ndimage.binary_dilation(mask > 0, structure=np.ones((2 * ry + 1, 2 * rx + 1), bool))

    def centre_hit(i, j):
        return bool(
            dilated[
                math.floor((i + Fraction(1, 2)) * Fraction(H, h)), math.floor((j + Fraction(1, 2)) * Fraction(W, w))
            ]
        )

    best = (0, 0)
    for i in range(h):
        for j in range(w):
            if saliency[i, j] > saliency[best]:
                best = (i, j)
    share = np.mean([centre_hit(i, j) for i in range(h) for j in range(w)])
    return centre_hit(*best), share


def test_pointing_by_hand():
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0] = 1  # dilated by ceil(8/4) = 2 pixels: rows and columns 0..2 hold the centre (2, 2) of cell (0, 0)
    cells = M.pointing_cells(mask, (2, 2))
    np.testing.assert_array_equal(cells, [[True, False], [False, False]])
    assert M.pointing_hit(np.array([[0.5, 0.1], [0.2, 0.5]]), mask)  # tie: the first in row-major order
    assert not M.pointing_hit(np.array([[0.1, 0.5], [0.2, 0.5]]), mask)
    mask[0, 0], mask[0, 5] = 0, 1  # in cell (0, 1): 1 column from its centre (2, 6), 3 from (2, 2)
    np.testing.assert_array_equal(M.pointing_cells(mask, (2, 2)), [[False, True], [False, False]])
    mask[0, 5], mask[0, 4] = 0, 1  # 2 columns from both centres: the dilation reaches cell (0, 0) too
    np.testing.assert_array_equal(M.pointing_cells(mask, (2, 2)), [[True, True], [False, False]])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pointing_matches_the_definition(data):
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    H, W = data.draw(st.integers(h, 40)), data.draw(st.integers(w, 40))
    mask = data.draw(hnp.arrays(np.uint8, (H, W), elements=st.sampled_from([0, 0, 0, 0, 0, 0, 0, 1])))
    # Few distinct values: ties are common, and the first in row-major order must win.
    saliency = data.draw(hnp.arrays(np.float64, (h, w), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0])))
    hit, share = _reference_pointing(saliency, mask)
    assert M.pointing_hit(saliency, mask) == hit
    assert M.pointing_cells(mask, (h, w)).mean() == pytest.approx(share)


def _localization(saliency_maps, masks, patch_locations, crop_shape):
    acc = M.LocalizationAccumulator(crop_shape)
    acc.update(saliency_maps, masks, patch_locations)
    return acc.result()


def test_accumulator_pointing_and_random_maps():
    rng = np.random.default_rng(0)
    n, H, W, h, w = 30, 48, 36, 6, 4
    masks = np.zeros((n, H, W, 2), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, H - 6), rng.integers(0, W - 6)
        masks[i, r : r + 6, c : c + 6, i % 2] = 1  # one lesion per image, alternating classes
    sal = rng.random((n, h, w, 2))
    out = _localization(sal, masks, np.zeros((n, 1, 2), int), (8, 8))
    for c, name in enumerate(M.CLASSES):
        ref = [_reference_pointing(sal[i, ..., c], masks[i, ..., c]) for i in range(n) if masks[i, ..., c].any()]
        assert out[f"val_pointing_{name}"] == pytest.approx(np.mean([r[0] for r in ref]))
        assert out[f"val_pointing_{name}_random"] == pytest.approx(np.mean([r[1] for r in ref]))
        # Uniform-random maps score the random baseline on average.
        tables = [M.pointing_cells(masks[i, ..., c], (h, w)) for i in range(n) if masks[i, ..., c].any()]
        rates = M.random_pointing_rates(tables, np.random.default_rng(1), 4000)
        assert rates.min() >= 0 and rates.max() <= 1
        assert rates.mean() == pytest.approx(out[f"val_pointing_{name}_random"], abs=0.01)
    # A map that peaks on the lesion hits every time.
    peaked = np.zeros((n, h, w, 2))
    for i in range(n):
        r, c = np.argwhere(masks[i].max(-1))[0]
        peaked[i, r * h // H, c * w // W, :] = 1.0
    out = _localization(peaked, masks, np.zeros((n, 1, 2), int), (8, 8))
    assert out["val_pointing_benign"] == 1.0 and out["val_pointing_malignant"] == 1.0
