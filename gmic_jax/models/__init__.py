"""GMIC's networks as Flax linen modules (NHWC)."""

from gmic_jax.models.gmic import GMIC, init_variables

__all__ = ["GMIC", "init_variables"]
