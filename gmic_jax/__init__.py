"""gmic-jax: GMIC (Shen et al., Medical Image Analysis 2021) in JAX/Flax.

    from gmic_jax import GMIC, GMICConfig, load_checkpoint

The names below are imported on first use, so that processes which only read data (the input
pipeline's worker processes, ``gmic-jax cache``) do not import JAX and Flax.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GMICConfig": "gmic_jax.config",
    "GMIC": "gmic_jax.models",
    "init_variables": "gmic_jax.models",
    "load_checkpoint": "gmic_jax.checkpoint",  # (GMICConfig, variables) of a checkpoint or a training workdir
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gmic_jax' has no attribute {name!r}")


__all__ = ["GMIC", "GMICConfig", "init_variables", "load_checkpoint", "__version__"]
