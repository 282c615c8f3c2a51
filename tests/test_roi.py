"""retrieve_roi and crop extraction against plain-numpy transcriptions of the paper's Algorithm 1
and of the original's crop rule (written here in float64, independent of the JAX code)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmic_jax.models.roi import extract_patches, retrieve_roi

# (grid h, w), (image H, W), crop: a few fixed shapes so the jitted function compiles once each.
SHAPES = [
    ((23, 15), (1472, 960), (256, 256)),  # the 'small' fixture: 4x4 windows
    ((5, 4), (160, 128), (64, 64)),  # windows that exhaust a small map
    ((7, 9), (700, 900), (250, 300)),  # non-square window, .5 rounding of pixel positions
    ((3, 3), (48, 48), (48, 48)),  # window == whole map: every pick is (0, 0)
]


def numpy_algorithm_1(saliency, image_shape, crop_shape, K):
    """Algorithm 1 of the paper, in float64 numpy. saliency: (h, w, C). Returns (K, 2) pixels."""
    h, w, _ = saliency.shape
    H, W = image_shape
    wh = min(max(int(np.round(crop_shape[0] * h / H)), 1), h)
    ww = min(max(int(np.round(crop_shape[1] * w / W)), 1), w)
    a = saliency.astype(np.float64)
    m = np.zeros((h, w))
    for c in range(a.shape[-1]):
        lo, hi = a[..., c].min(), a[..., c].max()
        if hi > lo:
            m += (a[..., c] - lo) / (hi - lo)
    picks = []
    for _ in range(K):
        best, best_rc = -np.inf, None
        for r in range(h - wh + 1):
            for c in range(w - ww + 1):
                s = m[r : r + wh, c : c + ww].sum()
                if s > best:  # strict: the first maximum in row-major order wins ties
                    best, best_rc = s, (r, c)
        r, c = best_rc
        m[r : r + wh, c : c + ww] = 0.0
        picks.append((int(np.round(r / h * H)), int(np.round(c / w * W))))
    return np.array(picks)


@functools.lru_cache(maxsize=None)
def jitted_roi(image_shape, crop_shape, K):
    return jax.jit(lambda s: retrieve_roi(s, image_shape, crop_shape, K)[0])


@st.composite
def saliency_maps(draw):
    grid, image, crop = draw(st.sampled_from(SHAPES))
    h, w = grid
    # Values on a power-of-two lattice with each class map spanning [0, 1]: min-max normalisation
    # is the identity and window sums are exact in float32 and float64 alike, so the comparison is
    # exact; ties are common.
    levels = draw(st.sampled_from([1, 2, 4, 8]))
    values = draw(st.lists(st.integers(0, levels), min_size=h * w * 2, max_size=h * w * 2))
    sal = np.array(values, np.float32).reshape(h, w, 2) / levels
    for c in range(2):
        i = draw(st.integers(0, h * w - 1))
        j = (i + 1 + draw(st.integers(0, h * w - 2))) % (h * w)
        sal[..., c].flat[i] = 0.0
        sal[..., c].flat[j] = 1.0
    if draw(st.booleans()):
        sal[..., draw(st.integers(0, 1))] = 0.25  # one constant class map
    K = draw(st.sampled_from([1, 6, 10]))
    return sal, image, crop, K


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(saliency_maps())
def test_retrieve_roi_matches_numpy_algorithm_1(example):
    sal, image, crop, K = example
    ours = np.asarray(jitted_roi(image, crop, K)(jnp.asarray(sal[None])))[0]
    np.testing.assert_array_equal(ours, numpy_algorithm_1(sal, image, crop, K))


def test_constant_map_picks_origin_without_nan():
    sal = jnp.full((2, 23, 15, 2), 0.7, jnp.float32)
    locs, grid = retrieve_roi(sal, (1472, 960), (256, 256), 6)
    assert not np.isnan(np.asarray(locs, np.float64)).any()
    np.testing.assert_array_equal(np.asarray(grid), 0)
    np.testing.assert_array_equal(np.asarray(locs), 0)


def test_pixel_rounding_is_half_to_even():
    # 7 x 9 grid on 700 x 900 ... choose a grid where (i / h) * H hits .5 exactly: h=4, H=6 -> 1.5 -> 2, 4.5 -> 4.
    from gmic_jax.models.roi import grid_to_pixel_table

    np.testing.assert_array_equal(grid_to_pixel_table(4, 6), [0, 2, 3, 4])
    # float64 table, not float32 arithmetic in the graph: agrees with numpy for many sizes.
    for h in (16, 23, 46):
        for H in range(300, 4000, 37):
            np.testing.assert_array_equal(grid_to_pixel_table(h, H), np.around(np.arange(h) / h * H))


def test_selection_passes_no_gradient_and_crops_pass_it_to_their_pixels():
    """The locations are integers picked by argmax: a loss that sees the saliency map through the
    crops alone has an exactly zero gradient with respect to the map, while the map's other uses
    keep theirs, and each crop pixel's gradient lands on the image pixel it was cut from.

    (`lax.stop_gradient` in retrieve_roi and GMIC does not change these values: argmax already ends
    the gradient, and with it removed the compiled gradient program is the same. A differentiable
    selection, such as a soft or straight-through one, would fail the first assertion.)"""
    rng = np.random.default_rng(0)
    image_shape, crop, K = (160, 128), (64, 64), 3  # 5 x 4 grid, 2 x 2-cell windows: every crop inside
    sal = jnp.asarray(rng.uniform(size=(1, 5, 4, 2)), jnp.float32)
    image = jnp.asarray(rng.standard_normal((1, *image_shape)), jnp.float32)
    crop_weights = jnp.asarray(rng.standard_normal((1, K, *crop)), jnp.float32)
    map_weights = jnp.asarray(rng.standard_normal(sal.shape), jnp.float32)

    def crops_only(s, x):
        locs, _ = retrieve_roi(s, image_shape, crop, K)
        return jnp.sum(crop_weights * extract_patches(x, locs, crop))

    g_map, g_image = jax.grad(crops_only, argnums=(0, 1))(sal, image)
    np.testing.assert_array_equal(np.asarray(g_map), 0.0)
    # The map's direct use (as y_global's pooling uses it) passes its gradient unchanged.
    g_both = jax.grad(lambda s: crops_only(s, image) + jnp.sum(map_weights * s))(sal)
    np.testing.assert_array_equal(np.asarray(g_both), np.asarray(map_weights))
    # Crops pass d loss / d crop pixel to the pixel it was cut from (sums where crops overlap).
    locs = np.asarray(retrieve_roi(sal, image_shape, crop, K)[0])[0]
    assert ((locs + crop) <= image_shape).all()  # no border fill: every crop pixel is an image pixel
    expected = np.zeros(image_shape, np.float32)
    for k, (r, c) in enumerate(locs):
        expected[r : r + crop[0], c : c + crop[1]] += np.asarray(crop_weights)[0, k]
    np.testing.assert_allclose(np.asarray(g_image)[0], expected, rtol=1e-6, atol=1e-6)
    assert len({tuple(loc) for loc in locs}) == K and (expected == 0).any()  # K distinct crops, pixels outside them


def test_local_head_gets_no_gradient_from_the_global_network():
    """In GMIC, y_local depends on the global network only through the (discrete) patch locations:
    its gradient with respect to the global network's parameters is exactly zero and its gradient
    with respect to the image lies inside the crops, while y_global trains the global network."""
    from gmic_jax import GMIC, GMICConfig

    config = GMICConfig(
        image_shape=(64, 48),
        crop_shape=(16, 16),
        K=2,
        percent_t=0.1,
        local_net="resnet18_narrow",
        global_strides=(1, 2, 2, 1, 1),
        global_blocks=(1, 1, 1, 1, 1),
        global_widths=(4, 8, 8, 8, 8),
    )
    model = GMIC(config)
    x = jax.random.normal(jax.random.key(1), (1, 64, 48, 1))
    # Variables of init's shapes drawn in numpy (compiling init's random initialisers costs ~18 s of
    # CPU here): weights N(0, 1 / fan-in), BatchNorm's scale and running variance 1, biases and means 0.
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))

    def heads(params, x):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return jnp.stack([out["y_local"].sum(), out["y_global"].sum()]), out["patch_locations"]

    # One compile for both heads' gradients (rows of the Jacobian: 0 y_local, 1 y_global).
    (g_params, g_x), locs = jax.jit(jax.jacrev(heads, argnums=(0, 1), has_aux=True))(variables["params"], x)
    g_local = jax.tree.map(lambda g: g[0], g_params)
    g_global = jax.tree.map(lambda g: g[1], g_params)
    gx_local = g_x[0]
    for part in ("ds_net", "left_postprocess_net"):
        assert all((np.asarray(v) == 0).all() for v in jax.tree.leaves(g_local[part])), part
        assert any((np.asarray(v) != 0).any() for v in jax.tree.leaves(g_global[part])), part
    assert any((np.asarray(v) != 0).any() for v in jax.tree.leaves(g_local["dn_resnet"]))
    inside = np.zeros((64, 48), bool)
    for r, c in np.asarray(locs)[0]:
        inside[r : r + 16, c : c + 16] = True
    gx = np.asarray(gx_local)[0, ..., 0]
    assert (gx[~inside] == 0).all() and (gx[inside] != 0).mean() > 0.5 and (~inside).any()


def numpy_crop(image, r, c, crop_shape):
    """The original's rule: fill with the image minimum, clipped content at the bottom-right."""
    H, W = image.shape
    ch, cw = crop_shape
    r1, c1 = min(r + ch, H), min(c + cw, W)
    out = np.full(crop_shape, image.min(), image.dtype)
    out[ch - (r1 - r) :, cw - (c1 - c) :] = image[r:r1, c:c1]
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([(40, 30), (20, 12), (64, 64)]),
    st.lists(st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)), min_size=3, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_extract_patches_matches_original_border_rule(image_shape, fractions, seed):
    crop = (16, 24)
    H, W = image_shape
    images = np.random.default_rng(seed).standard_normal((2, H, W)).astype(np.float32)
    locs = np.array([[(int(fr * H), int(fc * W)) for fr, fc in fractions]] * 2, np.int32)
    ours = np.asarray(_jitted_crops(crop)(jnp.asarray(images), jnp.asarray(locs)))
    for n in range(2):
        for k in range(3):
            np.testing.assert_array_equal(ours[n, k], numpy_crop(images[n], *locs[n, k], crop))


@functools.lru_cache(maxsize=None)
def _jitted_crops(crop):
    return jax.jit(lambda x, locs: extract_patches(x, locs, crop))


def test_extract_patches_image_smaller_than_crop():
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 4) + 5
    locs = np.array([[[1, 2]]], np.int32)
    ours = np.asarray(extract_patches(jnp.asarray(image), jnp.asarray(locs), (5, 6)))[0, 0]
    np.testing.assert_array_equal(ours, numpy_crop(image[0], 1, 2, (5, 6)))
    assert ours[0, 0] == 5.0 and ours[-1, -1] == image[0, -1, -1]
