"""The synthetic lesion data: deterministic, any size, masks, small and not-too-bright findings."""

from __future__ import annotations

import numpy as np
import pytest

from gmic_jax.data.batch import check_batch
from gmic_jax.data.synthetic import MAX_VALUE, SyntheticLesions, SyntheticSpec, render, stack


def test_deterministic_per_seed_and_distinct_across_seeds_and_splits():
    a = render(3, "train", 5)
    b = render(3, "train", 5)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert a["image_id"] == b["image_id"]
    assert not np.array_equal(render(4, "train", 5)["image"], a["image"])
    assert not np.array_equal(render(3, "val", 5)["image"], a["image"])


@pytest.mark.parametrize("shape", [(256, 192), (97, 131), (512, 384)])
def test_any_size_gives_the_batch_dict(shape):
    src = SyntheticLesions(4, seed=1, spec=SyntheticSpec(image_shape=shape, p_benign=1.0, p_malignant=1.0))
    batch = src.batch(range(4))
    check_batch(batch, window_shape=shape)  # the layout every data source yields
    assert batch["image"].shape == (4,) + shape + (1,) and batch["image"].dtype == np.uint16
    assert list(batch["view"]) == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    assert batch["breast_id"][0] == batch["breast_id"][1] != batch["breast_id"][2]
    # Raw 12-bit values with a zero background, like the sample exam.
    assert batch["image"].max() <= 4095 and (batch["image"] == 0).any() and batch["image"].max() > 2000
    # Every labelled class has a non-empty mask in both views.
    assert (batch["mask"].reshape(4, -1, 2).sum(1) > 0).all()


def test_masks_agree_with_labels_and_views_share_breast_labels():
    src = SyntheticLesions(120, seed=7)
    labels = src.labels
    np.testing.assert_array_equal(labels[0::2], labels[1::2])
    assert 0.15 < labels[:, 0].mean() < 0.55 and 0.15 < labels[:, 1].mean() < 0.55
    assert (labels.sum(1) == 0).any()  # normal breasts exist
    for i in range(0, 120, 3):
        e = src[i]
        np.testing.assert_array_equal(e["label"], labels[i])
        present = e["mask"].reshape(-1, 2).any(0).astype(np.float32)
        np.testing.assert_array_equal(present, e["label"])


def _densest_tissue(seed, split, index, spec):
    """The brightest value of the image's tissue before findings and noise, in raw units."""
    import gmic_jax.data.synthetic as syn

    rng = syn._rng(seed, split, index // 2, 1 + index % 2)
    tissue, _ = syn._tissue(rng, spec.image_shape, syn.VIEWS[index % 2])
    return np.rint(tissue.max() * MAX_VALUE)


@pytest.mark.parametrize("contrast", [(0.25, 0.4), (3.0, 3.0)])
def test_lesions_are_small_and_not_brighter_than_densest_tissue(contrast):
    # (3.0, 3.0): findings far brighter than any tissue before the clip.
    spec = SyntheticSpec(image_shape=(256, 192), p_benign=1.0, p_malignant=1.0, lesion_contrast=contrast)
    saturated = 0
    for i in range(12):
        e = render(11, "train", i, spec)
        area = e["mask"].shape[0] * e["mask"].shape[1]
        frac = e["mask"].reshape(-1, 2).sum(0) / area
        assert (frac > 0.0005).all() and (frac < 0.01).all(), frac
        img = e["image"][..., 0].astype(np.int64)
        densest = _densest_tissue(11, "train", i, spec)
        assert img.max() <= densest
        lesion = e["mask"].any(-1)
        saturated += img[lesion].max() == densest
    if contrast[0] > 1:
        assert saturated == 12  # the clip really bounds them


def test_source_validates_and_caches():
    with pytest.raises(ValueError, match="split"):
        SyntheticLesions(4, split="nope")
    with pytest.raises(ValueError, match="positive"):
        SyntheticLesions(0)
    src = SyntheticLesions(4, seed=0)
    with pytest.raises(IndexError):
        src[4]
    assert src[1] is src[1]
    nomask = SyntheticLesions(2, seed=0, with_masks=False, cache=False)
    assert "mask" not in nomask[0] and not nomask.has_masks
    assert stack([src[0], src[1]])["image_id"].dtype.kind == "U"
