"""CPU XLA defaults are added before JAX starts, never override the user's, and can be turned off."""
from __future__ import annotations

import os
import subprocess
import sys

SNIPPET = "from gmic_jax.xla_flags import apply_cpu_defaults; print(apply_cpu_defaults())"


def run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GMIC_JAX_KEEP_XLA_FLAGS")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_defaults_added():
    assert run({}) == "--xla_cpu_experimental_ynn_fusion_type="


def test_user_flags_kept_and_win():
    out = run({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_dump_to=/tmp/x"})
    assert out == "--xla_cpu_experimental_ynn_fusion_type=dot --xla_dump_to=/tmp/x"
    assert run({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}) == "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type="


def test_opt_out():
    assert run({"GMIC_JAX_KEEP_XLA_FLAGS": "1", "XLA_FLAGS": "--xla_dump_to=/tmp/y"}) == "--xla_dump_to=/tmp/y"
