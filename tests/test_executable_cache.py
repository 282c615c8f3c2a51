"""The executable cache in front of tracing (gmic_jax.executable_cache): a later process loads the
compiled training step instead of tracing it, and computes the same numbers."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN_ARGS

from gmic_jax import executable_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """JAX's persistent cache pointed at tmp_path (the executable cache follows it), restored after."""
    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / executable_cache.SUBDIR
    jax.config.update("jax_enable_compilation_cache", before[0])
    jax.config.update("jax_compilation_cache_dir", before[1])


def _affine():
    return jax.jit(lambda p, x: {"y": p["w"] @ x + p["b"]}, donate_argnums=(1,))


def _args(n=3):
    return {"w": jnp.arange(n * n, dtype=jnp.float32).reshape(n, n), "b": jnp.ones(n)}, jnp.arange(n, dtype=jnp.float32)


def test_off_without_jax_s_cache(cache_on):
    fn = _affine()
    assert isinstance(executable_cache.cached(fn, "f", ""), executable_cache.CachedExecutable)
    jax.config.update("jax_compilation_cache_dir", None)  # as GMIC_JAX_COMPILE_CACHE=off leaves it
    assert executable_cache.cached(fn, "f", "") is fn
    jax.config.update("jax_compilation_cache_dir", str(cache_on.parent))
    jax.config.update("jax_enable_compilation_cache", False)
    assert executable_cache.cached(fn, "f", "") is fn


def test_second_wrapper_loads_what_the_first_compiled(cache_on):
    first = executable_cache.cached(_affine(), "affine", "salt")
    expected = first(*_args())["y"]
    assert first.events == ["compile"] and len(list(cache_on.glob("affine-*.pkl"))) == 1
    second = executable_cache.cached(_affine(), "affine", "salt")
    np.testing.assert_array_equal(second(*_args())["y"], expected)
    assert second.events == ["load"]
    # Another salt, or other shapes, is another program: compiled, not loaded.
    other = executable_cache.cached(_affine(), "affine", "other salt")
    other(*_args())
    other(*_args(4))
    assert other.events == ["compile", "compile"] and len(list(cache_on.glob("affine-*.pkl"))) == 3


def test_a_broken_entry_is_compiled_again_with_a_warning(cache_on):
    executable_cache.cached(_affine(), "affine", "s")(*_args())
    [entry] = cache_on.glob("affine-*.pkl")
    entry.write_bytes(b"not an executable")
    again = executable_cache.cached(_affine(), "affine", "s")
    with pytest.warns(UserWarning, match="cannot load the cached executable"):
        out = again(*_args())
    assert again.events == ["compile"] and float(out["y"][0]) == 6.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert executable_cache.cached(_affine(), "affine", "s")(*_args())["y"].shape == (3,)


def test_the_key_follows_the_code(monkeypatch):
    sig = executable_cache._signature(_args())
    key = executable_cache.cache_key("f", "s", sig)
    monkeypatch.setattr(executable_cache, "code_version", lambda: "edited")
    assert executable_cache.cache_key("f", "s", sig) != key


def test_a_second_training_run_loads_the_step_and_computes_the_same(tmp_path, train_env, tiny_run):
    """tiny_run trained with train_env's cache: the same command again loads its training step."""
    workdir, first_log = tiny_run
    cache = Path(train_env["GMIC_JAX_COMPILE_CACHE"]) / executable_cache.SUBDIR
    env = {k: v for k, v in train_env.items() if k != "JAX_PLATFORMS"}  # as tiny_run
    out = subprocess.run(
        [sys.executable, "-m", "gmic_jax.cli", "train", *TINY_RUN_ARGS, "--workdir", str(tmp_path / "again")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [entry] = (p for p in cache.glob("train_step-*.pkl") if str(p) in first_log)
    assert f"train_step: compiled, kept in {entry}" in first_log or f"train_step: loaded {entry}" in first_log
    assert f"train_step: loaded {entry}" in out.stderr
    again = (tmp_path / "again" / "metrics.jsonl").read_text()
    assert again == (workdir / "metrics.jsonl").read_text() and again  # every logged number, digit for digit
