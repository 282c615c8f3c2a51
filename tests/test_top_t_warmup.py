"""Two training-only terms for the saliency maps (off in every config; benchmarks/RESULTS.md, held-out
localisation): the top-t warm-up (loss.top_t_warmup_steps: traced top-t pooling, its schedule and
beta's) and the saliency head on max-pooled h_g (loss.head_on_max_pool)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pathlib import Path

from gmic_jax import GMICConfig, init_variables
from gmic_jax.models import GMIC
from gmic_jax.models.pooling import top_t_count, top_t_percent, top_t_percent_traced
from gmic_jax.preprocessing import normalize_images
from gmic_jax.train.config_lib import ConfigError, apply_overrides, check_config, load_config
from gmic_jax.train.loss import binary_cross_entropy
from gmic_jax.train.state import create_train_state
from gmic_jax.train.step import (head_on_max_pool_bce, make_mesh, make_train_step, replicate, shard_batch,
                                 top_t_at_step)


@pytest.mark.parametrize("t", [1.0, 0.5, 0.1, 0.05, 0.02, 1e-4])
def test_traced_top_t_equals_the_static_pooling_and_its_gradient(t):
    maps = jax.random.uniform(jax.random.key(1), (3, 16, 12, 2))
    np.testing.assert_allclose(jax.jit(top_t_percent_traced)(maps, t), top_t_percent(maps, t), rtol=1e-6)
    g_static = jax.grad(lambda a: top_t_percent(a, t).sum())(maps)
    g_traced = jax.jit(jax.grad(lambda a, t: top_t_percent_traced(a, t).sum()))(maps, t)
    np.testing.assert_allclose(g_traced, g_static, rtol=1e-6)
    # The gradient reaches exactly the k ranked cells of each map: all of them at t = 1.
    k = top_t_count(16, 12, t)
    assert (np.asarray(g_traced) != 0).sum(axis=(1, 2)).tolist() == [[k, k]] * 3


def test_schedule_goes_linearly_from_the_mean_to_percent_t():
    t = [float(top_t_at_step(s, 0.05, 100)) for s in (0, 50, 100, 101, 10_000)]
    assert t[0] == 1.0 and t[1] == pytest.approx(0.525)
    assert t[2] == t[3] == t[4] == np.float32(0.05)  # exactly percent_t, so k equals the model's


def _step_metrics(cfg, variables, batch, warmup, at_step, head=0.0):
    tx = optax.sgd(1e-2)
    mesh = make_mesh(jax.devices()[:1])
    step = make_train_step(cfg, tx, mesh, beta=1.0, top_t_warmup_steps=warmup, head_on_max_pool=head)
    state = replicate(create_train_state(variables, tx, 0).replace(step=at_step), mesh)
    _, m = step(state, shard_batch(batch, mesh))
    return {k: float(v) for k, v in m.items()}


def test_warmup_step_trains_the_mean_and_a_scaled_beta_at_step_zero_and_the_model_from_its_end():
    cfg = GMICConfig(percent_t=0.1, K=2, crop_shape=(32, 32), image_shape=(128, 96), rotate_crops=False)
    variables = jax.tree.map(np.asarray, dict(init_variables(cfg, jax.random.key(0))))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 4096, (4, 128, 96, 1)).astype(np.uint16),
             "label": np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)}
    out, _ = GMIC(cfg).apply(variables, normalize_images(jnp.asarray(batch["image"])), train=True,
                             mutable=["batch_stats"], rngs={"roi": jax.random.key(0)})
    bce = lambda y: float(binary_cross_entropy(y, batch["label"]).mean())
    bce_mean = bce(jnp.mean(out["saliency_map"], axis=(1, 2)))
    bce_top_t = bce(out["y_global"])
    assert abs(bce_mean - bce_top_t) > 1e-3  # the two poolings differ on this batch

    at_0 = _step_metrics(cfg, variables, batch, warmup=20, at_step=0)
    at_20 = _step_metrics(cfg, variables, batch, warmup=20, at_step=20)
    plain = _step_metrics(cfg, variables, batch, warmup=0, at_step=0)
    assert at_0["bce_y_global"] == pytest.approx(bce_mean, rel=1e-5)
    assert plain["bce_y_global"] == pytest.approx(bce_top_t, rel=1e-5)
    assert at_20["bce_y_global"] == pytest.approx(plain["bce_y_global"], rel=1e-6)
    assert at_0["bce_y_local"] == pytest.approx(plain["bce_y_local"], rel=1e-6)  # only y_global changes
    # ... and beta, scaled by percent_t / t: 0.1 of it at t = 1, all of it from the warm-up's end.
    bces = lambda m: sum(m[f"bce_{h}"] for h in ("y_global", "y_local", "y_fusion"))
    assert at_0["loss"] == pytest.approx(bces(at_0) + 0.1 * at_0["saliency_reg"], rel=1e-6)
    assert at_20["loss"] == pytest.approx(bces(at_20) + at_20["saliency_reg"], rel=1e-6)
    assert at_0["saliency_reg"] == pytest.approx(plain["saliency_reg"], rel=1e-6)

    # The saliency head on max-pooled h_g: its BCE by hand, added with its weight, nothing else changed.
    kernel = np.asarray(variables["params"]["left_postprocess_net"]["gn_conv_last"]["kernel"])[0, 0]
    y_head = 1 / (1 + np.exp(-(np.asarray(out["h_g"], np.float64).max(axis=(1, 2)) @ kernel)))
    by_hand = float(np.mean(-(batch["label"] * np.log(y_head) + (1 - batch["label"]) * np.log(1 - y_head))))
    assert float(head_on_max_pool_bce(variables["params"], out["h_g"], batch["label"])) == pytest.approx(by_hand, rel=1e-5)
    with_head = _step_metrics(cfg, variables, batch, warmup=0, at_step=0, head=0.5)
    assert with_head["bce_head_max_pool"] == pytest.approx(by_hand, rel=1e-5)
    assert with_head["loss"] == pytest.approx(plain["loss"] + 0.5 * by_hand, rel=1e-6)
    assert with_head["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-4)


def test_warmup_config_is_checked():
    synthetic = str(Path(__file__).resolve().parents[1] / "configs" / "synthetic.py")
    check_config(load_config(synthetic))
    for bad in ("-1", "True", "2.5"):
        c = load_config(synthetic)
        with pytest.raises(ConfigError, match="loss.top_t_warmup_steps"):
            apply_overrides(c, [f"loss.top_t_warmup_steps={bad}"])
            check_config(c)
    c = load_config(synthetic)
    apply_overrides(c, ["loss.top_t_warmup_steps=10", "model.aggregation=gmp"])
    with pytest.raises(ConfigError, match="needs model.aggregation='top_t'"):
        check_config(c)
    c = load_config(synthetic)
    apply_overrides(c, ["loss.head_on_max_pool=-0.5"])
    with pytest.raises(ConfigError, match="loss.head_on_max_pool"):
        check_config(c)
