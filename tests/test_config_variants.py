"""Every GMICConfig field changes the computation, at a small size."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmic_jax import GMIC, GMICConfig, init_variables
from gmic_jax.config import REMAT_POLICIES
from gmic_jax.models.remat import remat_spec
from gmic_jax.models.global_net import receptive_field, saliency_grid_shape
from gmic_jax.models.local_net import local_feature_width

# Programs that take >= 1 s to compile and are built again by later tests load from JAX's
# persistent cache: measured 289 -> 258 s wall (404 -> 346 s of CPU) for the module, quiet machine.
pytestmark = pytest.mark.usefixtures("compile_cache_in_process")

BASE = GMICConfig(image_shape=(512, 384), crop_shape=(64, 64), K=4, percent_t=0.05)
X = jax.random.normal(jax.random.key(7), (2, 512, 384, 1))


def run(config, variables=None, train=False, rng=0):
    if variables is None:
        variables = init_variables(config, jax.random.key(0))
    rngs = {"roi": jax.random.key(rng)}
    f = GMIC(config).apply
    if train:
        out, _ = f(variables, X, train=True, mutable=["batch_stats"], rngs=rngs)
    else:
        out = f(variables, X, train=False, rngs=rngs)
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def base():
    variables = init_variables(BASE, jax.random.key(0))
    return variables, run(BASE, variables)


def differs(a, b):
    return a.shape != b.shape or not np.allclose(a, b)


def test_base_outputs(base):
    _, out = base
    h, w = saliency_grid_shape((512, 384))
    assert out["saliency_map"].shape == (2, h, w, 2)
    assert out["patches"].shape == (2, 4, 64, 64) and out["h_crops"].shape == (2, 4, 512)
    for k in ("y_global", "y_local", "y_fusion"):
        assert out[k].shape == (2, 2) and ((out[k] > 0) & (out[k] < 1)).all()
    np.testing.assert_allclose(out["patch_attns"].sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "field, value, output",
    [
        ("percent_t", 0.5, "y_global"),
        ("aggregation", "gmp", "y_global"),
        ("aggregation", "gap", "y_global"),
        ("K", 2, "patch_attns"),
        ("crop_shape", (96, 96), "patches"),
        ("attention", "uniform", "patch_attns"),
        ("global_strides", (1, 2, 2, 1, 1), "saliency_map"),
        ("global_blocks", (1, 1, 1, 1, 1), "saliency_map"),
        ("global_widths", (16, 32, 64, 64, 128), "h_g"),
        ("global_kernels", (3, 3, 1, 1, 1), "saliency_map"),
    ],
)
def test_field_changes_output(base, field, value, output):
    variables, out = base
    config = dataclasses.replace(BASE, **{field: value})
    if field in ("attention", "global_blocks", "global_widths", "global_kernels"):  # other parameters
        variables = init_variables(config, jax.random.key(0))
    changed = run(config, variables)
    assert differs(changed[output], out[output]), f"{field}={value!r} did not change {output}"


def test_aggregation_extremes(base):
    _, out = base
    sal = out["saliency_map"]
    np.testing.assert_allclose(run(BASE.replace(aggregation="gmp"), base[0])["y_global"], sal.max((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(run(BASE.replace(aggregation="gap"), base[0])["y_global"], sal.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(run(BASE.replace(percent_t=1.0), base[0])["y_global"], sal.mean((1, 2)), rtol=1e-5)


def test_uniform_attention_weighs_equally(base):
    config = BASE.replace(attention="uniform")
    out = run(config)
    np.testing.assert_allclose(out["patch_attns"], 1.0 / config.K)
    np.testing.assert_allclose(out["z"], out["h_crops"].mean(1), rtol=1e-5)


@pytest.mark.parametrize("local_net, width", [("resnet34", 512), ("resnet50", 2048), ("resnet18_narrow", 128)])
def test_local_nets(base, local_net, width):
    config = BASE.replace(local_net=local_net)
    out = run(config)
    assert out["h_crops"].shape == (2, 4, width)
    assert differs(out["y_local"], base[1]["y_local"])
    assert local_feature_width(local_net) == width
    if local_net == "resnet18_narrow":  # ResNet-18's layout at a quarter of the channels
        from flax.traverse_util import flatten_dict

        narrow = flatten_dict(init_variables(config, jax.random.key(0))["params"]["dn_resnet"])
        full = flatten_dict(init_variables(BASE, jax.random.key(0))["params"]["dn_resnet"])
        assert narrow.keys() == full.keys()
        assert all(narrow[k].shape[-1] * 4 == full[k].shape[-1] for k in full)


def test_random_patches_follow_roi_rng(base):
    config = BASE.replace(patch_selection="random")
    a, b, c = (run(config, base[0], rng=r) for r in (1, 1, 2))
    np.testing.assert_array_equal(a["patch_locations"], b["patch_locations"])
    assert differs(a["patch_locations"], c["patch_locations"])
    assert differs(a["patch_locations"], base[1]["patch_locations"])
    assert (a["patch_locations"] >= 0).all()
    assert (a["patch_locations"][..., 0] <= 512 - 64).all() and (a["patch_locations"][..., 1] <= 384 - 64).all()


def test_rotate_crops_only_in_training(base):
    variables, _ = base
    config = BASE.replace(rotate_crops=True)
    plain, rotated = run(BASE, variables, train=True), run(config, variables, train=True)
    np.testing.assert_array_equal(plain["patch_locations"], rotated["patch_locations"])
    assert differs(rotated["patches"], plain["patches"])
    # Each rotated patch is one of the four rotations of the plain one.
    for n in range(2):
        for k in range(4):
            assert any(np.array_equal(rotated["patches"][n, k], np.rot90(plain["patches"][n, k], t)) for t in range(4))
    np.testing.assert_array_equal(run(config, variables)["patches"], base[1]["patches"])  # eval: no rotation


def test_bfloat16_close_to_float32(base):
    variables, out = base
    bf16 = run(BASE.replace(dtype="bfloat16"), variables)
    for k in ("y_global", "y_local", "y_fusion"):
        err = np.abs(bf16[k] - out[k]).max()
        assert 0 < err <= 2e-2, f"{k}: bf16 vs float32 differ by {err}"
    assert bf16["y_fusion"].dtype == np.float32 and bf16["saliency_map"].dtype == np.float32


REMAT_BASE = GMICConfig(image_shape=(256, 192), crop_shape=(96, 96), K=2, percent_t=0.1)


@pytest.fixture(scope="module")
def remat_reference():
    variables = init_variables(REMAT_BASE, jax.random.key(0))
    x = jax.random.normal(jax.random.key(7), (1, *REMAT_BASE.image_shape, 1))

    def grads(config):
        def loss(p):
            out, _ = GMIC(config).apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                                        mutable=["batch_stats"], rngs={"roi": jax.random.key(0)})
            return out["y_fusion"].sum()

        return jax.grad(loss)

    return variables, grads, jax.jit(grads(REMAT_BASE))(variables["params"])


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_recompute_their_parts_with_same_gradients(remat_reference, policy):
    variables, grads, plain = remat_reference
    # One checkpoint per unit the policy names: 10 global blocks (or 5 stages), the global stem,
    # the local stem and 8 local blocks.
    spec = remat_spec(policy)
    units = ({"block": 10, "stage": 5, "": 0}[spec.global_blocks] + spec.global_stem + spec.local_stem
             + 8 * bool(spec.local_blocks))
    assert str(jax.make_jaxpr(grads(REMAT_BASE.replace(remat=policy)))(variables["params"])).count("remat") == units
    assert "remat" not in str(jax.make_jaxpr(grads(REMAT_BASE))(variables["params"]))
    ours = jax.jit(grads(REMAT_BASE.replace(remat=policy)))(variables["params"])
    assert jax.tree.structure(ours) == jax.tree.structure(plain)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_remat_accepts_booleans_and_names():
    assert GMICConfig(remat=False) == GMICConfig() and GMICConfig().remat == "none"
    assert GMICConfig(remat=True).remat == "global"
    assert GMICConfig.from_dict({**GMICConfig().to_dict(), "remat": True}).remat == "global"
    for name in REMAT_POLICIES:
        assert GMICConfig(remat=name).remat == name
    with pytest.raises(ValueError, match="remat='everything'"):
        GMICConfig(remat="everything")


def test_image_shape_is_checked_and_sets_grid():
    config = GMICConfig(image_shape=(256, 192), crop_shape=(32, 32))
    variables = init_variables(config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(N, 256, 192, 1\).*image_shape"):
        GMIC(config).apply(variables, jnp.zeros((1, 200, 192, 1)))
    out = GMIC(config).apply(variables, jnp.zeros((1, 256, 192, 1)))
    assert out["saliency_map"].shape[1:3] == saliency_grid_shape((256, 192))
    assert saliency_grid_shape((2944, 1920)) == (46, 30)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(aggregation="max"), "aggregation"),
        (dict(dtype="float16"), "dtype"),
        (dict(percent_t=0.0), "percent_t"),
        (dict(K=0), "K"),
        (dict(rotate_crops=True, crop_shape=(64, 32)), "square"),
        (dict(local_net="vgg"), "local_net"),
        (dict(global_strides=(1, 2, 2, 2)), "global_strides"),
        (dict(global_strides=(1, 2, 3, 2, 2)), "global_strides"),
        (dict(global_blocks=(2, 2, 2, 2)), "global_blocks"),
        (dict(global_blocks=(1, 1, 0, 1, 1)), "global_blocks"),
        (dict(global_widths=(16, 32, 64, 128)), "global_widths"),
        (dict(global_kernels=(3, 3, 5, 1, 1)), "global_kernels"),
        (dict(global_kernels=(3, 3, 1, 1)), "global_kernels"),
        (dict(saliency_symmetry="flip"), "saliency_symmetry"),
    ],
)
def test_bad_config_is_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        GMICConfig(**kw)


def test_global_strides_set_the_saliency_grid(base):
    """Fewer stride-2 stages: a finer saliency grid from the same parameters, the ROI windows
    scaled to it (a 64-pixel crop is 4 x 4 cells at 1/16) and the locations on the finer lattice."""
    variables, out = base
    config = BASE.replace(global_strides=(1, 2, 2, 1, 1))
    fine = run(config, variables)
    h, w = saliency_grid_shape((512, 384), (1, 2, 2, 1, 1))
    assert (h, w) == (32, 24) and fine["saliency_map"].shape == (2, h, w, 2)
    assert out["saliency_map"].shape[1:3] == (8, 6)
    assert (fine["patch_locations"] % 16 == 0).all() and (fine["patch_locations"] % 64 != 0).any()
    # Parameter shapes do not depend on the strides: the same variables serve both.
    assert jax.tree.map(np.shape, init_variables(config, jax.random.key(0))) == jax.tree.map(np.shape, variables)


@pytest.mark.parametrize("strides, blocks, kernels", [((1, 2, 2, 1, 1), (1, 1, 1, 1, 1), (3, 3, 3, 3, 3)),
                                                     ((1, 1, 2, 2, 1), (2, 1, 1, 1, 1), (3, 3, 3, 3, 3)),
                                                     ((1, 2, 2, 1, 1), (1, 1, 1, 1, 1), (3, 3, 1, 1, 1))])
def test_global_blocks_and_kernels_bound_the_receptive_field(strides, blocks, kernels):
    """A saliency cell depends on exactly the pixels receptive_field says: the support of its
    gradient with respect to the image is that square (clipped to the image), and fewer blocks
    drop their parameters (kernel 1 stages: 51 pixels instead of 227)."""
    config = BASE.replace(image_shape=(256, 256), global_strides=strides, global_blocks=blocks,
                          global_kernels=kernels)
    variables = init_variables(config, jax.random.key(0))
    size, jump, start = receptive_field(strides, blocks, kernels)
    h, w = saliency_grid_shape(config.image_shape, strides)
    i, j = h // 2, w // 2

    def cell(x):
        return GMIC(config).apply(variables, x, train=False, rngs={"roi": jax.random.key(0)})["saliency_map"][0, i, j, 1]

    g = np.asarray(jax.grad(cell)(X[:1, :256, :256]))[0, ..., 0]
    rows, cols = np.nonzero(g)
    first = (start + i * jump, start + j * jump)
    assert size < 256 and (rows.min(), cols.min()) == tuple(max(0, f) for f in first)
    assert (rows.max(), cols.max()) == tuple(min(255, f + size - 1) for f in first)
    names = {"/".join(k) for k in __import__("flax").traverse_util.flatten_dict(variables["params"])}
    for s, n in enumerate(blocks):
        assert any(f"layer_list_{s}_{n - 1}/" in k for k in names) and not any(f"layer_list_{s}_{n}/" in k for k in names)


def test_rot180_symmetry_makes_the_saliency_map_equivariant(base):
    """saliency_symmetry="rot180": turning the image by 180 degrees turns its saliency map (exactly,
    in eval mode), from the same parameters; without it the network is not equivariant."""
    variables, out = base
    config = BASE.replace(saliency_symmetry="rot180")
    turned = X[:, ::-1, ::-1]

    def saliency(config, x):
        return np.asarray(GMIC(config).apply(variables, x, train=False, rngs={"roi": jax.random.key(0)})["saliency_map"])

    sym, sym_turned = saliency(config, X), saliency(config, turned)
    np.testing.assert_allclose(sym_turned, sym[:, ::-1, ::-1], rtol=1e-5, atol=1e-6)
    assert differs(sym, out["saliency_map"])  # a different map from the paper's network
    plain_turned = saliency(BASE, turned)
    assert differs(plain_turned, out["saliency_map"][:, ::-1, ::-1])
    # Training mode runs (both turns share the batch statistics) and gives finite outputs.
    trained = run(config, variables, train=True)
    assert all(np.isfinite(v).all() for v in trained.values() if v.dtype.kind == "f")


def test_config_dict_round_trip():
    config = GMICConfig(percent_t=0.1, crop_shape=[128, 128], local_net="resnet34", global_strides=[1, 2, 2, 1, 1],
                        global_blocks=[1, 1, 1, 2, 1], global_widths=[8, 16, 32, 64, 64],
                        global_kernels=[3, 3, 1, 1, 1], saliency_symmetry="rot180")
    assert GMICConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GMICConfig fields"):
        GMICConfig.from_dict({"percent_t": 0.1, "typo": 1})
