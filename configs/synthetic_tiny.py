"""A small synthetic config for the learning test (tests/test_train_learning.py).

    gmic-jax train --config configs/synthetic_tiny.py --workdir runs/tiny

Cost: ~3-4 min on a 2-core CPU (400 training images of 256 x 192, 32 x 32 crops, K = 3,
3 epochs of 25 steps).
"""
from gmic_jax.train.defaults import default_config


def get_config():
    c = default_config()
    c.data.source = "synthetic"
    c.data.image_shape = (256, 192)
    c.data.num_train = 400
    c.data.num_val = 100
    c.model.image_shape = (256, 192)
    c.model.crop_shape = (32, 32)
    c.model.K = 3
    c.model.percent_t = 0.1
    c.loss.beta = 1e-4
    c.optimizer.learning_rate = 1e-3
    c.augment.enabled = False
    c.batch_size = 16
    c.num_epochs = 3
    c.eval.batch_size = 50
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
