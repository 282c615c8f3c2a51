"""Speed rewrites compute the same function as the plain ops they replace, and the variant a
program gets follows the platform it is lowered for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gmic_jax.models import fast_ops
from gmic_jax.models.fast_ops import max_pool_separable, max_pool_xla, stem_conv_s2d


def numpy_max_pool_grad(x, g, window, stride, padding):
    """Reference: each output's gradient goes to the first maximum of its window (row-major)."""
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
    dx = np.zeros_like(xp)
    n, ho, wo, c = g.shape
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    win = xp[b, i * stride : i * stride + window, j * stride : j * stride + window, ch]
                    a, bb = np.unravel_index(np.argmax(win), win.shape)  # argmax: first maximum
                    dx[b, i * stride + a, j * stride + bb, ch] += g[b, i, j, ch]
    return dx[:, padding : padding + x.shape[1], padding : padding + x.shape[2]]


@pytest.mark.parametrize("pool", [max_pool_separable, max_pool_xla])
@pytest.mark.parametrize("shape, padding", [((2, 11, 9, 3), 0), ((1, 12, 10, 2), 1), ((1, 7, 7, 1), 0)])
def test_max_pool_gradient_goes_to_first_maximum_on_ties(shape, padding, pool):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, shape).astype(np.float32)  # three levels: ties everywhere
    y, vjp = jax.vjp(lambda v: pool(v, 3, 2, padding), jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), numpy_max_pool_grad(x, g, 3, 2, padding), rtol=1e-6)
    ref = lax.reduce_window(
        jnp.asarray(x),
        -jnp.inf,
        lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


@pytest.mark.parametrize("pool", [max_pool_separable, max_pool_xla])
def test_max_pool_constant_input_routes_to_window_corner(pool):
    x = jnp.zeros((1, 5, 5, 1))
    dx = jax.grad(lambda v: pool(v, 3, 2).sum())(x)
    expected = np.zeros((5, 5))
    expected[0, 0] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1.0
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], expected)


@pytest.mark.parametrize("hw", [(64, 48), (65, 47), (31, 30), (8, 9)])
def test_space_to_depth_stem_equals_strided_conv(hw):
    x = jax.random.normal(jax.random.key(0), (2, *hw, 1))
    k = jax.random.normal(jax.random.key(1), (7, 7, 1, 5))

    def plain(x, k):
        return lax.conv_general_dilated(x, k, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    ref, ref_vjp = jax.vjp(plain, x, k)
    ours, our_vjp = jax.vjp(lambda x, k: stem_conv_s2d(x, k, 3), x, k)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(2), ref.shape)
    for a, b in zip(our_vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_strided_conv_by_phases_equals_xlas_gradient():
    x = jax.random.normal(jax.random.key(0), (2, 13, 10, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    ref, ref_vjp = jax.vjp(lambda x, k: fast_ops.strided_conv_xla(x, k, 2, 1), x, k)
    ours, our_vjp = jax.vjp(lambda x, k: fast_ops.strided_conv_phases(x, k, 2, 1), x, k)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(2), ref.shape)
    for a, b in zip(our_vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def _three_ops(x, k, k2):
    y = fast_ops.stem_conv(x, k, 3)
    y = fast_ops.max_pool(y, 3, 2, 0)
    return jnp.sum(fast_ops.strided_conv(y, k2, 2, 1) ** 2)


_ARGS = (
    jax.ShapeDtypeStruct((1, 40, 36, 1), jnp.float32),
    jax.ShapeDtypeStruct((7, 7, 1, 4), jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32),
)


def _program(platform: str, choice: str = "auto") -> str:
    """StableHLO of the three ops' gradient lowered for `platform` (no device of it needed)."""
    with fast_ops.kernels(choice):
        exported = jax.export.export(jax.jit(jax.grad(_three_ops, argnums=(0, 1, 2))), platforms=[platform])(*_ARGS)
    return exported.mlir_module()


def test_variant_follows_the_lowering_platform():
    cpu, cuda = _program("cpu"), _program("cuda")
    assert "cpu_kernel" in cpu and "cpu_kernel" not in cuda
    assert "select_and_scatter" in cuda and "select_and_scatter" not in cpu  # XLA's max-pool gradient
    # Forcing a variant overrides the platform, both ways.
    assert "cpu_kernel" not in _program("cpu", "xla") and "cpu_kernel" in _program("cuda", "cpu")


def test_forced_variants_compute_the_same_gradients(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (1, 40, 36, 1))
    k = jax.random.normal(jax.random.key(1), (7, 7, 1, 4))
    k2 = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))
    grads = {}
    for choice in ("cpu", "xla"):
        monkeypatch.setenv(fast_ops.KERNELS_ENV, choice)
        assert fast_ops.kernel_choice() == choice
        grads[choice] = jax.jit(jax.grad(_three_ops, argnums=(0, 1, 2)))(x, k, k2)
    for a, b in zip(grads["cpu"], grads["xla"]):  # float32 round-off, relative to the largest value
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
    monkeypatch.setenv(fast_ops.KERNELS_ENV, "gpu")
    with pytest.raises(ValueError, match="GMIC_JAX_KERNELS"):
        fast_ops.kernel_choice()
    with pytest.raises(ValueError, match="expected one of"):
        with fast_ops.kernels("fast"):
            pass
