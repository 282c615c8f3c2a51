"""tests/conftest.py without the project's shared folder: outside CI the tests of the real sample exam
skip and the run ends with one line that counts them (also under pytest-xdist, whose controller
gets the workers' reports); under CI=true they fail. Each case runs pytest in a subprocess on two
small test files with the repo's conftest as a plugin and GMIC_JAX_SHARED naming a missing folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

EXAM_TESTS = """
import pytest

def test_exam_a(sample_exam_dir):
    pass

@pytest.mark.parametrize("i", [1, 2])
def test_exam_b(sample_exam_dir, i):
    pass
"""

OTHER_TESTS = """
import pytest

def test_exam_c(sample_exam_dir):
    pass

def test_skipped_for_another_reason():
    pytest.skip("not a test of the real sample exam")

def test_goldens(goldens):
    assert goldens.golden["small/grad_loss"].shape == ()

def test_plain():
    pass
"""

WORKERS = [pytest.param(["-n", "0"], id="serial"), pytest.param(["-n", "2", "--dist", "loadfile"], id="xdist")]


def run_pytest(tmp_path, workers, ci):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the rootdir: no ini file of an enclosing folder
    (tmp_path / "test_exam.py").write_text(EXAM_TESTS)
    (tmp_path / "test_other.py").write_text(OTHER_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env.update(GMIC_JAX_SHARED=str(tmp_path / "absent"), PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    if ci:
        env["CI"] = "true"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "conftest",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-q",
            *workers,
            "test_exam.py",
            "test_other.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return r, r.stdout.splitlines()


@pytest.mark.parametrize("workers", WORKERS)
def test_one_summary_line_counts_the_skips_of_the_shared_folder(tmp_path, workers):
    r, lines = run_pytest(tmp_path, workers, ci=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = [line for line in lines if line.startswith("gmic-jax:")]
    # 4 of the 5 skips (not the one with another reason); without the folder 'goldens' is only 'repo'.
    expected = (
        f"gmic-jax: 4 tests of the real sample exam skipped: {tmp_path / 'absent' / 'sample_exam'} "
        "is not beside the repo (under CI=true they fail instead)"
    )
    assert summary == [expected], r.stdout[-3000:]
    assert re.search(r"\b2 passed, 5 skipped\b", lines[-1]), lines[-1]


@pytest.mark.parametrize("workers", WORKERS)
def test_under_ci_they_fail(tmp_path, workers):
    r, lines = run_pytest(tmp_path, workers, ci=True)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert not [line for line in lines if line.startswith("gmic-jax:")], r.stdout[-3000:]
    # The 4 tests of the sample exam and goldens[shared] fail in their fixtures' set-up (pytest: errors).
    assert re.search(r"\b2 passed, 1 skipped, 5 errors\b", lines[-1]), lines[-1]
    assert "test_goldens[shared]" in r.stdout
    assert r.stdout.count(f"{tmp_path / 'absent' / 'sample_exam'} is not beside the repo") >= 4
