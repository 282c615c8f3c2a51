"""CPU XLA defaults are added before JAX starts, never override the user's, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

SNIPPET = "from gmic_jax.xla_flags import apply_cpu_defaults; print(apply_cpu_defaults())"


def run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GMIC_JAX_KEEP_XLA_FLAGS")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_defaults_added():
    assert run({}) == "--xla_cpu_experimental_ynn_fusion_type="


def test_user_flags_kept_and_win():
    out = run({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_dump_to=/tmp/x"})
    assert out == "--xla_cpu_experimental_ynn_fusion_type=dot --xla_dump_to=/tmp/x"
    assert run({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}) == "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type="


def test_opt_out():
    assert run({"GMIC_JAX_KEEP_XLA_FLAGS": "1", "XLA_FLAGS": "--xla_dump_to=/tmp/y"}) == "--xla_dump_to=/tmp/y"


# ----------------------------------------------------------------------------- compile cache
CACHE_SNIPPET = """
import sys, jax, jax.numpy as jnp
sys.path.insert(0, "benchmarks")
import bench_common as bc
from gmic_jax.xla_flags import enable_compile_cache
print(enable_compile_cache())
from jax._src import compiler  # record the options XLA compiles with: where its GPU autotuning results go
used, make_options = [], compiler.get_compile_options
compiler.get_compile_options = lambda *a, **k: used.append(make_options(*a, **k)) or used[-1]
with bc.CompileCacheEvents() as events:  # any program: the cache's behaviour, not the model's
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0)).lower(jnp.zeros((64, 32))).compile()
print(events.status, jax.config.jax_compilation_cache_max_size)
print(used[0].executable_build_options.debug_options.xla_gpu_per_fusion_autotune_cache_dir or "-")
"""


def run_cache(env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("GMIC_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    # Cache every program, however fast it compiles (the user's threshold wins over gmic-jax's).
    env.update(env_extra, PYTHONPATH=str(cwd), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run(
        [sys.executable, "-c", CACHE_SNIPPET], env=env, capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_compile_cache_dir_env_default_and_off(monkeypatch, tmp_path):
    from gmic_jax.xla_flags import COMPILE_CACHE_ENV, compile_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert compile_cache_dir() == tmp_path / "xdg" / "gmic-jax" / "jax-compile-cache"
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    for off in ("off", "OFF", "0"):
        monkeypatch.setenv(COMPILE_CACHE_ENV, off)
        assert compile_cache_dir() is None


def test_second_process_hits_the_cache_and_off_writes_nothing(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = tmp_path / "cache"
    from gmic_jax.xla_flags import COMPILE_CACHE_MAX_BYTES

    first = run_cache({"GMIC_JAX_COMPILE_CACHE": str(cache)}, repo)
    # With its size limit, and XLA's GPU autotuning results kept beside the programs.
    assert first == [
        str(cache),
        "miss",
        str(COMPILE_CACHE_MAX_BYTES),
        str(cache / "xla_gpu_per_fusion_autotune_cache_dir"),
    ]
    assert any(cache.iterdir())  # the program was written
    assert run_cache({"GMIC_JAX_COMPILE_CACHE": str(cache)}, repo)[:2] == [str(cache), "hit"]
    off = run_cache({"GMIC_JAX_COMPILE_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path / "xdg")}, repo)
    assert off[:2] == ["None", "off"] and off[-1] == "-"
    assert not (tmp_path / "xdg").exists()
