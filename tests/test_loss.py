"""The training loss: hand-computed values, PyTorch's clamping, the original's goldens (tests/conftest.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmic_jax.train.loss import binary_cross_entropy, gmic_loss, saliency_regularizer


def _outputs():
    return {
        "y_global": jnp.array([[0.8, 0.3], [0.4, 0.9]]),
        "y_local": jnp.array([[0.6, 0.1], [0.5, 0.5]]),
        "y_fusion": jnp.array([[0.7, 0.2], [0.2, 0.6]]),
        "saliency_map": jnp.array([[[[0.1, 0.2]], [[0.3, 0.0]]], [[[0.5, 0.5]], [[0.0, 0.25]]]]),  # (2,2,1,2)
    }


def test_hand_computed_loss_sum_and_mean_reduction():
    out = _outputs()
    labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])

    def head(p):
        (a, b), (c, d) = p
        return -(math.log(a) + math.log(1 - b) + math.log(1 - c) + math.log(d)) / 4

    bce = head([[0.8, 0.3], [0.4, 0.9]]) + head([[0.6, 0.1], [0.5, 0.5]]) + head([[0.7, 0.2], [0.2, 0.6]])
    reg_sum = ((0.1 + 0.2 + 0.3 + 0.0) + (0.5 + 0.5 + 0.0 + 0.25)) / 2  # sum over grid+classes, mean over batch
    total, parts = gmic_loss(out, labels, beta=0.5)
    np.testing.assert_allclose(float(total), bce + 0.5 * reg_sum, rtol=1e-6)
    np.testing.assert_allclose(float(parts["saliency_reg"]), reg_sum, rtol=1e-6)
    np.testing.assert_allclose(float(parts["bce_y_local"]), head([[0.6, 0.1], [0.5, 0.5]]), rtol=1e-6)
    total_mean, parts_mean = gmic_loss(out, labels, beta=0.5, saliency_reduction="mean")
    np.testing.assert_allclose(float(parts_mean["saliency_reg"]), reg_sum / 4, rtol=1e-6)
    np.testing.assert_allclose(float(total_mean), bce + 0.5 * reg_sum / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        saliency_regularizer(out["saliency_map"], "max")


def test_saturated_predictions_clamp_like_pytorch_without_nan_gradients():
    p = jnp.array([0.0, 1.0, 0.0, 1.0])
    y = jnp.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(np.asarray(binary_cross_entropy(p, y)), [100.0, 100.0, 0.0, 0.0])
    g = jax.grad(lambda q: binary_cross_entropy(q, y).sum())(p)
    assert np.isfinite(np.asarray(g)).all()
    # Away from saturation the gradient is the usual -(y/p) + (1-y)/(1-p).
    q = jnp.array([0.25, 0.75])
    g = jax.grad(lambda q: binary_cross_entropy(q, jnp.array([1.0, 0.0])).sum())(q)
    np.testing.assert_allclose(np.asarray(g), [-4.0, 4.0], rtol=1e-6)


def test_fixture_grad_loss_from_the_original_outputs(goldens):
    """The goldens' grad_loss is the BCE sum of the original's three heads, target [1, 0]."""
    z = goldens.golden
    out = {k: jnp.asarray(z[f"small/{k}"]) for k in ("y_global", "y_local", "y_fusion")}
    n = out["y_global"].shape[0]
    out["saliency_map"] = jnp.zeros((n, 1, 1, 2))
    labels = jnp.tile(jnp.array([[1.0, 0.0]]), (n, 1))
    total, _ = gmic_loss(out, labels, beta=123.0)  # zero saliency: beta must not matter
    np.testing.assert_allclose(float(total), float(z["small/grad_loss"]), rtol=1e-6)


def test_loss_through_the_model_matches_fixture_loss_and_gradients(goldens):
    """Our loss on our model, with the goldens' weights, gives the goldens' loss and gradients."""
    from gmic_jax import GMIC
    from gmic_jax.convert import variables_to_state_dict

    meta, cfg, variables, x = goldens.case_inputs("small")
    labels = jnp.tile(jnp.array([[1.0, 0.0]]), (meta["N"], 1))

    def loss_fn(params):
        out = GMIC(cfg).apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
        return gmic_loss(out, labels, beta=0.0)[0]

    z = goldens.golden
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    np.testing.assert_allclose(float(loss), float(z["small/grad_loss"]), rtol=1e-5)
    ours = variables_to_state_dict({"params": grads, "batch_stats": variables["batch_stats"]})
    for key in ("classifier_linear.weight", "fusion_dnn.weight", "fusion_dnn.bias", "mil_attn_w.weight"):
        ref = z[f"small/grad/{key}"]
        err = np.abs(ours[key] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (key, err)


def test_gap_term_hand_computed_and_off_by_default():
    logits = jnp.array([[[[2.0, -1.0]], [[0.0, -3.0]]], [[[40.0, -200.0]], [[-40.0, 0.0]]]])  # (2,2,1,2)
    out = {**_outputs(), "saliency_logits": logits}
    labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    total0, parts0 = gmic_loss(out, labels, beta=0.5)
    assert "bce_gap" not in parts0  # the paper's loss unless asked for

    def bce_logit(z, y):  # log(1 + exp(-z)) for y = 1, log(1 + exp(z)) for y = 0, computed exactly
        return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))

    centred = [[0.5, 49.0], [-0.5, -49.0]]  # grid means [[1, -2], [0, -100]] less their batch mean per class
    expected = sum(bce_logit(centred[i][c], labels[i, c]) for i in range(2) for c in range(2)) / 4
    total, parts = gmic_loss(out, labels, beta=0.5, gap_weight=0.25)
    np.testing.assert_allclose(float(parts["bce_gap"]), expected, rtol=1e-6)  # finite at logit -49 (y = 1)
    np.testing.assert_allclose(float(total), float(total0) + 0.25 * expected, rtol=1e-6)
    # A shift of every logit of every image leaves it unchanged: no pull on the head's overall level.
    shifted = gmic_loss({**out, "saliency_logits": logits + 7.0}, labels, beta=0.5, gap_weight=0.25)[1]
    np.testing.assert_allclose(float(shifted["bce_gap"]), expected, rtol=1e-6)


def test_gap_term_reaches_a_cell_that_top_t_pooling_leaves_out():
    """The reason for the term: with top-t pooling only the pooled cells get y_global's gradient; the
    grid-mean logit gives every cell one, also where the sigmoid of the map is saturated."""
    from gmic_jax.models.pooling import aggregate

    ramp = jnp.linspace(-30.0, 5.0, 20).reshape(1, 5, 4, 1) * jnp.ones((1, 1, 1, 2))
    logits = jnp.concatenate([ramp, ramp - 1.0])  # a positive image and a negative one
    labels = jnp.array([[1.0, 1.0], [0.0, 0.0]])

    def loss(z, gap_weight):
        a = jax.nn.sigmoid(z)
        out = {"y_global": aggregate(a, "top_t", 0.1), "saliency_map": a, "saliency_logits": z}
        return gmic_loss(out, labels, beta=0.0, heads=("y_global",), gap_weight=gap_weight)[0]

    g0, g1 = jax.grad(loss)(logits, 0.0), jax.grad(loss)(logits, 1.0)
    lowest = (0, 0, 0, 0)  # logit -30: outside the top 2 of 20 cells, sigmoid saturated
    assert float(g0[lowest]) == 0.0
    assert float(g1[lowest]) < -1e-3  # pulled up towards the positive label
    # d/dz of the batch-and-class mean BCE at centred score s = +0.5 (y = 1) and -0.5 (y = 0): each image's
    # own term minus its share of the centring, over 20 cells, 2 images and 2 classes.
    own, other = -(1 - jax.nn.sigmoid(0.5)), jax.nn.sigmoid(-0.5)
    np.testing.assert_allclose(np.asarray(g1[lowest]), (own - (own + other) / 2) / 20 / 4, rtol=1e-5)


@pytest.mark.parametrize("margin", [None, 0.25])  # None: the default, GAP_MARGIN
def test_gap_term_stops_pulling_an_image_past_the_margin(margin):
    from gmic_jax.train.loss import GAP_MARGIN

    labels = jnp.array([[1.0, 1.0], [0.0, 0.0]])
    kw = {} if margin is None else {"gap_margin": margin}
    m = GAP_MARGIN if margin is None else margin

    def gap(z):
        return gmic_loss({**_outputs(), "saliency_logits": z}, labels, beta=0.0, heads=(), gap_weight=1.0, **kw)[0]

    for gap_between, pulled in ((2 * m - 0.1, True), (2 * m + 0.1, False)):
        z = jnp.zeros((2, 3, 2, 2)).at[0].set(gap_between)  # centred scores +-gap_between / 2
        g = jax.grad(gap)(z)
        assert bool(jnp.all(g[0] < 0)) == pulled and bool(jnp.all(g[1] > 0)) == pulled
        if not pulled:  # both images classified with margin: constant loss, no gradient at all
            assert float(jnp.abs(g).max()) == 0.0
            np.testing.assert_allclose(float(gap(z)), math.log1p(math.exp(-m)), rtol=1e-6)
