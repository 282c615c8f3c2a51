"""Training checkpoints in the project's one layout (see :mod:`gmic_jax.checkpoint`).

One Orbax ``CheckpointManager`` in WORKDIR; each step holds two items:

* ``variables``   -- {'params', 'batch_stats'}: what ``gmic_jax.load_checkpoint`` reads;
* ``train_state`` -- optimizer state, step, base RNG key and the data position (epoch, running
  train-loss sums), everything a resumed run needs to continue the same trajectory.

Saves are asynchronous. Kept: the latest ``keep_latest`` steps (for resuming) and the best step by
``val_auc_malignant`` (steps saved at evaluations carry their metrics). A step whose save did not
finish (a run killed mid-save) is never listed, so a restart resumes from the last complete one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from gmic_jax import checkpoint as ckpt_lib

TRAIN_STATE_ITEM = "train_state"


def make_manager(workdir, keep_latest: int = 2, asynchronous: bool = True):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm

    best = cm.BestN(get_metric_fn=lambda m: float(m[ckpt_lib.BEST_METRIC]), reverse=False, n=1,
                    keep_checkpoints_without_metrics=False)
    policy = cm.AnyPreservationPolicy([cm.LatestN(n=keep_latest), best])
    options = ckpt_lib.manager_options(
        preservation_policy=policy,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,
        save_interval_steps=1,
    )
    return ocp.CheckpointManager(Path(workdir).absolute(), options=options,
                                 item_names=(ckpt_lib.VARIABLES_ITEM, TRAIN_STATE_ITEM))


def _train_state_tree(state, data_position: Mapping):
    return {
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "data": {k: np.asarray(v) for k, v in data_position.items()},
    }


def save(manager, state, data_position: Mapping, metrics: Mapping | None = None) -> bool:
    """Start an (asynchronous) save of ``state`` as its step; ``metrics`` mark evaluation steps."""
    import orbax.checkpoint as ocp

    step = int(np.asarray(state.step.addressable_shards[0].data)) if isinstance(state.step, jax.Array) else int(state.step)
    args = ocp.args.Composite(**{
        ckpt_lib.VARIABLES_ITEM: ocp.args.StandardSave(state.variables),
        TRAIN_STATE_ITEM: ocp.args.StandardSave(_train_state_tree(state, data_position)),
    })
    metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
    if metrics is not None and ckpt_lib.BEST_METRIC not in metrics:
        metrics = None  # undefined metric (e.g. one class in the validation set): a plain step
    return manager.save(step, args=args, metrics=metrics, force=True)


def restore(manager, template_state, data_position_template: Mapping, step: int | None = None):
    """(state, data_position) of ``step`` (default: the latest), laid out like ``template_state``
    (same shardings), or None when WORKDIR has no step yet."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    ts_template = _train_state_tree(template_state, data_position_template)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        ckpt_lib.VARIABLES_ITEM: ocp.args.StandardRestore(abstract(template_state.variables)),
        TRAIN_STATE_ITEM: ocp.args.StandardRestore(abstract(ts_template)),
    }))
    variables, ts = restored[ckpt_lib.VARIABLES_ITEM], restored[TRAIN_STATE_ITEM]
    state = template_state.replace(step=ts["step"], params=variables["params"],
                                   batch_stats=variables["batch_stats"], opt_state=ts["opt_state"],
                                   rng=ts["rng"])
    return state, {k: np.asarray(v) for k, v in ts["data"].items()}
