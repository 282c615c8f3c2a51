"""Shared fixtures. Tests that need ../shared skip outside CI and fail under CI (CI=true)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never write into the user's compilation cache: the CLI and benchmarks they run (in this
# process or in subprocesses, which inherit it) get the cache off unless a test sets a directory.
os.environ.setdefault("GMIC_JAX_COMPILE_CACHE", "off")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def require_shared(*parts: str) -> Path:
    """Path under ../shared; skip (or fail under CI=true) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"{path} not found: these tests need the project's ../shared folder beside the repo"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = require_shared("reference")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(scope="session")
def sample_exam_dir() -> Path:
    return require_shared("sample_exam")


# A training run of a few seconds: `gmic-jax train` on a tiny synthetic config (1 epoch of 6 steps).
TINY_TRAIN_ARGS = [
    "--config", "configs/synthetic_tiny.py",
    "--config.data.image_shape=(128, 96)", "--config.model.image_shape=(128, 96)",
    "--config.model.crop_shape=(32, 32)", "--config.model.K=2",
    "--config.data.num_train=24", "--config.data.num_val=8", "--config.batch_size=4",
    "--config.num_epochs=1", "--config.checkpoint_every_steps=2", "--config.eval.batch_size=8",
    "--config.progress_bar=False", "--config.log_every_steps=1",
]


@pytest.fixture(scope="module")
def compile_cache_in_process(tmp_path_factory):
    """JAX's persistent compilation cache in this (pytest) process for one module's tests, so that
    a program they build again in a fresh `jax.jit` (a training step: one per training run) loads
    instead of compiling; off again afterwards, as for the rest of the suite."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache_in_process")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # whole programs, not eager ops
    cc.reset_cache()  # JAX decides once whether the cache is used: decide again now ...
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()  # ... and after


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
    """Environment for `gmic-jax train` subprocesses: CPU, and a persistent compilation cache shared
    by all their runs so that each program compiles once."""
    cache = tmp_path_factory.mktemp("jax_cache")
    # GMIC_JAX_COMPILE_CACHE names it: the CLI's enable_compile_cache() reads that variable first, and
    # the "off" set above for every other subprocess would turn this session-wide cache off too.
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "GMIC_JAX_COMPILE_CACHE": str(cache),
         "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    e.pop("XLA_FLAGS", None)
    return e


# The tiny run shared by the tests of a training workdir and of what evaluate and predict make of it.
# best_min_delta 0: the tests of the selection rule state its plain form (the best step wins).
TINY_RUN_ARGS = [*TINY_TRAIN_ARGS, "--config.optimizer.schedule=constant", "--config.keep_evaluated=True",
                 "--config.best_min_delta=0.0"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, train_env):
    """(workdir, its training log) of one `gmic-jax train` on TINY_RUN_ARGS: steps 4 and 6 saved,
    6 evaluated. Read-only for the tests: copy it to change it. JAX_PLATFORMS is unset for this run
    (JAX probes for a TPU runtime then, and must not say so: tests/test_train_workdir.py)."""
    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    env = {k: v for k, v in train_env.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-m", "gmic_jax.cli", "train", *TINY_RUN_ARGS, "--workdir", str(workdir)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r.stderr
