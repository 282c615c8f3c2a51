"""On-device augmentation: identity when disabled, the right geometry, deterministic per key."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gmic_jax.augment import AugmentConfig, augment_batch, augment_image

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
    flips = [np.allclose(np.asarray(augment_image(jax.random.key(i), x, flip_only)), np.asarray(x)[:, ::-1], atol=1e-5)
             for i in range(16)]
    assert 3 <= sum(flips) <= 13  # about half flipped ...
    for i, f in enumerate(flips):  # ... and the others untouched
        if not f:
            np.testing.assert_allclose(np.asarray(augment_image(jax.random.key(i), x, flip_only)), np.asarray(x), atol=1e-5)


def test_translation_scale_and_rotation_geometry():
    H, W = 33, 21
    x = jnp.zeros((H, W, 1)).at[16, 10, 0].set(1.0).at[0, 0, 0].set(-1.0)  # centre dot; min -1 is the fill
    # Scale about the centre keeps the centre pixel where it is.
    z = augment_image(jax.random.key(3), x, dataclasses.replace(NONE, scale=(1.5, 1.5)))
    assert float(z[16, 10, 0]) == 1.0
    # A rotation (up to 90 degrees here) moves an off-centre dot along its circle about the centre.
    y = jnp.zeros((H, H, 1)).at[16, 20, 0].set(1.0)  # 4 columns right of the centre (16, 16)
    r = np.asarray(augment_image(jax.random.key(1), y, dataclasses.replace(NONE, rotation_deg=90.0)))[..., 0]
    peak = np.unravel_index(np.argmax(r), r.shape)
    assert abs(np.hypot(peak[0] - 16, peak[1] - 16) - 4) <= 0.75 and peak != (16, 20)
    # Translation moves content by at most 10% of the size and fills with the image minimum.
    t = np.asarray(augment_image(jax.random.key(2), x, dataclasses.replace(NONE, translation=0.1)))[..., 0]
    peak = np.unravel_index(np.argmax(t), t.shape)
    assert abs(peak[0] - 16) <= 4 and abs(peak[1] - 10) <= 3
    assert t.min() >= -1.0


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
