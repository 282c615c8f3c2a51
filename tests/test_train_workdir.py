"""A training workdir a researcher can trust: it owns its config (a resumed run with another config
stops, unless the change is allowed, and then it is recorded), it names the checkpoint it keeps
(and load_checkpoint loads that one), it writes TensorBoard event files, and the libraries' noise
stays out of its log.

`gmic-jax train` subprocesses on a tiny synthetic config with a constant learning rate; they share
a persistent compilation cache so that only the first one compiles. The guard's decisions that need
no training run on a fake workdir.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_RUN_ARGS as TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(train_env):
    return train_env


def _train(workdir, env, *extra):
    return subprocess.run(
        [sys.executable, "-m", "gmic_jax.cli", "train", *TINY, "--workdir", str(workdir), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _kept_in_log(text):
    return [int(s) for s in re.findall(r"kept as the run's checkpoint: step (\d+)", text)]


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # trained with JAX_PLATFORMS unset: JAX probes for a TPU runtime there, and must not say so


def test_the_log_names_devices_and_kept_step_without_library_noise(run):
    workdir, log = run
    assert "Traceback" not in log
    for noise in ("Unable to initialize backend", "Given directory is read only", "tracked_metric"):
        assert noise not in log, log[-3000:]
    assert re.search(r"devices: \d+ \w+ device\(s\) in 1 process\(es\)", log)
    assert _kept_in_log(log) == [6]
    assert "load_checkpoint(" in log and "uses step 6" in log


def test_tensorboard_event_files_hold_step_and_evaluation_scalars(run):
    from gmic_jax.train.writers import read_scalars

    workdir, _ = run
    scalars = read_scalars(workdir / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]  # log_every_steps=1
    assert [v for _, v in scalars["train/learning_rate"]] == [pytest.approx(1e-3)] * 6
    assert len(scalars["train/grad_norm"]) == 6
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    for key, value in record.items():
        if key.startswith("val_"):
            tag = "val/" + key[len("val_") :]
            assert scalars[tag] == [(6, pytest.approx(value, abs=1e-6))], tag
    assert scalars["train/loss_mean"] == [(6, pytest.approx(record["train_loss"], rel=1e-6))]
    assert {"val/auc_global_malignant", "val/auc_local_malignant", "val/auc_fusion_malignant"} <= set(scalars)


def test_profile_steps_write_a_trace_of_those_steps_and_a_bad_value_is_refused(run):
    """The tiny run's --config.profile_steps=5:6 traced steps 5 and 6 into WORKDIR/profile: an .xplane.pb
    (TensorBoard's profile plugin) and a Perfetto trace holding the loop's phases."""
    import gzip

    from gmic_jax.train.config_check import check_config
    from gmic_jax.train.config_lib import ConfigError

    workdir, log = run
    [xplane] = (workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb")
    assert xplane.stat().st_size > 0
    events = json.loads(gzip.decompress((xplane.parent / "perfetto_trace.json.gz").read_bytes()))["traceEvents"]
    steps = [e["args"]["step_num"] for e in events if e.get("name") == "train_step"]
    assert sorted(steps) == ["5", "6"]
    assert {"loader_wait", "step_fn", "checkpoint", "evaluate"} <= {e.get("name") for e in events}
    assert "profiling steps 5..6" in log and "profile of steps 5..6 written to" in log
    for bad in ("2:1", "0:3", "5", "a:b", "1:2:3"):
        with pytest.raises(ConfigError, match=r"^profile_steps=.*expected 'FIRST:LAST'"):
            check_config(_config(profile_steps=bad))
    check_config(_config(profile_steps="3:3"))


def _snapshot(workdir):
    return {
        str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(workdir.rglob("*"))
    }


def test_resume_guard_extension_override_and_the_kept_step(run, env, tmp_path):
    from gmic_jax import load_checkpoint
    from gmic_jax.checkpoint import select_checkpoint
    from gmic_jax.train.writers import read_scalars

    src, _ = run
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    before = _snapshot(workdir)
    # 1) A change of the model: refused, named, nothing touched.
    r = _train(workdir, env, "--config.model.K=3", "--config.progress_bar=True")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "model.K 2 -> 3" in r.stderr and "progress_bar" not in r.stderr.splitlines()[-1]
    assert "--config-changes-ok" in r.stderr
    assert _snapshot(workdir) == before
    # 2) Extending the constant-rate run is allowed; the selection rule is not changed silently.
    r = _train(workdir, env, "--config.num_epochs=2", "--config.best_min_delta=0.5")
    assert r.returncode == 2 and "best_min_delta 0.0 -> 0.5" in r.stderr and "num_epochs" not in r.stderr
    assert _snapshot(workdir) == before
    # 3) ... unless asked: trains the second epoch and records both changes.
    r = _train(workdir, env, "--config.num_epochs=2", "--config.best_min_delta=0.5", "--config-changes-ok")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((workdir / "config.json").read_text())
    entry = doc["history"][-1]
    assert entry["resumed_at_step"] == 6
    assert entry["changes"] == {"num_epochs": [1, 2], "best_min_delta": [0.0, 0.5]}
    assert any("--config-changes-ok" in a for a in entry["allowed_by"])
    assert doc["train"]["num_epochs"] == 2 and doc["checkpoint_selection"]["min_delta"] == 0.5
    # The step the training log names is the step load_checkpoint loads.
    kept = _kept_in_log(r.stderr)[-1]
    assert select_checkpoint(workdir).step == kept
    _, variables = load_checkpoint(workdir)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(load_checkpoint(workdir, step=kept)[1])):
        np.testing.assert_array_equal(a, b)
    # TensorBoard: one value per step across the two runs.
    assert [s for s, _ in read_scalars(workdir / "tensorboard")["train/loss"]] == list(range(1, 13))
    # 4) The extended run is the run that was asked for 2 epochs from the start, step for step.
    straight = tmp_path / "straight"
    r = _train(straight, env, "--config.num_epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(
        jax.tree.leaves(load_checkpoint(straight, step=12)[1]), jax.tree.leaves(load_checkpoint(workdir, step=12)[1])
    ):
        np.testing.assert_array_equal(a, b)
    assert (straight / "metrics.jsonl").read_text() == (workdir / "metrics.jsonl").read_text()
    # 5) compare-steps evaluates both evaluated steps on held-out data and marks the kept one.
    out = tmp_path / "steps"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmic_jax.cli",
            "compare-steps",
            "--workdir",
            str(workdir),
            "--data",
            "synthetic:split=test,num=8",
            "--output",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "steps.json").read_text())
    assert [row["step"] for row in result["rows"]] == [6, 12]
    assert [row["step"] for row in result["rows"] if row["kept"]] == [kept] == [result["summary"]["kept_step"]]
    best = max(row["heldout"]["auc_malignant"] for row in result["rows"])
    assert result["summary"]["best_heldout_auc_malignant"] == best
    assert f"kept step {kept}" in r.stdout


# ---------------------------------------------------------------- the guard's rules, no training


def _fake_workdir(path, config, steps=(12,)):
    """config.json of a run with ``config`` and saved steps, as training writes them."""
    import orbax.checkpoint as ocp

    from gmic_jax import checkpoint as ckpt_lib
    from gmic_jax.config import GMICConfig
    from gmic_jax.train.sampling import make_sources

    model = GMICConfig.from_dict(config.model.to_dict())
    prep = make_sources(config.data)[2]
    ckpt_lib.write_config(path, model, prep, train=config.to_dict())
    with ocp.CheckpointManager(path, options=ckpt_lib.manager_options(enable_async_checkpointing=False)) as m:
        for step in steps:
            m.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave({"w": np.ones(2)})), force=True)
    return {"model": model.to_dict(), "preprocessing": prep.to_dict(), "train": config.to_dict()}


def _config(**fields):
    from gmic_jax.train.config_lib import apply_overrides, load_config

    c = load_config(str(REPO / "configs" / "synthetic_tiny.py"))
    return apply_overrides(c, [f"{k}={v}" for k, v in fields.items()])


def test_num_epochs_with_a_cosine_schedule_is_a_change_of_the_computation(tmp_path):
    from gmic_jax.train import workdir as W

    doc = _fake_workdir(tmp_path, _config(**{"optimizer.schedule": "cosine", "num_epochs": 2}), steps=(12,))
    longer = {**doc, "train": _config(**{"optimizer.schedule": "cosine", "num_epochs": 3}).to_dict()}
    with pytest.raises(
        W.WorkdirError,
        match=r"num_epochs 2 -> 3 \(optimizer.schedule='cosine'.*learning rate at "
        r"step 12 would be 0.00025 instead of 0\)",
    ):
        W.check(tmp_path, longer, steps_per_epoch=6)
    resume = W.check(tmp_path, longer, steps_per_epoch=6, config_changes_ok=True)
    assert resume.entry["changes"] == {"num_epochs": [2, 3]}


def test_constant_rate_may_extend_but_not_cut_below_the_trained_steps(tmp_path):
    from gmic_jax.train import workdir as W

    doc = _fake_workdir(tmp_path, _config(**{"optimizer.schedule": "constant", "num_epochs": 2}), steps=(12,))
    extend = {**doc, "train": _config(**{"optimizer.schedule": "constant", "num_epochs": 5}).to_dict()}
    assert W.check(tmp_path, extend, steps_per_epoch=6).entry["changes"] == {"num_epochs": [2, 5]}
    cut = {**doc, "train": _config(**{"optimizer.schedule": "constant", "num_epochs": 1}).to_dict()}
    with pytest.raises(W.WorkdirError, match="num_epochs 2 -> 1"):
        W.check(tmp_path, cut, steps_per_epoch=6)


def test_free_fields_pass_and_are_recorded_a_converted_model_is_not_a_workdir(tmp_path):
    import ml_collections

    from gmic_jax.checkpoint import save_checkpoint
    from gmic_jax.config import GMICConfig
    from gmic_jax.train import workdir as W

    doc = _fake_workdir(tmp_path / "run", _config())
    free = {
        **doc,
        "train": _config(
            **{
                "progress_bar": True,
                "log_every_steps": 3,
                "eval.batch_size": 2,
                "data.workers": 2,
                "profile_steps": "1:2",
            }
        ).to_dict(),
    }
    resume = W.check(tmp_path / "run", free, steps_per_epoch=6)
    assert set(resume.entry["changes"]) == {
        "progress_bar",
        "log_every_steps",
        "eval.batch_size",
        "data.workers",
        "profile_steps",
    }
    assert W.check(tmp_path / "run", doc, steps_per_epoch=6).entry is None
    for field, value in [
        ("seed", 1),
        ("batch_size", 8),
        ("optimizer.learning_rate", 0.5),
        ("data.num_train", 10),
        ("loss.beta", 0.5),
        ("eval.every_epochs", 2),
        ("best_metric", "val_dice_malignant"),
    ]:
        with pytest.raises(W.WorkdirError, match=re.escape(field)):
            W.check(tmp_path / "run", {**doc, "train": _config(**{field: value}).to_dict()}, steps_per_epoch=6)
    # A config.json written before the loss.gap_* fields existed was trained with gap_weight 0 (and
    # margin 2): the same is no change, the gap term is one, and the change is named.
    old = {**doc, "train": _config().to_dict()}
    for k in ("gap_weight", "gap_margin"):
        old["train"]["loss"].pop(k)
    _fake_workdir(tmp_path / "old", ml_collections.ConfigDict(old["train"]))
    paper_loss = {"loss.gap_weight": 0.0, "loss.gap_margin": 2.0}
    assert W.check(tmp_path / "old", {**doc, "train": _config(**paper_loss).to_dict()}, steps_per_epoch=6).entry is None
    with pytest.raises(W.WorkdirError, match=re.escape("loss.gap_margin 2.0 -> 0.25, loss.gap_weight 0.0 -> 4.0")):
        W.check(tmp_path / "old", doc, steps_per_epoch=6)
    save_checkpoint(tmp_path / "converted", GMICConfig(), {"params": {"w": np.ones(2)}, "batch_stats": {}})
    with pytest.raises(W.WorkdirError, match="--init-from"):
        W.check(tmp_path / "converted", doc, steps_per_epoch=6)


def test_a_730583d_workdir_resumes_with_its_preprocessing_migrated_not_changed(tmp_path):
    """A workdir whose config.json 730583d wrote ("synthetic", "per_window_standardize") resumes with
    the same training config: the old spellings are not config changes."""
    import ml_collections
    import orbax.checkpoint as ocp

    from gmic_jax import checkpoint as ckpt_lib
    from gmic_jax.train import workdir as W
    from gmic_jax.train.sampling import make_sources

    fixture = Path(__file__).parent / "fixtures" / "config_730583d_train_synthetic.json"
    shutil.copy(fixture, tmp_path / ckpt_lib.CONFIG_FILE)
    with ocp.CheckpointManager(tmp_path, options=ckpt_lib.manager_options(enable_async_checkpointing=False)) as m:
        m.save(4, args=ocp.args.Composite(variables=ocp.args.StandardSave({"w": np.ones(2)})), force=True)
    old = json.loads(fixture.read_text())
    config = ml_collections.ConfigDict(old["train"])
    requested = {
        "model": old["model"],
        "preprocessing": make_sources(config.data)[2].to_dict(),
        "train": config.to_dict(),
    }
    resume = W.check(tmp_path, requested, steps_per_epoch=2)
    assert resume.entry is None or not resume.entry.get("changes")
    assert (tmp_path / ckpt_lib.CONFIG_FILE).read_text() == fixture.read_text()  # check() writes nothing
