"""Shared fixtures. Tests that need ../shared skip outside CI and fail under CI (CI=true)."""
from __future__ import annotations

import os
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
