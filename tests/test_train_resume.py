"""Checkpoints: SIGKILL-and-resume continues the same trajectory bit for bit; a non-finite step
stops the run with a clear message and keeps the last good checkpoint; the workdir is readable by
load_checkpoint and `gmic-jax evaluate`.

All runs are `gmic-jax train` subprocesses on a tiny synthetic config; they share a persistent
compilation cache so that only the first one compiles.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_TRAIN_ARGS

from gmic_jax.train.writers import JSONL_KEYS

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN_ARGS
# `gmic-jax train` with a hook that SIGKILLs the process at step STEP: right after the (asynchronous)
# save of that step has started ("during"), or once it is complete ("after"; a kill between two
# checkpoints). Arguments: WHEN STEP, then those of `gmic-jax train`.
KILLING_TRAIN = """
import os, signal, sys, argparse
from gmic_jax.xla_flags import apply_cpu_defaults, enable_compile_cache

apply_cpu_defaults()  # as the CLI, before JAX is imported
enable_compile_cache()
from gmic_jax import logs
from gmic_jax.train import main as train_cli
from gmic_jax.train.config_lib import apply_overrides, load_config
from gmic_jax.train.loop import train_and_evaluate

when, kill_step = sys.argv[1], int(sys.argv[2])
parser = argparse.ArgumentParser()
train_cli.add_arguments(parser)
args = train_cli.parse_args(parser, sys.argv[3:])
config = apply_overrides(load_config(args.config), args.config_overrides)


def kill(step, report):
    if step == kill_step:
        if when == "after":
            report.checkpoints.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)


logs.configure()
train_and_evaluate(config, args.workdir, hooks=[kill])
"""


@pytest.fixture(scope="module")
def env(train_env):
    return train_env


def _train(workdir, env, *extra, kill=None, wait=True):
    """`gmic-jax train` of TINY in ``workdir``; ``kill``: (when, step) of :data:`KILLING_TRAIN`."""
    run = (
        [sys.executable, "-m", "gmic_jax.cli", "train"]
        if kill is None
        else [sys.executable, "-c", KILLING_TRAIN, *map(str, kill)]
    )
    cmd = [*run, *TINY, "--workdir", str(workdir), *extra]
    log = open(Path(str(workdir) + ".log"), "a")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, text=True)
    if wait:
        proc.wait(timeout=900)
    return proc


def _log(workdir):
    return Path(str(workdir) + ".log").read_text()


def _steps(workdir):
    return sorted(int(p.name) for p in Path(workdir).iterdir() if p.name.isdigit())


def _params(workdir, step):
    from gmic_jax import load_checkpoint

    cfg, variables = load_checkpoint(workdir, step=step)
    return jax.tree.leaves(variables)


def _workers(pid):
    """Process ids of ``pid``'s input worker processes (spawned Python processes; Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if (
                d.name.isdigit()
                and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
                and b"multiprocessing.spawn" in (d / "cmdline").read_bytes()
            ):
                out.append(int(d.name))
        except (OSError, IndexError):
            continue
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("runs") / "straight"
    proc = _train(workdir, env, "--config.data.workers=0")  # in-process loading
    assert proc.returncode == 0, _log(workdir)[-3000:]
    return workdir


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists worker processes in /proc (Linux)")
def test_kill_and_resume_is_bitwise_identical(uninterrupted, tmp_path, env):
    """With 2 input worker processes, killed twice and resumed: the same parameters and
    metrics.jsonl as the uninterrupted in-process run, and no worker outlives a killed run."""
    final = _steps(uninterrupted)[-1]
    assert final >= 6
    workers = "--config.data.workers=2"
    # 0) SIGKILL a run whose two workers are busy (many epochs ahead): they go with it.
    proc = _train(tmp_path / "orphans", env, workers, "--config.num_epochs=50", wait=False)
    deadline = time.time() + 900
    while len(_workers(proc.pid)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    children = _workers(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(children) == 2, _log(tmp_path / "orphans")[-2000:]
    deadline = time.time() + 30
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [c for c in children if _alive(c)]
    for c in survivors:  # leave nothing behind, then fail
        os.kill(c, signal.SIGKILL)
    assert not survivors, "input worker processes outlived the killed training process"
    # 1) SIGKILL once the first checkpoint (step 2) is complete, before step 3: the run kills itself
    # there (a hook), so where it dies does not depend on how fast this machine is.
    workdir = tmp_path / "killed"
    proc = _train(workdir, env, workers, kill=("after", 2))
    assert proc.returncode == -signal.SIGKILL, _log(workdir)[-3000:]
    assert _steps(workdir) == [2]
    # 2) Resume; this time SIGKILL in the middle of the asynchronous save of step 6.
    proc = _train(workdir, env, workers, kill=("during", 6))
    assert proc.returncode == -signal.SIGKILL, _log(workdir)[-3000:]
    assert "resumed from" in _log(workdir)
    # 3) Resume to the end.
    proc = _train(workdir, env, workers)
    assert proc.returncode == 0, _log(workdir)[-3000:]
    assert _steps(workdir)[-1] == final
    for a, b in zip(_params(uninterrupted, final), _params(workdir, final)):
        np.testing.assert_array_equal(a, b)
    # The evaluation records agree too (train_loss included: its running sums are checkpointed).
    assert (workdir / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_workdir_layout_metrics_and_evaluate_cli(uninterrupted, tmp_path, env):
    from gmic_jax import load_checkpoint
    from gmic_jax.checkpoint import read_config

    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    # Only the keys the writer documents (JSONL_KEYS), and those every evaluation writes.
    assert set(records[0]) <= set(JSONL_KEYS) and {"step", "epoch", "train_loss", "val_roi_hit_rate"} <= set(records[0])
    cfg, prep, doc = read_config(uninterrupted)
    assert cfg.K == 2 and cfg.rotate_crops
    # The canonical schema as written; the synthetic data the run trained on comes with it.
    assert doc["preprocessing"] == prep.to_dict() and prep.name == "window" and prep.window_shape == cfg.image_shape
    assert prep.synthetic is not None and prep.synthetic.lesion_area == (0.002, 0.006)
    # Kept: the latest two steps and the evaluated (best) one.
    steps = _steps(uninterrupted)
    assert len(steps) <= 3 and records[0]["step"] in steps
    cfg, variables = load_checkpoint(uninterrupted)
    assert set(variables) == {"params", "batch_stats"}
    out = tmp_path / "eval"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmic_jax.cli",
            "evaluate",
            "--checkpoint",
            str(uninterrupted),
            "--data",
            "synthetic:num=8,split=val,height=128,width=96",
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
    m = json.loads((out / "metrics.json").read_text())
    # The same validation images as the training run's evaluation: the same metrics.
    for k in (
        "val_auc_malignant",
        "val_dice_malignant",
        "val_roi_hit_rate",
        "val_pointing_malignant",
        "val_pointing_malignant_random",
        "val_pointing_benign",
        "val_pointing_benign_random",
    ):
        if k in records[0]:
            assert m[k] == pytest.approx(records[0][k], abs=1e-6)
    assert (out / "roc_pr.png").stat().st_size > 1000
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmic_jax.cli",
            "evaluate",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--data",
            "synthetic",
            "--output",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "not a gmic-jax checkpoint" in bad.stderr


def test_evaluate_scores_the_readable_images_and_reports_the_rest(uninterrupted, tmp_path, capsys):
    """A cache with one shard gone bad: evaluate scores the other images, names the bad ones on
    stderr and in failures.txt, and exits 1."""
    from gmic_jax.cli import main
    from gmic_jax.data.cache import build_cache
    from gmic_jax.data.synthetic import SyntheticLesions, SyntheticSpec

    source = SyntheticLesions(8, seed=0, split="val", spec=SyntheticSpec(image_shape=(128, 96)))
    assert build_cache(source, tmp_path / "cache", shard_size=4) == (8, [])
    shard = tmp_path / "cache" / "images-00001.npy"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated: images 4..7 unreadable
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(uninterrupted),
            "--data",
            f"cache:{tmp_path / 'cache'}",
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--split",
            "test",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("images-00001.npy: unreadable cache shard") == 4 and "left out of metrics.json" in err
    assert len((out / "failures.txt").read_text().splitlines()) == 4
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["num_images"] == 4 and doc["failed_images"] == 4


def test_non_finite_step_stops_with_the_last_good_checkpoint(uninterrupted, tmp_path, env):
    workdir = tmp_path / "nan"
    shutil.copytree(uninterrupted, workdir)
    final = _steps(workdir)[-1]
    before = _params(workdir, final)
    proc = _train(workdir, env, "--config.num_epochs=2", "--config.loss.beta=nan", "--config-changes-ok")
    assert proc.returncode == 1
    log = _log(workdir)
    assert f"non-finite loss or gradient at step {final + 1}" in log and f"last good checkpoint: step {final}" in log
    assert _steps(workdir)[-1] == final
    for a, b in zip(before, _params(workdir, final)):
        np.testing.assert_array_equal(a, b)
