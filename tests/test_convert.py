"""Converter: strict key mapping, exact round trip, clear errors; the checkpoint layout and CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from gmic_jax import GMICConfig, init_variables, load_checkpoint
from gmic_jax.checkpoint import CheckpointError
from gmic_jax.cli import main as cli_main
from gmic_jax.convert import ConversionError, convert_state_dict, variables_to_state_dict


@pytest.fixture(scope="module")
def reference_state_dict(goldens):
    """A whole state_dict of the original GMIC (num_batches_tracked included): the goldens' weights of
    their 'small' case, for each source of tests/conftest.py's `goldens`."""
    sd = goldens.state_dict(goldens.meta("small")["weight_seed"])
    assert len(sd) == 258
    assert sum(key.endswith("num_batches_tracked") for key in sd) == 41
    return sd


def assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_original_key_is_placed(reference_state_dict):
    variables = convert_state_dict(reference_state_dict, GMICConfig())
    back = variables_to_state_dict(variables)
    assert set(back) == set(reference_state_dict)  # including num_batches_tracked
    for key, value in reference_state_dict.items():
        assert back[key].shape == value.shape, key
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("local_net", ["resnet18", "resnet50"])
def test_round_trip_is_exact(local_net):
    config = GMICConfig(local_net=local_net)
    variables = jax.tree.map(np.asarray, init_variables(config, jax.random.key(3)))
    again = convert_state_dict(variables_to_state_dict(variables), config)
    assert_trees_equal(variables, again)


def test_num_batches_tracked_optional(reference_state_dict):
    without = {k: v for k, v in reference_state_dict.items() if not k.endswith("num_batches_tracked")}
    assert_trees_equal(convert_state_dict(without), convert_state_dict(reference_state_dict))


def test_missing_key_is_named(reference_state_dict):
    sd = dict(reference_state_dict)
    del sd["ds_net.layer_list.3.1.conv2.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'ds_net\.layer_list\.3\.1\.conv2\.weight'"):
        convert_state_dict(sd)


def test_unexpected_key_is_named(reference_state_dict):
    sd = dict(reference_state_dict, **{"dn_resnet.fc.weight": np.zeros((2, 512), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key 'dn_resnet\.fc\.weight'"):
        convert_state_dict(sd)


def test_wrong_shape_is_named(reference_state_dict):
    sd = dict(reference_state_dict)
    sd["mil_attn_V.weight"] = np.zeros((64, 512), np.float32)
    with pytest.raises(ConversionError, match=r"'mil_attn_V\.weight' has shape \(64, 512\), expected \(128, 512\)"):
        convert_state_dict(sd)


def test_all_problems_reported_at_once(reference_state_dict):
    sd = dict(reference_state_dict)
    del sd["fusion_dnn.bias"]
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(ConversionError, match="2 problems") as e:
        convert_state_dict(sd)
    assert "fusion_dnn.bias" in str(e.value) and "extra.weight" in str(e.value)


def test_cli_convert_npz_and_load_checkpoint(tmp_path, reference_state_dict, capsys):
    src = tmp_path / "model_4.npz"
    np.savez(src, **reference_state_dict)
    out = tmp_path / "converted"
    assert cli_main(["convert", str(src), "--out", str(out), "--model-index", "4"]) == 0
    config, variables = load_checkpoint(out)
    assert config == GMICConfig(percent_t=0.05)
    doc = json.loads((out / "config.json").read_text())
    assert doc["model"]["percent_t"] == 0.05 and doc["preprocessing"]["name"] == "original"
    assert set(doc["model"]) == set(GMICConfig().to_dict())
    assert_trees_equal(variables, convert_state_dict(reference_state_dict))


def test_cli_convert_reports_bad_checkpoints(tmp_path, reference_state_dict, capsys):
    not_a_checkpoint = tmp_path / "notes.p"
    not_a_checkpoint.write_text("hello")
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"PK\x03\x04 truncated")
    missing = dict(reference_state_dict)
    del missing["dn_resnet.bn1.running_var"]
    missing_npz = tmp_path / "missing.npz"
    np.savez(missing_npz, **missing)
    cases = [
        (not_a_checkpoint, "not a PyTorch checkpoint"),
        (bad_npz, "not a readable .npz"),
        (missing_npz, "missing key 'dn_resnet.bn1.running_var'"),
        (tmp_path / "absent.p", "no such file"),
    ]
    for src, message in cases:
        assert cli_main(["convert", str(src), "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert str(src) in err and message in err, err
    assert not (tmp_path / "o" / "config.json").exists()  # nothing written for a failed conversion


def test_torch_checkpoint(tmp_path, reference_state_dict):
    torch = pytest.importorskip("torch", reason="writing a .p checkpoint here needs torch (the [torch] extra)")
    src = tmp_path / "sample_model_1.p"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in reference_state_dict.items()}, src)
    out = tmp_path / "converted"
    assert cli_main(["convert", str(src), "--out", str(out)]) == 0
    _, variables = load_checkpoint(out)
    assert_trees_equal(variables, convert_state_dict(reference_state_dict))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
