"""Ordinary mistakes, made the way a new user makes them: through the `gmic-jax` command line.

Each is one line on stderr naming what is wrong, exit 2 for a mistake in the command or config
(nothing written) and 1 for data or a checkpoint that cannot be used; never a traceback. (That the
libraries' known noise does not show is tested on a real run: tests/test_train_workdir.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    "configs/synthetic_tiny.py",
    "--config.data.image_shape=(64, 48)",
    "--config.model.image_shape=(64, 48)",
    "--config.model.crop_shape=(16, 16)",
    "--config.model.K=1",
    "--config.data.num_train=8",
    "--config.data.num_val=4",
    "--config.batch_size=2",
]


def _env(**extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def _cli(*args, env=None, code, says, cwd=REPO):
    r = subprocess.run(
        [sys.executable, "-m", "gmic_jax.cli", *map(str, args)],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-3000:]
    assert r.returncode == code, out[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gmic-jax {args[0]}: error: "), out[-3000:]
    for text in [says] if isinstance(says, str) else says:
        assert text in last, last
    return last


CONFIG_MISTAKES = [
    (["--config", "README.md"], "README.md is not a config"),
    (["--config", "configs/no_such_config.py"], "config file configs/no_such_config.py not found"),
    (["--config.batchsize=3"], "did you mean 'batch_size'?"),
    (["--config.model.k=3"], "did you mean 'model.K'?"),
    (["--config.model"], "--config.model needs a value"),
    (["--config.batch_size=abc"], "--config.batch_size=abc: expected a int"),
    (["--config.model.local_net=resnet19"], "local_net='resnet19'"),
    (["--config.best_metric=val_auc"], "best_metric='val_auc'; expected one of"),
    (["--config.loss.gap_weight=-1"], "loss.gap_weight=-1.0; expected a number >= 0"),
    (["--config.loss.gap_margin=0"], "loss.gap_margin=0.0; expected a number > 0"),
]


@pytest.mark.parametrize("args,says", CONFIG_MISTAKES, ids=[" ".join(a) for a, _ in CONFIG_MISTAKES])
def test_config_mistakes_exit_2_without_writing(tmp_path, args, says):
    workdir = tmp_path / "run"
    config = [] if args[0] == "--config" else ["--config", "configs/synthetic_tiny.py"]
    _cli("train", *config, *args, "--workdir", workdir, code=2, says=says)
    assert not workdir.exists()


def test_workdir_and_output_that_are_files(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    _cli("train", *TINY, "--workdir", file, code=2, says="--workdir")
    _cli("cache", "--output", file, "--source", "manifest", "--manifest", tmp_path / "m.csv", code=2, says="is a file")
    _cli(
        "preprocess", "--exam-list", tmp_path / "e.pkl", "--images", tmp_path, "--output", file, code=2, says="--output"
    )
    assert file.read_text() == "mine\n"


def test_batch_size_that_the_devices_do_not_divide_names_the_sizes_that_work(tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _cli(
        "train",
        *TINY,
        "--config.batch_size=7",
        "--workdir",
        tmp_path / "run",
        env=env,
        code=2,
        says=["batch_size=7", "2 devices", "6 or 8", "JAX_PLATFORMS"],
    )
    assert not (tmp_path / "run").exists()


def test_init_from_a_missing_checkpoint(tmp_path):
    _cli(
        "train",
        *TINY,
        "--init-from",
        tmp_path / "nothing",
        "--workdir",
        tmp_path / "run",
        code=1,
        says="not a gmic-jax checkpoint",
    )
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_1_bad_options_2(tmp_path):
    _cli(
        "train",
        *TINY,
        "--config.data.source=cache",
        f"--config.data.train_cache={tmp_path / 'none'}",
        f"--config.data.val_cache={tmp_path / 'none'}",
        "--workdir",
        tmp_path / "run",
        code=1,
        says="not a gmic-jax cache",
    )
    _cli("convert", tmp_path / "none.npz", "--out", tmp_path / "model", code=1, says="no such file")
    _cli(
        "convert",
        tmp_path / "none.npz",
        "--out",
        tmp_path / "model",
        "--percent-t",
        "2",
        code=2,
        says="--percent-t 2.0",
    )
    _cli(
        "cache",
        "--output",
        tmp_path / "cache",
        "--source",
        "manifest",
        "--manifest",
        tmp_path / "m.csv",
        "--shard-size",
        "0",
        code=2,
        says="--shard-size (0)",
    )
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()
    _cli(
        "compare-steps",
        "--workdir",
        tmp_path / "none",
        "--output",
        tmp_path / "out",
        code=1,
        says="not a gmic-jax checkpoint",
    )


# ------------------------------------------------------------------------------- predict, evaluate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny converted-style checkpoint (step 0, original preprocessing, no synthetic data)."""
    import jax
    import numpy as np

    from gmic_jax.checkpoint import save_checkpoint
    from gmic_jax.config import GMICConfig
    from gmic_jax.models import init_variables

    config = GMICConfig(image_shape=(64, 48), crop_shape=(16, 16), K=1, local_net="resnet18_narrow")
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, config, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
    return path


def _inputs(tmp_path):
    (tmp_path / "exams.pkl").write_bytes(b"not read")
    (tmp_path / "images").mkdir()
    (tmp_path / "a_file").write_text("x\n")
    return tmp_path


PREDICT_MISTAKES = [
    (["--exam-list", "{t}/exams.pkl"], 2, "--exam-list needs --images"),
    (["--exam-list", "{t}/none.pkl", "--images", "{t}/images"], 1, "--exam-list {t}/none.pkl: no such file"),
    (["--exam-list", "{t}/exams.pkl", "--images", "{t}/none"], 1, "--images {t}/none: no such file"),
    (["--exam-list", "{t}/exams.pkl", "--images", "{t}/a_file"], 1, "--images {t}/a_file: is a file"),
    (["--dicom", "{t}/none"], 1, "--dicom {t}/none: no such file"),
    (["--synthetic", "2"], 2, "--synthetic needs a checkpoint trained on synthetic data"),
]


@pytest.mark.parametrize("args,code,says", PREDICT_MISTAKES, ids=[" ".join(a) for a, _, _ in PREDICT_MISTAKES])
def test_predict_mistakes_write_nothing(checkpoint, tmp_path, args, code, says):
    t = _inputs(tmp_path)
    _cli(
        "predict",
        *[a.format(t=t) for a in args],
        "--checkpoint",
        checkpoint,
        "--output",
        t / "out",
        "--no-progress",
        code=code,
        says=says.format(t=t),
    )
    assert not (t / "out").exists()


def test_predict_with_a_checkpoint_it_cannot_use_claims_only_what_it_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("predictions.csv", "breast_predictions.csv", "run.json"):  # an earlier run's
        (out / stale).write_text("stale\n")
    (tmp_path / "a_file").write_text("x\n")
    for checkpoint, problem in [
        (tmp_path / "none", "not a gmic-jax checkpoint"),
        (tmp_path / "a_file", "is a file; a gmic-jax checkpoint is a directory"),
    ]:
        last = _cli(
            "predict",
            "--synthetic",
            "2",
            "--checkpoint",
            checkpoint,
            "--output",
            out,
            "--no-progress",
            code=1,
            says=[str(checkpoint), problem, f"nothing was predicted (written: {out / 'failures.txt'} only)"],
        )
        assert "predictions.csv" not in last
        assert sorted(p.name for p in out.iterdir()) == ["failures.txt"]
        assert problem in (out / "failures.txt").read_text()


EVALUATE_MISTAKES = [
    (["--checkpoint", "{t}/none"], 1, "{t}/none: not a gmic-jax checkpoint"),
    (["--checkpoint", "{t}/a_file"], 1, "{t}/a_file: is a file"),
    (["--step", "7"], 1, "no step 7 (saved steps: [0])"),
    (["--data", "synthtic"], 2, "expected 'synthetic[:opts]' or 'cache:PATH'"),
    (["--data", "synthetic:num"], 2, "'num' is not key=value"),
    (["--data", "synthetic:num=many"], 2, "num=many is not an integer"),
    (["--data", "synthetic:split=val", "--split", "test"], 2, "split=val but --split says test"),
    (["--split", "test set"], 2, "--split 'test set': a split name is"),
    (["--data", "cache:{t}/none"], 1, "{t}/none/index.json: not a gmic-jax cache"),
    (["--tta", "-1"], 2, "--tta must be >= 0"),
]


@pytest.mark.parametrize("args,code,says", EVALUATE_MISTAKES, ids=[" ".join(a) for a, _, _ in EVALUATE_MISTAKES])
def test_evaluate_mistakes_write_nothing(checkpoint, tmp_path, args, code, says):
    t = _inputs(tmp_path)
    given = dict(zip(args[::2], args[1::2]))
    defaults = {"--checkpoint": str(checkpoint), "--data": "synthetic:num=4"}
    args = [*args, *[x for k, v in defaults.items() if k not in given for x in (k, v)]]
    _cli("evaluate", *[a.format(t=t) for a in args], "--output", t / "out", code=code, says=says.format(t=t))
    assert not (t / "out").exists()
