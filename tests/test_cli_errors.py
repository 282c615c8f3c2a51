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
TINY = ["--config", "configs/synthetic_tiny.py",
        "--config.data.image_shape=(64, 48)", "--config.model.image_shape=(64, 48)",
        "--config.model.crop_shape=(16, 16)", "--config.model.K=1",
        "--config.data.num_train=8", "--config.data.num_val=4", "--config.batch_size=2"]


def _env(**extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def _cli(*args, env=None, code, says, cwd=REPO):
    r = subprocess.run([sys.executable, "-m", "gmic_jax.cli", *map(str, args)], cwd=cwd, env=env or _env(),
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-3000:]
    assert r.returncode == code, out[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gmic-jax {args[0]}: error: "), out[-3000:]
    for text in ([says] if isinstance(says, str) else says):
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
    _cli("preprocess", "--exam-list", tmp_path / "e.pkl", "--images", tmp_path, "--output", file, code=2,
         says="--output")
    assert file.read_text() == "mine\n"


def test_batch_size_that_the_devices_do_not_divide_names_the_sizes_that_work(tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _cli("train", *TINY, "--config.batch_size=7", "--workdir", tmp_path / "run", env=env, code=2,
         says=["batch_size=7", "2 devices", "6 or 8", "JAX_PLATFORMS"])
    assert not (tmp_path / "run").exists()


def test_init_from_a_missing_checkpoint(tmp_path):
    _cli("train", *TINY, "--init-from", tmp_path / "nothing", "--workdir", tmp_path / "run", code=1,
         says="not a gmic-jax checkpoint")
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_1_bad_options_2(tmp_path):
    _cli("train", *TINY, "--config.data.source=cache", f"--config.data.train_cache={tmp_path / 'none'}",
         f"--config.data.val_cache={tmp_path / 'none'}", "--workdir", tmp_path / "run", code=1,
         says="not a gmic-jax cache")
    _cli("convert", tmp_path / "none.npz", "--out", tmp_path / "model", code=1, says="no such file")
    _cli("convert", tmp_path / "none.npz", "--out", tmp_path / "model", "--percent-t", "2", code=2,
         says="--percent-t 2.0")
    _cli("cache", "--output", tmp_path / "cache", "--source", "manifest", "--manifest", tmp_path / "m.csv",
         "--shard-size", "0", code=2, says="--shard-size (0)")
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()
    _cli("compare-steps", "--workdir", tmp_path / "none", "--output", tmp_path / "out", code=1,
         says="not a gmic-jax checkpoint")
