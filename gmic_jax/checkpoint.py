"""The one checkpoint layout of gmic-jax, shared by the converter, training, predict and evaluate.

    DIR/config.json          {"format": "gmic-jax", "version": 1,
                              "model": {every GMICConfig field},
                              "preprocessing": {...what the weights expect...},
                              ... (training workdirs add "train": {...})}
    DIR/<step>/variables/    an Orbax checkpoint of {'params', 'batch_stats'}
    DIR/<step>/...           training adds its own items (optimizer state, data position)

Steps are managed by `orbax.checkpoint.CheckpointManager`; `load_checkpoint` takes the best step
by `BEST_METRIC` where metrics were saved, else the latest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gmic_jax.config import GMICConfig

FORMAT = "gmic-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_ITEM = "variables"
BEST_METRIC = "val_auc_malignant"

# The original release's inference preprocessing (see gmic_jax.data): 16-bit PNG values as read,
# cropped, flipped, 2944 x 1920 window at the optimal centre, per-window standardisation.
ORIGINAL_PREPROCESSING = {
    "name": "original",
    "window_shape": [2944, 1920],
    "normalization": "per_window_standardize",
    "std_floor": 1e-5,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the path and the problem."""


def manager_options(**overrides):
    """CheckpointManagerOptions used for every gmic-jax directory (best step by BEST_METRIC)."""
    import orbax.checkpoint as ocp

    kw: dict[str, Any] = dict(
        best_fn=lambda metrics: float(metrics[BEST_METRIC]),
        best_mode="max",
        keep_checkpoints_without_metrics=True,
        create=True,
    )
    kw.update(overrides)
    return ocp.CheckpointManagerOptions(**kw)


def write_config(directory, config: GMICConfig, preprocessing: Mapping[str, Any] | None = None, **extra):
    """Write DIR/config.json atomically (extra top-level sections, e.g. train=..., are kept)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": config.to_dict(),
        "preprocessing": dict(preprocessing if preprocessing is not None else ORIGINAL_PREPROCESSING),
    }
    doc.update(extra)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / CONFIG_FILE)


def read_config(directory) -> tuple[GMICConfig, dict]:
    """(GMICConfig, the whole config.json document)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a gmic-jax checkpoint ({CONFIG_FILE} is missing)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if doc.get("format") != FORMAT or "model" not in doc:
        raise CheckpointError(f"{path}: not a gmic-jax config (expected format={FORMAT!r} and a 'model' section)")
    try:
        return GMICConfig.from_dict(doc["model"]), doc
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad 'model' section: {e}") from None


def save_checkpoint(directory, config: GMICConfig, variables, preprocessing=None, step: int = 0):
    """Write config.json and `variables` ({'params', 'batch_stats'}) as step `step` of DIR."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    write_config(directory, config, preprocessing)
    tree = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    with ocp.CheckpointManager(directory, options=manager_options(enable_async_checkpointing=False)) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{VARIABLES_ITEM: ocp.args.StandardSave(tree)}), force=True)
        mngr.wait_until_finished()


def load_checkpoint(directory, step: int | None = None):
    """(GMICConfig, variables) from DIR: the given step, else the best by BEST_METRIC, else the latest."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    config, _ = read_config(directory)
    with ocp.CheckpointManager(directory, options=manager_options(read_only=True, create=False)) as mngr:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"{directory}: has {CONFIG_FILE} but no saved step")
        if step is None:
            step = mngr.best_step()
            if step is None:
                step = mngr.latest_step()
        elif step not in steps:
            raise CheckpointError(f"{directory}: no step {step} (saved steps: {sorted(steps)})")
        restored = mngr.restore(step, args=ocp.args.Composite(**{VARIABLES_ITEM: ocp.args.StandardRestore()}))
    variables = restored[VARIABLES_ITEM]
    return config, {k: _to_numpy_tree(v) for k, v in variables.items()}


def _to_numpy_tree(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a), tree)
