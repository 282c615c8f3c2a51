"""On-device data augmentation of whole images (paper 3.3): random flip, rotation, translation,
scale and shear as one affine resampling, then Gaussian noise. Used by training and, through
:func:`tta_augment`, by test-time augmentation in predict, evaluate and validation.

Everything is jit-able and vmapped over the batch; each example draws from its own key, so an
example's augmentation does not depend on how the batch is split over devices.

Geometry: the affine map A = R(theta) . Sh(shear) . S(scale), about the image centre, then a
translation; output pixel p takes the bilinear sample of the input at
c + A^-1 (p - c - t). Pixels that fall outside the input take the image's minimum (the
background of a normalised mammogram). scale > 1 zooms in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation; the defaults are the paper's."""

    flip: bool = True  # left-right, with probability 1/2
    rotation_deg: float = 15.0  # uniform in [-r, r]
    translation: float = 0.1  # uniform in [-f, f] times (H, W)
    scale: tuple[float, float] = (0.8, 1.6)
    shear_deg: float = 25.0  # uniform in [-s, s]
    noise_sigma: float = 0.005  # additive Gaussian noise

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "AugmentConfig":
        d = dict(d or {})
        if "scale" in d:
            d["scale"] = tuple(float(v) for v in d["scale"])
        return cls(**d)

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> "AugmentConfig | None":
        """From a training config's ``augment`` section (``enabled`` plus the fields); None when the
        section is absent or disabled."""
        if section is None:
            return None
        section = dict(section)
        if not section.pop("enabled", True):
            return None
        return cls.from_dict(section)

    @property
    def is_identity(self) -> bool:
        return (
            not self.flip
            and self.rotation_deg == 0
            and self.translation == 0
            and tuple(self.scale) == (1.0, 1.0)
            and self.shear_deg == 0
            and self.noise_sigma == 0
        )


def sample_transform(key, cfg: AugmentConfig, shape):
    """(flip, A^-1 (2, 2), translation (2,)) of one example, in (row, col) pixel coordinates."""
    H, W = shape
    k_flip, k_rot, k_shear, k_scale, k_t = jax.random.split(key, 5)
    flip = jax.random.bernoulli(k_flip, 0.5) if cfg.flip else jnp.array(False)
    deg = math.pi / 180.0
    theta = jax.random.uniform(k_rot, (), minval=-cfg.rotation_deg, maxval=cfg.rotation_deg) * deg
    shear = jax.random.uniform(k_shear, (), minval=-cfg.shear_deg, maxval=cfg.shear_deg) * deg
    s = jax.random.uniform(k_scale, (), minval=cfg.scale[0], maxval=cfg.scale[1])
    t = jax.random.uniform(k_t, (2,), minval=-cfg.translation, maxval=cfg.translation) * jnp.array([H, W], jnp.float32)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.array([[cos, -sin], [sin, cos]])
    shear_m = jnp.array([[1.0, 0.0], [jnp.tan(shear), 1.0]])  # shifts columns in proportion to rows
    A = rot @ shear_m * s
    det = A[0, 0] * A[1, 1] - A[0, 1] * A[1, 0]
    A_inv = jnp.array([[A[1, 1], -A[0, 1]], [-A[1, 0], A[0, 0]]]) / det
    return flip, A_inv, t


def augment_image(key, image, cfg: AugmentConfig):
    """One (H, W, 1) image -> its augmented copy (same shape, float32)."""
    if cfg.is_identity:
        return image
    H, W = image.shape[:2]
    k_geo, k_noise = jax.random.split(key)
    flip, A_inv, t = sample_transform(k_geo, cfg, (H, W))
    x = image[..., 0].astype(jnp.float32)
    x = jnp.where(flip, x[:, ::-1], x)
    c = jnp.array([(H - 1) / 2.0, (W - 1) / 2.0], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(H, dtype=jnp.float32), jnp.arange(W, dtype=jnp.float32), indexing="ij")
    p = jnp.stack([rows.ravel(), cols.ravel()]) - (c + t)[:, None]
    src = A_inv @ p + c[:, None]
    # cval must be static: resample x - min with zero fill, then add the minimum back.
    lo = x.min()
    out = map_coordinates(x - lo, [src[0], src[1]], order=1, mode="constant", cval=0.0).reshape(H, W) + lo
    if cfg.noise_sigma:
        out = out + cfg.noise_sigma * jax.random.normal(k_noise, out.shape, jnp.float32)
    return out[..., None]


def augment_batch(keys, images, cfg: AugmentConfig):
    """(N,) keys and (N, H, W, 1) images -> augmented images, each with its own key."""
    if cfg.is_identity:
        return images
    return jax.vmap(lambda k, x: augment_image(k, x, cfg))(keys, images)


def tta_augment(train_augment: Mapping[str, Any] | None) -> AugmentConfig:
    """The augmentation of one test-time augmentation draw -- the one rule of ``gmic-jax predict
    --tta``, ``gmic-jax evaluate --tta`` and validation during training (``eval.tta_draws``):
    the augmentation the model was trained with (``train_augment``: its training config's
    ``augment`` section, as config.json records it) when it was enabled, else the paper's ranges
    (:class:`AugmentConfig` defaults). Draws are made on device from the normalised window."""
    return AugmentConfig.from_section(train_augment) or AugmentConfig()
