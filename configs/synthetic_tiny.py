"""A small synthetic config for the learning test (tests/test_train_learning.py): the main job's
config (configs/synthetic.py) with half the data and half the epochs.

    gmic-jax train --config configs/synthetic_tiny.py --workdir runs/tiny

Cost: ~3-4 min on a 2-core CPU (400 training images of 256 x 192, 32 x 32 crops, K = 3,
3 epochs of 25 steps).
"""
from pathlib import Path

from gmic_jax.train.config_lib import load_config


def get_config():
    c = load_config(str(Path(__file__).with_name("synthetic.py")))
    c.data.num_train = 400
    c.data.num_val = 100
    c.num_epochs = 3
    c.eval.batch_size = 50
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
