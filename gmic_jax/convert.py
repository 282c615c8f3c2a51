"""Original GMIC checkpoints <-> gmic-jax variables, strictly key for key.

    from gmic_jax.convert import convert_state_dict, variables_to_state_dict
    variables = convert_state_dict(state_dict, GMICConfig(percent_t=0.02))
    state_dict = variables_to_state_dict(variables)

    gmic-jax convert sample_model_1.p --out models/gmic_1 --model-index 1   (gmic_jax.convert_cli)

The original is NCHW/OIHW PyTorch; gmic-jax is NHWC/HWIO Flax. Every key of the original
state_dict must find its place and every parameter of the model must be filled: a missing,
unexpected or mis-shaped key is an error naming it. `num_batches_tracked` is ignored.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from gmic_jax.checkpoint import save_checkpoint
from gmic_jax.config import GMICConfig
from gmic_jax.models import init_variables
from gmic_jax.preprocessing import Preprocessing
from gmic_jax.torch_format import TorchFormatError, read_torch_state_dict

IGNORED_LEAVES = ("num_batches_tracked",)
# Flax module path prefixes that differ from the original's attribute names.
_PREFIX_TO_TORCH = {
    ("attention", "mil_attn_U"): "mil_attn_U",
    ("attention", "mil_attn_V"): "mil_attn_V",
    ("attention", "mil_attn_w"): "mil_attn_w",
}
_NUMBERED = re.compile(r"^(layer_list|layer\d+|downsample)_(\d+(?:_\d+)*)$")


class ConversionError(ValueError):
    """A state_dict that does not fit the model; the message lists every offending key."""


def _module_name_to_torch(name: str) -> str:
    numbered = _NUMBERED.match(name)
    return f"{numbered.group(1)}.{numbered.group(2).replace('_', '.')}" if numbered else name


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    *modules, leaf = path
    modules = list(modules)
    for (a, b), torch_name in _PREFIX_TO_TORCH.items():
        if tuple(modules[:2]) == (a, b):
            modules = [torch_name] + modules[2:]
    modules = [_module_name_to_torch(m) for m in modules]
    torch_leaf = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }[(collection, leaf)]
    return ".".join(modules + [torch_leaf])


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # conv HWIO -> OIHW
        return np.transpose(a, (3, 2, 0, 1))
    if a.ndim == 2:  # dense (in, out) -> (out, in)
        return a.T
    return a


def _from_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # OIHW -> HWIO
        return np.transpose(a, (2, 3, 1, 0))
    if a.ndim == 2:
        return a.T
    return a


def _flat_leaves(variables):
    """[(collection, path tuple, array)] of a variables dict."""
    out = []

    def walk(collection, node, path):
        if isinstance(node, Mapping):
            for k in sorted(node):
                walk(collection, node[k], path + (k,))
        else:
            out.append((collection, path, node))

    for collection in ("params", "batch_stats"):
        if collection in variables:
            walk(collection, variables[collection], ())
    return out


def _template(config: GMICConfig):
    """Shapes of the model's variables (no compute: jax.eval_shape)."""
    return jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: GMICConfig = GMICConfig()):
    """Original state_dict (numpy arrays or torch tensors) -> {'params', 'batch_stats'} of GMIC(config)."""
    template = _template(config)
    sd = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in IGNORED_LEAVES}
    problems, used = [], set()
    variables: dict = {}
    for collection, path, leaf in _flat_leaves(template):
        key = _torch_key(collection, path)
        if key not in sd:
            problems.append(
                f"missing key {key!r} (expected shape {_to_torch_layout(np.empty(leaf.shape, np.uint8)).shape})"
            )
            continue
        used.add(key)
        value = _as_numpy(sd[key], key)
        converted = _from_torch_layout(value)
        if converted.shape != tuple(leaf.shape):
            problems.append(
                f"key {key!r} has shape {value.shape}, expected "
                f"{_to_torch_layout(np.empty(leaf.shape, np.uint8)).shape}"
            )
            continue
        node = variables.setdefault(collection, {})
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(converted, dtype=np.float32)
    for key in sorted(set(sd) - used):
        problems.append(
            f"unexpected key {key!r} (shape {tuple(np.shape(sd[key]))}): no place for it in GMIC({_describe(config)})"
        )
    if problems:
        raise ConversionError(f"state_dict does not fit GMIC ({len(problems)} problems):\n  " + "\n  ".join(problems))
    return variables


def variables_to_state_dict(variables) -> dict[str, np.ndarray]:
    """{'params', 'batch_stats'} -> original state_dict layout (numpy; num_batches_tracked = 0)."""
    sd = {}
    for collection, path, leaf in _flat_leaves(variables):
        key = _torch_key(collection, path)
        sd[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(leaf)))
        if key.endswith(".running_var"):
            sd[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return sd


def _describe(config: GMICConfig) -> str:
    return f"local_net={config.local_net}, attention={config.attention}"


def _as_numpy(value, key) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # pragma: no cover - exotic objects
        raise ConversionError(f"key {key!r}: value of type {type(value).__name__} is not an array ({e})") from None


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Read an original checkpoint: a state_dict written by `torch.save` (`.p`/`.pt`/`.pth`, either of
    its formats; read without torch by :mod:`gmic_jax.torch_format`) or an `.npz` of its arrays."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: not a readable .npz state_dict ({e})") from None
    try:
        return read_torch_state_dict(path)
    except TorchFormatError as e:
        raise ConversionError(str(e)) from None


def count_values(variables) -> int:
    """How many numbers {'params', 'batch_stats'} hold."""
    return sum(int(np.size(leaf)) for _, _, leaf in _flat_leaves(variables))


def convert_checkpoint(src, out_dir, config: GMICConfig) -> dict:
    """Read SRC, convert strictly, write OUT_DIR in the gmic-jax checkpoint layout; returns variables."""
    state_dict = read_state_dict(src)
    try:
        variables = convert_state_dict(state_dict, config)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    # The original release's inference preprocessing: stored values, cropped, flipped, window at
    # the best centre, per-window standardisation.
    save_checkpoint(out_dir, config, variables, preprocessing=Preprocessing.for_name("original", config.image_shape))
    return variables
