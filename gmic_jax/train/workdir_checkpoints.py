"""Training checkpoints in the project's one layout (see :mod:`gmic_jax.checkpoint`).

One Orbax ``CheckpointManager`` in WORKDIR; each step holds two items:

* ``variables``   -- {'params', 'batch_stats'}: what ``gmic_jax.load_checkpoint`` reads;
* ``train_state`` -- optimizer state, step, base RNG key and the data position (epoch, running
  train-loss sums), everything a resumed run needs to continue the same trajectory.

Saves are asynchronous. Steps saved at evaluations carry the validation metrics. Kept: the latest
``keep_latest`` steps (for resuming), the step the run's :class:`~gmic_jax.checkpoint.SelectionRule`
chooses (``config.best_metric``, ``config.best_min_delta``; the step ``load_checkpoint`` loads) and
the best evaluated one (so that the choice stays what it would be with every step kept), or with
``keep_evaluated`` every evaluated step (to compare them later on held-out data:
``gmic-jax compare-steps``). A step whose save did not finish (a run killed mid-save) is never
listed, so a restart resumes from the last complete one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from gmic_jax import checkpoint as ckpt_lib
from gmic_jax.logs import quiet_library_noise

TRAIN_STATE_ITEM = "train_state"


@dataclasses.dataclass
class KeepSelected:
    """Orbax preservation policy: the evaluated steps ``rule`` needs (all of them with
    ``keep_evaluated``); steps without metrics are left to the other policies."""

    rule: ckpt_lib.SelectionRule
    keep_evaluated: bool = False

    def should_preserve(self, checkpoints: Sequence, *, context=None) -> list[bool]:
        evaluated = {c.step: c.metrics for c in checkpoints if c.metrics}
        keep = set(evaluated) if self.keep_evaluated else self.rule.steps_to_preserve(evaluated)
        return [c.step in keep for c in checkpoints]


def make_manager(
    workdir,
    keep_latest: int = 2,
    asynchronous: bool = True,
    rule: ckpt_lib.SelectionRule | None = None,
    keep_evaluated: bool = False,
):
    quiet_library_noise()  # Orbax warns at every save without metrics (all but evaluation steps)
    keep = KeepSelected(rule or ckpt_lib.SelectionRule(), keep_evaluated)
    policy = cm.AnyPreservationPolicy([cm.LatestN(n=keep_latest), keep])
    options = ckpt_lib.manager_options(
        preservation_policy=policy,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,
        save_interval_steps=1,
    )
    return ocp.CheckpointManager(
        Path(workdir).absolute(), options=options, item_names=(ckpt_lib.VARIABLES_ITEM, TRAIN_STATE_ITEM)
    )


def _train_state_tree(state, data_position: Mapping):
    return {
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "data": {k: np.asarray(v) for k, v in data_position.items()},
    }


def save(manager, state, data_position: Mapping, metrics: Mapping | None = None) -> bool:
    """Start an (asynchronous) save of ``state`` as its step; ``metrics`` mark evaluation steps
    (the defined ones are stored; a step without the selection metric is never chosen)."""
    step = (
        int(np.asarray(state.step.addressable_shards[0].data)) if isinstance(state.step, jax.Array) else int(state.step)
    )
    args = ocp.args.Composite(
        **{
            ckpt_lib.VARIABLES_ITEM: ocp.args.StandardSave(state.variables),
            TRAIN_STATE_ITEM: ocp.args.StandardSave(_train_state_tree(state, data_position)),
        }
    )
    metrics = {k: float(v) for k, v in metrics.items() if v is not None} if metrics else None
    return manager.save(step, args=args, metrics=metrics, force=True)


def restore(manager, template_state, data_position_template: Mapping, step: int | None = None):
    """(state, data_position) of ``step`` (default: the latest), laid out like ``template_state``
    (same shardings), or None when WORKDIR has no step yet."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None

    def abstract(tree):
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

    ts_template = _train_state_tree(template_state, data_position_template)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                ckpt_lib.VARIABLES_ITEM: ocp.args.StandardRestore(abstract(template_state.variables)),
                TRAIN_STATE_ITEM: ocp.args.StandardRestore(abstract(ts_template)),
            }
        ),
    )
    variables, ts = restored[ckpt_lib.VARIABLES_ITEM], restored[TRAIN_STATE_ITEM]
    state = template_state.replace(
        step=ts["step"],
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=ts["opt_state"],
        rng=ts["rng"],
    )
    return state, {k: np.asarray(v) for k, v in ts["data"].items()}
