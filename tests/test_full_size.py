"""The jitted forward at the original's 2944 x 1920: one compile, no host callbacks."""

from __future__ import annotations

import chex
import jax
import numpy as np

from gmic_jax import GMIC, GMICConfig, init_variables

HOST_CALLBACK_MARKERS = ("callback", "host_callback", 'CustomCall("xla_python', "xla_ffi_python")


def test_full_size_forward_compiles_once_and_stays_on_device():
    config = GMICConfig()  # 2944 x 1920, K = 6, 256 x 256 crops
    variables = init_variables(config, jax.random.key(0))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x):
        return GMIC(config).apply(variables, x, train=False)

    x = jax.random.normal(jax.random.key(1), (1, 2944, 1920, 1))
    lowered = forward.lower(variables, x)
    jaxpr = str(jax.make_jaxpr(lambda v, x: GMIC(config).apply(v, x))(variables, x))
    hlo = lowered.as_text()
    for marker in HOST_CALLBACK_MARKERS:
        assert marker not in jaxpr and marker not in hlo, f"host callback {marker!r} in the forward pass"

    out1 = forward(variables, x)
    out2 = forward(variables, x * 0.5)  # same shapes: no retrace (assert_max_traces would raise)
    assert out1["saliency_map"].shape == (1, 46, 30, 2)
    assert out1["patches"].shape == (1, 6, 256, 256)
    locs = np.asarray(out2["patch_locations"])
    assert locs.min() >= 0 and (locs[..., 0] <= 2944 - 1).all() and (locs[..., 1] <= 1920 - 1).all()
    assert forward._cache_size() == 1
