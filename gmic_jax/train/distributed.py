"""Multi-process (multi-host) set-up: ``jax.distributed.initialize`` when the environment asks.

The environment asks with ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; on CPU the collectives go through gloo. Every
process then runs the same program: the mesh spans all devices of all processes, and each process
feeds only its own rows of every global batch.
"""
from __future__ import annotations

import os

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False


def maybe_initialize_distributed(environ=None) -> bool:
    """Initialise jax.distributed from the environment if it names a coordinator; returns whether
    this is a multi-process run. Call before any other JAX work."""
    global _initialized
    env = os.environ if environ is None else environ
    address = env.get(ENV_COORDINATOR)
    if not address:
        return False
    if _initialized:
        return True
    missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(k)]
    if missing:
        raise RuntimeError(f"{ENV_COORDINATOR}={address} is set but {missing} are not: "
                           f"set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}")
    import jax

    if env.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(env[ENV_NUM_PROCESSES]),
                               process_id=int(env[ENV_PROCESS_ID]))
    _initialized = True
    return True


def _has_accelerator() -> bool:
    # Decided without initialising a backend (that must wait until after distributed init).
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
