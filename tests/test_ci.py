"""CI runs the README's test command verbatim, lint and format check included."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.startswith("    ")]
    commands = [line for line in readme if line.startswith('pip install -e ".[test]"')]
    assert len(commands) == 1, commands  # the one set-up command of the tests
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci
    assert "ruff check ." in commands[0] and "ruff format --check ." in commands[0]
