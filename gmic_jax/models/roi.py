"""Patch retrieval: `retrieve_roi` (the paper's Algorithm 1), random patches, crop extraction.

Everything here is traced into the model's jitted graph: window sums by `lax.reduce_window`,
the greedy selection in a `lax.fori_loop` over K, crops by `vmap` + `lax.dynamic_slice`. Shapes
(image, grid, window, crop) are static at trace time, so the grid -> pixel table is built on the
host in float64, reproducing the original's numpy round-half-to-even exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def roi_window_shape(grid_shape, image_shape, crop_shape) -> tuple[int, int]:
    """The crop size on the saliency grid: round(crop * h / H) (numpy rounding), within [1, h]."""
    (h, w), (H, W), (ch, cw) = grid_shape, image_shape, crop_shape
    wh = int(np.round(ch * h / H))
    ww = int(np.round(cw * w / W))
    return min(max(wh, 1), h), min(max(ww, 1), w)


def grid_to_pixel_table(n: int, size: int) -> np.ndarray:
    """Pixel coordinate of grid index 0..n-1: numpy's round-half-to-even of (i / n) * size, float64."""
    return np.around(np.arange(n, dtype=np.int64) / n * size).astype(np.int32)


def normalize_saliency(saliency_map):
    """Per sample and class min-max normalisation over the grid, summed over classes: (N, h, w).

    A constant class map (max == min; the original divides by zero and gets NaN) normalises to 0.
    """
    a = saliency_map.astype(jnp.float32)
    lo = jnp.min(a, axis=(1, 2), keepdims=True)
    hi = jnp.max(a, axis=(1, 2), keepdims=True)
    rng = hi - lo
    safe = jnp.where(rng > 0, rng, 1.0)
    return jnp.sum(jnp.where(rng > 0, (a - lo) / safe, 0.0), axis=-1)


def greedy_windows(score_map, window: tuple[int, int], K: int):
    """Algorithm 1's loop: K times take the window with the largest mean (first maximum in
    row-major order on ties), then zero the map inside it. (N, h, w) -> (N, K, 2) int32 grid
    upper-left (row, col)."""
    n, h, w = score_map.shape
    wh, ww = window
    out_w = w - ww + 1
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]

    def body(k, carry):
        m, picks = carry
        # The original pools with avg_pool2d: sum of the window divided by its area.
        sums = lax.reduce_window(m, 0.0, lax.add, (1, wh, ww), (1, 1, 1), "VALID") / float(wh * ww)
        flat_idx = jnp.argmax(sums.reshape(n, -1), axis=-1)  # first maximum
        r, c = flat_idx // out_w, flat_idx % out_w
        inside = (rows >= r[:, None, None]) & (rows < r[:, None, None] + wh)
        inside &= (cols >= c[:, None, None]) & (cols < c[:, None, None] + ww)
        m = jnp.where(inside, 0.0, m)
        picks = picks.at[:, k].set(jnp.stack([r, c], axis=-1).astype(jnp.int32))
        return m, picks

    picks = jnp.zeros((n, K, 2), jnp.int32)
    _, picks = lax.fori_loop(0, K, body, (score_map, picks))
    return picks


def retrieve_roi(saliency_map, image_shape, crop_shape, K: int):
    """Greedy patch selection on the saliency maps (no gradient flows through it).

    Returns (patch_locations (N, K, 2) int32 pixel upper-left, grid_locations (N, K, 2) int32).
    """
    _, h, w, _ = saliency_map.shape
    window = roi_window_shape((h, w), image_shape, crop_shape)
    score = normalize_saliency(lax.stop_gradient(saliency_map))
    grid = greedy_windows(score, window, K)
    row_px = jnp.asarray(grid_to_pixel_table(h, image_shape[0]))
    col_px = jnp.asarray(grid_to_pixel_table(w, image_shape[1]))
    pixels = jnp.stack([row_px[grid[..., 0]], col_px[grid[..., 1]]], axis=-1)
    return pixels, grid


def random_patch_locations(rng, n: int, image_shape, crop_shape, K: int):
    """Ablation 'random patches': K upper-left corners drawn uniformly so each crop lies inside
    the image where it fits. (N, K, 2) int32."""
    (H, W), (ch, cw) = image_shape, crop_shape
    kr, kc = jax.random.split(rng)
    r = jax.random.randint(kr, (n, K), 0, max(H - ch, 0) + 1)
    c = jax.random.randint(kc, (n, K), 0, max(W - cw, 0) + 1)
    return jnp.stack([r, c], axis=-1).astype(jnp.int32)


def extract_patches(images, locations, crop_shape):
    """Cut crops at pixel upper-left corners with the original's border rule.

    images (N, H, W) and locations (N, K, 2) -> (N, K, ch, cw). Each crop starts filled with its
    image's minimum; the part of x[r:min(r+ch, H), c:min(c+cw, W)] inside the image is placed at
    the crop's bottom-right corner.
    """
    n, H, W = images.shape
    ch, cw = crop_shape
    fill = jnp.min(images, axis=(1, 2))
    # Images smaller than a crop: pad on top/left with the minimum so a full crop always fits;
    # content placed bottom-right is unaffected by that padding.
    pad_h, pad_w = max(ch - H, 0), max(cw - W, 0)
    if pad_h or pad_w:
        images = jax.vmap(lambda x, v: jnp.pad(x, ((pad_h, 0), (pad_w, 0)), constant_values=v))(images, fill)
    Hp, Wp = H + pad_h, W + pad_w
    r = locations[..., 0] + pad_h
    c = locations[..., 1] + pad_w
    # Clipped crops end at the border: start at min(r, Hp - ch); rows before r are fill.
    r0 = jnp.minimum(r, Hp - ch)
    c0 = jnp.minimum(c, Wp - cw)
    row_ok = (r0[..., None] + jnp.arange(ch)) >= r[..., None]  # (N, K, ch)
    col_ok = (c0[..., None] + jnp.arange(cw)) >= c[..., None]  # (N, K, cw)

    def crop_one(x, rr, cc):
        return lax.dynamic_slice(x, (rr, cc), (ch, cw))

    crops = jax.vmap(jax.vmap(crop_one, in_axes=(None, 0, 0)))(images, r0, c0)
    keep = row_ok[..., :, None] & col_ok[..., None, :]
    return jnp.where(keep, crops, fill[:, None, None, None])


def rotate_patches(rng, patches):
    """Training-time augmentation: rotate each square patch by a random multiple of 90 degrees.
    (N, K, s, s) -> same shape."""
    if patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"rotate_crops needs square crops, got {patches.shape[-2:]}")
    n, k = patches.shape[:2]
    turns = jax.random.randint(rng, (n, k), 0, 4)

    def rotate(p, t):
        return lax.switch(t, [lambda q, i=i: jnp.rot90(q, i) for i in range(4)], p)

    return jax.vmap(jax.vmap(rotate))(patches, turns)
