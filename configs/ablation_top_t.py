"""Ablation (paper Table 5): t of top-t% pooling.

    gmic-jax train --config configs/ablation_top_t.py:0.2 --workdir runs/abl-t20

Changes model.percent_t only (on configs/synthetic.py unless a base is named after a comma).
Cost: that of the base config.
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config

CHANGES = {"model.percent_t"}


def get_config(arg="0.2"):
    value, _, base = arg.partition(",")
    c = load_config(str(Path(__file__).with_name(f"{base or 'synthetic'}.py")))
    c.model.percent_t = float(value)
    return c
