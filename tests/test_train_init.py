"""--init-from: loaded arrays replace the fresh ones by path; unknown keys and shapes are errors."""

from __future__ import annotations

import numpy as np
import pytest

from gmic_jax.train.loop import _merge_init


def _fresh():
    return {
        "params": {"ds_net": {"w": np.zeros((2, 3), np.float32)}, "head": {"b": np.zeros(2, np.float32)}},
        "batch_stats": {"ds_net": {"mean": np.zeros(3, np.float32)}},
    }


def test_partial_checkpoint_replaces_only_its_arrays():
    loaded = {"params": {"ds_net": {"w": np.ones((2, 3))}}, "batch_stats": {"ds_net": {"mean": np.full(3, 2.0)}}}
    out = _merge_init(_fresh(), loaded, "pretrained-global")
    np.testing.assert_array_equal(out["params"]["ds_net"]["w"], np.ones((2, 3)))
    assert out["params"]["ds_net"]["w"].dtype == np.float32
    np.testing.assert_array_equal(out["params"]["head"]["b"], np.zeros(2))  # kept fresh
    np.testing.assert_array_equal(out["batch_stats"]["ds_net"]["mean"], np.full(3, 2.0))


def test_unknown_key_and_wrong_shape_are_named():
    with pytest.raises(ValueError, match="not in this model.*other/w"):
        _merge_init(_fresh(), {"params": {"other": {"w": np.ones(1)}}}, "ckpt")
    with pytest.raises(ValueError, match=r"ds_net/w has shape \(3, 2\)"):
        _merge_init(_fresh(), {"params": {"ds_net": {"w": np.ones((3, 2))}}}, "ckpt")
