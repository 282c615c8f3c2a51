"""Where training writes its numbers: WORKDIR/metrics.jsonl and TensorBoard event files.

* ``metrics.jsonl``: one JSON object per evaluation (the keys of :data:`JSONL_KEYS` that are defined).
* ``WORKDIR/tensorboard/``: event files (tensorboardX, no TensorFlow needed) with
  ``train/loss``, ``train/grad_norm`` and ``train/learning_rate`` every ``log_every_steps`` steps,
  and at every evaluation ``train/loss_mean`` (the mean since the previous evaluation), every
  ``val/<metric>`` of metrics.jsonl (``val/auc_malignant``, ...) and the per-head
  ``val/auc_<head>_<class>``. Open them with ``tensorboard --logdir WORKDIR/tensorboard``.

Only process 0 writes. A resumed run tells TensorBoard to drop what a killed run had written after
the step it resumes from (``purge_step``), as it truncates metrics.jsonl: the curves hold one value
per step.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

log = logging.getLogger("gmic_jax.train")

TENSORBOARD_DIR = "tensorboard"
METRICS_JSONL = "metrics.jsonl"
# The keys of a metrics.jsonl record, in this order; a record holds those that are defined.
JSONL_KEYS = (
    "step",
    "epoch",
    "train_loss",
    "val_auc_malignant",
    "val_auc_benign",
    "val_prauc_malignant",
    "val_prauc_benign",
    "val_breast_auc_malignant",
    "val_breast_auc_benign",
    "val_dice_malignant",
    "val_dice_benign",
    "val_pxap_malignant",
    "val_pxap_benign",
    "val_roi_hit_rate",
    "val_pointing_malignant",
    "val_pointing_benign",
    "val_pointing_malignant_random",
    "val_pointing_benign_random",
)


def jsonl_record(step: int, epoch: int, train_loss: float, val_metrics: dict) -> dict:
    """The metrics.jsonl record of an evaluation: the :data:`JSONL_KEYS` whose value is defined
    (not None, not NaN)."""
    rec = {"step": int(step), "epoch": int(epoch), "train_loss": float(train_loss), **val_metrics}
    return {
        k: rec[k]
        for k in JSONL_KEYS
        if k in rec and rec[k] is not None and not (isinstance(rec[k], float) and math.isnan(rec[k]))
    }


def read_jsonl(path: Path) -> dict:
    """{step: record} of metrics.jsonl (empty when there is none)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r for r in records}


def truncate_jsonl(path: Path, max_step: int):
    """Drop records of steps after ``max_step`` (written by a run that was killed before its
    checkpoint of that step completed)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in keep))


def tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: 'val_auc_malignant' -> 'val/auc_malignant',
    'train_loss' -> 'train/loss_mean' (per step, 'train/loss' is the step's own loss)."""
    if key == "train_loss":
        return "train/loss_mean"
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if rest else key


class MetricWriters:
    """metrics.jsonl and TensorBoard for one run in ``workdir`` (inactive when not ``enabled``)."""

    def __init__(self, workdir, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_JSONL
        self.tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard event files (`pip install -e .` installs it)")
            return
        # Steps after start_step were written by a run that was killed before saving them.
        self.tb = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def train_step(self, step: int, scalars: dict):
        """Per-step scalars (loss, grad_norm, learning_rate) under ``train/``."""
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(f"train/{name}", float(value), step)

    def evaluation(self, record: dict, extra: dict | None = None):
        """One metrics.jsonl record (and ``extra`` scalars, e.g. per-head AUCs, under ``val/``)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(tag(k), v, record["step"])
            for k, v in (extra or {}).items():
                self.tb.add_scalar(f"val/{k}", float(v), record["step"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under ``logdir``, in the order written,
    applying purges as TensorBoard does (a session start at step S drops earlier values of steps
    >= S). For tests and quick looks without TensorBoard."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + n]
            pos += 12 + n + 4
            event = event_pb2.Event.FromString(payload)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {k: [(s, x) for s, x in v if s < event.step] for k, v in out.items()}
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
