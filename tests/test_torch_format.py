"""torch.save files read without torch (gmic_jax.torch_format), and converted through `gmic-jax convert`.

The fixtures (tests/fixtures/*.p, written by tests/fixtures/make_torch_checkpoints.py with real torch)
hold GMIC's full original state_dict layout as strided views into small shared storages, in both
formats torch.save writes. The reference every test compares with is rebuilt here with numpy from the
script's rule, not read from the files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
from conftest import REPO

from gmic_jax import GMIC, GMICConfig, load_checkpoint
from gmic_jax.cli import main as cli_main
from gmic_jax.convert import convert_state_dict
from gmic_jax.torch_format import MAGIC_NUMBER, PROTOCOL_VERSION, TorchFormatError, read_torch_state_dict

FORMATS = ["zip", "legacy"]


def _load_maker():
    spec = importlib.util.spec_from_file_location(
        "make_torch_checkpoints", REPO / "tests" / "fixtures" / "make_torch_checkpoints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()


@pytest.fixture(scope="module")
def gmic_reference():
    return maker.gmic_state_dict(maker.gmic_shapes())


def assert_same_arrays(ours: dict, reference: dict):
    assert list(ours) == list(reference)  # keys, in the order they were saved
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gmic_fixture_reads_as_numpy_rebuilds_it(fmt, gmic_reference):
    ours = read_torch_state_dict(maker.GMIC_FILES[fmt])
    assert len(ours) == 258  # 217 parameters and buffers + 41 num_batches_tracked
    assert_same_arrays(ours, gmic_reference)
    conv = ours["ds_net.layer_list.3.1.conv2.weight"]
    assert conv.ndim == 4 and all(np.ptp(conv, axis=a).max() > 0 for a in range(4))  # varies along every axis


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_dtypes_transposed_empty_negated_conjugated(fmt):
    ours = read_torch_state_dict(maker.DTYPE_FILES[fmt])
    reference = maker.dtype_state_dict()
    assert str(ours["bfloat16"].dtype) == "bfloat16"
    ours["bfloat16"] = ours["bfloat16"].astype(np.float32)  # the reference holds values bfloat16 holds exactly
    assert_same_arrays(ours, reference)


def test_torch_load_agrees():
    torch = pytest.importorskip("torch", reason="the comparison with torch.load needs torch (the [torch] extra)")
    for path in [*maker.GMIC_FILES.values(), *maker.DTYPE_FILES.values()]:
        theirs = torch.load(path, map_location="cpu", weights_only=False)
        ours = read_torch_state_dict(path)
        assert list(ours) == list(theirs)
        for key, tensor in theirs.items():
            tensor = tensor.resolve_neg().resolve_conj()  # numpy() refuses torch's lazy negation / conjugation
            expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
            np.testing.assert_array_equal(np.asarray(ours[key], expected.dtype), expected, err_msg=f"{path}: {key}")


def test_cli_converts_torch_files_as_the_npz_of_their_arrays(tmp_path, gmic_reference):
    """`gmic-jax convert FIXTURE.p` (both formats) gives the variables and the model outputs that the
    .npz of the same arrays gives."""
    dense = gmic_reference
    npz = tmp_path / "state_dict.npz"
    np.savez(npz, **dense)
    loaded = {}
    for name, src in [("npz", npz), *maker.GMIC_FILES.items()]:
        out = tmp_path / name
        assert cli_main(["convert", str(src), "--out", str(out), "--model-index", "1"]) == 0
        loaded[name] = load_checkpoint(out)
    expected = convert_state_dict(dense, GMICConfig(percent_t=0.02))
    for name, (config, variables) in loaded.items():
        assert config == GMICConfig(percent_t=0.02), name
        la, ta = jax.tree.flatten(variables)
        lb, tb = jax.tree.flatten(expected)
        assert ta == tb, name
        for a, b in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    # The same converted weights drive the model to the same outputs (one small image; the weights do
    # not depend on the image size). Equal weights through one compiled program: exactly equal.
    config = dataclasses.replace(loaded["npz"][0], image_shape=(192, 128), crop_shape=(32, 32))
    x = np.random.default_rng(0).standard_normal((1, 192, 128, 1)).astype(np.float32)
    apply = jax.jit(lambda v, x: GMIC(config).apply(v, x, train=False))
    outputs = {name: jax.tree.map(np.asarray, apply(variables, x)) for name, (_, variables) in loaded.items()}
    assert np.isfinite(outputs["npz"]["y_fusion"]).all() and np.ptp(outputs["npz"]["saliency_map"]) > 0
    for name in maker.GMIC_FILES:
        for key, value in outputs["npz"].items():
            np.testing.assert_array_equal(outputs[name][key], value, err_msg=f"{name}: {key}")


class _Evil:
    """Unpickled by a plain pickle.load, this would create the directory `target`."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def _legacy_bytes(obj) -> bytes:
    return b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, {}, obj, []))


def _zip_bytes(obj) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("archive/byteorder", "little")
    return buf.getvalue()


def test_cli_names_the_file_and_the_problem(tmp_path, capsys):
    legacy = maker.GMIC_FILES["legacy"].read_bytes()
    zipped = maker.GMIC_FILES["zip"].read_bytes()
    target = tmp_path / "created_by_unpickling"
    refused = f"refusing the pickled global {os.mkdir.__module__}.mkdir"  # posix.mkdir on Linux
    cases = {
        "evil_legacy.p": (_legacy_bytes({"w": _Evil(target)}), refused),
        "evil_zip.p": (_zip_bytes({"w": _Evil(target)}), refused),
        "truncated_data.p": (legacy[:-100], "the file ends inside storage"),
        "truncated_pickle.p": (legacy[: len(legacy) // 2], "not a PyTorch checkpoint"),
        "truncated_zip.p": (zipped[:-100], "a damaged or truncated zip archive"),
        "not_a_dict.p": (_legacy_bytes([1, 2]), "holds a list, not a state_dict of tensors"),
        "other_pickle.p": (pickle.dumps({"a": 1}), "not a PyTorch checkpoint"),
    }
    for name, (data, message) in cases.items():
        src = tmp_path / name
        src.write_bytes(data)
        with pytest.raises(TorchFormatError) as e:
            read_torch_state_dict(src)
        assert str(e.value).startswith(f"{src}: ") and message in str(e.value), (name, str(e.value))
        assert cli_main(["convert", str(src), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert str(src) in err and message in err, (name, err)
    assert not target.exists()  # nothing from a file is run
    assert not (tmp_path / "out" / "config.json").exists()
