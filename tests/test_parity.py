"""Parity with the original PyTorch GMIC: goldens of the original are the model's contract.

Two sources of goldens share the test code: tests/fixtures/golden/golden.npz (in the repository,
made by tests/fixtures/make_golden.py from tests/fixtures/golden_recipe.py; small images and
128-pixel crops) and, when it is present, the project's reference ../shared/reference/golden.npz
(with its recipe.py; 1472 x 960 and 1000 x 700 images, 256-pixel crops): tests/conftest.py's
`goldens` fixture. Both have the cases 'small' (with gradients), 'b2' (batch of 2) and 'odd'
(crops clipped at the image border).

Every test runs with both kernel variants of gmic_jax.models.fast_ops forced on CPU: the CPU
rewrites ('cpu', what CPU programs run) and XLA's own ops ('xla', what GPU programs run)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, Goldens, golden_recipe

from gmic_jax import GMIC, GMICConfig, init_variables
from gmic_jax.convert import variables_to_state_dict
from gmic_jax.models import fast_ops

CASES = ("small", "b2", "odd")
KERNELS = ("cpu", "xla")
OUTPUT_TOL = 1e-5
# Gradients: heads, attention and last blocks sum few terms; the stems sum ~1e6 terms each.
GRAD_TOL = 1e-4
GRAD_TOL_STEM = 5e-3
STEM_KEYS = (
    "ds_net.first_conv.weight",
    "ds_net.layer_list.0.0.downsample.0.weight",
    "dn_resnet.conv1.weight",
    "dn_resnet.bn1.weight",
)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=KERNELS)
def kernel_variant(request):
    return request.param


def bce(p, target):  # PyTorch's BCELoss default: mean over batch and classes
    return -jnp.mean(target * jnp.log(p) + (1 - target) * jnp.log(1 - p))


_SMALL_RUNS: dict[tuple[str, str], tuple] = {}


def small_with_grads(goldens: Goldens, kernel_variant: str):
    """(meta, outputs, loss, gradients as a state_dict) of the 'small' case: one program gives the
    eval-mode outputs and the gradients of the summed BCE of the three heads (target benign = 1,
    malignant = 0), so the case compiles once per source and kernel variant (kept in _SMALL_RUNS
    for the module: pytest's parametrised fixtures would rebuild it as the parameters alternate)."""
    key = (goldens.name, kernel_variant)
    if key in _SMALL_RUNS:
        return _SMALL_RUNS[key]
    meta, config, variables, x = goldens.case_inputs("small")
    target = jnp.tile(jnp.array([[1.0, 0.0]]), (meta["N"], 1))

    def loss_fn(params, x):
        out = GMIC(config).apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
        return bce(out["y_global"], target) + bce(out["y_local"], target) + bce(out["y_fusion"], target), out

    with fast_ops.kernels(kernel_variant):
        (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"], x)
    grads_sd = variables_to_state_dict({"params": jax.tree.map(np.asarray, grads)})
    _SMALL_RUNS[key] = meta, jax.tree.map(np.asarray, out), float(loss), grads_sd
    return _SMALL_RUNS[key]


@pytest.fixture(scope="module", params=CASES)
def case_outputs(request, goldens, kernel_variant):
    case = request.param
    if case == "small":
        meta, out, _, _ = small_with_grads(goldens, kernel_variant)
        return case, meta, out
    meta, config, variables, x = goldens.case_inputs(case)
    with fast_ops.kernels(kernel_variant):
        out = jax.jit(lambda v, x: GMIC(config).apply(v, x, train=False))(variables, x)
    return case, meta, jax.tree.map(np.asarray, out)


@pytest.mark.parametrize(
    "name", ["y_global", "y_local", "y_fusion", "patch_attns", "global_vec", "patches", "saliency_map"]
)
def test_outputs_match_original(case_outputs, goldens, name):
    case, _, out = case_outputs
    ours = out[name]
    if name == "saliency_map":
        ours = ours.transpose(0, 3, 1, 2)  # NHWC -> NCHW as the original
    ref = goldens.golden[f"{case}/{name}"]
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= OUTPUT_TOL, f"{goldens.name} {case}/{name}: {rel_err(ours, ref):.3g}"


def test_patch_locations_identical(case_outputs, goldens):
    case, meta, out = case_outputs
    ref = goldens.golden[f"{case}/patch_locations"]
    np.testing.assert_array_equal(out["patch_locations"], ref.astype(np.int64))
    # The saliency grid follows from the image size; the maps are the sigmoid of the logits the
    # optional grid-mean loss term uses.
    assert out["saliency_map"].shape[1:3] == tuple(meta["cam_size"])
    np.testing.assert_allclose(
        1 / (1 + np.exp(-out["saliency_logits"].astype(np.float64))), out["saliency_map"], rtol=1e-6, atol=1e-7
    )


def test_gradients_match_original(goldens, kernel_variant):
    golden = goldens.golden
    _, _, loss, grads_sd = small_with_grads(goldens, kernel_variant)
    np.testing.assert_allclose(loss, float(golden["small/grad_loss"]), rtol=1e-5)
    keys = [k[len("small/grad/") :] for k in golden.files if k.startswith("small/grad/")]
    assert len(keys) == 14
    errors = {k: rel_err(grads_sd[k], golden[f"small/grad/{k}"]) for k in keys}
    for key, err in errors.items():
        tol = GRAD_TOL_STEM if key in STEM_KEYS else GRAD_TOL
        assert err <= tol, f"{goldens.name}: gradient of {key}: relative error {err:.3g} > {tol}"


def test_golden_recipe_layout_is_the_converters():
    """The recipe's keys and shapes (written without jax, for make_golden.py) are those our converter
    expects: the goldens exercise every parameter of the weight-compatible model."""
    template = jax.eval_shape(lambda: init_variables(GMICConfig(), jax.random.key(0)))
    blank = jax.tree.map(lambda leaf: np.empty(leaf.shape, np.uint8), template)  # shapes only
    converters = {
        key: value.shape
        for key, value in variables_to_state_dict(blank).items()
        if not key.endswith("num_batches_tracked")
    }
    assert dict(golden_recipe.state_dict_layout()) == converters


def test_repo_goldens_cover_border_and_rounding():
    """The in-repo 'odd' case exercises what it is there for: a crop clipped at the bottom and one at
    the right border, whose uncovered part the original fills with the image minimum; and pixel
    corners where row / h * H is an exact half, rounded to even (a round-half-up would differ)."""
    golden = np.load(FIXTURES / "golden" / "golden.npz")
    meta = json.loads(str(golden["odd/meta"]))
    crop, (H, W), (h, w) = meta["crop"], (meta["H"], meta["W"]), meta["cam_size"]
    cam = golden["odd/patch_locations_cam"][0]
    loc = golden["odd/patch_locations"][0].astype(np.int64)
    np.testing.assert_array_equal(loc, np.round(cam * [H / h, W / w]))
    halves = (cam * [H, W]) % [h, w] * 2 == [h, w]  # (row * H / h) has fractional part exactly 0.5
    assert np.any(halves & (loc % 2 == 0) & (np.floor(cam * [H / h, W / w] + 0.5) != loc))
    x = golden_recipe.golden_input((meta["N"], 1, H, W), meta["input_seed"])[0, 0]
    patches = golden["odd/patches"][0]
    for axis, size in ((0, H), (1, W)):
        clipped = np.flatnonzero(loc[:, axis] + crop > size)
        assert clipped.size, f"no crop of the 'odd' case reaches the border of axis {axis}"
        for k in clipped:
            fill = crop - (size - loc[k, axis])  # rows (axis 0) or columns (axis 1) beyond the image
            band = patches[k, :fill] if axis == 0 else patches[k, :, :fill]
            np.testing.assert_array_equal(band, x.min())
