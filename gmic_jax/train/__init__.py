"""Training and evaluation of GMIC: loss, metrics, on-device augmentation, the data-parallel step,
Orbax checkpoints and the loop behind ``gmic-jax train`` / ``gmic-jax evaluate``.

    from gmic_jax.train.loop import train_and_evaluate
    from gmic_jax.train.config_lib import load_config
    train_and_evaluate(load_config("configs/synthetic.py"), "runs/demo")
"""
