"""Rewrites of the global network's most expensive ops for XLA:CPU; each computes the same
function as the straightforward op (checked by tests against it and by the parity tests).

* `stem_conv_s2d`: the 7x7 stride-2 conv on a 1-channel image, rewritten as a 4x4 stride-1 conv
  on the 2x2 space-to-depth image (4 channels at half resolution). A 1-input-channel strided conv
  is the worst case of XLA:CPU's conv path, in the forward and above all in the weight gradient.
* `max_pool`: k x k / stride s max-pool from shifted strided slices, with a custom VJP that routes
  each output's gradient to the first maximum of its window in row-major order (PyTorch's and
  XLA's select-and-scatter rule) by masks and interior padding, with no scatter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def stem_conv_s2d(x, kernel, padding: int):
    """conv(x, kernel, stride 2, symmetric `padding`) for odd square kernels; x (N, H, W, 1),
    kernel (k, k, 1, C) HWIO -> (N, Ho, Wo, C) with Ho = (H + 2p - k) // 2 + 1."""
    n, H, W, cin = x.shape
    k = kernel.shape[0]
    assert cin == 1 and kernel.shape[:3] == (k, k, 1), (x.shape, kernel.shape)
    ho, wo = (H + 2 * padding - k) // 2 + 1, (W + 2 * padding - k) // 2 + 1
    kb = (k + 1) // 2  # kernel size on the 2x2 blocks
    # Pad so that the blocked image has exactly ho + kb - 1 rows / wo + kb - 1 cols.
    rows, cols = 2 * (ho + kb - 1), 2 * (wo + kb - 1)
    xp = lax.pad(x[..., 0], jnp.array(0, x.dtype),
                 ((0, 0, 0), (padding, rows - H - padding, 0), (padding, cols - W - padding, 0)))
    s = xp.reshape(n, rows // 2, 2, cols // 2, 2).transpose(0, 1, 3, 2, 4).reshape(n, rows // 2, cols // 2, 4)
    # kernel (k, k, 1, C) -> zero-pad to (2kb, 2kb) -> (kb, 2, kb, 2, C) -> (kb, kb, 4, C)
    kp = jnp.pad(kernel[:, :, 0, :], ((0, 2 * kb - k), (0, 2 * kb - k), (0, 0)))
    kp = kp.reshape(kb, 2, kb, 2, -1).transpose(0, 2, 1, 3, 4).reshape(kb, kb, 4, -1)
    return lax.conv_general_dilated(s, kp.astype(s.dtype), (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _window_slices(x, window, stride, out_hw):
    """The window*window strided views of x (N, H, W, C), in row-major window order."""
    ho, wo = out_hw
    for a in range(window):
        for b in range(window):
            yield (a, b), lax.slice(
                x, (0, a, b, 0), (x.shape[0], a + stride * (ho - 1) + 1, b + stride * (wo - 1) + 1, x.shape[3]),
                (1, stride, stride, 1))


def _pool_out(n, window, stride):
    return (n - window) // stride + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_valid(x, window: int, stride: int):
    out_hw = (_pool_out(x.shape[1], window, stride), _pool_out(x.shape[2], window, stride))
    return functools.reduce(jnp.maximum, (v for _, v in _window_slices(x, window, stride, out_hw)))


def _max_pool_fwd(x, window, stride):
    y = _max_pool_valid(x, window, stride)
    return y, (x, y)


def _max_pool_bwd(window, stride, res, g):
    x, y = res
    ho, wo = y.shape[1:3]
    H, W = x.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(x.shape, g.dtype)
    zero = jnp.array(0, g.dtype)
    for (a, b), v in _window_slices(x, window, stride, (ho, wo)):
        first = (v == y) & ~taken  # first maximum in row-major window order
        taken = taken | first
        contrib = jnp.where(first, g, zero)
        # Place contrib[i, j] at x[a + stride*i, b + stride*j]: interior padding, no scatter.
        hi_h = H - (a + stride * (ho - 1) + 1)
        hi_w = W - (b + stride * (wo - 1) + 1)
        dx = dx + lax.pad(contrib, zero, ((0, 0, 0), (a, hi_h, stride - 1), (b, hi_w, stride - 1), (0, 0, 0)))
    return (dx,)


_max_pool_valid.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: int, stride: int, padding: int = 0):
    """Max-pool NHWC with -inf padding (PyTorch's MaxPool2d) and first-maximum gradient routing."""
    if padding:
        x = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)))
    return _max_pool_valid(x, window, stride)
