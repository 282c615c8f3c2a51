"""The main job on the embedded synthetic lesion data (no download), sized for a CPU.

    gmic-jax train --config configs/synthetic.py --workdir runs/demo

Cost: ~12-15 min on a 2-core CPU (256 x 192 images, 32 x 32 crops, K = 3, 6 epochs of ~50 steps
of 16 images). The paper's augmentation is off here: on this short schedule it cost more than it
gave (measured: val_auc_malignant 0.78 after 5 epochs with it, 0.975 without); turn it on with
--config.augment.enabled=True.
"""
from gmic_jax.train.defaults import default_config


def get_config():
    c = default_config()
    c.data.source = "synthetic"
    c.data.image_shape = (256, 192)
    c.data.num_train = 800
    c.data.num_val = 200
    c.model.image_shape = (256, 192)
    c.model.crop_shape = (32, 32)
    c.model.K = 3
    c.model.percent_t = 0.1
    c.loss.beta = 1e-4
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "constant"
    c.augment.enabled = False
    c.batch_size = 16
    c.num_epochs = 6
    c.eval.batch_size = 40
    c.checkpoint_every_steps = 50
    return c
