"""Branches of the command line that the README promises, run for real through `gmic-jax` (in this
process, `gmic_jax.cli.main`, or as a subprocess for training) and checked against numbers computed
independently here:

* ``evaluate --tta N``: the predictions are the mean over N augmented draws keyed by the documented
  rule (seed, draw, image position in the data), whatever the batch size;
* ``evaluate --step N``, ``load_checkpoint(workdir, step=N)`` and ``compare-steps`` load the weights
  saved at that step (a workdir whose steps hold known, different weights);
* ``train --init-from DIR`` starts from DIR's weights.

The model is the shared tiny training run's (tests/conftest.py ``tiny_run``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmic_jax import GMIC, load_checkpoint
from gmic_jax import metrics as M
from gmic_jax.augment import AugmentConfig, augment_batch
from gmic_jax.checkpoint import read_config
from gmic_jax.preprocessing import normalize_images

REPO = Path(__file__).resolve().parents[1]
NUM = 8
SYNTHETIC = f"synthetic:num={NUM}"  # the model's window (128, 96), the synthetic data it was trained on
HEADS = ("y_global", "y_local", "y_fusion")
# The CLI's outputs come from the data-parallel program (shard_map, TTA draws in a fori_loop), the
# expected ones from a plain jit of the model: XLA fuses and tiles the two differently, so float32
# sums are reassociated (measured here: up to ~1e-7 on these sigmoid outputs). Loading another
# step's weights or a wrong draw moves the outputs by > 1e-3 (asserted below for each comparison).
TOL = dict(rtol=1e-5, atol=1e-6)
CHANGED = 1e-3


def _cli(*args) -> None:
    from gmic_jax.cli import main

    assert main([str(a) for a in args]) == 0


@pytest.fixture
def spy_evaluate(monkeypatch):
    """The details (model outputs) of every evaluation the CLI runs: the real function, observed."""
    import gmic_jax.train.evaluate as E

    calls = []
    real = E.evaluate

    def spy(*args, **kwargs):
        metrics, details = real(*args, **kwargs)
        calls.append(details)
        return metrics, details

    monkeypatch.setattr(E, "evaluate", spy)
    return calls


def _images(prep, split="test"):
    """The raw images of the data the CLI's ``--data SYNTHETIC`` draws, in source order."""
    from gmic_jax.train.evaluate import parse_data_spec

    source = parse_data_spec(SYNTHETIC, prep.window_shape, prep.synthetic, split=split)
    return np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])


def _apply(config, variables, x):
    """Inference outputs (heads, saliency maps), a plain jit of the model (one compile per shape)."""
    return {k: np.asarray(v) for k, v in _forward(config)(variables, x).items()}


_FORWARDS: dict = {}


def _forward(config):
    if config not in _FORWARDS:
        _FORWARDS[config] = jax.jit(
            lambda v, x: {h: GMIC(config).apply(v, x, train=False)[h] for h in (*HEADS, "saliency_map")}
        )
    return _FORWARDS[config]


# ------------------------------------------------------------------------------------ evaluate --tta


def test_evaluate_tta_is_the_mean_of_the_seeded_draws(tiny_run, spy_evaluate, tmp_path):
    """``evaluate --tta 2 --seed 3``: y_global, y_local and y_fusion are the mean over 2 draws of the
    augmentation the checkpoint records (here disabled in training: the paper's ranges), draw d of
    image j keyed ``fold_in(fold_in(key(3), 1 + d), j)``, not the un-augmented predictions; the
    saliency maps are the un-augmented image's. Batches of 4 split the 8 images in two: a key tied
    to the row of the batch (so to the batch size) instead of the image would differ in the second.
    metrics.json holds the metrics of those scores."""
    workdir, _ = tiny_run
    config, variables = load_checkpoint(workdir)
    _, prep, doc = read_config(workdir)
    _cli(
        "evaluate",
        "--checkpoint",
        workdir,
        "--data",
        SYNTHETIC,
        "--workers",
        0,
        "--output",
        tmp_path,
        "--tta",
        2,
        "--seed",
        3,
        "--batch-size",
        4,
    )
    (details,) = spy_evaluate
    tta = details["outputs"]

    # The documented rule, computed here: the training augmentation when enabled, else the paper's.
    section = dict(doc["train"]["augment"])
    augment = (
        AugmentConfig(**{k: v for k, v in section.items() if k != "enabled"}) if section["enabled"] else AugmentConfig()
    )
    x = np.asarray(normalize_images(_images(prep), prep.normalization))
    draws = []
    for d in range(2):
        k = jax.random.fold_in(jax.random.key(3), 1 + d)
        keys = jnp.stack([jax.random.fold_in(k, j) for j in range(NUM)])
        draws.append(_apply(config, variables, augment_batch(keys, jnp.asarray(x), augment)))
    expected = {h: (draws[0][h] + draws[1][h]) / 2 for h in HEADS}
    unaugmented = _apply(config, variables, x)
    for h in HEADS:
        np.testing.assert_allclose(tta[h], expected[h], **TOL)
    assert np.abs(tta["y_fusion"] - unaugmented["y_fusion"]).max() > CHANGED  # the TTA branch ran
    assert np.abs(draws[0]["y_fusion"] - draws[1]["y_fusion"]).max() > CHANGED  # the two draws differ
    np.testing.assert_allclose(tta["saliency_map"], unaugmented["saliency_map"], **TOL)

    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["tta_draws"] == 2
    want = M.classification_metrics(expected["y_fusion"], details["labels"], details["breast_ids"], prefix="test_")
    for key, value in want.items():
        assert report[key] == pytest.approx(value, abs=1e-12), key


# ------------------------------------------------------------- the step asked for: evaluate, load, compare

STEP_AUCS = {2: 0.5, 4: 0.9, 6: 0.7}  # val_auc_malignant per step: the rule keeps 4, neither first nor latest


def _step_variables(variables, step: int):
    """The tiny run's variables, every parameter moved by its own seeded noise: weights unique to ``step``."""
    rng = np.random.default_rng(step)
    params = jax.tree.map(
        lambda p: (p + 0.1 * np.std(p) * rng.standard_normal(p.shape) if p.size > 1 else p).astype(np.float32),
        variables["params"],
    )
    return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.fixture(scope="module")
def stepped_workdir(tiny_run, tmp_path_factory):
    """A training workdir (the tiny run's config.json) whose evaluated steps 2, 4, 6 hold known,
    different weights, saved by training's own checkpoint manager with their validation metrics."""
    import shutil

    import orbax.checkpoint as ocp

    from gmic_jax import checkpoint as ckpt_lib
    from gmic_jax.train import workdir_checkpoints

    workdir, _ = tiny_run
    directory = tmp_path_factory.mktemp("stepped") / "run"
    directory.mkdir()
    shutil.copy(workdir / "config.json", directory / "config.json")
    _, base = load_checkpoint(workdir)
    saved = {s: _step_variables(base, s) for s in STEP_AUCS}
    manager = workdir_checkpoints.make_manager(
        directory,
        keep_latest=1,
        asynchronous=False,
        rule=ckpt_lib.SelectionRule.from_doc(read_config(directory)[2]),
        keep_evaluated=True,
    )
    for step, auc in STEP_AUCS.items():
        manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    ckpt_lib.VARIABLES_ITEM: ocp.args.StandardSave(saved[step]),
                    workdir_checkpoints.TRAIN_STATE_ITEM: ocp.args.StandardSave({"step": np.int64(step)}),
                }
            ),
            metrics={"val_auc_malignant": auc},
            force=True,
        )
    manager.wait_until_finished()
    manager.close()
    assert ckpt_lib.saved_steps(directory) == sorted(STEP_AUCS)
    return directory, saved


def _assert_same_tree(got, want):
    flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, a), (_, b) in zip(flat_got, flat_want):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_load_checkpoint_step_loads_that_steps_weights(stepped_workdir):
    directory, saved = stepped_workdir
    for step in STEP_AUCS:
        _, variables = load_checkpoint(directory, step=step)
        _assert_same_tree(variables["params"], saved[step]["params"])
    _, kept = load_checkpoint(directory)  # the rule's step (4), neither the first nor the latest
    _assert_same_tree(kept["params"], saved[4]["params"])


def test_evaluate_step_scores_that_steps_weights(stepped_workdir, spy_evaluate, tmp_path):
    directory, saved = stepped_workdir
    _, prep, _ = read_config(directory)
    config, _ = load_checkpoint(directory)
    x = np.asarray(normalize_images(_images(prep), prep.normalization))
    expected = {s: _apply(config, saved[s], x)["y_fusion"] for s in STEP_AUCS}
    for a in STEP_AUCS:  # the steps' weights give different scores: a wrong step cannot pass
        for b in STEP_AUCS:
            assert a == b or np.abs(expected[a] - expected[b]).max() > CHANGED
    asked = [2, 6, None]  # None: the kept step (4)
    for step in asked:
        out = tmp_path / str(step)
        _cli(
            "evaluate",
            "--checkpoint",
            directory,
            "--data",
            SYNTHETIC,
            "--workers",
            0,
            "--batch-size",
            8,
            "--output",
            out,
            *(["--step", step] if step is not None else []),
        )
        assert json.loads((out / "metrics.json").read_text())["checkpoint_step"] == (step or 4)
    for step, details in zip(asked, spy_evaluate):
        np.testing.assert_allclose(details["outputs"]["y_fusion"], expected[step or 4], **TOL)


def test_compare_steps_evaluates_each_steps_weights(stepped_workdir, tmp_path):
    """steps.json's held-out metrics of step s are those of step s's saved weights (evaluated here
    with the same function, batch size and data: equal to the last bit)."""
    from gmic_jax.train.evaluate import evaluate, parse_data_spec
    from gmic_jax.train.step import make_mesh

    directory, saved = stepped_workdir
    config, prep, doc = read_config(directory)
    data = f"synthetic:num={NUM},split=test"
    _cli("compare-steps", "--workdir", directory, "--data", data, "--batch-size", 8, "--output", tmp_path)
    result = json.loads((tmp_path / "steps.json").read_text())
    assert [r["step"] for r in result["rows"]] == sorted(STEP_AUCS)
    assert [r["step"] for r in result["rows"] if r["kept"]] == [4] and result["summary"]["kept_step"] == 4
    source = parse_data_spec(data, prep.window_shape, prep.synthetic)
    expected = {}
    for step in STEP_AUCS:
        metrics, _ = evaluate(
            config,
            saved[step],
            source,
            make_mesh(),
            batch_size=8,
            normalization=prep.normalization,
            prediction=result["prediction"],
        )
        expected[step] = {k.removeprefix("val_"): v for k, v in metrics.items()}
    for row in result["rows"]:
        assert row["heldout"] == expected[row["step"]], row["step"]
    # The steps' held-out metrics differ, so rows that all held one step's numbers would fail above.
    assert len({json.dumps(v, sort_keys=True) for v in expected.values()}) == len(STEP_AUCS)


# ------------------------------------------------------------------------------------ train --init-from


def test_train_init_from_starts_from_the_given_weights(tiny_run, train_env, tmp_path):
    """``train --init-from WORKDIR`` with another seed and a learning rate of 0: Adam then moves no
    parameter, so every saved step holds the starting parameters: the init source's (trained for 6
    steps from seed 0), not the fresh initialisation of seed 1."""
    from conftest import TINY_TRAIN_ARGS

    from gmic_jax.checkpoint import saved_steps

    source, _ = tiny_run
    run = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmic_jax.cli",
            "train",
            *TINY_TRAIN_ARGS,
            "--config.seed=1",
            "--config.optimizer.schedule=constant",
            "--config.optimizer.learning_rate=0.0",
            "--config.data.num_train=8",
            "--init-from",
            str(source),
            "--workdir",
            str(run),
        ],
        cwd=REPO,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _, want = load_checkpoint(source)
    n = len(jax.tree.leaves(want["params"])) + len(jax.tree.leaves(want["batch_stats"]))
    assert f"initialised {n} of {n} arrays from {source}" in r.stderr
    steps = saved_steps(run)
    assert steps, r.stderr[-3000:]
    for step in steps:
        _, got = load_checkpoint(run, step=step)
        _assert_same_tree(got["params"], want["params"])
