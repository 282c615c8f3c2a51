"""Ablation (paper Table 7): uniform attention over the K patches instead of gated attention.

    gmic-jax train --config configs/ablation_uniform_attention.py --workdir runs/abl-uniform

Changes model.attention only (on configs/synthetic.py, or the base named as the argument).
Cost: that of the base config.
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config

CHANGES = {"model.attention"}


def get_config(base="synthetic"):
    c = load_config(str(Path(__file__).with_name(f"{base}.py")))
    c.model.attention = "uniform"
    return c
