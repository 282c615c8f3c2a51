"""gmic_jax.models.layers.BatchNorm against flax's nn.BatchNorm (two-pass variance, PyTorch's eps and
momentum): the same variables, inference bit for bit, the same training output and running
statistics, and its closed-form gradient equal to autodiff through flax's to float32 rounding."""

from __future__ import annotations

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


def test_batchnorm_variants_benchmark_swaps_the_model_and_counts_its_kernels():
    """benchmarks/batchnorm_variants.py's swap reaches the model's blocks, and its HLO counts see
    the weight gradient's operand copies and the closed form's lighter program (a 3x3 conv + BN
    block on 4 x 32 x 24 x 8)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import batchnorm_variants as bv

    from gmic_jax.models import global_net

    block = global_net.PreActBlock(8, 1, False, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (4, 32, 24, 8)) * 2 + 1
    variables = block.init(jax.random.key(1), x, False)
    counts = {}
    try:
        for variant in ("closed_form", "flax_two_pass"):
            bv.use(variant)
            assert (global_net.batch_norm is bv.MODEL_BATCH_NORM) == (variant == "closed_form")

            def loss(p, x):
                y, _ = block.apply({**variables, "params": p}, x, True, mutable=["batch_stats"])
                return jnp.sum(y * y)

            hlo = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile().as_text()
            counts[variant] = bv.hlo_counts(hlo)
    finally:
        bv.use("closed_form")
    for row in counts.values():
        assert row["kernels"] > 0 and row["conv_operand_copies"] > 0 and row["conv_operand_copy_bytes"] > 0
    assert counts["closed_form"]["kernel_bytes"] < counts["flax_two_pass"]["kernel_bytes"]
