"""A small synthetic config for the learning test (tests/test_train_learning.py): the main job's
config (configs/synthetic.py) for 4 epochs instead of 12, no checkpoints between evaluations.

    gmic-jax train --config configs/synthetic_tiny.py --workdir runs/tiny

Cost: 800 training images of 256 x 192, 4 epochs of 50 steps; measured 2.7 min (the learning test's
training, tests/test_train_learning.py, in the full suite) on a 2-core Intel Xeon (family 6 model 207,
no AMX), load 1.4-2.2.
"""

from pathlib import Path

from gmic_jax.train.config_lib import load_config


def get_config():
    c = load_config(str(Path(__file__).with_name("synthetic.py")))
    c.num_epochs = 4
    c.eval.batch_size = 50
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
