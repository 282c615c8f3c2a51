"""gmic_jax.models.layers.BatchNorm against flax's nn.BatchNorm (two-pass variance, PyTorch's eps and
momentum): the same variables, inference bit for bit, the same training output and running
statistics, and its closed-form gradient equal to autodiff through flax's to float32 rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmic_jax.models.layers import BN_EPS, BN_MOMENTUM, batch_norm


class Ours(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return jax.nn.relu(batch_norm(x, train, name="bn"))


class Flax(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        bn = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            use_fast_variance=False,
            name="bn",
        )
        return jax.nn.relu(bn(x.astype(jnp.float32)))


def _variables():
    """Variables with non-trivial scale, bias and running statistics (C = 5)."""
    keys = jax.random.split(jax.random.key(2), 4)
    params = {"bn": {"scale": 1 + 0.3 * jax.random.normal(keys[0], (5,)), "bias": jax.random.normal(keys[1], (5,))}}
    stats = {"bn": {"mean": jax.random.normal(keys[2], (5,)), "var": 0.5 + jax.random.uniform(keys[3], (5,))}}
    return params, stats


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax_and_its_gradient_is_autodiffs(dtype):
    # A channel mean far from zero and spreads that differ by channel (where the formulae differ most).
    x = (jax.random.normal(jax.random.key(0), (4, 9, 7, 5)) * jnp.arange(1.0, 6.0) + 20.0).astype(dtype)
    params, stats = _variables()
    assert jax.tree.structure(Ours().init(jax.random.key(1), x, False)) == jax.tree.structure(
        Flax().init(jax.random.key(1), x, False)
    )
    results = []
    for model in (Ours(), Flax()):
        inference = model.apply({"params": params, "batch_stats": stats}, x, False)

        def loss(p, x, model=model):
            y, updates = model.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * jnp.arange(1.0, 6.0)), (y, updates["batch_stats"])

        (value, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        results.append((inference, value, y, new_stats, grads))
    (inf_a, value_a, y_a, stats_a, (gp_a, gx_a)), (inf_b, value_b, y_b, stats_b, (gp_b, gx_b)) = results
    np.testing.assert_array_equal(inf_a, inf_b)  # inference: op for op as flax
    np.testing.assert_array_equal(y_a, y_b)  # the same forward arithmetic in training
    np.testing.assert_array_equal(value_a, value_b)
    jax.tree.map(np.testing.assert_array_equal, stats_a, stats_b)
    assert gx_a.dtype == x.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(gx_a, np.float32), np.asarray(gx_b, np.float32), rtol=tol, atol=tol)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(gp_a["bn"][name], gp_b["bn"][name], rtol=1e-5, atol=1e-4)
    assert float(jnp.max(jnp.abs(gx_a.astype(jnp.float32)))) > 1e-2  # a gradient worth comparing


def test_batchnorm_variants_benchmark_counts_the_closed_form_as_lighter(tmp_path):
    """benchmarks/batchnorm_variants.py --steps 0 on a small image: every variant compiled and
    counted, the model's closed-form gradient moving fewer kernel bytes than flax's autodiff."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bn.json"
    subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "batchnorm_variants.py"), "--image-shape", "256", "192"]
        + ["--crop-shape", "96", "96", "--steps", "0", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"closed_form", "flax_two_pass", "flax_one_pass"}
    for row in variants.values():
        assert row["kernels"] > 0 and row["kernel_bytes"] > 0 and row["conv_operand_copies"] > 0
    assert variants["closed_form"]["kernel_bytes"] < variants["flax_two_pass"]["kernel_bytes"]
    assert variants["closed_form"]["kernels"] < variants["flax_two_pass"]["kernels"]
