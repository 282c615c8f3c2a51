"""Compiled programs kept on disk, keyed by what they compute, so that a later run skips tracing too.

JAX's persistent compilation cache (`gmic_jax.xla_flags.enable_compile_cache`) is keyed by the
lowered program: a run that hits it still traces and lowers the training step first (1.5 s of the
2.1 s a warm start costs on a 2-core CPU; benchmarks/RESULTS.md, "Compile"). `cached(fn, ...)` puts
a cache in front of tracing: the executable itself (`jax.experimental.serialize_executable`) is
stored under a key made of

* what the caller says fixes the program (`salt`: the training config, the schedule's length),
* the arguments' tree structure, shapes, dtypes and shardings (the mesh's devices included),
* the code: a hash of every source file of the gmic_jax package (an edit makes a new key),
* jax and jaxlib versions, the backend's platform version, XLA_FLAGS, JAX's config values,

and loaded from there at the first call of a later process. It lives in the subdirectory
`executables/` of JAX's cache directory and is on exactly when that cache is (the CLI turns it
on; GMIC_JAX_COMPILE_CACHE=off turns both off); least recently used files go first beyond
`MAX_BYTES`. One process only: under `jax.distributed` every process compiles (each must hold the
same program, and the processes' caches may differ). An entry that cannot be loaded is deleted,
with a warning, and the program compiled again.

Only a program XLA compiled in this process is kept: one that JAX's cache served is not. On
XLA:CPU such an executable serialises without the code of its kernels, and loading it fails at the
first call ("Function ... not found"). A program JAX's cache already holds is therefore kept after
the first run that compiles it (a new config, code or version), and until then starts through
JAX's cache as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import Any, Callable

import jax
import jaxlib
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)
SUBDIR = "executables"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
MAX_BYTES = 2 * 2**30


def cache_dir() -> Path | None:
    """Where executables go: under JAX's persistent cache directory, or None when that is off."""
    if not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
        return None
    base = jax.config.jax_compilation_cache_dir
    return Path(base) / SUBDIR if base else None


@cache
def code_version() -> str:
    """A hash of the gmic_jax package's source files (names and contents)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _arguments_key(args) -> tuple:
    """What selects an executable in this process: the arguments' tree, shapes, dtypes, weak types
    and shardings, as hashable objects (:func:`_signature` spells the same in text, for the file
    name)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (x.shape, x.dtype, getattr(x, "weak_type", False), getattr(x, "sharding", None)) for x in leaves
    )


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (
        str(treedef),
        tuple(
            (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), repr(getattr(x, "sharding", None)))
            for x in leaves
        ),
    )


def cache_key(name: str, salt: str, signature: tuple) -> str:
    backend = jax.devices()[0].client
    parts = (
        name,
        salt,
        repr(signature),
        code_version(),
        jax.__version__,
        jaxlib.__version__,
        backend.platform,
        backend.platform_version,
        os.environ.get("XLA_FLAGS", ""),
        repr(sorted((k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k)),
    )
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


class CachedExecutable:
    """`fn` (a jitted function) with its executables kept on disk per argument signature."""

    def __init__(self, fn, name: str, salt: str, directory: Path):
        self.fn, self.name, self.salt, self.directory = fn, name, salt, directory
        self._loaded: dict[tuple, Any] = {}
        self.events: list[str] = []  # "load" or "compile" per signature, in order (tests, benchmarks)

    def __call__(self, *args):
        key = _arguments_key(args)  # per step: ~0.3 ms for a training state, where _signature takes ~4 ms
        compiled = self._loaded.get(key)
        if compiled is None:
            compiled = self._loaded[key] = self._load_or_compile(args, _signature(args))
        return compiled(*args)

    def _load_or_compile(self, args, sig):
        path = self.directory / f"{self.name}-{cache_key(self.name, self.salt, sig)}.pkl"
        if path.exists():
            try:
                compiled = serialize_executable.deserialize_and_load(*pickle.loads(path.read_bytes()))
                os.utime(path)  # recently used
                self.events.append("load")
                log.info("%s: loaded %s", self.name, path)
                return compiled
            except Exception as e:  # a truncated or foreign file: drop it and compile
                path.unlink(missing_ok=True)
                warnings.warn(f"{path}: cannot load the cached executable ({e!r}); compiling again", stacklevel=3)
        served = []  # JAX's persistent cache reports a hit through its monitoring events
        listener = lambda event, **kw: served.append(event) if event == CACHE_HIT_EVENT else None  # noqa: E731
        jax.monitoring.register_event_listener(listener)
        try:
            compiled = self.fn.lower(*args).compile()
        finally:
            jax.monitoring.unregister_event_listener(listener)
        self.events.append("compile")
        if served:  # see the module docstring: such an executable does not serialise whole on CPU
            log.info("%s: served by JAX's compilation cache; not kept", self.name)
            return compiled
        _write(path, pickle.dumps(serialize_executable.serialize(compiled)))
        log.info("%s: compiled, kept in %s", self.name, path)
        return compiled


def _write(path: Path, data: bytes) -> None:
    """Write atomically (another process may read the directory), then trim it to MAX_BYTES."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)
    files = sorted(path.parent.glob("*.pkl"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for p in files:
        total += p.stat().st_size
        if total > MAX_BYTES and p != path:
            p.unlink(missing_ok=True)


def cached(fn: Callable, name: str, salt: str) -> Callable:
    """`fn` behind the executable cache when it is on (`cache_dir()`) and `fn` is a jitted function
    (it has `.lower`; a wrapper such as a benchmark's is left as it is), else `fn` itself."""
    directory = cache_dir()
    return fn if directory is None or not hasattr(fn, "lower") else CachedExecutable(fn, name, salt, directory)
