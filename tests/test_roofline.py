"""The roofline of benchmarks/roofline.py on a small GPU program checked into tests/fixtures.

tests/fixtures/gpu_roofline_tiny.hlo.txt is XLA's optimised module of `tiny_program` (a bfloat16
3x3 convolution, BatchNorm on batch statistics, ReLU, a dense layer and a five-step loop) compiled
for the H100 target (benchmarks/gpu_targets/h100_sxm.txtpb) with jax[cuda12] 0.10.2, its
backend_config attributes removed except the while loop's trip count. Every expected byte and
FLOP count below is worked out by hand from the shapes of that text.
`test_checked_in_program_is_what_the_compiler_makes` recompiles it where the CUDA plugin is
installed; rewrite the fixture with `python tests/test_roofline.py` (in the deviceless environment
of benchmarks/deviceless.py, with the plugin).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import deviceless  # noqa: E402
import roofline  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpu_roofline_tiny.hlo.txt"
H100 = json.loads(roofline.PEAKS_FILE.read_text())["h100"]
needs_plugin = pytest.mark.skipif(
    not deviceless.plugin_available(),
    reason="needs jaxlib's CUDA plugin (the [gpu] extra, jax[cuda12]) to compile for a GPU without one; CI is CPU-only",
)


def tiny_program():
    """(function, example args): conv 3x3 8 -> 16 (ds_net/first_conv), BatchNorm on batch
    statistics (ds_net/layer_list_0_0), ReLU, dense 512 -> 128 (classifier_linear), and a
    fori_loop of 5 steps under the named scope retrieve_roi; bfloat16, 2 images of 32 x 32 x 8."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Stem(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(16, (3, 3), padding=1, use_bias=False, dtype=jnp.bfloat16, name="first_conv")(x)
            h = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16, name="layer_list_0_0")(h)
            return jax.nn.relu(h)

    class GMIC(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = Stem(name="ds_net")(x)
            with jax.named_scope("retrieve_roi"):
                s = jax.lax.fori_loop(0, 5, lambda i, s: jnp.sin(s) * s, h[:, :4, :4, 0].astype(jnp.float32))
            return nn.Dense(128, dtype=jnp.bfloat16, name="classifier_linear")(h.reshape(-1, 16 * 32)), s

    x = jax.ShapeDtypeStruct((2, 32, 32, 8), jnp.float32)
    variables = jax.eval_shape(lambda: GMIC().init(jax.random.key(0), jnp.zeros(x.shape)))

    def f(variables, x):
        return GMIC().apply(variables, x, mutable=["batch_stats"])[0]

    return f, (variables, x)


def strip(hlo_text: str) -> str:
    """The module without what the roofline does not read: backend_config (except a while loop's
    trip count), scheduling names, stack frames, shardings."""

    def config(m):
        trip = re.search(r'"known_trip_count":\{"n":"\d+"\}', m.group(0))
        return f", backend_config={{{trip.group(0)}}}" if trip else ""

    hlo_text = re.sub(r", backend_config=\{.*\}$", config, hlo_text, flags=re.M)
    hlo_text = re.sub(r' (scheduling_name="[^"]*"|stack_frame_id=\d+)', "", hlo_text)
    hlo_text = re.sub(r', (sharding=\{[^}]*\}|frontend_attributes=\{[^"]*"[^"]*"\})', "", hlo_text)
    return re.sub(r"\n(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)+", "\n", hlo_text)


@pytest.fixture(scope="module")
def kernels():
    return {k["name"]: k for k in roofline.hlo_kernels(FIXTURE.read_text())}


def test_kernels_are_the_instructions_that_launch_work(kernels):
    # Parameters, bitcasts, get-tuple-elements, tuples and the while itself are no kernels; the
    # loop's body and condition are (the body's counter and step, the condition's compare).
    assert set(kernels) == {
        "copy.9",
        "input_transpose_fusion",
        "wrapped_convert",
        "cudnn-conv.1",
        "input_reduce_fusion",
        "loop_convert_fusion",
        "loop_convert_fusion.1",
        "loop_add_fusion",
        "loop_multiply_fusion",
        "loop_compare_fusion",
        "gemm_fusion_dot",
        "loop_add_fusion.1",
    }


def test_bytes_and_flops_from_the_shapes(kernels):
    x, w, y = 2 * 32 * 32 * 8, 16 * 3 * 3 * 8, 2 * 32 * 32 * 16  # elements: input, filter, output
    conv = kernels["cudnn-conv.1"]
    assert conv["bytes"] == 2 * (x + w + y) + 0  # bf16 in, filter, out; the u8[0] workspace
    assert conv["flops"] == 2 * y * (3 * 3) * 8  # 2 x outputs x kernel window x input features
    assert conv["peak"] == "bf16_tensor_flops" and conv["trip_count"] == 1
    # BatchNorm's statistics: read the bf16 output, write two f32[16]; square (y multiplies) and
    # two sums over y elements.
    stats = kernels["input_reduce_fusion"]
    assert stats["bytes"] == 2 * y + 2 * 16 * 4
    assert stats["flops"] == y + 2 * y and stats["peak"] == "fp32_flops"
    # The dense layer, split along K into 16 pieces: lhs bf16[64,16,32] (ReLU fused: 64*16*32
    # maximum), rhs f32[16,32,128], result f32[16,64,128]; 2 x 16*64*128 x 32 = 2 x M x N x K.
    gemm = kernels["gemm_fusion_dot"]
    assert gemm["bytes"] == 64 * 16 * 32 * 2 + 16 * 32 * 128 * 4 + 16 * 64 * 128 * 4
    assert gemm["flops"] == 2 * 64 * 128 * 512 + 64 * 16 * 32
    assert gemm["peak"] == "bf16_tensor_flops"
    # The loop body's step (sin, multiply on f32[2,4,4]) runs 5 times (known_trip_count).
    step = kernels["loop_multiply_fusion"]
    assert step["trip_count"] == 5
    assert step["bytes"] == 5 * (32 * 4 + 32 * 4) and step["flops"] == 5 * (32 + 32)
    assert kernels["loop_compare_fusion"]["bytes"] == 5 * (4 + 1)  # s32[] in, pred[] out
    assert kernels["copy.9"]["bytes"] == 8 and kernels["copy.9"]["flops"] == 0


def test_parts_from_the_module_path(kernels):
    assert kernels["cudnn-conv.1"]["part"] == "global stem"
    assert kernels["input_reduce_fusion"]["part"] == "global stage 0"
    assert kernels["gemm_fusion_dot"]["part"] == "heads"
    assert kernels["loop_multiply_fusion"]["part"] == "ROI and crops"
    assert kernels["copy.9"]["part"] == "other"  # no metadata


def test_bound_is_the_slower_of_compute_and_memory(kernels):
    line = roofline.roofline(list(kernels.values()), H100)
    rows = {k["name"]: k for k in line["kernels"]}
    y = 2 * 32 * 32 * 16
    conv_memory_s = (2 * (2 * 32 * 32 * 8 + 16 * 72 + y)) / 3.35e12
    assert conv_memory_s > 2 * y * 72 / 989e12  # a small convolution is memory-bound
    assert rows["cudnn-conv.1"]["bound_ms"] == pytest.approx(conv_memory_s * 1e3)
    assert all(r["memory_bound"] for r in rows.values())
    assert line["memory_bound_share"] == 1.0
    assert line["bound_ms"] == pytest.approx(sum(r["bound_ms"] for r in rows.values()))
    assert [r["bound_ms"] for r in line["kernels"]] == sorted((r["bound_ms"] for r in rows.values()), reverse=True)
    assert line["by_part"]["heads"] == pytest.approx(
        rows["gemm_fusion_dot"]["bound_ms"] + rows["loop_add_fusion.1"]["bound_ms"]
    )

    # A card with a 1 GFLOP/s tensor core: the two tensor kernels become compute-bound.
    slow = {**H100, "bf16_tensor_flops": 1e9}
    line = roofline.roofline(list(kernels.values()), slow, per=2)
    rows = {k["name"]: k for k in line["kernels"]}
    gemm_s = (2 * 64 * 128 * 512 + 64 * 16 * 32) / 1e9
    assert rows["gemm_fusion_dot"]["bound_ms"] == pytest.approx(gemm_s * 1e3 / 2)  # per exam of 2
    assert not rows["gemm_fusion_dot"]["memory_bound"] and not rows["cudnn-conv.1"]["memory_bound"]
    compute = rows["gemm_fusion_dot"]["bound_ms"] + rows["cudnn-conv.1"]["bound_ms"]
    assert line["memory_bound_share"] == pytest.approx(1 - compute / line["bound_ms"])


def test_report_follows_the_json_contract():
    config = dict(target="h100", phase="train", dtype="bfloat16", remat="none", batch_exams=2, image_shape=(32, 32))
    compiled = {"hlo": FIXTURE.read_text(), "arg_bytes": 4000, "temp_bytes": 2000, "compile_s": 1.0}
    result = roofline.result(config, compiled, H100)
    report = json.loads(json.dumps(roofline.make_report("h100", H100, [result], "auto")))
    [r] = report["results"]
    assert tuple(r)[: len(roofline.RESULT_KEYS)] == roofline.RESULT_KEYS
    assert r["batch_exams"] == 2 and r["arg_bytes"] == 2000 and r["temp_bytes"] == 1000  # per exam
    assert all(set(roofline.KERNEL_KEYS) <= set(k) for k in r["kernels"])
    assert r["bound_ms"] == pytest.approx(
        roofline.roofline(roofline.hlo_kernels(FIXTURE.read_text()), H100)["bound_ms"] / 2
    )
    assert "| cudnn-conv.1 |" in roofline.markdown(report)


def test_scaled_image_keeps_the_pixel_ratio():
    assert roofline.scaled_shape(1.0) == (2944, 1920)
    assert roofline.scaled_shape(2.0) == (4160, 2720)  # 2944 * 1.414 = 4163, 1920 * 1.414 = 2715
    assert roofline.scaled_shape(0.5) == (2080, 1344)


@needs_plugin
def test_checked_in_program_is_what_the_compiler_makes():
    env = {**os.environ, **deviceless.WORKER_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "print"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fresh = roofline.hlo_kernels(proc.stdout)
    checked_in = roofline.hlo_kernels(FIXTURE.read_text())
    assert [(k["kind"], k["bytes"], k["flops"]) for k in fresh] == [
        (k["kind"], k["bytes"], k["flops"]) for k in checked_in
    ]


if __name__ == "__main__":  # in a deviceless process: rewrite the fixture, or print the fresh module
    sys.path.insert(0, str(REPO / "tests"))
    from test_gpu_compile import compile_for_h100

    text = strip(compile_for_h100(*tiny_program())[0])
    if sys.argv[1:] == ["print"]:
        print(text)
    else:
        FIXTURE.write_text(text)
        print(f"wrote {FIXTURE} ({len(text)} characters)")
