"""GPU programs without a GPU: the HLO counting and peak attribution of benchmarks/hlo_report.py on
a small GPU program checked into tests/data, and (where jaxlib's CUDA plugin is installed, the
[gpu] extra) the deviceless compile of benchmarks/memory_fwd_bwd.py --deviceless.

tests/data/gpu_two_blocks.{hlo,buffer-assignment,live-range}.txt are XLA's optimized module (its
backend_config and scheduling_name attributes, which nothing here reads, removed), buffer
assignment and live ranges of `two_blocks_gradient` compiled for the H100 target (benchmarks/gpu_targets/h100_sxm.txtpb)
with jax[cuda12] 0.10.2; `test_checked_in_program_is_what_the_compiler_makes` recompiles it where
the plugin is installed (rewrite them with `python tests/test_gpu_compile.py`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(BENCH))

import deviceless  # noqa: E402
import hlo_report  # noqa: E402

HLO = DATA / "gpu_two_blocks.hlo.txt"
LIVE_RANGE = DATA / "gpu_two_blocks.live-range.txt"
ASSIGNMENT = DATA / "gpu_two_blocks.buffer-assignment.txt"
needs_plugin = pytest.mark.skipif(
    not deviceless.plugin_available(),
    reason="needs jaxlib's CUDA plugin (the [gpu] extra, jax[cuda12]) to compile for a GPU without one; CI is CPU-only",
)


def two_blocks_gradient():
    """A global-network block and a local-network block named as in GMIC (ds_net/layer_list_0_0,
    dn_resnet/layer1_0), bfloat16, batch statistics: (gradient function, example args)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from gmic_jax.models.global_net import PreActBlock
    from gmic_jax.models.local_net import BasicBlock

    class Global(nn.Module):
        @nn.compact
        def __call__(self, x):
            return PreActBlock(16, 2, True, jnp.bfloat16, name="layer_list_0_0")(x, True)

    class Local(nn.Module):
        @nn.compact
        def __call__(self, x):
            return BasicBlock(16, 1, False, jnp.bfloat16, name="layer1_0")(x, True)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Local(name="dn_resnet")(Global(name="ds_net")(x))

    x = jnp.zeros((4, 64, 48, 8), jnp.float32)
    variables = jax.eval_shape(lambda: Net().init(jax.random.key(0), x))

    def loss(params, batch_stats, x):
        y, _ = Net().apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.grad(loss), (variables["params"], variables["batch_stats"], jax.ShapeDtypeStruct(x.shape, x.dtype))


def strip_unread_attributes(hlo_text: str) -> str:
    hlo_text = re.sub(r", backend_config=\{.*\}$", "", hlo_text, flags=re.M)
    return re.sub(r' scheduling_name="[^"]*"', "", hlo_text)


def compile_for_h100(fn, args) -> tuple[str, str, str]:
    """(optimized HLO text, buffer assignment, live ranges) of fn compiled for the H100 target,
    without a GPU."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(deviceless.target_mesh("h100"), PartitionSpec())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), args)
    with tempfile.TemporaryDirectory() as dump:
        compiled = jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})
        [live] = Path(dump).glob("*after_optimizations-live-range.txt")
        [assignment] = Path(dump).glob("*after_optimizations-buffer-assignment.txt")
        return compiled.as_text(), assignment.read_text(), live.read_text()


# ----------------------------------------------------------------------------- on the checked-in text
def test_counts_cudnn_convolutions_and_fusions():
    counts = hlo_report.program_counts(HLO.read_text())
    kinds = counts["cudnn_by_kind"]
    # Five kernels (global: projection, conv1, conv2; local: conv1, conv2): each gets exactly one
    # weight-gradient convolution; the forward convolutions may be fused with their bias/activation.
    assert kinds["BackwardFilter"] == 5
    assert kinds.get("Forward", 0) + kinds.get("BiasActivationForward", 0) == 5
    assert 1 <= kinds["BackwardInput"] <= 5
    assert counts["cudnn_convs"] == sum(kinds.values())
    assert counts["fusions"] > 10 and counts["host_transfers"] == []
    assert (
        sum(n for t, n in counts["custom_calls"].items() if t.startswith(hlo_report.CUDNN_PREFIX))
        == counts["cudnn_convs"]
    )


def test_peak_is_the_fullest_moment_of_the_temporary_allocation():
    assignment, live = ASSIGNMENT.read_text(), LIVE_RANGE.read_text()
    peak = hlo_report.temp_peak(assignment, live)
    allocations = hlo_report.buffer_allocations(assignment)
    [temp] = [a for a in allocations if a["kind"] == "temp"]
    assert peak["allocation_bytes"] == temp["size"] and 0 < peak["bytes"] <= temp["size"]
    assert sum(size for _, size in peak["chunks"]) == peak["bytes"]  # disjoint chunks
    # The input image (f32 4 x 64 x 48 x 8) is an argument, in its own allocation.
    assert peak["argument_bytes"] >= 4 * 64 * 48 * 8 * 4
    assert 4 * 64 * 48 * 8 * 4 in [a["size"] for a in allocations if a["kind"] == "parameter"]
    # No other schedule position has more temporary bytes live: recount every position by brute force.
    ranges = hlo_report.live_ranges(live)
    values = [(n, s, o) for n, s, o in temp["values"] if s and n in ranges]
    last = max(e for _, e in ranges.values())
    in_use = [
        hlo_report._union({(o, o + s) for n, s, o in values if ranges[n][0] <= t <= ranges[n][1]})
        for t in range(last + 1)
    ]
    assert max(in_use) == peak["bytes"] == in_use[peak["position"]]


def test_peak_buffers_are_attributed_to_the_blocks_that_made_them():
    peak = hlo_report.attribute_peak(ASSIGNMENT.read_text(), LIVE_RANGE.read_text(), HLO.read_text())
    assert peak["bytes"] == sum(b["bytes"] for b in peak["buffers"]) == sum(p["bytes"] for p in peak["by_part"])
    parts = {p["part"] for p in peak["by_part"]}
    assert parts & {"global stage 0", "local layer1"}, parts
    for b in peak["buffers"]:
        if b["op_name"]:
            assert ("transpose(" in b["op_name"]) == (b["pass"] == "backward")
    text = hlo_report.peak_markdown(peak, per=1)
    assert "MiB per exam" in text and f"| {peak['by_part'][0]['part']} |" in text


def test_host_transfers_are_found():
    hlo = """HloModule m
ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %cb = f32[4]{0} custom-call(%p), custom_call_target="xla_ffi_python_gpu_callback"
  %cs = (f32[4]{0:S(5)}, f32[4]{0}, u32[]) copy-start(%cb)
  %cd = f32[4]{0:S(5)} copy-done(%cs)
  %tok = token[] after-all()
  %of = token[] outfeed(%cb, %tok), outfeed_shape=f32[4]{0}
  ROOT %r = f32[4]{0} add(%p, %cb)
}
"""
    found = hlo_report.program_counts(hlo)["host_transfers"]
    assert found == [
        "cb: custom-call xla_ffi_python_gpu_callback",
        "cs: copy-start in host memory",
        "cd: copy-done in host memory",
        "of: outfeed",
    ]


def test_dumps_without_temporaries_are_an_error():
    with pytest.raises(ValueError, match="preallocated-temp"):
        hlo_report.temp_peak("allocation 0: size 4, parameter 0, shape |f32[]| at ShapeIndex {}:\n", "")


# ----------------------------------------------------------------------------- with the CUDA plugin
def in_deviceless_process(command: str) -> dict:
    """Run `python tests/test_gpu_compile.py COMMAND` with the deviceless environment (the CUDA
    plugin must start without a driver, before JAX initialises: a fresh process) -> its JSON."""
    env = {**os.environ, **deviceless.WORKER_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, command], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def kernel_programs() -> dict:
    """Whether the CPU kernels and XLA's 7x7 stride-2 stem conv are in the H100 program of the
    three per-platform ops, by default and with the CPU variant forced."""
    import jax
    import jax.numpy as jnp

    from gmic_jax.models import fast_ops

    def f(x, k):
        y = fast_ops.max_pool(fast_ops.stem_conv(x, k, 3), 3, 2, 0)
        return jnp.sum(fast_ops.strided_conv(y, jnp.ones((3, 3, 4, 4)), 2, 1) ** 2)

    args = (jax.ShapeDtypeStruct((2, 64, 48, 1), jnp.float32), jax.ShapeDtypeStruct((7, 7, 1, 4), jnp.float32))
    out = {}
    for choice in ("auto", "cpu"):
        with fast_ops.kernels(choice):
            hlo, _, _ = compile_for_h100(jax.grad(f, argnums=(0, 1)), args)
        out[choice] = {"cpu_kernel": "cpu_kernel" in hlo, "xla_stem": "window={size=7x7 stride=2x2" in hlo}
    return out


@needs_plugin
def test_checked_in_program_is_what_the_compiler_makes():
    fresh = in_deviceless_process("analyse")
    assert fresh["counts"]["cudnn_by_kind"] == hlo_report.program_counts(HLO.read_text())["cudnn_by_kind"]
    checked_in = hlo_report.temp_peak(ASSIGNMENT.read_text(), LIVE_RANGE.read_text())
    assert fresh["peak"] == {k: checked_in[k] for k in ("bytes", "allocation_bytes", "argument_bytes")}


@needs_plugin
def test_cuda_program_lacks_the_cpu_kernels():
    programs = in_deviceless_process("kernels")
    assert programs["auto"] == {"cpu_kernel": False, "xla_stem": True}
    assert programs["cpu"] == {"cpu_kernel": True, "xla_stem": False}


@needs_plugin
def test_deviceless_benchmark_writes_its_contract(tmp_path):
    out = tmp_path / "h100.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "memory_fwd_bwd.py"),
            "--deviceless",
            "h100",
            "--dtype",
            "bfloat16",
            "--remat",
            "none",
            "global",
            "--batch-exams",
            "1",
            "--image-shape",
            "256",
            "192",
            "--crop-shape",
            "96",
            "96",
            "--threads",
            str(min(2, len(os.sched_getaffinity(0)))),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["phase"], r["remat"]) for r in rows] == [("fwd", "none"), ("train", "none"), ("train", "global")]
    from gmic_jax import GMICConfig

    for r in rows:
        assert r["impl"] == "jax" and "deviceless" in r["device"] and "H100" in r["device"]
        assert r["dtype"] == "bfloat16" and r["batch_exams"] == 1 and GMICConfig(remat=r["remat"]).remat == r["remat"]
        for key in ("arg_bytes", "temp_bytes", "out_bytes"):
            assert isinstance(r[key], int) and r[key] > 0
        assert r["compile_s"] > 0 and r["compile_cache"] == "off"
        assert r["cudnn_convs"] > 0 and r["host_transfers"] == 0 and r["kernels"] == "auto"
    fwd, train, remat = rows
    assert train["temp_bytes"] > fwd["temp_bytes"] and train["flops"] > 2 * fwd["flops"]
    assert remat["recompute_flops"] > 0 == train["recompute_flops"]
    assert not any(d["hlo_has_cpu_kernel"] for d in report["details"]["per_result"])
    assert "Peak of the training step" in proc.stdout


if __name__ == "__main__":  # in a deviceless process: regenerate the data files, or analyse
    sys.path.insert(0, str(REPO))
    command = sys.argv[1] if len(sys.argv) > 1 else "write"
    if command == "kernels":
        print(json.dumps(kernel_programs()))
        sys.exit(0)
    hlo_text, assignment_text, live_text = compile_for_h100(*two_blocks_gradient())
    if command == "analyse":
        peak = hlo_report.temp_peak(assignment_text, live_text)
        print(
            json.dumps(
                {
                    "counts": hlo_report.program_counts(hlo_text),
                    "peak": {k: peak[k] for k in ("bytes", "allocation_bytes", "argument_bytes")},
                }
            )
        )
    else:
        HLO.write_text(strip_unread_attributes(hlo_text))
        ASSIGNMENT.write_text(assignment_text)
        LIVE_RANGE.write_text(live_text)
        print(f"wrote {HLO}, {ASSIGNMENT} and {LIVE_RANGE}")
