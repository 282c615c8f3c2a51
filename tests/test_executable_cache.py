"""The executable cache in front of tracing (gmic_jax.executable_cache): a later process loads the
compiled training step instead of tracing it, and computes the same numbers."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_TRAIN_ARGS

from gmic_jax import executable_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_on(tmp_path):
    """JAX's persistent cache pointed at tmp_path (the executable cache follows it), every program
    written to it; the settings and JAX's decision to use the cache restored after."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()  # JAX decides once whether the cache is used: decide again now ...
    yield tmp_path / executable_cache.SUBDIR
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()  # ... and after


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
    assert other.events == ["compile", "compile"]
    # The other salt's program is the first one lowered again: JAX's cache served it, so it is not kept.
    assert len(list(cache_on.glob("affine-*.pkl"))) == 2


def test_a_broken_entry_is_compiled_again_with_a_warning(cache_on):
    executable_cache.cached(_affine(), "affine", "s")(*_args())
    [entry] = cache_on.glob("affine-*.pkl")
    entry.write_bytes(b"not an executable")
    again = executable_cache.cached(_affine(), "affine", "s")
    with pytest.warns(UserWarning, match="cannot load the cached executable"):
        out = again(*_args())
    assert again.events == ["compile"] and float(out["y"][0]) == 6.0
    assert (
        not entry.exists() or entry.read_bytes() != b"not an executable"
    )  # deleted (JAX's cache served the compile: not kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert executable_cache.cached(_affine(), "affine", "s")(*_args())["y"].shape == (3,)


def test_a_program_served_by_jax_s_cache_is_not_kept(cache_on):
    """An executable JAX's persistent cache loaded serialises without its kernels' code on XLA:CPU
    (loading it in another process fails: "Function ... not found"): it must not be written."""
    fn = jax.jit(lambda x: jnp.sort(x * jnp.arange(x.shape[0])[:, None]).sum(0))
    executable_cache.cached(fn, "fresh", "s")(jnp.ones((16, 8)))  # compiled: JAX's cache and ours
    jax.clear_caches()
    served = executable_cache.cached(fn, "served", "s")
    out = served(jnp.ones((16, 8)))
    assert served.events == ["compile"] and float(out[0]) == 120.0
    assert [p.name.split("-")[0] for p in cache_on.glob("*.pkl")] == ["fresh"]


def test_the_key_follows_the_code(monkeypatch):
    sig = executable_cache._signature(_args())
    key = executable_cache.cache_key("f", "s", sig)
    monkeypatch.setattr(executable_cache, "code_version", lambda: "edited")
    assert executable_cache.cache_key("f", "s", sig) != key


def test_a_second_training_run_loads_the_step_and_computes_the_same(tmp_path, train_env):
    """Two `gmic-jax train` runs of one config in a fresh cache: the first compiles and keeps its
    step, the second loads it and ends with the same parameters, bit for bit."""
    from gmic_jax import load_checkpoint

    cache = tmp_path / "cache"
    env = {**train_env, "GMIC_JAX_COMPILE_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": str(cache)}
    args = [*TINY_TRAIN_ARGS, "--config.data.num_train=16", "--config.eval.every_epochs=0"]  # a few steps, no eval
    logs = []
    for name in ("a", "b"):
        out = subprocess.run(
            [sys.executable, "-m", "gmic_jax.cli", "train", *args, "--workdir", str(tmp_path / name)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        logs.append(out.stderr)
    [entry] = (cache / executable_cache.SUBDIR).glob("train_step-*.pkl")  # one program, written once
    assert f"train_step: compiled, kept in {entry}" in logs[0] and f"train_step: loaded {entry}" in logs[1]
    (_, a), (_, b) = (load_checkpoint(tmp_path / n) for n in ("a", "b"))
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
