"""The workdir owns its config: a run that resumes is checked against WORKDIR/config.json.

``gmic-jax train --workdir DIR`` resumes by itself from the checkpoints in DIR. Before it touches
DIR, the requested config is compared with the one DIR's weights were trained with (its
config.json, written by the first run):

* fields that do not change what is computed -- :data:`FREE_FIELDS`: progress bar, logging and
  checkpoint intervals, how many checkpoints are kept, the evaluation batch size, the profiled
  steps -- may differ;
  config.json takes the new values;
* ``num_epochs`` may change when the learning rate does not depend on the number of steps
  (``optimizer.schedule='constant'``, warm-up or not) and the run has not gone past the new end:
  every step depends only on the step number, the seed and the epoch's data order, so a run
  extended from 12 to 20 epochs is step for step the run that was asked for 20 from the start.
  With ``'cosine'`` or ``'warmup_cosine'`` the schedule spans all ``num_epochs``: changing it
  changes the learning rate of every remaining step (a run extended after its cosine has decayed
  to zero jumps back to a larger rate), and the result is neither the shorter nor the longer run;
  that is a change of the computation like any other;
* any other difference (model, data, loss, optimizer, seed, batch size, evaluation, checkpoint
  selection, the preprocessing the data carries) is an error that names each field (old -> new)
  and leaves DIR as it was (the CLI exits 2). ``--config-changes-ok`` (``config_changes_ok=True``)
  accepts the changes: they are logged and config.json then holds the new config. A field added
  after a workdir was written counts at the value earlier versions computed with
  (:data:`IMPLIED_FIELDS`: a config.json without ``loss.gap_weight`` was trained with 0).

Every accepted difference is appended to config.json's ``history`` (time, the step the run resumed
from, each field's old and new value, and what allowed it), so the workdir keeps saying what
produced its weights.

A workdir without a saved step has trained nothing yet: its config.json is simply replaced.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from gmic_jax import checkpoint as ckpt_lib
from gmic_jax.config import GMICConfig
from gmic_jax.preprocessing import Preprocessing
from gmic_jax.train.config_lib import ConfigError, flat_fields
from gmic_jax.train.state import learning_rate_schedule

log = logging.getLogger("gmic_jax.train")

CHANGES_OK_OPTION = "--config-changes-ok"
# Training-config fields that change no computed value: what is logged or shown, how often a
# checkpoint is written and how many are kept (which steps are *chosen* is not free: best_metric
# and best_min_delta are guarded), the evaluation batch size (predictions do not depend on it),
# the number of input worker processes (batches do not depend on it) and which steps are traced by
# the profiler (profile_steps).
FREE_FIELDS = frozenset(
    {
        "progress_bar",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_latest",
        "keep_evaluated",
        "eval.batch_size",
        "data.workers",
        "profile_steps",
    }
)
EXTENDABLE = "num_epochs"
# Learning-rate schedules that do not depend on the total number of steps (see
# gmic_jax.train.state.learning_rate_schedule).
STEP_COUNT_FREE_SCHEDULES = ("constant",)
# Fields added after workdirs were first written, at the value every earlier version computed with:
# a config.json without one was trained with that value, so asking for another is a change. History,
# not today's defaults: these stay as they are when a default changes.
IMPLIED_FIELDS = {"loss.gap_weight": 0.0, "loss.gap_margin": 2.0}


class WorkdirError(ConfigError):
    """The workdir cannot take this run (it is a file, or holds a run with another config)."""


@dataclasses.dataclass
class Resume:
    """What :func:`check` decided: the document to write and the history entry it adds (if any)."""

    doc: dict
    latest_step: int | None
    entry: dict | None = None


def _as_json(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _fields(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Comparable fields: the training config by its override names, the preprocessing prefixed."""
    out = flat_fields(doc.get("train") or {})
    if out:
        out = {**IMPLIED_FIELDS, **out}
    out.update(flat_fields(doc.get("preprocessing") or {}, "preprocessing."))
    return out


def _fmt(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _num_epochs_allowed(old: dict, new: dict, latest: int, steps_per_epoch: int) -> bool:
    schedules = (old.get("optimizer.schedule"), new.get("optimizer.schedule"))
    return all(s in STEP_COUNT_FREE_SCHEDULES for s in schedules) and int(new[EXTENDABLE]) * steps_per_epoch >= latest


def _learning_rate_note(old: dict, new: dict, latest: int, steps_per_epoch: int) -> str:
    opt = {k.partition(".")[2]: v for k, v in new.items() if k.startswith("optimizer.")}
    before = float(learning_rate_schedule(opt, int(old[EXTENDABLE]) * steps_per_epoch)(latest))
    after = float(learning_rate_schedule(opt, int(new[EXTENDABLE]) * steps_per_epoch)(latest))
    return (
        f" (optimizer.schedule={new.get('optimizer.schedule')!r} spans all num_epochs: the learning rate "
        f"at step {latest} would be {after:.3g} instead of {before:.3g})"
    )


def check(workdir, requested: Mapping[str, Any], *, steps_per_epoch: int, config_changes_ok: bool = False) -> Resume:
    """Compare ``requested`` (the config.json this run would write) with WORKDIR's; raise
    :class:`WorkdirError` for a change that is not allowed. Reads only."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; give a directory (it is created if missing)")
    requested = _as_json(dict(requested))
    steps = ckpt_lib.saved_steps(workdir)
    if not steps:
        return Resume(requested, None)
    latest = steps[-1]
    path = workdir / ckpt_lib.CONFIG_FILE
    try:
        _, old_prep, old_doc = ckpt_lib.read_config(workdir)
    except ckpt_lib.CheckpointError as e:
        raise WorkdirError(
            f"--workdir {workdir} holds checkpoints but no readable training config ({e}); use another --workdir"
        ) from None
    if "train" not in old_doc:
        raise WorkdirError(
            f"--workdir {workdir} holds a model checkpoint that was not trained here ({path} has "
            f"no 'train' section); start from it with --init-from {workdir} and another --workdir"
        )
    # The preprocessing as this version spells it (older spellings are migrated, not changes).
    old, new = _fields({**old_doc, "preprocessing": old_prep.to_dict()}), _fields(requested)
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    # Fields this version knows and the workdir's config.json does not (or the reverse): recorded.
    unversioned = {k for k in changes if k not in old or k not in new}
    guarded = {k: v for k, v in changes.items() if k not in FREE_FIELDS and k not in unversioned}
    extension = None
    if EXTENDABLE in guarded and _num_epochs_allowed(old, new, latest, steps_per_epoch):
        extension = guarded.pop(EXTENDABLE)
    if guarded and not config_changes_ok:
        listed = ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in guarded.items())
        if EXTENDABLE in guarded and new.get("optimizer.schedule") not in STEP_COUNT_FREE_SCHEDULES:
            listed = listed.replace(
                f"{EXTENDABLE} {_fmt(old[EXTENDABLE])} -> {_fmt(new[EXTENDABLE])}",
                f"{EXTENDABLE} {_fmt(old[EXTENDABLE])} -> {_fmt(new[EXTENDABLE])}"
                + _learning_rate_note(old, new, latest, steps_per_epoch),
            )
        raise WorkdirError(
            f"--workdir {workdir} was trained (to step {latest}) with another config; this run changes "
            f"{listed}. Resume with the workdir's config (see {path}), use a new --workdir, or pass "
            f"{CHANGES_OK_OPTION} to continue with the changes (recorded in config.json's history)"
        )
    doc = dict(requested)
    history = list(old_doc.get("history", []))
    entry = None
    if changes:
        entry = _history_entry(workdir, latest, changes, guarded, extension, unversioned)
        history.append(entry)
    if history:
        doc["history"] = history
    return Resume(doc, latest, entry)


def _history_entry(workdir, latest: int, changes: dict, guarded: dict, extension, unversioned: set) -> dict:
    """config.json's history entry for a resume with ``changes`` (field -> (old, new)), naming what
    allowed each; logged (a warning for changes of the computation)."""
    allowed = []
    if guarded:
        allowed.append(f"{CHANGES_OK_OPTION}: " + ", ".join(guarded))
    if extension is not None:
        allowed.append(
            f"{EXTENDABLE} with a step-count-free learning rate (the same steps as a run "
            f"asked for {extension[1]} epochs from the start)"
        )
    free = [k for k in changes if k in FREE_FIELDS]
    if free:
        allowed.append("fields that change no computed value: " + ", ".join(free))
    if unversioned:
        allowed.append(
            "fields this version and the workdir's config.json do not share: " + ", ".join(sorted(unversioned))
        )
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_at_step": latest,
        "changes": {k: [a, b] for k, (a, b) in changes.items()},
        "allowed_by": allowed,
    }
    text = ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items())
    (log.warning if guarded else log.info)(
        "resuming %s at step %d with config changes: %s (allowed by %s; recorded in config.json's history)",
        workdir,
        latest,
        text,
        "; ".join(allowed),
    )
    return entry


def record(workdir, resume: Resume) -> None:
    """Write the checked config.json (process 0 only; the caller decides)."""
    doc = dict(resume.doc)
    model = GMICConfig.from_dict(doc.pop("model"))
    preprocessing = Preprocessing.from_dict(doc.pop("preprocessing"))
    for key in ("format", "version"):
        doc.pop(key, None)
    ckpt_lib.write_config(workdir, model, preprocessing, **doc)
