"""Ablation (paper Table 6): the number K of retrieved patches.

    gmic-jax train --config configs/ablation_k.py:1 --workdir runs/abl-k1

Changes model.K only (on configs/synthetic.py unless a base is named after a comma).
Cost: that of the base config, scaled roughly with K for the local network.
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config

CHANGES = {"model.K"}


def get_config(arg="1"):
    value, _, base = arg.partition(",")
    c = load_config(str(Path(__file__).with_name(f"{base or 'synthetic'}.py")))
    c.model.K = int(value)
    return c
