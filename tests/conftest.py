"""Shared fixtures.

The original's goldens: the `goldens` fixture gives each test that asks for it the goldens in
tests/fixtures/golden (always) and those of ../shared/reference (where that folder is present, and
always under CI=true, where its absence fails). Only the tests of the real sample exam need
../shared (its sample_exam, and reference for their weights): outside CI they skip without it, and
the run ends with one line that counts them; under CI=true they fail. GMIC_JAX_SHARED names another
folder in place of ../shared."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# Tests never write into the user's compilation cache: the CLI and benchmarks they run (in this
# process or in subprocesses, which inherit it) get the cache off unless a test sets a directory.
os.environ.setdefault("GMIC_JAX_COMPILE_CACHE", "off")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED = Path(os.environ.get("GMIC_JAX_SHARED") or REPO.parent / "shared")
UNDER_CI = os.environ.get("CI", "").lower() == "true"
# Start of the reason of every skip require_shared raises: the terminal summary counts them by it.
SHARED_SKIP = "gmic-jax needs the project's shared folder:"


def _shown(path: Path) -> str:
    """`path` as the messages name it: ../shared/... in the default location, else in full."""
    try:
        return str(Path("..", "shared") / path.relative_to(REPO.parent / "shared"))
    except ValueError:
        return str(path)


def require_shared(*parts: str) -> Path:
    """Path under ../shared; skip (or fail under CI=true) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"{SHARED_SKIP} {_shown(path)} is not beside the repo"
        if UNDER_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = require_shared("reference")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(scope="session")
def sample_exam_dir() -> Path:
    return require_shared("sample_exam")


def pytest_terminal_summary(terminalreporter):
    """One line for the skips of require_shared (under xdist the controller gets every worker's
    skipped reports, so it counts them all)."""
    missing = []
    count = 0
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if SHARED_SKIP in reason:
            count += 1
            what = reason.partition(SHARED_SKIP)[2].strip().removesuffix(" is not beside the repo")
            if what not in missing:
                missing.append(what)
    if count:
        verb = "is" if len(missing) == 1 else "are"
        terminalreporter.write_line(
            f"gmic-jax: {count} test{'s' if count != 1 else ''} of the real sample exam skipped: "
            f"{', '.join(missing)} {verb} not beside the repo (under CI=true they fail instead)"
        )


# ------------------------------------------------------------------------------ parity goldens


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


golden_recipe = load_module(FIXTURES / "golden_recipe.py", "golden_recipe")
GOLDEN_SOURCES = ("repo", "shared") if UNDER_CI or (SHARED / "reference").exists() else ("repo",)


@dataclasses.dataclass(frozen=True)
class Goldens:
    """What the original computed ('golden': cases 'small' with gradients, 'b2', 'odd', each with its
    'meta') and the recipe of the weights and inputs it computed it on."""

    name: str
    golden: np.lib.npyio.NpzFile
    weights: Callable[[int], dict]  # seed -> original state_dict entries (the 'repo' recipe: float ones only)
    inputs: Callable[[tuple, int], np.ndarray]  # (NCHW shape, seed) -> image batch

    def meta(self, case: str) -> dict:
        return json.loads(str(self.golden[f"{case}/meta"]))

    def state_dict(self, seed: int) -> dict[str, np.ndarray]:
        """The original's whole state_dict for the recipe's weights of `seed`: every BatchNorm also
        has its int64 `num_batches_tracked` (PyTorch's buffer after running_var; 0 here, as the
        'shared' recipe writes it), which the 'repo' recipe leaves out."""
        out = {}
        for key, value in self.weights(seed).items():
            out[key] = value
            if key.endswith(".running_var"):
                out.setdefault(key.removesuffix("running_var") + "num_batches_tracked", np.zeros((), np.int64))
        return out

    def case_inputs(self, case: str):
        """(meta, GMICConfig, converted variables, NHWC input) of `case`. For the 'repo' goldens the
        recipe must still give the weights and input whose sha256 the goldens recorded."""
        from gmic_jax import GMICConfig
        from gmic_jax.convert import convert_state_dict

        meta = self.meta(case)
        config = GMICConfig(
            percent_t=meta["percent_t"], K=meta["K"], crop_shape=(meta["crop"],) * 2, image_shape=(meta["H"], meta["W"])
        )
        weights = self.weights(meta["weight_seed"])
        x = self.inputs((meta["N"], 1, meta["H"], meta["W"]), meta["input_seed"])
        if self.name == "repo":
            assert golden_recipe.fingerprint(weights) == meta["weights_sha256"], (
                f"{case}: golden_recipe.golden_weights({meta['weight_seed']}) no longer gives the goldens' weights"
            )
            assert golden_recipe.fingerprint(x) == meta["input_sha256"], (
                f"{case}: golden_recipe.golden_input(..., {meta['input_seed']}) no longer gives the goldens' input"
            )
        return meta, config, convert_state_dict(weights, config), x.transpose(0, 2, 3, 1)  # NCHW -> NHWC


@pytest.fixture(scope="module", params=GOLDEN_SOURCES)
def goldens(request) -> Goldens:
    """The in-repo goldens ('repo') and, where present, the project's reference goldens ('shared')."""
    if request.param == "repo":
        return Goldens(
            "repo",
            np.load(FIXTURES / "golden" / "golden.npz"),
            golden_recipe.golden_weights,
            golden_recipe.golden_input,
        )
    reference_dir = request.getfixturevalue("reference_dir")  # under CI=true: fails without ../shared
    recipe = load_module(reference_dir / "recipe.py", "reference_recipe")
    return Goldens("shared", np.load(reference_dir / "golden.npz"), recipe.reference_weights, recipe.reference_input)


# ------------------------------------------------------------------------------ training runs

# A training run of a few seconds: `gmic-jax train` on a tiny synthetic config (1 epoch of 6 steps).
TINY_TRAIN_ARGS = [
    "--config",
    "configs/synthetic_tiny.py",
    "--config.data.image_shape=(128, 96)",
    "--config.model.image_shape=(128, 96)",
    "--config.model.crop_shape=(32, 32)",
    "--config.model.K=2",
    "--config.data.num_train=24",
    "--config.data.num_val=8",
    "--config.batch_size=4",
    "--config.num_epochs=1",
    "--config.checkpoint_every_steps=2",
    "--config.eval.batch_size=8",
    "--config.progress_bar=False",
    "--config.log_every_steps=1",
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
    e = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "GMIC_JAX_COMPILE_CACHE": str(cache),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    e.pop("XLA_FLAGS", None)
    return e


# The tiny run shared by the tests of a training workdir and of what evaluate and predict make of it.
# best_min_delta 0: the tests of the selection rule state its plain form (the best step wins). Steps 5
# and 6 (6: a checkpoint and an evaluation) are profiled: tests/test_train_workdir.py reads the trace.
TINY_RUN_ARGS = [
    *TINY_TRAIN_ARGS,
    "--config.optimizer.schedule=constant",
    "--config.keep_evaluated=True",
    "--config.best_min_delta=0.0",
    "--config.profile_steps=5:6",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, train_env):
    """(workdir, its training log) of one `gmic-jax train` on TINY_RUN_ARGS: steps 4 and 6 saved,
    6 evaluated. Read-only for the tests: copy it to change it. JAX_PLATFORMS is unset for this run
    (JAX probes for a TPU runtime then, and must not say so: tests/test_train_workdir.py)."""
    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    env = {k: v for k, v in train_env.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run(
        [sys.executable, "-m", "gmic_jax.cli", "train", *TINY_RUN_ARGS, "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r.stderr
