"""Crop + bicubic resize on the device, as PIL resizes: the window noise of training on the device.

With ``data.window_noise`` the host draws each example's crop borders (the original's window
noise, :func:`gmic_jax.data.window.noise_borders`, seeded by (seed, epoch, example)) and ships the
cached region they lie in; :func:`crop_resize` cuts the crop and resizes it to the model's window
on the device, in a program dispatched before the training step
(:func:`gmic_jax.train.step.make_window_fn`). The host then only copies bytes, which keeps a GPU fed; the
resampling costs the device a few gathers per pixel (benchmarks/RESULTS.md).

The rule is PIL's ``Image.resize(..., BICUBIC)`` of the cropped float32 image (Resample.c), the
host reference :func:`gmic_jax.data.window.crop_resized`:

- separable: a horizontal pass, then a vertical one;
- along an axis with ``n_in`` crop and ``n_out`` window pixels, output pixel ``i`` is centred at
  ``(i + 0.5) n_in / n_out``; the cubic kernel (Keys, a = -0.5, support 2) is widened by
  ``s = max(n_in / n_out, 1)`` (antialiasing when the crop is larger than the window);
- its taps are the crop pixels ``[floor(c - 2s + 0.5), floor(c + 2s + 0.5))``, cut to the crop
  (at the crop's borders fewer taps), with weights normalised to sum 1.

Tap positions are computed in exact integer arithmetic (the kernel's argument is one rounding of
an integer ratio); weights and sums are float32 where PIL uses float64. Results are rounded and
clipped to the uint16 range as the host path stores its windows: device and host windows then
agree exactly except where the float32 sum lies within its rounding error of a half-integer
(tests/test_window_noise.py states and checks the bound).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

IMAGE_MAX = 65535.0  # the batch layout's uint16 image values


def max_taps(max_scale: float) -> int:
    """Taps per output pixel for crops up to ``max_scale`` times the window along an axis (PIL's
    ``ksize``: the kernel's support, 2 ``max_scale`` pixels, on each side of the centre)."""
    return 2 * math.ceil(2.0 * max(float(max_scale), 1.0)) + 1


def _cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (PIL's bicubic)."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _axis_taps(start, stop, n_out: int, ksize: int):
    """Input positions (n_out, ksize) int32 and weights (n_out, ksize) float32 of one axis, for
    the crop ``[start, stop)`` of it resized to ``n_out`` pixels; absent taps have weight 0."""
    n_in = stop - start
    m = jnp.maximum(n_in, n_out)  # the support is 2 m / n_out pixels
    i = jnp.arange(n_out, dtype=jnp.int32)
    at = (2 * i + 1) * n_in  # 2 n_out times the centre
    lo = jnp.maximum(jnp.floor_divide(at - 4 * m + n_out, 2 * n_out), 0)
    hi = jnp.minimum(jnp.floor_divide(at + 4 * m + n_out, 2 * n_out), n_in)
    r = lo[:, None] + jnp.arange(ksize, dtype=jnp.int32)[None, :]
    # kernel argument (r + 0.5 - centre) / s = ((2r + 1) n_out - (2i + 1) n_in) / (2 m): one rounding
    x = ((2 * r + 1) * n_out - at[:, None]).astype(jnp.float32) / (2 * m).astype(jnp.float32)
    w = jnp.where(r < hi[:, None], _cubic(x), 0.0)
    w = w / jnp.sum(w, axis=1, keepdims=True)
    return start + jnp.minimum(r, n_in - 1), w


def _horizontal(region, borders, ww: int, ksize: int):
    """The horizontal pass of one example: (region rows, ww) float32."""
    cols, wx = _axis_taps(borders[2], borders[3], ww, ksize)
    x = region.astype(jnp.float32).T  # whole rows to gather: gathering columns leaves XLA a transposed layout
    return sum(x[cols[:, k], :] * wx[:, k, None] for k in range(ksize)).T


def _vertical(tmp, borders, wh: int, ksize: int, rounded: bool):
    """The vertical pass of one example: (wh, ww) float32, rounded to the uint16 range or not."""
    rows, wy = _axis_taps(borders[0], borders[1], wh, ksize)
    out = sum(tmp[rows[:, k], :] * wy[:, k, None] for k in range(ksize))
    return jnp.clip(jnp.round(out), 0.0, IMAGE_MAX) if rounded else out


def crop_resize(regions, borders, window_shape, rounded: bool = True):
    """``regions[n, top:bottom, left:right]`` resized to ``window_shape`` (bicubic, as PIL), per example.

    ``regions`` (N, h, w) (any real dtype; uint16 from the cache), ``borders`` (N, 4) int
    ``[top, bottom, left, right]`` inside each region. The region's shape bounds the crop, and so
    the taps per pixel (:func:`max_taps`; 7 for the original's noise at 2944 x 1920).
    Returns (N, H, W) float32: ``rounded``, integers in [0, 65535] as the host path's uint16
    windows; else the resampled values themselves.
    """
    wh, ww = window_shape
    ksize = max_taps(max(regions.shape[1] / wh, regions.shape[2] / ww))
    borders = jnp.asarray(borders, jnp.int32)
    # One example at a time, each pass a loop of its own: a loop's results are written out, so
    # XLA cannot fuse a pass's sum of taps into its consumers (the next pass's gathers, the
    # normalisation, the network), which would recompute it in each of them.
    tmp = lax.map(lambda a: _horizontal(a[0], a[1], ww, ksize), (regions, borders))
    return lax.map(lambda a: _vertical(a[0], a[1], wh, ksize, rounded), (tmp, borders))
