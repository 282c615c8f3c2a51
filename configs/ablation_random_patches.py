"""Ablation (paper Table 7): K uniformly random patches instead of retrieve_roi.

    gmic-jax train --config configs/ablation_random_patches.py --workdir runs/abl-random

Changes model.patch_selection only (on configs/synthetic.py, or the base named as the argument).
Cost: that of the base config.
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config

CHANGES = {"model.patch_selection"}


def get_config(base="synthetic"):
    c = load_config(str(Path(__file__).with_name(f"{base}.py")))
    c.model.patch_selection = "random"
    return c
