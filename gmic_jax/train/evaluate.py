"""Evaluation: the model over a data source -> the metrics of ``metrics.jsonl`` (and more); the
``gmic-jax evaluate`` run (:func:`evaluate_checkpoint`; its command line: :mod:`gmic_jax.train.evaluate_main`).

    gmic-jax evaluate --checkpoint DIR --data synthetic:num=200,seed=0 --output OUT [--split test]
    gmic-jax evaluate --checkpoint DIR --data cache:PATH --output OUT [--split NAME] [--step N] [--tta 10]

writes OUT/metrics.json and OUT/roc_pr.png. The metric keys are those of metrics.jsonl with the
name of the split scored in place of ``val_`` (``test_auc_malignant``, ``test_roi_hit_rate``, ...;
per-head AUCs ``test_auc_global_malignant``, ...); training's own evaluation is the same function
with the ``val_`` prefix. metrics.json also records the split, the checkpoint step and why it was
chosen (:func:`gmic_jax.checkpoint.select_checkpoint`), the command and the versions
(:mod:`gmic_jax.records`); the figure's title names the split and the step. Images come through
the input pipeline (``--workers``); an image that cannot be loaded is left out of the metrics,
named on stderr and in OUT/failures.txt, and the command exits 1.

The split: synthetic data draws the split ``--split`` names (train, val or test; default test, or
the ``split=`` of ``--data``). A cache holds whatever it was built from: its split is the one its
metadata records (``gmic-jax cache --split``), and ``--split NAME`` names it when it records none
(or overrides what it records, which metrics.json then keeps as ``recorded_split``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve
from tqdm import tqdm

from gmic_jax import metrics as M
from gmic_jax import records
from gmic_jax.augment import tta_augment
from gmic_jax.checkpoint import CheckpointError, load_selected, read_config
from gmic_jax.data.cache import CacheSource
from gmic_jax.data.image import DataError
from gmic_jax.data.pipeline import FAILURES, OK, SourceExamples, default_workers, load_batches
from gmic_jax.data.synthetic import SyntheticLesions
from gmic_jax.files import FAILURES_TXT, write_atomic, write_failures
from gmic_jax.preprocessing import SyntheticData
from gmic_jax.train.distributed import maybe_initialize_distributed
from gmic_jax.train.heads import HEAD_OUTPUTS, HEADS, PREDICTIONS
from gmic_jax.train.input import eval_plan
from gmic_jax.train.step import make_eval_step, make_mesh, replicate, shard_batch, to_host

SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # it becomes the prefix of every metric key
DEFAULT_SYNTHETIC_SPLIT = "test"
SPLIT_NAME_FORM = "a split name is a letter then letters, digits or '_' (it prefixes every metric key)"
log = logging.getLogger("gmic_jax.evaluate")


class EvaluateError(Exception):
    """What stops an evaluation of a checkpoint; ``exit_code`` 2: a mistake in what was asked,
    1: the checkpoint or the data cannot be used."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` found: the metrics (as metrics.json has them, without the
    records) and the images that could not be loaded (left out of the metrics)."""

    metrics: dict
    failures: list
    written: bool = False  # this process wrote the outputs (process 0 does)
    failures_path: Path | None = None  # OUT/failures.txt when there are failures (process 0)


def prediction_scores(outputs: dict, prediction: str) -> np.ndarray:
    """(N, 2) scores of the chosen prediction: one head, or 'average' of the three."""
    if prediction == "average":
        first, *others = HEAD_OUTPUTS
        return sum((outputs[h] for h in others), outputs[first]) / 3.0
    if prediction not in HEADS:
        raise ValueError(f"prediction={prediction!r}; expected one of {list(PREDICTIONS)}")
    return outputs[HEADS[prediction]]


def run_model(
    model_config,
    variables,
    source,
    mesh,
    *,
    batch_size: int,
    normalization: str = "standardize",
    augment=None,
    tta_draws: int = 0,
    seed: int = 0,
    progress: bool = False,
    workers: int = 0,
):
    """Model outputs over the source (host numpy, source order), the localisation metrics
    accumulated batch by batch (masks never pile up in memory) and the examples that could not be
    loaded (:class:`~gmic_jax.data.pipeline.Failure`; left out of the outputs and metrics).

    Examples come through the input pipeline (``workers`` processes, 0: this one); every process
    loads the whole evaluation batch (the metrics need every label and mask) and feeds its rows."""
    devices = mesh.devices.size
    batch_size = max(devices, (batch_size // devices) * devices)
    step = make_eval_step(model_config, mesh, normalization=normalization, augment=augment, tta_draws=tta_draws)
    variables = replicate({k: variables[k] for k in ("params", "batch_stats")}, mesh)
    key = np.asarray(jax.random.key_data(jax.random.key(seed)))
    num_examples = len(source)
    outs, labels, breast_ids, failures = [], [], [], []
    localization = M.LocalizationAccumulator(model_config.crop_shape)
    has_masks = False
    bar = None
    if progress and jax.process_index() == 0:
        bar = tqdm(total=num_examples, desc="eval", leave=False)
    rows = batch_size // jax.process_count()  # of each evaluation batch, fed by this process
    first_row = jax.process_index() * rows
    plan = eval_plan(num_examples, batch_size)
    batches = load_batches(plan, SourceExamples(source), workers=workers)
    batch = None
    try:
        for batch_index in range(len(plan)):
            batch = next(batches)
            real = min(batch_size, num_examples - batch_index * batch_size)  # the rest pads the last batch
            failures += [f for f in batch[FAILURES] if f.row < real]
            keep = batch[OK][:real]
            images = batch.get("image")
            if images is None:  # every example of the batch failed: zeros keep the processes in step
                images = np.zeros((batch_size, *model_config.image_shape, 1), np.uint16)
            index = np.asarray(plan[batch_index], np.int32)  # the augmentation keys of TTA draws (make_eval_step)
            local = shard_batch(
                {"image": images[first_row : first_row + rows], "index": index[first_row : first_row + rows]}, mesh
            )
            out = to_host(step(variables, local["image"], local["index"], key))
            if not keep.any():
                continue
            out = {name: v[:real][keep] for name, v in out.items()}
            outs.append(out)
            labels.append(batch["label"][:real][keep])
            breast_ids += [str(b) for b in batch["breast_id"][:real][keep]]
            if "mask" in batch:
                has_masks = True
                localization.update(out["saliency_map"], batch["mask"][:real][keep], out["patch_locations"])
            if bar is not None:
                bar.update(real)
    finally:
        batch = None  # released before the pipeline closes (its memory is shared with a worker)
        batches.close()
    if bar is not None:
        bar.close()
    if not outs:
        raise RuntimeError(f"no example of {source!r} could be loaded:\n" + "\n".join(f"  {f}" for f in failures))
    outputs = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return outputs, np.concatenate(labels), np.asarray(breast_ids), (localization if has_masks else None), failures


def evaluate(
    model_config,
    variables,
    source,
    mesh,
    *,
    batch_size: int = 32,
    normalization: str = "standardize",
    prediction: str = "fusion",
    augment=None,
    tta_draws: int = 0,
    seed: int = 0,
    progress: bool = False,
    prefix: str = "val_",
    workers: int = 0,
):
    """(metrics, details): ``metrics`` has exactly the metrics.jsonl validation keys that are
    defined, with ``prefix`` for their ``val_`` (the name of the split scored); ``details`` adds
    per-head AUCs (``auc_<head>_<class>``, no prefix), the raw scores/labels and ``failures``
    (examples that could not be loaded: left out of everything else)."""
    outputs, labels, breast_ids, localization, failures = run_model(
        model_config,
        variables,
        source,
        mesh,
        batch_size=batch_size,
        normalization=normalization,
        augment=augment,
        tta_draws=tta_draws,
        seed=seed,
        progress=progress,
        workers=workers,
    )
    scores = prediction_scores(outputs, prediction)
    metrics = M.classification_metrics(scores, labels, breast_ids, prefix=prefix)
    if localization is not None:
        metrics.update(localization.result(prefix=prefix))
    details = {"scores": scores, "labels": labels, "breast_ids": breast_ids, "outputs": outputs, "failures": failures}
    for name, head in HEADS.items():
        for c, cls in enumerate(M.CLASSES):
            v = M.auc(labels[:, c], outputs[head][:, c])
            if v is not None:
                details[f"auc_{name}_{cls}"] = v
    return metrics, details


def plot_roc_pr(scores, labels, path, title: str = ""):
    """ROC and PR curves per class to ``path`` (PNG; ``title`` also in its Title text chunk)."""
    # matplotlib: imported for the figure only (slow to import), with the Agg backend chosen first.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for c, cls in enumerate(M.CLASSES):
        y, s = labels[:, c], scores[:, c]
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        ax_roc.plot(fpr, tpr, label=f"{cls} (AUC {M.auc(y, s):.3f})")
        ax_pr.plot(rec, prec, label=f"{cls} (AP {M.pr_auc(y, s):.3f})")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title} if title else None)
    plt.close(fig)


def parse_data_spec(spec: str, image_shape, trained=None, split: str | None = None):
    """'synthetic[:key=value,...]' (num, seed, split, p_benign, p_malignant, height, width) or
    'cache:PATH'. Synthetic settings not given come from ``trained`` (the
    :class:`~gmic_jax.preprocessing.SyntheticData` the checkpoint was trained on, from its
    config.json), else the generator's defaults; the split is the spec's ``split=``, else
    ``split``, else 'test' (the two disagreeing is an error). A ValueError names what is wrong with
    the spec; a cache that cannot be read is a :class:`~gmic_jax.data.image.DataError`."""
    kind, _, rest = spec.partition(":")
    if kind == "cache":
        if not rest:
            raise ValueError("--data cache:PATH needs the cache directory")
        return CacheSource(rest)
    if kind == "synthetic":
        opts = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not value:
                raise ValueError(f"--data {spec}: {item!r} is not key=value")
            opts[key] = value
        unknown = set(opts) - {"num", "seed", "split", "p_benign", "p_malignant", "height", "width"}
        if unknown:
            raise ValueError(f"--data {spec}: unknown synthetic options {sorted(unknown)}")
        if split is not None and opts.get("split", split) != split:
            raise ValueError(f"--data {spec} draws split={opts['split']} but --split says {split}; give one of them")

        def number(key, default, kind=int):
            try:
                return kind(opts[key]) if key in opts else default
            except ValueError:
                raise ValueError(
                    f"--data {spec}: {key}={opts[key]} is not a{'n integer' * (kind is int)}"
                    f"{' number' * (kind is float)}"
                ) from None

        trained = trained or SyntheticData()
        shape = (number("height", image_shape[0]), number("width", image_shape[1]))
        spec_ = trained.spec(shape, **{k: number(k, None, float) for k in ("p_benign", "p_malignant") if k in opts})
        return SyntheticLesions(
            number("num", 200),
            seed=number("seed", trained.seed),
            split=opts.get("split", split or DEFAULT_SYNTHETIC_SPLIT),
            spec=spec_,
            cache=False,
        )
    raise ValueError(f"--data {spec!r}: expected 'synthetic[:opts]' or 'cache:PATH'")


def split_name(source, split: str | None) -> tuple[str, str | None]:
    """(the name of what ``source`` holds, the split a cache records when ``split`` overrides it).

    Synthetic data: the split it draws. A cache: ``split`` if given, else the split its metadata
    records; a cache that records none needs ``split`` (ValueError)."""
    drawn = getattr(source, "split", None)
    if drawn is not None:  # synthetic: parse_data_spec made them agree
        return str(drawn), None
    metadata = getattr(source, "metadata", None) or {}
    recorded = metadata.get("split")
    if split is None:
        if not recorded:
            where = getattr(source, "cache_dir", "the data")
            raise ValueError(
                f"{where}: the cache records no split; name what it holds with --split NAME "
                "(e.g. --split test), the prefix of every metric key"
            )
        split = str(recorded)
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split {split!r}: {SPLIT_NAME_FORM}")
    return split, (str(recorded) if recorded and recorded != split else None)


def evaluate_checkpoint(
    checkpoint,
    data: str,
    output,
    *,
    step: int | None = None,
    split: str | None = None,
    prediction: str = "fusion",
    tta: int = 0,
    batch_size: int = 16,
    normalization: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    command: list | None = None,
) -> CheckpointEvaluation:
    """``gmic-jax evaluate``: the checkpoint (its selected step, or ``step``) on ``data`` (a
    :func:`parse_data_spec` spec) -> OUTPUT/metrics.json and OUTPUT/roc_pr.png (written by process
    0), as the module docstring says. An :class:`EvaluateError` says what stopped it."""
    if tta < 0 or batch_size < 1:
        raise EvaluateError(f"--tta must be >= 0 and --batch-size >= 1 (got {tta} and {batch_size})", 2)
    if split is not None and not SPLIT_NAME.fullmatch(split):
        raise EvaluateError(f"--split {split!r}: {SPLIT_NAME_FORM}", 2)
    maybe_initialize_distributed()
    config, variables, chosen, prep, augment = _load_for_evaluation(checkpoint, step, tta)
    source, split, recorded_split = _evaluation_source(data, prep, split)
    if jax.process_index() == 0:
        if recorded_split is not None:
            log.warning("%s records split %r; scored as --split %r", data, recorded_split, split)
        log.info("evaluating %s on split %r of %s", records.describe(checkpoint, chosen), split, data)
    prefix = f"{split}_"
    try:
        metrics, details = evaluate(
            config,
            variables,
            source,
            make_mesh(),
            batch_size=batch_size,
            normalization=normalization or prep.normalization,
            prediction=prediction,
            augment=augment,
            tta_draws=tta,
            seed=seed,
            progress=True,
            prefix=prefix,
            workers=default_workers() if workers is None else workers,
        )
    except RuntimeError as e:  # nothing could be loaded
        raise EvaluateError(str(e), 1) from None
    result = CheckpointEvaluation(metrics, details["failures"])
    if jax.process_index() == 0:
        report = {
            **metrics,
            **{prefix + k: v for k, v in details.items() if k.startswith("auc_")},
            "split": split,
            "num_images": int(len(details["labels"])),
            "failed_images": len(result.failures),
            "prediction": prediction,
            "tta_draws": tta,
            "data": data,
            **records.checkpoint_record(checkpoint, chosen),
            **records.provenance(command),
        }
        if recorded_split is not None:
            report["recorded_split"] = recorded_split
        title = f"{checkpoint} step {chosen.step}: split {split} of {data} ({prediction})"
        result.failures_path = _write_report(Path(output), report, details, result.failures, title)
        result.written = True
    return result


def _load_for_evaluation(checkpoint, step: int | None, tta: int):
    """(model config, variables, the chosen step, preprocessing, TTA augmentation or None)."""
    try:
        config, variables, chosen = load_selected(checkpoint, step=step)
        _, prep, doc = read_config(checkpoint)
        augment = tta_augment((doc.get("train") or {}).get("augment")) if tta else None
    except CheckpointError as e:
        raise EvaluateError(str(e), 1) from None
    except (TypeError, ValueError) as e:
        raise EvaluateError(f"{checkpoint}: {e}", 1) from None
    return config, variables, chosen, prep, augment


def _evaluation_source(data: str, prep, split: str | None):
    """(the source ``data`` names, its split, the split a cache records when ``split`` overrides it)."""
    try:
        source = parse_data_spec(data, prep.window_shape, prep.synthetic, split=split)
        split, recorded_split = split_name(source, split)
        shape = tuple(getattr(source, "window_shape", prep.window_shape))
        if shape != tuple(prep.window_shape):
            raise DataError(data, f"holds {list(shape)} windows; the checkpoint takes {list(prep.window_shape)}")
        if len(source) == 0:
            raise DataError(data, "holds no image")
    except (DataError, OSError) as e:
        raise EvaluateError(str(e), 1) from None
    except ValueError as e:
        raise EvaluateError(str(e), 2) from None
    return source, split, recorded_split


def _write_report(out: Path, report: dict, details: dict, failures: list, title: str) -> Path | None:
    """OUT/metrics.json, OUT/roc_pr.png and (with failures) OUT/failures.txt, whose path it returns."""
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILURES_TXT).unlink(missing_ok=True)
    failures_path = write_failures(out, failures) if failures else None
    write_atomic(out / "metrics.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot_roc_pr(details["scores"], details["labels"], out / "roc_pr.png", title=title)
    return failures_path
