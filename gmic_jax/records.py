"""What an output of predict or evaluate says about how it was made: the checkpoint step it used
and why (:class:`gmic_jax.checkpoint.Selection`), the command line, the versions.

    {"checkpoint": "runs/demo", "checkpoint_step": 250,
     "checkpoint_selection": {"rule": "...", "metric": "val_auc_malignant", "min_delta": 0.0,
                              "reason": "val_auc_malignant 0.9818, the best of 12 evaluated steps", ...},
     "command": ["gmic-jax", "evaluate", ...], "versions": {"gmic-jax": ..., "jax": ..., ...}}
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Optional, Sequence

PACKAGES = ("gmic-jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "scikit-learn")


def versions() -> dict[str, str]:
    """Python and the packages whose versions change the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def checkpoint_record(directory, selection) -> dict:
    """``checkpoint``, ``checkpoint_step`` and ``checkpoint_selection`` (rule and reason) of one
    loaded checkpoint."""
    return {
        "checkpoint": str(directory),
        "checkpoint_step": int(selection.step),
        "checkpoint_selection": selection.to_dict(),
    }


def describe(directory, selection) -> str:
    """One line for the log: which step of which checkpoint, and why."""
    return f"{directory}: step {selection.step} ({selection.reason})"


def provenance(command: Optional[Sequence[str]]) -> dict:
    """``command`` (as typed, when known) and ``versions``."""
    out: dict = {"versions": versions()}
    if command is not None:
        out["command"] = [str(a) for a in command]
    return out
