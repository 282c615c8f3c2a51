"""gmic-jax: GMIC (Shen et al., Medical Image Analysis 2021) in JAX/Flax.

    from gmic_jax import GMIC, GMICConfig, load_checkpoint
"""
from gmic_jax.config import GMICConfig
from gmic_jax.models import GMIC, init_variables

__version__ = "0.1.0"


def load_checkpoint(directory, step=None):
    """(GMICConfig, variables) from a converted checkpoint or a training workdir."""
    from gmic_jax.checkpoint import load_checkpoint as _load

    return _load(directory, step=step)


__all__ = ["GMIC", "GMICConfig", "init_variables", "load_checkpoint", "__version__"]
