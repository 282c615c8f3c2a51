"""Contracts that tests/mutations.py found unguarded: top-t pooling, the per-image standardisation,
and the evaluation step's test-time augmentation. Each is checked against an independent numpy or
step-by-step computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gmic_jax import GMIC, GMICConfig, init_variables
from gmic_jax.augment import AugmentConfig, augment_batch
from gmic_jax.models.pooling import top_t_count, top_t_percent
from gmic_jax.preprocessing import normalize_images
from gmic_jax.train.step import make_eval_step, make_mesh


def test_top_t_pooling_is_the_mean_of_the_largest_rounded_t_percent():
    # 5 x 6 = 30 cells: t = 0.06 -> 1.8 cells, rounded to 2 (truncation would give 1); t = 0.1 -> 3.
    assert top_t_count(5, 6, 0.06) == 2 and top_t_count(5, 6, 0.1) == 3
    assert top_t_count(5, 6, 0.001) == 1  # at least one cell
    # Distinct values (a permutation): the k largest are unambiguous; per image and class.
    rng = np.random.default_rng(0)
    sal = np.stack([rng.permutation(30).reshape(5, 6) for _ in range(4)], -1).reshape(5, 6, 2, 2)
    sal = (sal.transpose(2, 0, 1, 3) / 29.0).astype(np.float32)  # (N=2, 5, 6, C=2) in [0, 1]
    for t, k in ((0.06, 2), (0.1, 3), (1.0, 30)):
        expected = np.sort(sal.reshape(2, 30, 2), axis=1)[:, ::-1][:, :k].astype(np.float64).mean(axis=1)
        # float32 mean of at most 30 values in [0, 1]: a few ulps of 1 at most.
        np.testing.assert_allclose(np.asarray(top_t_percent(jnp.asarray(sal), t)), expected, rtol=0, atol=1e-6)


def test_normalize_images_standardizes_each_image():
    rng = np.random.default_rng(1)
    # Three images with very different levels and spreads (std 5, 300, 1150: far from 1), and a constant one.
    raw = np.stack(
        [rng.normal(10, 5, (8, 6)), rng.normal(-200, 300, (8, 6)), rng.uniform(0, 4000, (8, 6)), np.full((8, 6), 7.0)]
    )[..., None].astype(np.float32)
    x = raw.astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)  # population standard deviation, as the original
    expected = (x - mean) / np.maximum(std, 1e-5)
    # float32 sums of n = 48 values err by at most n * 2**-24 * max|x| (naive summation): in units of
    # the std that is 48 * 6e-8 * 5 = 1.4e-5 here (max|x| / std <= 5 for these images); mean and std
    # both, on outputs up to ~3 in magnitude: 1e-4.
    np.testing.assert_allclose(
        np.asarray(normalize_images(jnp.asarray(raw), "standardize")), expected, rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(normalize_images(jnp.asarray(raw), "unit_range")),
        x / x.max(axis=(1, 2, 3), keepdims=True),
        rtol=1e-6,
    )


# A small model: pointwise late stages and a narrow local network keep its compile to seconds.
TINY = GMICConfig(
    image_shape=(64, 48),
    crop_shape=(16, 16),
    K=2,
    percent_t=0.1,
    local_net="resnet18_narrow",
    global_strides=(1, 2, 1, 2, 1),
    global_blocks=(1, 1, 1, 1, 1),
    global_kernels=(3, 3, 1, 1, 1),
)
HEADS = ("y_global", "y_local", "y_fusion")


def test_eval_step_tta_is_each_images_mean_over_its_draws():
    """With tta_draws = D the three predictions of an image are the mean of its D augmented draws
    (draw i with key fold_in(key, 1 + i), the image at position j of the data fold_in(that, j)); the
    saliency maps and patches stay those of the plain image; an image's predictions do not depend on
    its batch-mates."""
    variables = init_variables(TINY, jax.random.key(0))
    mesh = make_mesh(jax.devices()[:1])
    augment = AugmentConfig(
        flip=False, rotation_deg=10.0, translation=0.1, scale=(0.9, 1.1), shear_deg=0.0, noise_sigma=0.05
    )
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 4000, (3, 64, 48, 1)).astype(np.float32)
    key = jax.random.key_data(jax.random.key(5))
    draws = 2
    tta = make_eval_step(TINY, mesh, augment=augment, tta_draws=draws)
    first = jax.tree.map(np.asarray, tta(variables, images[:2], np.arange(2, dtype=np.int32), key))
    other_mate = jax.tree.map(np.asarray, tta(variables, images[[0, 2]], np.array([0, 2], np.int32), key))

    # Step by step: the plain images and the documented draws through the model, the draws averaged.
    x = normalize_images(jnp.asarray(images[:2]))
    apply = jax.jit(lambda v, x: GMIC(TINY).apply(v, x, train=False))
    plain = jax.tree.map(np.asarray, apply(variables, x))
    outs = []
    for i in range(draws):
        k = jax.random.fold_in(jax.random.wrap_key_data(key), 1 + i)
        keys = jax.vmap(lambda j, k=k: jax.random.fold_in(k, j))(jnp.arange(2))
        outs.append(jax.tree.map(np.asarray, apply(variables, augment_batch(keys, x, augment))))
    for h in HEADS:
        mean = np.mean([o[h] for o in outs], axis=0)
        # The same float32 computation compiled as another program (other fusions, another order of
        # sums): measured 2.4e-7 at most, 4 ulps of a probability near 1; 1e-6 allows 16.
        np.testing.assert_allclose(first[h], mean, rtol=0, atol=1e-6)
        assert np.abs(first[h] - plain[h]).max() > 1e-4  # the draws changed the prediction
        np.testing.assert_array_equal(other_mate[h][0], first[h][0])  # its own draws only
    np.testing.assert_allclose(first["saliency_map"], plain["saliency_map"], rtol=0, atol=1e-6)  # as the heads
    np.testing.assert_array_equal(first["patch_locations"], plain["patch_locations"])
