"""Evaluation: the model over a data source -> the metrics of ``metrics.jsonl`` (and more).

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

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np

from gmic_jax import metrics as M
from gmic_jax.files import write_atomic

HEADS = {"global": "y_global", "local": "y_local", "fusion": "y_fusion"}
SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # it becomes the prefix of every metric key
DEFAULT_SYNTHETIC_SPLIT = "test"
log = logging.getLogger("gmic_jax.evaluate")


def prediction_scores(outputs: dict, prediction: str) -> np.ndarray:
    """(N, 2) scores of the chosen prediction: one head, or 'average' of the three."""
    if prediction == "average":
        return (outputs["y_global"] + outputs["y_local"] + outputs["y_fusion"]) / 3.0
    if prediction not in HEADS:
        raise ValueError(f"prediction={prediction!r}; expected one of {sorted(HEADS) + ['average']}")
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
    import jax

    from gmic_jax.data.pipeline import FAILURES, OK, SourceExamples, load_batches
    from gmic_jax.train.input import eval_plan
    from gmic_jax.train.step import make_eval_step, replicate, shard_batch, to_host

    n_dev = mesh.devices.size
    n_proc = jax.process_count()
    batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
    step = make_eval_step(model_config, mesh, normalization=normalization, augment=augment, tta_draws=tta_draws)
    variables = replicate({k: variables[k] for k in ("params", "batch_stats")}, mesh)
    key = np.asarray(jax.random.key_data(jax.random.key(seed)))
    n = len(source)
    outs, labels, breast_ids, failures = [], [], [], []
    loc = M.LocalizationAccumulator(model_config.crop_shape)
    has_masks = False
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="eval", leave=False)
    rows = batch_size // n_proc
    p = jax.process_index()
    plan = eval_plan(n, batch_size)
    batches = load_batches(plan, SourceExamples(source), workers=workers)
    batch = None
    try:
        for k in range(len(plan)):
            batch = next(batches)
            real = min(batch_size, n - k * batch_size)  # the rest pads the last batch
            failures += [f for f in batch[FAILURES] if f.row < real]
            keep = batch[OK][:real]
            images = batch.get("image")
            if images is None:  # every example of the batch failed: zeros keep the processes in step
                images = np.zeros((batch_size, *model_config.image_shape, 1), np.uint16)
            index = np.asarray(plan[k], np.int32)  # the augmentation keys of TTA draws (make_eval_step)
            local = shard_batch(
                {"image": images[p * rows : (p + 1) * rows], "index": index[p * rows : (p + 1) * rows]}, mesh
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
                loc.update(out["saliency_map"], batch["mask"][:real][keep], out["patch_locations"])
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
    return outputs, np.concatenate(labels), np.asarray(breast_ids), (loc if has_masks else None), failures


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
    outputs, labels, breast_ids, loc, failures = run_model(
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
    if loc is not None:
        metrics.update(loc.result(prefix=prefix))
    details = {"scores": scores, "labels": labels, "breast_ids": breast_ids, "outputs": outputs, "failures": failures}
    for name, head in HEADS.items():
        for c, cls in enumerate(M.CLASSES):
            v = M.auc(labels[:, c], outputs[head][:, c])
            if v is not None:
                details[f"auc_{name}_{cls}"] = v
    return metrics, details


def plot_roc_pr(scores, labels, path, title: str = ""):
    """ROC and PR curves per class to ``path`` (PNG; ``title`` also in its Title text chunk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

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
        from gmic_jax.data.cache import CacheSource

        if not rest:
            raise ValueError("--data cache:PATH needs the cache directory")
        return CacheSource(rest)
    if kind == "synthetic":
        from gmic_jax.data.synthetic import SyntheticLesions
        from gmic_jax.preprocessing import SyntheticData

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
        raise ValueError(
            f"split {split!r}: a split name is a letter then letters, digits or '_' (it prefixes every metric key)"
        )
    return split, (str(recorded) if recorded and recorded != split else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (converted model or training workdir)"
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="step to evaluate (default: the step the workdir's selection rule keeps, else the latest)",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="'synthetic[:num=200,seed=0,split=test]' or 'cache:PATH' (a gmic-jax cache with labels)",
    )
    parser.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="the split scored, the prefix of every metric key: synthetic data draws it (train, val, "
        "test; default test); for a cache it names what the cache holds (default: the split its "
        "metadata records)",
    )
    parser.add_argument("--output", required=True, help="output directory for metrics.json and roc_pr.png")
    parser.add_argument("--prediction", default="fusion", choices=sorted(HEADS) + ["average"])
    parser.add_argument(
        "--tta",
        type=int,
        default=0,
        help="test-time augmentation draws (paper: 10); the augmentation the checkpoint was trained "
        "with, else the paper's (gmic_jax.augment.tta_augment)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--normalization",
        default=None,
        choices=["standardize", "unit_range"],
        help="default: what the checkpoint's config.json says",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="input worker processes (0: load in this process; default: the usable cores less one, 0 below 3 cores)",
    )


def _error(message: str, code: int) -> int:
    print(f"gmic-jax evaluate: error: {message}", file=sys.stderr)
    return code


def main(args) -> int:
    import jax

    from gmic_jax import logs, records
    from gmic_jax.augment import tta_augment
    from gmic_jax.checkpoint import CheckpointError, load_selected, read_config
    from gmic_jax.data.image import DataError
    from gmic_jax.data.pipeline import default_workers
    from gmic_jax.files import FAILURES_TXT, print_failures, write_failures
    from gmic_jax.train.distributed import maybe_initialize_distributed
    from gmic_jax.train.step import make_mesh

    logs.configure()
    if args.tta < 0 or args.batch_size < 1:
        return _error(f"--tta must be >= 0 and --batch-size >= 1 (got {args.tta} and {args.batch_size})", 2)
    if args.split is not None and not SPLIT_NAME.fullmatch(args.split):
        return _error(
            f"--split {args.split!r}: a split name is a letter then letters, digits or '_' "
            "(it prefixes every metric key)",
            2,
        )
    maybe_initialize_distributed()
    try:
        config, variables, chosen = load_selected(args.checkpoint, step=args.step)
        _, prep, doc = read_config(args.checkpoint)
        augment = tta_augment((doc.get("train") or {}).get("augment")) if args.tta else None
    except CheckpointError as e:
        return _error(str(e), 1)
    except (TypeError, ValueError) as e:
        return _error(f"{args.checkpoint}: {e}", 1)
    try:
        source = parse_data_spec(args.data, prep.window_shape, prep.synthetic, split=args.split)
        split, recorded_split = split_name(source, args.split)
        shape = tuple(getattr(source, "window_shape", prep.window_shape))
        if shape != tuple(prep.window_shape):
            raise DataError(args.data, f"holds {list(shape)} windows; the checkpoint takes {list(prep.window_shape)}")
        if len(source) == 0:
            raise DataError(args.data, "holds no image")
    except (DataError, OSError) as e:
        return _error(str(e), 1)
    except ValueError as e:
        return _error(str(e), 2)
    if jax.process_index() == 0:
        if recorded_split is not None:
            log.warning("%s records split %r; scored as --split %r", args.data, recorded_split, split)
        log.info("evaluating %s on split %r of %s", records.describe(args.checkpoint, chosen), split, args.data)
    prefix = f"{split}_"
    workers = default_workers() if args.workers is None else args.workers
    try:
        metrics, details = evaluate(
            config,
            variables,
            source,
            make_mesh(),
            batch_size=args.batch_size,
            normalization=args.normalization or prep.normalization,
            prediction=args.prediction,
            augment=augment,
            tta_draws=args.tta,
            seed=args.seed,
            progress=True,
            prefix=prefix,
            workers=workers,
        )
    except RuntimeError as e:  # nothing could be loaded
        return _error(str(e), 1)
    failures = details["failures"]
    if jax.process_index() == 0:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / FAILURES_TXT).unlink(missing_ok=True)
        if failures:  # scored without them; the run says so and fails
            print_failures(failures)
            print(
                f"{len(failures)} image(s) could not be loaded and are left out of metrics.json "
                f"(see {write_failures(out, failures)})",
                file=sys.stderr,
            )
        heads = {prefix + k: v for k, v in details.items() if k.startswith("auc_")}
        report = {
            **metrics,
            **heads,
            "split": split,
            "num_images": int(len(details["labels"])),
            "failed_images": len(failures),
            "prediction": args.prediction,
            "tta_draws": args.tta,
            "data": args.data,
            **records.checkpoint_record(args.checkpoint, chosen),
            **records.provenance(getattr(args, "command_line", None)),
        }
        if recorded_split is not None:
            report["recorded_split"] = recorded_split
        write_atomic(out / "metrics.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
        plot_roc_pr(
            details["scores"],
            details["labels"],
            out / "roc_pr.png",
            title=f"{args.checkpoint} step {chosen.step}: split {split} of {args.data} ({args.prediction})",
        )
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 1 if failures else 0
