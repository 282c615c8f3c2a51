"""Training and evaluation of GMIC: loss, the data-parallel step, Orbax checkpoints and the loop
behind ``gmic-jax train`` / ``gmic-jax evaluate`` (metrics, augmentation and the preprocessing
schema live beside it, in :mod:`gmic_jax.metrics`, :mod:`gmic_jax.augment` and
:mod:`gmic_jax.preprocessing`, where predict imports them too).

    from gmic_jax.train.loop import train_and_evaluate
    from gmic_jax.train.config_lib import load_config
    train_and_evaluate(load_config("configs/synthetic.py"), "runs/demo")
"""
