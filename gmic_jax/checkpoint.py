"""The one checkpoint layout of gmic-jax, shared by the converter, training, predict and evaluate.

    DIR/config.json          {"format": "gmic-jax", "version": 1,
                              "model": {every GMICConfig field},
                              "preprocessing": {what the weights expect: gmic_jax.preprocessing},
                              ... (training workdirs add "train": {...})}
    DIR/<step>/variables/    an Orbax checkpoint of {'params', 'batch_stats'}
    DIR/<step>/...           training adds its own items (optimizer state, data position)

Steps are managed by `orbax.checkpoint.CheckpointManager`; `load_checkpoint` takes the best step
by `BEST_METRIC` where metrics were saved, else the latest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gmic_jax.config import GMICConfig
from gmic_jax.files import write_atomic
from gmic_jax.preprocessing import Preprocessing

FORMAT = "gmic-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_ITEM = "variables"
BEST_METRIC = "val_auc_malignant"


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


def write_config(directory, config: GMICConfig, preprocessing: Preprocessing | None = None, **extra):
    """Write DIR/config.json atomically (extra top-level sections, e.g. train=..., are kept).

    ``preprocessing`` defaults to the original pipeline at the model's window; its window must be
    the model's image_shape."""
    preprocessing = preprocessing or Preprocessing(window_shape=config.image_shape)
    if preprocessing.window_shape != config.image_shape:
        raise ValueError(f"preprocessing window_shape {list(preprocessing.window_shape)} differs from the "
                         f"model's image_shape {list(config.image_shape)}")
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
    }
    doc.update(extra)
    write_atomic(Path(directory) / CONFIG_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_model_config(directory) -> tuple[GMICConfig, dict]:
    """(GMICConfig, the whole config.json document as written): what loading the weights needs."""
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


def read_config(directory) -> tuple[GMICConfig, Preprocessing, dict]:
    """(GMICConfig, :class:`Preprocessing`, the whole config.json document as written).

    The preprocessing section is read through :meth:`Preprocessing.read`: files of older versions
    are migrated in memory (the file is not rewritten)."""
    config, doc = read_model_config(directory)
    try:
        preprocessing = Preprocessing.read(doc.get("preprocessing"), config.image_shape)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: bad 'preprocessing' section: {e}") from None
    return config, preprocessing, doc


def save_checkpoint(directory, config: GMICConfig, variables, preprocessing: Preprocessing | None = None,
                    step: int = 0):
    """Write config.json (:func:`write_config`) and `variables` ({'params', 'batch_stats'}) as step `step` of DIR."""
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
    config, _ = read_model_config(directory)  # the weights need the model alone
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
