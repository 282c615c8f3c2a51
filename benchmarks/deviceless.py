"""Compile GMIC for an NVIDIA GPU on a machine without one, and read what XLA planned.

`benchmarks/memory_fwd_bwd.py --deviceless h100|h200` runs one worker per configuration with
`DevicelessRunner`. The worker needs the `[gpu]` extra (jax[cuda12]): XLA's CUDA compiler builds
the program against a target description (`gpu_targets/*.txtpb`, written from the card's public
specifications) through `jax.experimental.topologies`, with `CUDA_VISIBLE_DEVICES=-1` and
`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` so that no driver is looked for. Inputs are
`jax.ShapeDtypeStruct`s on a one-device mesh of that target: nothing is allocated.

What comes back is compiled memory (XLA's buffer assignment: argument, temporary, output bytes;
the buffers live at the peak), never runtime: no autotuning ran (cuDNN workspaces are 0 bytes in
a deviceless program), and allocator fragmentation is not in it. FLOPs are XLA's cost analysis
of the program before optimisation (the CUDA compiler's own cost analysis needs a device); a
remat policy's recompute is explicit there, so policy minus 'none' is its recompute cost.

The persistent compilation cache stays off here: an executable built against a hand-written
target without autotuning must never be served to a real card of the same name.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
TARGETS = {"h100": BENCH_DIR / "gpu_targets" / "h100_sxm.txtpb", "h200": BENCH_DIR / "gpu_targets" / "h200_sxm.txtpb"}
PLUGIN_MISSING = (
    "--deviceless needs the CUDA plugin of jaxlib (the [gpu] extra: pip install 'jax[cuda12]'); "
    "it compiles for the GPU without one"
)
WORKER_ENV = {
    "JAX_PLATFORMS": "cpu",
    "CUDA_VISIBLE_DEVICES": "-1",
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
    "GMIC_JAX_COMPILE_CACHE": "off",
}


def plugin_available() -> bool:
    return importlib.util.find_spec("jax_cuda12_plugin") is not None


def target_config(name: str) -> str:
    if name not in TARGETS:
        raise ValueError(f"unknown deviceless target {name!r}; known: {sorted(TARGETS)}")
    return TARGETS[name].read_text()


def target_mesh(name: str):
    """A one-device mesh ('data') of the named GPU target, without a GPU."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(name), topology="1x1x1")
    return topologies.make_mesh(topology, (1,), ("data",))


def flops_before_optimization(lowered) -> float:
    """XLA's cost analysis (the CPU client's) of a lowered program's HLO before optimisation."""
    import jax
    from jax._src.lib import _jax

    module = lowered.compiler_ir("hlo").as_hlo_module()
    return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["flops"])


class DevicelessRunner:
    """Compile the forward (inference) or the training step's forward + backward for a GPU target."""

    def __init__(self, spec: dict):
        import bench_common as bc
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec
        from memory_fwd_bwd import IMAGES_PER_EXAM, make_config

        from gmic_jax import GMIC, init_variables

        self.spec, self.jax = spec, jax
        self.mesh = target_mesh(spec["deviceless"])
        self.device = self.mesh.devices.flat[0]
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def on_target(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)

        self.cfg = make_config(spec)
        self.model = GMIC(self.cfg)
        n = IMAGES_PER_EXAM * spec["batch_exams"]
        variables = jax.tree.map(on_target, jax.eval_shape(lambda: init_variables(self.cfg, jax.random.key(0))))
        x = jax.ShapeDtypeStruct((n, *self.cfg.image_shape, 1), jnp.float32, sharding=replicated)
        y = jax.ShapeDtypeStruct((n, 2), jnp.float32, sharding=replicated)
        rng = on_target(jax.eval_shape(lambda: jax.random.key(0)))
        if spec["phase"] == "fwd":
            self.fn = jax.jit(lambda v, x, rng: self.model.apply(v, x, train=False, rngs={"roi": rng}))
            self.args = (variables, x, rng)
        else:
            self.fn = jax.jit(bc.make_grad_fn(self.model, train=True))
            self.args = (variables["params"], variables["batch_stats"], x, y, rng)

    def ready(self) -> dict:
        import hlo_report

        with tempfile.TemporaryDirectory(prefix="gmic_deviceless_") as dump:
            t0 = time.perf_counter()
            lowered = self.fn.lower(*self.args)
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
            compile_s = time.perf_counter() - t0
            [live_range] = Path(dump).glob("*after_optimizations-live-range.txt")
            [assignment] = Path(dump).glob("*after_optimizations-buffer-assignment.txt")
            live_range_text, assignment_text = live_range.read_text(), assignment.read_text()
        hlo_text = compiled.as_text()
        mem = compiled.memory_analysis()
        return {
            "device_kind": self.device.device_kind,
            "platform": self.device.platform,
            "target": self.spec["deviceless"],
            "target_file": str(TARGETS[self.spec["deviceless"]].relative_to(BENCH_DIR.parent)),
            "compile_s": compile_s,
            "compile_cache": "off",
            "arg_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "out_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "flops": flops_before_optimization(lowered),
            "hlo_has_cpu_kernel": "cpu_kernel" in hlo_text,
            **hlo_report.program_counts(hlo_text),
            "peak": hlo_report.attribute_peak(assignment_text, live_range_text, hlo_text),
            "kernels": os.environ.get("GMIC_JAX_KERNELS") or "auto",
        }

    def handle(self, msg: dict) -> dict:
        raise ValueError(f"a deviceless worker only compiles; got command {msg['cmd']!r}")
