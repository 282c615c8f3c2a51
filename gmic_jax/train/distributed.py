"""Multi-process (multi-host) set-up: ``jax.distributed.initialize`` when the environment asks.

Two ways, tried in this order:

1. Variables: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID``, set by hand on every host.
2. A cluster manager that ``jax.distributed.initialize()`` detects by itself -- SLURM (``srun``),
   Open MPI (``mpirun``), Kubernetes (with the ``kubernetes`` package), Cloud TPU -- when it runs
   more than one task of the job; JAX then reads the coordinator, the process count and this
   process's id from the manager's variables (``JAX_COORDINATOR_PORT`` overrides the port JAX
   derives, e.g. from the SLURM job id). One task means a single-process run: no initialisation.

``GMIC_JAX_DISTRIBUTED=off`` turns both off (every process runs alone); ``auto`` (default) is the
above. On CPU the collectives go through gloo. Every process then runs the same program: the mesh
spans all devices of all processes, and each process feeds only its own rows of every global batch.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import jax

log = logging.getLogger("gmic_jax.distributed")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SWITCH = "GMIC_JAX_DISTRIBUTED"
SWITCH_VALUES = ("auto", "off")

_initialized = False


def detected_cluster():
    """(name, process count) of the first cluster manager that ``jax.distributed.initialize()``
    would detect in this process's environment, or None. The same detection as JAX's (its
    ``ClusterEnv`` classes, skipping the opt-in ones such as mpi4py)."""
    try:  # JAX's private module: imported here so that its absence is handled below
        from jax._src import clusters

        kinds = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):  # JAX moved its detection: only the variables work
        log.warning(
            "this JAX has no cluster detection gmic-jax knows; set %s to run on several processes", ENV_COORDINATOR
        )
        return None
    for kind in kinds:
        if getattr(kind, "opt_in_only_method", False) or not kind.is_env_present():
            continue
        return kind.name, int(kind.get_process_count())
    return None


def maybe_initialize_distributed(environ=None) -> bool:
    """Initialise jax.distributed if the environment asks (see the module doc); returns whether
    this is a multi-process run. Call before any other JAX work."""
    global _initialized
    env = os.environ if environ is None else environ
    switch = env.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if switch not in SWITCH_VALUES:
        raise RuntimeError(f"{ENV_SWITCH}={env.get(ENV_SWITCH)!r}; expected one of {SWITCH_VALUES}")
    if switch == "off":
        return False
    if _initialized:
        return True
    address = env.get(ENV_COORDINATOR)
    if address:
        missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(k)]
        if missing:
            raise RuntimeError(
                f"{ENV_COORDINATOR}={address} is set but {missing} are not: "
                f"set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}"
            )
        kwargs = dict(
            coordinator_address=address, num_processes=int(env[ENV_NUM_PROCESSES]), process_id=int(env[ENV_PROCESS_ID])
        )
    else:
        cluster = detected_cluster()
        if cluster is None or cluster[1] <= 1:
            return False
        kwargs = dict(cluster_detection_method=cluster[0])
        log.info("%s runs %d tasks: initialising jax.distributed from its environment", *cluster)
    if env.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def _has_accelerator() -> bool:
    # Decided without initialising a backend (that must wait until after distributed init).
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
