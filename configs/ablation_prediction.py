"""Ablation (paper Table 7): which prediction is scored -- 'global' (y_global), 'local'
(y_local), 'average' (mean of the three) or 'fusion' (y_fusion, the default).

    gmic-jax train --config configs/ablation_prediction.py:local --workdir runs/abl-local

Changes eval.prediction only (on configs/synthetic.py unless a base is named after a comma).
Any trained checkpoint can also be scored this way: gmic-jax evaluate --prediction local ...
Cost: that of the base config.
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config

CHANGES = {"eval.prediction"}


def get_config(arg="local"):
    value, _, base = arg.partition(",")
    c = load_config(str(Path(__file__).with_name(f"{base or 'synthetic'}.py")))
    c.eval.prediction = value
    return c
