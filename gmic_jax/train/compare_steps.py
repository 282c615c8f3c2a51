"""Is the checkpoint a run keeps as good as the best of its evaluated steps on held-out data?

    gmic-jax train --config configs/synthetic.py --workdir runs/demo --config.keep_evaluated=True
    gmic-jax compare-steps --workdir runs/demo --data synthetic:split=test --output runs/demo_steps

evaluates every saved step of WORKDIR that was saved at an evaluation (all of them when the run
was trained with ``keep_evaluated``; otherwise only the kept and the best one survive) on the
held-out data, and writes OUTPUT/steps.json: one row per step (its validation metric, its held-out
metrics, whether the workdir's selection rule keeps it) and a summary -- the kept step, its
held-out AUC, the best held-out AUC among the evaluated steps and the step that has it. This is
the table by which ``best_metric`` / ``best_min_delta`` are chosen; choose them on some seeds and
report them on others.
"""

from __future__ import annotations

from gmic_jax.checkpoint import SelectionRule, evaluated_steps, load_checkpoint, read_config, select_checkpoint
from gmic_jax.train.evaluate import evaluate, parse_data_spec
from gmic_jax.train.step import make_mesh

HELDOUT_METRIC = "auc_malignant"


def compare_steps(
    workdir,
    data: str = "synthetic:split=test",
    *,
    batch_size: int = 16,
    prediction: str | None = None,
    metric: str = HELDOUT_METRIC,
    progress: bool = False,
) -> dict:
    """Rows and summary as described in the module docstring (``metric``: the held-out metric the
    summary compares, a metrics.jsonl name without its ``val_`` prefix)."""
    config, prep, doc = read_config(workdir)
    rule = SelectionRule.from_doc(doc)
    evaluated = evaluated_steps(workdir)
    if not evaluated:
        raise ValueError(f"{workdir}: no step saved at an evaluation (is it a training workdir?)")
    kept = select_checkpoint(workdir)
    normalization = prep.normalization
    source = parse_data_spec(data, prep.window_shape, prep.synthetic)
    prediction = prediction or doc.get("train", {}).get("eval", {}).get("prediction", "fusion")
    mesh = make_mesh()
    rows = []
    for step in sorted(evaluated):
        _, variables = load_checkpoint(workdir, step=step)
        heldout, _ = evaluate(
            config,
            variables,
            source,
            mesh,
            batch_size=batch_size,
            normalization=normalization,
            prediction=prediction,
            progress=progress,
        )
        rows.append(
            {
                "step": step,
                rule.metric: rule.value(evaluated[step]),
                "kept": step == kept.step,
                "heldout": {k.removeprefix("val_"): v for k, v in heldout.items()},
            }
        )
    scored = [r for r in rows if r["heldout"].get(metric) is not None]
    if not scored:
        raise ValueError(f"held-out {metric} is undefined on {data} (one class only?)")
    best = max(scored, key=lambda r: (r["heldout"][metric], r["step"]))
    kept_row = next((r for r in rows if r["kept"]), None)
    summary = {
        "kept_step": kept.step,
        "kept_reason": kept.reason,
        f"kept_heldout_{metric}": kept_row["heldout"].get(metric) if kept_row else None,
        "best_heldout_step": best["step"],
        f"best_heldout_{metric}": best["heldout"][metric],
    }
    if kept_row and kept_row["heldout"].get(metric) is not None:
        summary[f"kept_minus_best_{metric}"] = kept_row["heldout"][metric] - best["heldout"][metric]
    return {
        "workdir": str(workdir),
        "data": data,
        "prediction": prediction,
        "selection": rule.to_dict(),
        "num_images": len(source),
        "rows": rows,
        "summary": summary,
    }


def format_table(result: dict, metric: str = HELDOUT_METRIC) -> str:
    """Markdown table of :func:`compare_steps`' rows and its summary line."""
    sel = result["selection"]["metric"]
    lines = [f"| step | {sel} | held-out {metric} | kept |", "|---:|---:|---:|:---:|"]
    for r in result["rows"]:
        v, h = r[sel], r["heldout"].get(metric)
        lines.append(
            f"| {r['step']} | {'' if v is None else f'{v:.4f}'} | {'' if h is None else f'{h:.4f}'} "
            f"| {'kept' if r['kept'] else ''} |"
        )
    s = result["summary"]
    kept_value = s.get(f"kept_heldout_{metric}")
    lines.append("")
    lines.append(
        f"kept step {s['kept_step']} ({s['kept_reason']}): held-out {metric} "
        f"{'not evaluated' if kept_value is None else f'{kept_value:.4f}'}; best of the evaluated steps: "
        f"{s[f'best_heldout_{metric}']:.4f} at step {s['best_heldout_step']}"
    )
    return "\n".join(lines)
