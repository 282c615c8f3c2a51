"""Ablation (paper Table 5): the aggregation of the saliency maps, 'gap', 'gmp' or 'top_t'.

    gmic-jax train --config configs/ablation_aggregation.py:gap --workdir runs/abl-gap
    gmic-jax train --config configs/ablation_aggregation.py:gmp,nyu_paper --workdir runs/abl-gmp

Changes model.aggregation only (on configs/synthetic.py unless a base is named after a comma).
Cost: that of the base config (synthetic: ~15-20 min on a 2-core CPU).
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config

CHANGES = {"model.aggregation"}


def get_config(arg="gap"):
    value, _, base = arg.partition(",")
    c = load_config(str(Path(__file__).with_name(f"{base or 'synthetic'}.py")))
    c.model.aggregation = value
    return c
