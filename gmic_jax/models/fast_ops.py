"""The model's most expensive ops, each in two variants computing the same function: a rewrite
tuned for XLA:CPU and XLA's own op. `stem_conv`, `max_pool` and `strided_conv` pick the variant by
the platform the program is lowered for (`lax.platform_dependent`, resolved at lowering: the other
variant is not in the compiled program), so a GPU program gets XLA's ops until a GPU measurement
says otherwise. `GMIC_JAX_KERNELS=cpu|xla` (or `with kernels("xla"):` around tracing) forces one
variant on every platform: the parity tests run both on CPU.

CPU variants (checked by tests against the plain ops and by the parity tests):

* `stem_conv_s2d`: the 7x7 stride-2 conv on a 1-channel image, rewritten as a 4x4 stride-1 conv
  on the 2x2 space-to-depth image (4 channels at half resolution). A 1-input-channel strided conv
  is the worst case of XLA:CPU's conv path, in the forward and above all in the weight gradient.
* `max_pool_separable`: k x k / stride s max-pool as two separable 1-D pools of shifted strided
  slices, with a custom VJP that routes each output's gradient to the first maximum of its window
  in row-major order (PyTorch's and XLA's select-and-scatter rule) by masks and interior padding,
  no scatter.
* `strided_conv_phases`: a strided conv whose input gradient is computed per output phase.

Their ops carry the name scope `cpu_kernel` (in the HLO's op_name metadata), so a test can check
that a program lacks them.
"""

from __future__ import annotations

import contextlib
import functools
import os

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
    xp = lax.pad(
        x[..., 0],
        jnp.array(0, x.dtype),
        ((0, 0, 0), (padding, rows - H - padding, 0), (padding, cols - W - padding, 0)),
    )
    s = xp.reshape(n, rows // 2, 2, cols // 2, 2).transpose(0, 1, 3, 2, 4).reshape(n, rows // 2, cols // 2, 4)
    # kernel (k, k, 1, C) -> zero-pad to (2kb, 2kb) -> (kb, 2, kb, 2, C) -> (kb, kb, 4, C)
    kp = jnp.pad(kernel[:, :, 0, :], ((0, 2 * kb - k), (0, 2 * kb - k), (0, 0)))
    kp = kp.reshape(kb, 2, kb, 2, -1).transpose(0, 2, 1, 3, 4).reshape(kb, kb, 4, -1)
    return lax.conv_general_dilated(s, kp.astype(s.dtype), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _strided_views(x, window: int, stride: int, axis: int):
    """The `window` strided views of x along `axis` (offsets 0..window-1)."""
    out = (x.shape[axis] - window) // stride + 1
    for a in range(window):
        yield lax.slice_in_dim(x, a, a + stride * (out - 1) + 1, stride, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_1d(x, window: int, stride: int, axis: int):
    return functools.reduce(jnp.maximum, _strided_views(x, window, stride, axis))


def _max_pool_1d_fwd(x, window, stride, axis):
    return _max_pool_1d(x, window, stride, axis), x


def _max_pool_1d_bwd(window, stride, axis, x, g):
    # Route g to the first maximum of each window: offset a wins where it equals the maximum and
    # no earlier offset did. Then place each offset's share with interior padding (no scatter).
    views = list(_strided_views(x, window, stride, axis))
    y = functools.reduce(jnp.maximum, views)
    zero = jnp.array(0, g.dtype)
    n_out, n_in = g.shape[axis], x.shape[axis]
    taken, dx = None, None
    for a, v in enumerate(views):
        hit = v == y
        first = hit if taken is None else hit & ~taken
        taken = hit if taken is None else taken | hit
        config = [(0, 0, 0)] * x.ndim
        config[axis] = (a, n_in - (a + stride * (n_out - 1) + 1), stride - 1)
        placed = lax.pad(jnp.where(first, g, zero), zero, config)
        dx = placed if dx is None else dx + placed
    return (dx,)


_max_pool_1d.defvjp(_max_pool_1d_fwd, _max_pool_1d_bwd)


def max_pool_separable(x, window: int, stride: int, padding: int = 0):
    """Max-pool NHWC with -inf padding (PyTorch's MaxPool2d) and first-maximum gradient routing."""
    if padding:
        x = lax.pad(
            x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0))
        )
    # Separable: a max over window rows of maxima over window columns. The first maximum in
    # row-major order of the 2-D window is the first row holding the maximum and, in it, the first
    # column: exactly what first-maximum routing of the two 1-D pools selects.
    return _max_pool_1d(_max_pool_1d(x, window, stride, 2), window, stride, 1)


def _conv(x, kernel, stride: int, padding):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv_phases(x, kernel, stride: int, padding: int):
    """conv(x, kernel) with `stride` and symmetric `padding`, NHWC / HWIO. Its input gradient is
    computed per output phase (sub-pixel convolution) instead of XLA's base-dilated transposed
    convolution, which multiplies stride**2 times as many zeros as values."""
    return _conv(x, kernel, stride, ((padding, padding), (padding, padding)))


def _strided_conv_fwd(x, kernel, stride, padding):
    return strided_conv_phases(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd(stride, padding, res, g):
    x, kernel = res
    _, dkernel_vjp = jax.vjp(lambda k: _conv(x, k, stride, ((padding, padding), (padding, padding))), kernel)
    (dkernel,) = dkernel_vjp(g)
    return _strided_conv_input_grad(g, kernel, x.shape, stride, padding), dkernel


strided_conv_phases.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _strided_conv_input_grad(g, kernel, x_shape, stride: int, padding: int):
    """d conv / d x by phases. With xp the padded input, y[i] = sum_a xp[s*i + a] W[a], so
    dxp[s*m + p] = sum_{t >= 0, a = p + s*t < k} g[m - t] W[a]: for each phase p a small
    stride-1 correlation of g with the phase's taps, then the phases interleave into dxp."""
    n, H, W, cin = x_shape
    kh, kw = kernel.shape[:2]
    s = stride
    ho, wo = g.shape[1:3]
    Hp, Wp = H + 2 * padding, W + 2 * padding
    M, M2 = -(-Hp // s), -(-Wp // s)  # rows / cols of each phase
    wt = jnp.swapaxes(kernel, 2, 3).astype(g.dtype)  # (kh, kw, cout, cin): g's channels in, x's out
    rows = []
    for p in range(s):
        cols = []
        for q in range(s):
            ta, tb = len(range(p, kh, s)), len(range(q, kw, s))  # taps of this phase
            if ta == 0 or tb == 0:
                cols.append(jnp.zeros((n, M, M2, cin), g.dtype))
                continue
            # taps a = p + s*t for t = ta-1 .. 0 (reversed: correlation over g[m - t])
            sub = wt[p::s][::-1][:, q::s][:, ::-1]
            # g[m - t] for m in [0, M): pad g by ta-1 on top and up to M rows at the bottom.
            gp = lax.pad(g, jnp.array(0, g.dtype), ((0, 0, 0), (ta - 1, M - ho, 0), (tb - 1, M2 - wo, 0), (0, 0, 0)))
            cols.append(_conv(gp, sub, 1, "VALID"))
        rows.append(jnp.stack(cols, axis=3))  # (n, M, M2, s_q, cin)
    phases = jnp.stack(rows, axis=2)  # (n, M, s_p, M2, s_q, cin)
    dxp = phases.reshape(n, M * s, M2 * s, cin)
    return dxp[:, padding : padding + H, padding : padding + W, :]


# ----------------------------------------------------------------------------- XLA's own ops
def stem_conv_xla(x, kernel, padding: int):
    """conv(x, kernel, stride 2, symmetric `padding`), NHWC / HWIO."""
    return _conv(x, kernel, 2, ((padding, padding), (padding, padding)))


def max_pool_xla(x, window: int, stride: int, padding: int = 0):
    """Max-pool NHWC with -inf padding by `lax.reduce_window` (gradient: XLA's select-and-scatter,
    which also routes to the first maximum of each window)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def strided_conv_xla(x, kernel, stride: int, padding: int):
    return _conv(x, kernel, stride, ((padding, padding), (padding, padding)))


# ----------------------------------------------------------------------------- choice by platform
KERNELS_ENV = "GMIC_JAX_KERNELS"
KERNEL_CHOICES = ("auto", "cpu", "xla")
_forced: list[str] = []


def kernel_choice() -> str:
    """'auto' (by the lowering platform), 'cpu' or 'xla': the innermost `kernels(...)` block, else
    $GMIC_JAX_KERNELS, else 'auto'. Read when a function is traced."""
    choice = _forced[-1] if _forced else (os.environ.get(KERNELS_ENV) or "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={choice!r}; expected one of {KERNEL_CHOICES}")
    return choice


@contextlib.contextmanager
def kernels(choice: str):
    """Force the kernel variant of everything traced inside the block: 'cpu' (the CPU rewrites on
    every platform), 'xla' (XLA's own ops everywhere) or 'auto'. jit caches traced functions, so
    use it around a fresh `jax.jit` (or its first call)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels({choice!r}): expected one of {KERNEL_CHOICES}")
    _forced.append(choice)
    try:
        yield
    finally:
        _forced.pop()


def _cpu_kernel(fn):
    @functools.wraps(fn)
    def scoped(*args):
        with jax.named_scope("cpu_kernel"):
            return fn(*args)

    return scoped


def _by_platform(cpu_fn, xla_fn, *args):
    choice = kernel_choice()
    if choice == "cpu":
        return _cpu_kernel(cpu_fn)(*args)
    if choice == "xla":
        return xla_fn(*args)
    return lax.platform_dependent(*args, cpu=_cpu_kernel(cpu_fn), default=xla_fn)


def stem_conv(x, kernel, padding: int):
    """The 7x7 stride-2 stem conv of a 1-channel image: `stem_conv_s2d` on CPU, XLA's conv elsewhere."""
    return _by_platform(lambda x, k: stem_conv_s2d(x, k, padding), lambda x, k: stem_conv_xla(x, k, padding), x, kernel)


def max_pool(x, window: int, stride: int, padding: int = 0):
    """Max-pool NHWC (PyTorch's MaxPool2d, first-maximum gradient): `max_pool_separable` on CPU,
    `lax.reduce_window` elsewhere."""
    return _by_platform(
        lambda x: max_pool_separable(x, window, stride, padding), lambda x: max_pool_xla(x, window, stride, padding), x
    )


def strided_conv(x, kernel, stride: int, padding: int):
    """conv(x, kernel) with `stride` and symmetric `padding`, NHWC / HWIO: input gradient by output
    phases on CPU (`strided_conv_phases`), XLA's transposed convolution elsewhere."""
    return _by_platform(
        lambda x, k: strided_conv_phases(x, k, stride, padding),
        lambda x, k: strided_conv_xla(x, k, stride, padding),
        x,
        kernel,
    )
