"""Every GMICConfig field changes the computation, at a small size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmic_jax import GMIC, GMICConfig, init_variables
from gmic_jax.config import REMAT_POLICIES
from gmic_jax.models.global_net import receptive_field, saliency_grid_shape
from gmic_jax.models.local_net import local_feature_width
from gmic_jax.models.remat import remat_spec

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


def _params_with(variables, updates):
    """A copy of ``variables`` with the params at the given paths ('/'-joined) replaced."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(variables["params"], sep="/")
    assert set(updates) <= set(flat), sorted(set(updates) - set(flat))
    return {**variables, "params": unflatten_dict({**flat, **updates}, sep="/")}


def test_percent_t_sets_how_many_cells_y_global_averages(base):
    """Same weights: the same saliency maps; y_global the mean of the top round(h * w * t) cells."""
    variables, out = base
    changed = run(BASE.replace(percent_t=0.5), variables)
    sal = out["saliency_map"]
    np.testing.assert_array_equal(changed["saliency_map"], sal)
    n, h, w, c = sal.shape
    top = np.sort(sal.reshape(n, h * w, c), axis=1)[:, ::-1]
    np.testing.assert_allclose(changed["y_global"], top[:, :24].mean(1), rtol=1e-6)  # 48 cells x 0.5
    np.testing.assert_allclose(out["y_global"], top[:, :2].mean(1), rtol=1e-6)  # round(48 x 0.05) = 2
    assert differs(changed["y_global"], out["y_global"])


def test_K_takes_the_first_K_greedy_patches(base):
    """Same weights: K=2 keeps the first two of the K=4 run's greedy picks (Algorithm 1 picks in order),
    their crops and their local features; the attention weighs two patches."""
    variables, out = base
    changed = run(BASE.replace(K=2), variables)
    np.testing.assert_array_equal(changed["patch_locations"], out["patch_locations"][:, :2])
    np.testing.assert_array_equal(changed["patches"], out["patches"][:, :2])
    # The local network sees each patch alone (eval-mode BatchNorm): the features of 4 or 8 patches per
    # call agree to float32 rounding of its convolutions.
    np.testing.assert_allclose(changed["h_crops"], out["h_crops"][:, :2], rtol=1e-5, atol=1e-6)
    assert changed["patch_attns"].shape == (2, 2)
    np.testing.assert_allclose(changed["patch_attns"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(changed["y_global"], out["y_global"])
    assert len({tuple(loc) for loc in out["patch_locations"][0]}) == 4  # four distinct picks to take a prefix of


def test_crop_shape_sets_the_roi_window_and_the_crops(base):
    """Same weights: the same saliency maps; a 96-pixel crop is a 2 x 2-cell window on the 8 x 6 grid
    (64 pixels: 1 x 1), so the picks are Algorithm 1's with that window (the float64 transcription in
    test_roi.py), and each crop is the image under it."""
    from test_roi import numpy_algorithm_1

    variables, out = base
    changed = run(BASE.replace(crop_shape=(96, 96)), variables)
    np.testing.assert_array_equal(changed["saliency_map"], out["saliency_map"])
    assert changed["patches"].shape == (2, 4, 96, 96)
    for n in range(2):
        expected = numpy_algorithm_1(out["saliency_map"][n], (512, 384), (96, 96), 4)
        np.testing.assert_array_equal(changed["patch_locations"][n], expected)
        for k, (r, c) in enumerate(expected):
            np.testing.assert_array_equal(changed["patches"][n, k], np.asarray(X)[n, r : r + 96, c : c + 96, 0])
    # The window matters here: 64-pixel windows on the same maps pick other places.
    assert any(
        differs(
            numpy_algorithm_1(out["saliency_map"][n], (512, 384), (96, 96), 4),
            numpy_algorithm_1(out["saliency_map"][n], (512, 384), (64, 64), 4),
        )
        for n in range(2)
    )


def test_uniform_attention_on_the_same_weights(base):
    """Same weights (uniform attention has no parameters; the gated ones are left unused): the same
    patches and features, each patch weighed 1/K, z their mean."""
    variables, out = base
    changed = run(BASE.replace(attention="uniform"), variables)
    np.testing.assert_array_equal(changed["h_crops"], out["h_crops"])
    np.testing.assert_allclose(changed["patch_attns"], 0.25)
    np.testing.assert_allclose(changed["z"], out["h_crops"].mean(1), rtol=1e-5)
    assert differs(out["patch_attns"], changed["patch_attns"])  # the gated attention did not weigh evenly
    assert (
        "attention"
        not in jax.eval_shape(lambda: init_variables(BASE.replace(attention="uniform"), jax.random.key(0)))["params"]
    )


def test_one_block_per_stage_is_the_two_block_network_with_empty_second_blocks(base):
    """A pre-activation block whose last conv is zero passes its input through, so the paper's
    two-block network with every second block's conv2 zeroed computes the one-block network from the
    same remaining weights, and differs from it with the trained (here: initial) second blocks."""
    variables, out = base
    config = BASE.replace(global_blocks=(1, 1, 1, 1, 1))
    one_block = run(config, variables)
    zeroed = _params_with(
        variables,
        {
            f"ds_net/layer_list_{s}_1/conv2/kernel": np.zeros_like(
                variables["params"]["ds_net"][f"layer_list_{s}_1"]["conv2"]["kernel"]
            )
            for s in range(5)
        },
    )
    two_blocks = run(BASE, zeroed)
    for key in ("h_g", "saliency_map", "y_global", "patch_locations", "y_local", "y_fusion"):
        # Identical computations on identical values, up to XLA's choice of fusion: float32 rounding.
        np.testing.assert_allclose(two_blocks[key], one_block[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert differs(out["h_g"], one_block["h_g"])


def test_kernel_1_stages_are_3x3_stages_with_only_the_centre_tap(base):
    """A 3 x 3 conv (padding 1) with zero off-centre taps is a 1 x 1 conv (padding 0), strided or not:
    the paper's network with those taps of stages 2-4 zeroed computes global_kernels (3, 3, 1, 1, 1)
    given the centre taps."""
    from flax.traverse_util import flatten_dict

    variables, out = base
    config = BASE.replace(global_kernels=(3, 3, 1, 1, 1))
    flat = flatten_dict(variables["params"], sep="/")
    convs = [
        k
        for k in flat
        if k.startswith(tuple(f"ds_net/layer_list_{s}_" for s in (2, 3, 4))) and ("/conv1/" in k or "/conv2/" in k)
    ]
    assert len(convs) == 12  # conv1 and conv2 of two blocks in each of three stages
    centre = np.zeros((3, 3, 1, 1), np.float32)
    centre[1, 1] = 1.0
    kernel_1 = run(config, _params_with(variables, {k: flat[k][1:2, 1:2] for k in convs}))
    masked = run(BASE, _params_with(variables, {k: flat[k] * centre for k in convs}))
    for key in ("h_g", "saliency_map", "y_global", "patch_locations", "y_fusion"):
        # The same products; the zero taps add exact zeros, so only the summation order can differ.
        np.testing.assert_allclose(masked[key], kernel_1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert differs(out["h_g"], kernel_1["h_g"])
    shapes = jax.tree.map(
        np.shape, flatten_dict(jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))["params"], sep="/")
    )
    assert all(shapes[k] == (1, 1, *flat[k].shape[2:]) for k in convs)


def test_global_widths_set_the_stage_widths_and_leave_the_first_stages(base):
    """Narrower stages 3 and 4 (64, 128 channels): h_g has the last width and every parameter of those
    stages follows the widths; the stem and stages 0-2 keep their shapes, and from the same weights
    they compute the same activations (the output of stage 2 is unchanged)."""
    from flax.traverse_util import flatten_dict

    variables, out = base
    widths = (16, 32, 64, 64, 128)
    config = BASE.replace(global_widths=widths)
    fresh = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))  # shapes only: no compile
    new_flat, old_flat = (flatten_dict(v["params"]["ds_net"], sep="/") for v in (fresh, variables))
    assert new_flat.keys() == old_flat.keys()
    # Every channel count of the paper's network (all five widths differ from each other and from the
    # kernel sizes 7, 3, 1 and the input's 1 channel) becomes its stage's new width.
    channels = dict(zip(BASE.global_widths, widths))
    for k, v in new_flat.items():
        assert v.shape == tuple(channels.get(d, d) for d in old_flat[k].shape), k
    assert all(
        v.shape == old_flat[k].shape
        for k, v in new_flat.items()
        if k.startswith(("first_conv", "layer_list_0", "layer_list_1", "layer_list_2"))
    )
    assert fresh["params"]["left_postprocess_net"]["gn_conv_last"]["kernel"].shape == (1, 1, 128, 2)
    # The base's variables cut to the new shapes (their leading channels): the stem, stages 0-2 and
    # their statistics are the base's own.
    mixed = jax.tree.map(lambda new, old: old[tuple(slice(0, d) for d in new.shape)], fresh, variables)

    def stage2(config, variables):
        _, state = GMIC(config).apply(
            variables,
            X,
            train=False,
            capture_intermediates=lambda m, _: m.name == "layer_list_2_1",
            mutable=["intermediates"],
        )
        return np.asarray(state["intermediates"]["ds_net"]["layer_list_2_1"]["__call__"][0])

    np.testing.assert_array_equal(stage2(config, mixed), stage2(BASE, variables))
    changed = run(config, mixed)
    assert changed["h_g"].shape == (*out["h_g"].shape[:3], 128) and out["h_g"].shape[-1] == 256
    assert changed["saliency_map"].shape == out["saliency_map"].shape


def test_aggregation_extremes(base):
    _, out = base
    sal = out["saliency_map"]
    np.testing.assert_allclose(run(BASE.replace(aggregation="gmp"), base[0])["y_global"], sal.max((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(run(BASE.replace(aggregation="gap"), base[0])["y_global"], sal.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(run(BASE.replace(percent_t=1.0), base[0])["y_global"], sal.mean((1, 2)), rtol=1e-5)


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
            out, _ = GMIC(config).apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"roi": jax.random.key(0)},
            )
            return out["y_fusion"].sum()

        return jax.grad(loss)

    return variables, grads, jax.jit(grads(REMAT_BASE))(variables["params"])


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_recompute_their_parts_with_same_gradients(remat_reference, policy):
    variables, grads, plain = remat_reference
    # One checkpoint per unit the policy names: 10 global blocks (or 5 stages), the global stem,
    # the local stem and 8 local blocks.
    spec = remat_spec(policy)
    units = (
        {"block": 10, "stage": 5, "": 0}[spec.global_blocks]
        + spec.global_stem
        + spec.local_stem
        + 8 * bool(spec.local_blocks)
    )
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


@pytest.mark.parametrize(
    "strides, blocks, kernels",
    [
        ((1, 2, 2, 1, 1), (1, 1, 1, 1, 1), (3, 3, 3, 3, 3)),
        ((1, 1, 2, 2, 1), (2, 1, 1, 1, 1), (3, 3, 3, 3, 3)),
        ((1, 2, 2, 1, 1), (1, 1, 1, 1, 1), (3, 3, 1, 1, 1)),
    ],
)
def test_global_blocks_and_kernels_bound_the_receptive_field(strides, blocks, kernels):
    """A saliency cell depends on exactly the pixels receptive_field says: the support of its
    gradient with respect to the image is that square (clipped to the image), and fewer blocks
    drop their parameters (kernel 1 stages: 51 pixels instead of 227)."""
    config = BASE.replace(image_shape=(256, 256), global_strides=strides, global_blocks=blocks, global_kernels=kernels)
    variables = init_variables(config, jax.random.key(0))
    size, jump, start = receptive_field(strides, blocks, kernels)
    h, w = saliency_grid_shape(config.image_shape, strides)
    i, j = h // 2, w // 2

    def cell(x):
        return GMIC(config).apply(variables, x, train=False, rngs={"roi": jax.random.key(0)})["saliency_map"][
            0, i, j, 1
        ]

    g = np.asarray(jax.grad(cell)(X[:1, :256, :256]))[0, ..., 0]
    rows, cols = np.nonzero(g)
    first = (start + i * jump, start + j * jump)
    assert size < 256 and (rows.min(), cols.min()) == tuple(max(0, f) for f in first)
    assert (rows.max(), cols.max()) == tuple(min(255, f + size - 1) for f in first)
    names = {"/".join(k) for k in __import__("flax").traverse_util.flatten_dict(variables["params"])}
    for s, n in enumerate(blocks):
        assert any(f"layer_list_{s}_{n - 1}/" in k for k in names) and not any(
            f"layer_list_{s}_{n}/" in k for k in names
        )


def test_rot180_symmetry_makes_the_saliency_map_equivariant(base):
    """saliency_symmetry="rot180": turning the image by 180 degrees turns its saliency map (exactly,
    in eval mode), from the same parameters; without it the network is not equivariant."""
    variables, out = base
    config = BASE.replace(saliency_symmetry="rot180")
    turned = X[:, ::-1, ::-1]

    def saliency(config, x):
        return np.asarray(
            GMIC(config).apply(variables, x, train=False, rngs={"roi": jax.random.key(0)})["saliency_map"]
        )

    sym, sym_turned = saliency(config, X), saliency(config, turned)
    np.testing.assert_allclose(sym_turned, sym[:, ::-1, ::-1], rtol=1e-5, atol=1e-6)
    assert differs(sym, out["saliency_map"])  # a different map from the paper's network
    plain_turned = saliency(BASE, turned)
    assert differs(plain_turned, out["saliency_map"][:, ::-1, ::-1])
    # Training mode runs (both turns share the batch statistics) and gives finite outputs.
    trained = run(config, variables, train=True)
    assert all(np.isfinite(v).all() for v in trained.values() if v.dtype.kind == "f")


def test_config_dict_round_trip():
    config = GMICConfig(
        percent_t=0.1,
        crop_shape=[128, 128],
        local_net="resnet34",
        global_strides=[1, 2, 2, 1, 1],
        global_blocks=[1, 1, 1, 2, 1],
        global_widths=[8, 16, 32, 64, 64],
        global_kernels=[3, 3, 1, 1, 1],
        saliency_symmetry="rot180",
    )
    assert GMICConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GMICConfig fields"):
        GMICConfig.from_dict({"percent_t": 0.1, "typo": 1})
