"""Evaluation: the model over a data source -> the metrics of ``metrics.jsonl`` (and more).

    gmic-jax evaluate --checkpoint DIR --data synthetic:num=200,seed=0 --output OUT
    gmic-jax evaluate --checkpoint DIR --data cache:PATH --output OUT [--tta 10] [--prediction fusion]

writes OUT/metrics.json (the metrics.jsonl keys plus per-head AUCs) and OUT/roc_pr.png. Images
come through the input pipeline (``--workers``); an image that cannot be loaded is left out of the
metrics, named on stderr and in OUT/failures.txt, and the command exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gmic_jax.train import metrics as M

HEADS = {"global": "y_global", "local": "y_local", "fusion": "y_fusion"}


def prediction_scores(outputs: dict, prediction: str) -> np.ndarray:
    """(N, 2) scores of the chosen prediction: one head, or 'average' of the three."""
    if prediction == "average":
        return (outputs["y_global"] + outputs["y_local"] + outputs["y_fusion"]) / 3.0
    if prediction not in HEADS:
        raise ValueError(f"prediction={prediction!r}; expected one of {sorted(HEADS) + ['average']}")
    return outputs[HEADS[prediction]]


def run_model(model_config, variables, source, mesh, *, batch_size: int, normalization: str = "standardize",
              augment=None, tta_draws: int = 0, seed: int = 0, progress: bool = False, workers: int = 0):
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
            out = to_host(step(variables, shard_batch({"image": images[p * rows:(p + 1) * rows]}, mesh)["image"], key))
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


def evaluate(model_config, variables, source, mesh, *, batch_size: int = 32, normalization: str = "standardize",
             prediction: str = "fusion", augment=None, tta_draws: int = 0, seed: int = 0, progress: bool = False,
             workers: int = 0):
    """(metrics, details): ``metrics`` has exactly the metrics.jsonl validation keys that are
    defined; ``details`` adds per-head AUCs, the raw scores/labels and ``failures`` (examples that
    could not be loaded: left out of everything else)."""
    outputs, labels, breast_ids, loc, failures = run_model(
        model_config, variables, source, mesh, batch_size=batch_size, normalization=normalization,
        augment=augment, tta_draws=tta_draws, seed=seed, progress=progress, workers=workers)
    scores = prediction_scores(outputs, prediction)
    metrics = M.classification_metrics(scores, labels, breast_ids)
    if loc is not None:
        metrics.update(loc.result())
    details = {"scores": scores, "labels": labels, "breast_ids": breast_ids, "outputs": outputs, "failures": failures}
    for name, head in HEADS.items():
        for c, cls in enumerate(M.CLASSES):
            v = M.auc(labels[:, c], outputs[head][:, c])
            if v is not None:
                details[f"auc_{name}_{cls}"] = v
    return metrics, details


def plot_roc_pr(scores, labels, path, title: str = ""):
    """ROC and PR curves per class to ``path`` (PNG)."""
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_data_spec(spec: str, image_shape, synthetic_defaults=None):
    """'synthetic[:key=value,...]' (num, seed, split, p_benign, p_malignant, height, width) or
    'cache:PATH'. Synthetic settings not given come from ``synthetic_defaults`` (what the
    checkpoint was trained on, from its config.json), else the generator's defaults."""
    kind, _, rest = spec.partition(":")
    if kind == "cache":
        from gmic_jax.data.cache import CacheSource

        if not rest:
            raise ValueError("--data cache:PATH needs the cache directory")
        return CacheSource(rest)
    if kind == "synthetic":
        from gmic_jax.data.synthetic import SyntheticLesions, SyntheticSpec

        opts = dict(item.split("=", 1) for item in rest.split(",") if item)
        unknown = set(opts) - {"num", "seed", "split", "p_benign", "p_malignant", "height", "width"}
        if unknown:
            raise ValueError(f"unknown synthetic options {sorted(unknown)}")
        trained = dict(synthetic_defaults or {})
        shape = (int(opts.get("height", image_shape[0])), int(opts.get("width", image_shape[1])))
        spec_ = SyntheticSpec(image_shape=shape, p_benign=float(opts.get("p_benign", trained.get("p_benign", 0.35))),
                              p_malignant=float(opts.get("p_malignant", trained.get("p_malignant", 0.35))),
                              lesion_area=tuple(trained.get("lesion_area", SyntheticSpec.lesion_area)))
        return SyntheticLesions(int(opts.get("num", 200)), seed=int(opts.get("seed", trained.get("seed", 0))),
                                split=opts.get("split", "test"), spec=spec_, cache=False)
    raise ValueError(f"--data {spec!r}: expected 'synthetic[:opts]' or 'cache:PATH'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (converted model or training workdir)")
    parser.add_argument("--step", type=int, default=None, help="step to evaluate (default: best, else latest)")
    parser.add_argument("--data", required=True,
                        help="'synthetic[:num=200,seed=0,split=test]' or 'cache:PATH' (a gmic-jax cache with labels)")
    parser.add_argument("--output", required=True, help="output directory for metrics.json and roc_pr.png")
    parser.add_argument("--prediction", default="fusion", choices=sorted(HEADS) + ["average"])
    parser.add_argument("--tta", type=int, default=0, help="test-time augmentation draws (paper: 10)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--normalization", default=None, choices=["standardize", "unit_range"],
                        help="default: what the checkpoint's config.json says")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="input worker processes (0: load in this process; default: the usable cores less "
                             "one, 0 below 3 cores)")


def main(args) -> int:
    import jax

    from gmic_jax.checkpoint import CheckpointError, load_checkpoint, read_config
    from gmic_jax.data.pipeline import default_workers
    from gmic_jax.train.augment import AugmentConfig
    from gmic_jax.train.distributed import maybe_initialize_distributed
    from gmic_jax.train.step import make_mesh

    maybe_initialize_distributed()
    try:
        config, variables = load_checkpoint(args.checkpoint, step=args.step)
        _, doc = read_config(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prep = doc.get("preprocessing", {})
    normalization = args.normalization or ("unit_range" if prep.get("normalization") == "unit_range" else "standardize")
    window = prep.get("window_shape") or list(config.image_shape)
    try:
        source = parse_data_spec(args.data, window, prep.get("synthetic"))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    workers = default_workers() if args.workers is None else args.workers
    try:
        metrics, details = evaluate(config, variables, source, make_mesh(), batch_size=args.batch_size,
                                    normalization=normalization, prediction=args.prediction,
                                    augment=AugmentConfig() if args.tta else None, tta_draws=args.tta,
                                    seed=args.seed, progress=True, workers=workers)
    except RuntimeError as e:  # nothing could be loaded
        print(f"error: {e}", file=sys.stderr)
        return 1
    failures = details["failures"]
    if jax.process_index() == 0:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "failures.txt").unlink(missing_ok=True)
        if failures:  # scored without them; the run says so and fails
            (out / "failures.txt").write_text("".join(f"{f}\n" for f in failures), encoding="utf-8")
            for f in failures:
                print(f"error: {f}", file=sys.stderr)
            print(f"{len(failures)} image(s) could not be loaded and are left out of metrics.json "
                  f"(see {out / 'failures.txt'})", file=sys.stderr)
        extra = {k: v for k, v in details.items() if k.startswith("auc_")}
        doc = {**metrics, **extra, "num_images": int(len(details["labels"])), "failed_images": len(failures),
               "prediction": args.prediction,
               "tta_draws": args.tta, "checkpoint": str(args.checkpoint), "data": args.data}
        (out / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        plot_roc_pr(details["scores"], details["labels"], out / "roc_pr.png",
                    title=f"{args.checkpoint} on {args.data} ({args.prediction})")
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 1 if failures else 0
