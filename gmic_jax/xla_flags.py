"""Process-wide JAX/XLA settings of gmic-jax: the XLA:CPU flags, set before JAX starts, and the
persistent compilation cache (the CLI and the benchmarks call `apply_cpu_defaults()` and
`enable_compile_cache()` first thing).

`--xla_cpu_experimental_ynn_fusion_type=` (empty) turns off XLA:CPU's YNNPACK fusions. Measured on
the development CPU (benchmarks/RESULTS.md): a training step of the full model (one exam of four
2944 x 1920 images, one thread) took 16.0 s of CPU with them and 13.3 s without; the forward
3.00 s and 2.88 s. The flag names only the CPU backend: GPUs are unaffected.

Set GMIC_JAX_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS exactly as the environment has it.

Compile cache: JAX's persistent compilation cache keeps compiled programs on disk, so a second
run of the same program (same shapes, config, flags and versions) loads it instead of compiling
(benchmarks/RESULTS.md: cold and warm compile of the training step). GMIC_JAX_COMPILE_CACHE=DIR
puts it in DIR, GMIC_JAX_COMPILE_CACHE=off turns it off; by default it lives in
$XDG_CACHE_HOME/gmic-jax/jax-compile-cache (~/.cache/...), capped at COMPILE_CACHE_MAX_BYTES
(least recently used entries go first). A cache directory JAX was already given
(JAX_COMPILATION_CACHE_DIR) is kept when GMIC_JAX_COMPILE_CACHE is not set.

On GPU the same directory also keeps XLA's autotuning results (`XLA_CACHES`, JAX's
`jax_persistent_cache_enable_xla_caches`; JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES wins): the
convolution and fusion configurations XLA measured on the card, per fusion, in its subdirectory
`xla_gpu_per_fusion_autotune_cache_dir`. A program that misses the cache (a new shape, an edited
model) then compiles without re-measuring the kernels it shares with programs compiled before;
`benchmarks/compile_time.py --device gpu` measures the difference ("cold, autotuning cached").
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

CPU_DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
COMPILE_CACHE_ENV = "GMIC_JAX_COMPILE_CACHE"
COMPILE_CACHE_MAX_BYTES = 4 * 2**30
# Programs that compile faster than this are not written to the cache (JAX's default is 1 s; the
# forward of a small config compiles in ~0.5 s on a 2-core CPU).
COMPILE_CACHE_MIN_COMPILE_S = 0.3
# XLA's own caches kept in the compilation cache's directory: the GPU autotuning results.
XLA_CACHES = "xla_gpu_per_fusion_autotune_cache_dir"
_OFF = ("off", "0", "false", "no", "none")


def apply_cpu_defaults() -> str:
    """Add the CPU defaults to XLA_FLAGS (flags already there win); returns the resulting value.

    Has an effect only before JAX initialises its backends, so call it before any JAX work."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("GMIC_JAX_KEEP_XLA_FLAGS") == "1":
        return flags
    if "jax" in sys.modules:
        from jax._src import xla_bridge  # noqa: PLC0415 (only once JAX is in: XLA_FLAGS must be set before)

        if getattr(xla_bridge, "_backends", None):
            return flags  # too late: backends exist already
    present = {f.split("=", 1)[0] for f in flags.split()}
    extra = [f for f in CPU_DEFAULT_FLAGS if f.split("=", 1)[0] not in present]
    if extra:
        flags = " ".join([flags, *extra]).strip()
        os.environ["XLA_FLAGS"] = flags
    return flags


def compile_cache_dir() -> Path | None:
    """The persistent compilation cache's directory gmic-jax uses, or None when it is off."""
    value = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gmic-jax" / "jax-compile-cache"


def enable_compile_cache() -> Path | None:
    """Turn JAX's persistent compilation cache on at `compile_cache_dir()` (or leave it off);
    returns the directory. Call before the first compilation of the process."""
    import jax  # noqa: PLC0415 (not at the top: apply_cpu_defaults must run before JAX is imported)

    path = compile_cache_dir()
    if path is None:
        if os.environ.get(COMPILE_CACHE_ENV, "").strip():  # asked off: also a cache JAX was given
            jax.config.update("jax_compilation_cache_dir", None)
            jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    try:  # JAX's size limit (least recently used entries evicted) needs filelock
        import filelock  # noqa: F401, PLC0415 (JAX needs it for the size limit; may be missing)

        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    except ImportError:  # without it JAX would fail every cache read: keep the cache, unlimited
        warnings.warn(
            f"the compilation cache in {path} has no size limit: `pip install filelock` for "
            f"the {COMPILE_CACHE_MAX_BYTES / 2**30:.0f} GiB cap",
            stacklevel=2,
        )
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's threshold wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_COMPILE_S)
    if "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES" not in os.environ:  # the user's choice wins
        jax.config.update("jax_persistent_cache_enable_xla_caches", XLA_CACHES)
    return path
