"""The one checkpoint layout of gmic-jax, shared by the converter, training, predict and evaluate.

    DIR/config.json          {"format": "gmic-jax", "version": 1,
                              "model": {every GMICConfig field},
                              "preprocessing": {what the weights expect: gmic_jax.preprocessing},
                              ... (training workdirs add "train": {...})}
    DIR/<step>/variables/    an Orbax checkpoint of {'params', 'batch_stats'}
    DIR/<step>/...           training adds its own items (optimizer state, data position)

Training workdirs add "checkpoint_selection": {"metric", "min_delta", "rule"}, the rule by which
`load_checkpoint` picks a step (see `SelectionRule`); training logs the step it keeps by the same
rule, and predict and evaluate record the step they load and why (`load_selected`,
`Selection.to_dict`, through :mod:`gmic_jax.records`). Steps are managed by
`orbax.checkpoint.CheckpointManager`; steps saved at an evaluation carry the validation metrics the
rule reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from gmic_jax.config import GMICConfig
from gmic_jax.files import write_atomic
from gmic_jax.logs import quiet_library_noise
from gmic_jax.preprocessing import Preprocessing

FORMAT = "gmic-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_ITEM = "variables"
BEST_METRIC = "val_auc_malignant"  # the default of SelectionRule.metric
SELECTION_KEY = "checkpoint_selection"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the path and the problem."""


ASKED_FOR = "the step asked for"
LATEST = "the latest saved step"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The step a rule picks, and why (``reason`` is one sentence for logs and outputs)."""

    step: int
    reason: str
    value: float | None = None  # the rule's metric at ``step`` (None: no evaluated step)
    best_step: int | None = None  # the evaluated step with the highest metric
    best_value: float | None = None
    rule: dict = dataclasses.field(default_factory=dict, hash=False)  # SelectionRule.to_dict(), or {"rule": ...}

    def to_dict(self) -> dict[str, Any]:
        """The choice as outputs record it (``checkpoint_selection``): the rule, the reason and,
        for a step chosen by a metric, the values it compared."""
        out: dict[str, Any] = {**self.rule, "reason": self.reason}
        if self.value is not None:
            out.update(value=self.value, best_step=self.best_step, best_value=self.best_value)
        return out


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """Which checkpoint of a training run is "the" checkpoint (``load_checkpoint``'s default).

    Among the steps saved at an evaluation, the **latest** whose ``metric`` is within ``min_delta``
    of the highest value of ``metric`` over all of them. ``min_delta=0`` keeps the best step (the
    later one on a tie); a positive ``min_delta`` says that a difference that small is noise, and
    then the later (longer-trained) step wins. Every validation metric of metrics.jsonl is
    higher-is-better.
    """

    metric: str = BEST_METRIC
    min_delta: float = 0.0

    DESCRIPTION = (
        "the latest evaluated step whose metric is within min_delta of the best value of "
        "the metric over all evaluated steps"
    )

    def __post_init__(self):
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0 and math.isfinite(self.min_delta)):
            raise ValueError(f"best_min_delta={self.min_delta!r}; expected a finite number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "min_delta": float(self.min_delta), "rule": self.DESCRIPTION}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "SelectionRule":
        """The rule a config.json records (workdirs from before it was recorded: the default)."""
        d = doc.get(SELECTION_KEY) or {}
        return cls(metric=str(d.get("metric", BEST_METRIC)), min_delta=float(d.get("min_delta", 0.0)))

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        v = (metrics or {}).get(self.metric)
        if v is None:
            return None
        v = float(v)
        return v if math.isfinite(v) else None

    def select(self, evaluated: Mapping[int, Mapping[str, Any] | None]) -> Selection | None:
        """The chosen step among ``{step: metrics}`` (None when no step has the metric)."""
        scored = sorted((int(s), v) for s, m in evaluated.items() if (v := self.value(m)) is not None)
        if not scored:
            return None
        best_step, best = max(scored, key=lambda sv: (sv[1], sv[0]))
        step, value = [sv for sv in scored if sv[1] >= best - self.min_delta][-1]
        n = len(scored)
        if step == best_step:
            reason = f"{self.metric} {value:.4f}, the best of {n} evaluated step{'s' * (n > 1)}"
        else:
            reason = (
                f"{self.metric} {value:.4f}, within best_min_delta {self.min_delta:g} of the best "
                f"{best:.4f} (step {best_step}): the later step wins"
            )
        return Selection(step, reason, value, best_step, best, self.to_dict())

    def steps_to_preserve(self, evaluated: Mapping[int, Mapping[str, Any] | None]) -> set[int]:
        """The chosen step and the best one: enough for the choice to stay the same as more steps
        come, whatever else is deleted."""
        chosen = self.select(evaluated)
        return set() if chosen is None else {chosen.step, chosen.best_step}


def manager_options(**overrides):
    """CheckpointManagerOptions used for every gmic-jax directory. ``best_fn`` is set so that Orbax
    stores the metrics given to ``save`` (it writes them only when it tracks a best); gmic-jax
    chooses steps with :class:`SelectionRule`, not with Orbax's ``best_step``."""
    kw: dict[str, Any] = dict(
        best_fn=lambda metrics: float(metrics.get(BEST_METRIC, float("nan"))),
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
        raise ValueError(
            f"preprocessing window_shape {list(preprocessing.window_shape)} differs from the "
            f"model's image_shape {list(config.image_shape)}"
        )
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
    if Path(directory).is_file():
        raise CheckpointError(f"{directory}: is a file; a gmic-jax checkpoint is a directory (with {CONFIG_FILE})")
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a gmic-jax checkpoint ({CONFIG_FILE} is missing)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "model" not in doc:
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


def save_checkpoint(
    directory, config: GMICConfig, variables, preprocessing: Preprocessing | None = None, step: int = 0
):
    """Write config.json (:func:`write_config`) and `variables` ({'params', 'batch_stats'}) as step `step` of DIR."""
    directory = Path(directory).absolute()
    write_config(directory, config, preprocessing)
    tree = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    with ocp.CheckpointManager(directory, options=manager_options(enable_async_checkpointing=False)) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{VARIABLES_ITEM: ocp.args.StandardSave(tree)}), force=True)
        mngr.wait_until_finished()


def _read_only_manager(directory):
    quiet_library_noise()  # Orbax announces every read-only manager
    # Options a read-only manager would otherwise reset, one warning each; no root metadata (its
    # save ends in a barrier of all processes, and a reader may be one process alone).
    return ocp.CheckpointManager(
        directory,
        options=manager_options(
            read_only=True, create=False, save_interval_steps=0, cleanup_tmp_directories=False, save_root_metadata=False
        ),
    )


def saved_steps(directory) -> list[int]:
    """The complete steps saved in DIR (none when DIR does not exist)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    with _read_only_manager(directory) as mngr:
        return sorted(mngr.all_steps())


def evaluated_steps(directory) -> dict[int, dict]:
    """{step: validation metrics} of the saved steps of DIR that were saved at an evaluation."""
    directory = Path(directory).absolute()
    with _read_only_manager(directory) as mngr:
        return {int(s): dict(m) for s in mngr.all_steps() if (m := mngr.metrics(s))}


def _select(mngr, directory, doc, step):
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{directory}: has {CONFIG_FILE} but no saved step")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{directory}: no step {step} (saved steps: {sorted(steps)})")
        return Selection(int(step), ASKED_FOR, rule={"rule": ASKED_FOR})
    chosen = SelectionRule.from_doc(doc).select({s: mngr.metrics(s) for s in steps})
    if chosen is None:
        return Selection(int(max(steps)), f"{LATEST} (no step saved at an evaluation)", rule={"rule": LATEST})
    return chosen


def select_checkpoint(directory, step: int | None = None) -> Selection:
    """The step :func:`load_checkpoint` loads from DIR and why: ``step`` if given, else the one
    the recorded :class:`SelectionRule` chooses, else (no evaluated step) the latest."""
    directory = Path(directory).absolute()
    _, doc = read_model_config(directory)
    with _read_only_manager(directory) as mngr:
        return _select(mngr, directory, doc, step)


def load_checkpoint(directory, step: int | None = None):
    """(GMICConfig, variables) from DIR: the given step, else the step the recorded
    :class:`SelectionRule` chooses (the one training logged as kept), else the latest."""
    config, variables, _ = load_selected(directory, step)
    return config, variables


def load_selected(directory, step: int | None = None) -> tuple[GMICConfig, dict, Selection]:
    """(GMICConfig, variables, the :class:`Selection` that chose the step): :func:`load_checkpoint`
    and what predict and evaluate record of it. Any failure is a :class:`CheckpointError` naming DIR."""
    given = directory
    directory = Path(directory).absolute()
    config, doc = read_model_config(given)  # the weights need the model alone
    # A step saved by a multi-process run records shardings over devices this process may not
    # have: those arrays come to this process's first device instead.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _read_only_manager(directory) as mngr:
        chosen = _select(mngr, given, doc, step)
        try:
            restored = mngr.restore(
                chosen.step,
                args=ocp.args.Composite(**{VARIABLES_ITEM: ocp.args.StandardRestore(fallback_sharding=here)}),
            )
        except Exception as e:  # Orbax's errors for a missing or damaged step
            raise CheckpointError(f"{given}: cannot read step {chosen.step} ({type(e).__name__}: {e})") from None
    variables = restored[VARIABLES_ITEM]
    return config, {k: _to_numpy_tree(v) for k, v in variables.items()}, chosen


def _to_numpy_tree(tree):
    return jax.tree.map(lambda a: np.asarray(a), tree)
