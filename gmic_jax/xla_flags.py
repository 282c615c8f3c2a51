"""XLA flags gmic-jax sets for the CPU backend, before JAX starts (the CLI and benchmarks call
`apply_cpu_defaults()` first thing).

`--xla_cpu_experimental_ynn_fusion_type=` (empty) turns off XLA:CPU's YNNPACK fusions. Measured on
the development CPU (benchmarks/RESULTS.md): a training step of the full model (one exam of four
2944 x 1920 images, one thread) took 16.0 s of CPU with them and 13.3 s without; the forward
3.00 s and 2.88 s. The flag names only the CPU backend: GPUs are unaffected.

Set GMIC_JAX_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS exactly as the environment has it.
"""
from __future__ import annotations

import os
import sys

CPU_DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_cpu_defaults() -> str:
    """Add the CPU defaults to XLA_FLAGS (flags already there win); returns the resulting value.

    Has an effect only before JAX initialises its backends, so call it before any JAX work."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("GMIC_JAX_KEEP_XLA_FLAGS") == "1":
        return flags
    if "jax" in sys.modules:
        from jax._src import xla_bridge  # noqa: PLC0415

        if getattr(xla_bridge, "_backends", None):
            return flags  # too late: backends exist already
    present = {f.split("=", 1)[0] for f in flags.split()}
    extra = [f for f in CPU_DEFAULT_FLAGS if f.split("=", 1)[0] not in present]
    if extra:
        flags = " ".join([flags, *extra]).strip()
        os.environ["XLA_FLAGS"] = flags
    return flags
