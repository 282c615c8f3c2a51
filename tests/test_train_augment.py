"""On-device augmentation: identity when disabled, the right geometry, deterministic per key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gmic_jax.augment import AugmentConfig, augment_batch, augment_image, sample_transform

NONE = AugmentConfig(flip=False, rotation_deg=0, translation=0, scale=(1.0, 1.0), shear_deg=0, noise_sigma=0)


def _image(H=24, W=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((H, W, 1)), jnp.float32)


def test_identity_and_flip():
    x = _image()
    key = jax.random.key(0)
    assert NONE.is_identity
    # Through the resampling path with an identity transform:
    same = augment_image(key, x, dataclasses.replace(NONE, scale=(1.0, 1.0 + 1e-12)))
    np.testing.assert_allclose(np.asarray(same), np.asarray(x), atol=1e-5)
    flip_only = dataclasses.replace(NONE, flip=True)
    flips = [
        np.allclose(np.asarray(augment_image(jax.random.key(i), x, flip_only)), np.asarray(x)[:, ::-1], atol=1e-5)
        for i in range(16)
    ]
    assert 3 <= sum(flips) <= 13  # about half flipped ...
    for i, f in enumerate(flips):  # ... and the others untouched
        if not f:
            np.testing.assert_allclose(
                np.asarray(augment_image(jax.random.key(i), x, flip_only)), np.asarray(x), atol=1e-5
            )


def _blob(H, W, centre, sigma=2.0):
    """A Gaussian dot of the given width at a sub-pixel (row, col) on a zero background."""
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(img):
    rows, cols = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    return np.array([(img * rows).sum(), (img * cols).sum()]) / img.sum()


# Centroid error of a resampled blob: bilinear interpolation of a sigma-2 Gaussian moves its
# intensity-weighted centroid by a fraction of a pixel (measured: at most 0.003 pixel over the draws
# below); 0.05 pixel bounds that with room and is under a thirtieth of the smallest displacement drawn
# (1.5 pixels), so the identity transform cannot pass.
CENTROID_TOL = 0.05


def test_translation_scale_and_rotation_move_a_dot_where_the_drawn_transform_says():
    """A blob off the centre lands at c + t + A (q - c) for the A and t the key draws (the same
    draw as augment_image's: its key's first half). Each drawn parameter moves the blob by several
    pixels, far beyond the tolerance, so the identity transform fails every case."""
    H, W = 65, 49
    c = np.array([(H - 1) / 2, (W - 1) / 2])
    q = c + np.array([6.0, -5.0])  # the blob, off the centre in both directions
    x = jnp.asarray(_blob(H, W, q))[..., None]
    cases = [
        (dataclasses.replace(NONE, scale=(1.3, 1.6)), "scale"),
        (dataclasses.replace(NONE, rotation_deg=90.0), "rotation"),
        (dataclasses.replace(NONE, translation=0.1), "translation"),
    ]
    for cfg, what in cases:
        for seed in range(4):
            key = jax.random.key(seed)
            _, A_inv, t = jax.tree.map(np.asarray, sample_transform(jax.random.split(key)[0], cfg, (H, W)))
            expected = c + t + np.linalg.solve(A_inv, q - c)
            moved = np.abs(expected - q).max()
            out = np.asarray(augment_image(key, x, cfg))[..., 0]
            np.testing.assert_allclose(_centroid(out), expected, atol=CENTROID_TOL, err_msg=f"{what}, key {seed}")
            assert moved > 10 * CENTROID_TOL, (what, seed, moved)  # this draw is far from the identity
            if what == "scale":  # the measured scale of the dot's offset from the centre is the drawn one
                # (the centroid's tolerance over the 7.8-pixel offset: 0.0064 of scale)
                s = 1.0 / A_inv[0, 0]
                assert 1.3 <= s <= 1.6
                assert abs(np.linalg.norm(_centroid(out) - c) / np.linalg.norm(q - c) - s) < 0.01
            if what == "translation":  # the shift is the drawn one, within 10% of the size
                np.testing.assert_allclose(_centroid(out) - q, t, atol=CENTROID_TOL)
                assert (np.abs(t) <= 0.1 * np.array([H, W])).all()
    # Pixels from outside the input take the image's minimum (-1 here), not zero.
    y = jnp.asarray(_blob(H, W, q) - 1.0)[..., None]
    z = np.asarray(augment_image(jax.random.key(0), y, dataclasses.replace(NONE, scale=(0.5, 0.5))))[..., 0]
    np.testing.assert_allclose(z[0, 0], -1.0, atol=1e-6)
    assert z.min() >= -1.0 - 1e-6


def test_paper_defaults_are_deterministic_per_key_and_jit_on_device():
    x = jnp.stack([_image(seed=i) for i in range(4)])
    keys = jax.random.split(jax.random.key(5), 4)
    cfg = AugmentConfig()
    f = jax.jit(lambda k, x: augment_batch(k, x, cfg))
    a, b = f(keys, x), f(keys, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Each example depends only on its own key (batch split independence).
    single = augment_image(keys[2], x[2], cfg)
    np.testing.assert_allclose(np.asarray(a[2]), np.asarray(single), atol=1e-4)
    other = f(jax.random.split(jax.random.key(6), 4), x)
    assert not np.allclose(np.asarray(a), np.asarray(other))
    assert a.shape == x.shape and a.dtype == jnp.float32
    # Noise only: the difference has the configured standard deviation.
    noisy = augment_batch(keys, x, dataclasses.replace(NONE, noise_sigma=0.005))
    assert abs(float(jnp.std(noisy - x)) - 0.005) < 0.0005
