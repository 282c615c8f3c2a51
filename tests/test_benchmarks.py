"""The benchmark programs (benchmarks/): analytic FLOPs against XLA's cost analysis, the JSON that
memory_fwd_bwd.py, throughput.py, input_pipeline.py and train_e2e.py write, the memory measurement.

Small runs only (256 x 192 images, 96 x 96 crops: at 64 x 64 the local network's last stage works
on 2 x 2 maps, which XLA's CPU backend runs on a slow path; train_e2e.py on the shared tiny run's
128 x 96 model, whose compiled step it shares). The side by side with the original
PyTorch release needs its checkout and torch: set GMIC_TORCH_REF=/path/to/checkout to run it here;
CI has neither, so RESULTS.md holds that run's table and command.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_common as bc  # noqa: E402
import compile_time  # noqa: E402
import flops  # noqa: E402
import fwd_bwd_driver  # noqa: E402
import fwd_bwd_report  # noqa: E402
import profile_summary  # noqa: E402
import throughput as tp  # noqa: E402
import torch_profile  # noqa: E402
import torch_reference as tref  # noqa: E402
import train_e2e  # noqa: E402
import train_e2e_worker  # noqa: E402

from gmic_jax import GMIC, GMICConfig, init_variables  # noqa: E402

IMAGE = (256, 192)
CROP = (96, 96)
THREADS = min(2, len(os.sched_getaffinity(0)))
SMALL = [
    "--image-shape",
    *map(str, IMAGE),
    "--crop-shape",
    *map(str, CROP),
    "--threads",
    str(THREADS),
    "--device",
    "cpu",
]


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _run_script(script: str, args, tmp_path: Path, name: str, timeout: int = 600):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


# ----------------------------------------------------------------------------- analytic FLOPs
CONVS = [  # (batch, h, w, cin, cout, kernel, stride, padding): the shapes GMIC uses, odd sizes
    (2, 32, 24, 1, 8, 7, 2, 3),
    (1, 17, 13, 4, 5, 3, 2, 1),
    (3, 9, 11, 6, 4, 3, 1, 1),
    (2, 15, 10, 5, 7, 1, 2, 0),
    (1, 31, 19, 2, 3, 3, 2, 0),
]


@pytest.mark.parametrize("n,h,w,cin,cout,k,s,p", CONVS)
def test_single_conv_flops_match_xla_exactly(n, h, w, cin, cout, k, s, p):
    layer = flops.Layer("conv", "conv", n, (h, w), (k, k), s, p, cin, cout)

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, kernel = jnp.zeros((n, h, w, cin)), jnp.zeros((k, k, cin, cout))
    ct = jnp.zeros((n, *layer.out_hw, cout))

    def fwd_bwd(x, kernel, ct):
        y, vjp = jax.vjp(conv, x, kernel)
        return y, vjp(ct)

    def fwd_bwd_weights_only(x, kernel, ct):
        y, vjp = jax.vjp(lambda kk: conv(x, kk), kernel)
        return y, vjp(ct)

    assert layer.out_hw == jax.eval_shape(conv, x, kernel).shape[1:3]
    assert _xla_flops(conv, x, kernel) == layer.flops()
    assert _xla_flops(fwd_bwd, x, kernel, ct) == layer.fwd_bwd_flops()
    stem = dataclasses.replace(layer, needs_input_grad=False)
    assert _xla_flops(fwd_bwd_weights_only, x, kernel, ct) == stem.fwd_bwd_flops()
    if p:  # padded taps are not multiply-adds in XLA's count; the paper's convention counts them
        assert layer.flops(count_padding=True) > layer.flops()


def test_single_dense_flops_match_xla_exactly():
    layer = flops.Layer("dense", "dense", 6, (1, 1), (1, 1), 1, 0, 512, 128)
    a, b, ct = jnp.zeros((6, 512)), jnp.zeros((512, 128)), jnp.zeros((6, 128))

    def fwd_bwd(a, b, ct):
        y, vjp = jax.vjp(jnp.matmul, a, b)
        return y, vjp(ct)

    assert _xla_flops(jnp.matmul, a, b) == layer.flops() == 2 * 6 * 512 * 128
    assert _xla_flops(fwd_bwd, a, b, ct) == layer.fwd_bwd_flops()


def test_analytic_count_matches_the_papers_multiply_adds():
    # Paper: 122 billion multiply-adds per exam of 4 images at 2944 x 1920 (every tap counted).
    layers = flops.gmic_layers(4)
    assert flops.global_layers((2944, 1920), 1)[-1].in_hw == (46, 30)  # the saliency conv, on the 46 x 30 grid
    assert abs(flops.forward_flops(layers, count_padding=True) / 2 / 122e9 - 1) < 0.02
    parts = flops.summary(layers)
    assert sum(parts.values()) == flops.forward_flops(layers)
    assert parts["global"] > 0 and parts["local"] > 0 and 0 < parts["heads"] < 1e-3 * parts["local"]


def test_whole_model_forward_flops_within_5_percent_of_xla_at_full_size():
    cfg = GMICConfig()
    variables = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((4, *cfg.image_shape, 1), jnp.float32)
    xla = (
        jax.jit(lambda v, x: GMIC(cfg).apply(v, x, train=False)).lower(variables, x).compile().cost_analysis()["flops"]
    )
    analytic = flops.forward_flops(flops.layers_for_config(cfg, 4, local_stem_channels=1))
    assert abs(xla / analytic - 1) < 0.05, (xla, analytic)


def test_local_network_variants_have_their_own_counts():
    r18 = flops.forward_flops(flops.local_layers((256, 256), 1, "resnet18"), count_padding=True)
    r34 = flops.forward_flops(flops.local_layers((256, 256), 1, "resnet34"), count_padding=True)
    r50 = flops.forward_flops(flops.local_layers((256, 256), 1, "resnet50"), count_padding=True)
    # torchvision at 224 x 224: 1.8 / 3.6 / 4.1 G multiply-adds; scale to 256 x 256 (every tap).
    for layers, gmacs in ((r18, 1.82), (r34, 3.67), (r50, 4.11)):
        assert abs(layers / 2 / 1e9 / (gmacs * (256 / 224) ** 2) - 1) < 0.06
    with pytest.raises(ValueError, match="local_net"):
        flops.local_layers((256, 256), 1, "resnet101")


# ----------------------------------------------------------------------------- memory_fwd_bwd.py
@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """The script at batch sizes 1 (with --profile) and 2: (json, stdout) for each."""
    tmp = tmp_path_factory.mktemp("bench")
    one = _run_script("memory_fwd_bwd.py", [*SMALL, "--n-runs", "2", "--profile"], tmp, "b1")
    two = _run_script("memory_fwd_bwd.py", [*SMALL, "--n-runs", "2", "--batch-exams", "2"], tmp, "b2")
    return {1: one, 2: two}


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_script_writes_the_json_with_every_field_filled(small_runs):
    report, stdout = small_runs[1]
    assert tuple(report)[: len(fwd_bwd_report.TOP_KEYS)] == fwd_bwd_report.TOP_KEYS
    assert set(report) == set(fwd_bwd_report.TOP_KEYS) | {"details"}
    assert report["unit"] == "exam of 4 images"
    assert report["image_shape"] == list(IMAGE) and report["threads"] == THREADS
    assert "CPU" in report["device"] and report["versions"]["jax"] == jax.__version__
    cpu = report["details"]["cpu"]  # every table names the CPU: family / model numbers and AMX
    assert f"family {cpu['family']} model {cpu['model']}" in report["device"]
    assert ("no AMX" in report["device"]) == (not cpu["amx"])
    assert "CPU: " in stdout and "AMX" in stdout
    [result] = report["results"]
    assert tuple(result) == fwd_bwd_report.RESULT_KEYS
    assert (result["impl"], result["dtype"], result["remat"]) == ("jax", "float32", "none")
    assert result["compile_cache"] == "off"  # tests never use the user's compilation cache
    for key in fwd_bwd_report.RESULT_KEYS[3:-1]:
        assert _finite_number(result[key]), (key, result[key])
        assert result[key] >= 0, key
        if not key.endswith("spread"):
            assert result[key] > 0, key
    # The backward pass costs about twice the forward's FLOPs: a count from XLA's cost analysis, not a
    # clock (how the two times compare on a loaded machine is for benchmarks/RESULTS.md).
    assert result["flops_fwd_bwd"] > 2 * result["flops_fwd"]
    assert "| forward (ms) |" in stdout and "| peak memory of a training step (MiB) |" in stdout


def test_script_parameter_counts_match_the_model(small_runs):
    report, _ = small_runs[1]
    [result] = report["results"]
    params = jax.eval_shape(lambda: init_variables(GMICConfig(image_shape=IMAGE, crop_shape=CROP), jax.random.key(0)))[
        "params"
    ]

    def size(name):
        return sum(x.size for x in jax.tree.leaves(params[name]))

    assert result["params"] == sum(x.size for x in jax.tree.leaves(params))
    assert result["params_global"] == size("ds_net") + size("left_postprocess_net")
    assert result["params_local"] == size("dn_resnet")
    assert report["details"]["per_result"][0]["params_heads"] == (
        result["params"] - result["params_global"] - result["params_local"]
    )


def test_script_xla_flops_within_5_percent_of_the_analytic_count(small_runs):
    for batch, (report, _) in small_runs.items():
        [result] = report["results"]
        [detail] = report["details"]["per_result"]
        assert abs(result["flops_fwd"] / result["flops_fwd_analytic"] - 1) < 0.05
        assert abs(result["flops_fwd_bwd"] / detail["flops_fwd_bwd_analytic"] - 1) < 0.05
        expected = flops.forward_flops(flops.gmic_layers(4 * batch, IMAGE, CROP, local_stem_channels=1)) / batch
        assert result["flops_fwd_analytic"] == pytest.approx(expected)
    # per exam: the same whatever the batch size
    assert small_runs[2][0]["results"][0]["flops_fwd_analytic"] == pytest.approx(
        small_runs[1][0]["results"][0]["flops_fwd_analytic"]
    )


def test_script_memory_is_positive_and_grows_with_the_batch(small_runs):
    (r1, _), (r2, _) = small_runs[1], small_runs[2]
    one, two = r1["results"][0]["peak_mem_bytes"], r2["results"][0]["peak_mem_bytes"]
    assert one > 0 and two > 0
    assert two != one
    assert 2 * two > 1.2 * one  # the whole step's rise (per exam x exams) grows with the batch
    d1, d2 = r1["details"]["per_result"][0], r2["details"]["per_result"][0]
    assert 2 * d2["xla_temp_bytes_train_step"] > 1.5 * d1["xla_temp_bytes_train_step"]
    assert d1["peak_mem_method"].startswith("resident rise")


def test_script_profile_says_where_the_time_goes(small_runs):
    _, stdout = small_runs[1]
    assert "### Profile: jax float32 forward + backward" in stdout
    assert "| global stage 1 | backward |" in stdout and "| local layer1 | forward |" in stdout


def test_make_config_takes_the_remat_policy():
    spec = {"image_shape": IMAGE, "crop_shape": CROP, "K": 6, "percent_t": 0.02, "dtype": "float32"}
    assert bc.make_config({**spec, "remat": "global"}).remat == "global"
    assert bc.make_config({**spec, "remat": "none"}).remat == "none"
    assert bc.make_config(spec) == GMICConfig(image_shape=IMAGE, crop_shape=CROP, K=6, percent_t=0.02, dtype="float32")


def test_bad_torch_reference_path_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory_fwd_bwd.py"), *SMALL, "--torch-ref", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert str(tmp_path) in proc.stderr and "src/modeling/gmic.py" in proc.stderr
    assert proc.stdout == ""
    for peers in (["none", "torch_bf16"], ["all", "torch_compile"], ["torch_fp8"]):
        proc = subprocess.run(
            [sys.executable, str(BENCH / "memory_fwd_bwd.py"), *SMALL, "--torch-ref", str(tmp_path)]
            + ["--torch-peers", *peers],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert proc.returncode != 0 and "--torch-peers" in proc.stderr and proc.stdout == "", peers


def test_resident_rise_sees_an_allocation_and_not_its_absence():
    with bc.ResidentRise() as idle:
        pass
    with bc.ResidentRise() as busy:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del block
    # 64 MiB touched: at least 60 MiB resident (the kernel counts pages, the array's header is small).
    assert busy.rise >= 60 * 2**20
    # An empty block: measured 0 bytes in 200 of 200 tries (VmHWM) with jax loaded, on the 2 cores this
    # suite shares with five other test runs; 16 MiB leaves that much headroom for another thread's allocation
    # and stays a quarter of the 64 MiB the check must tell apart.
    assert idle.rise < 16 * 2**20


def test_cpu_identity_reads_the_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    info = bc.cpu_identity()
    assert info["amx"] == any(f.startswith("amx") for f in flags) and info["avx512"] == ("avx512f" in flags)
    assert isinstance(info["family"], int) and isinstance(info["model"], int)
    fake = {
        "name": "Xeon",
        "family": 6,
        "model": 143,
        "amx": True,
        "avx512": True,
        "amx_flags": ["amx_bf16", "amx_tile"],
    }
    assert bc.cpu_name(fake) == "Xeon (family 6 model 143, AVX-512, AMX (amx_bf16, amx_tile))"


def test_timed_runs_keep_each_workers_times_apart_in_abba_order():
    """Two workers of the same implementation and phase (two dtypes) each get their own n runs;
    they once shared one list under the name 'jax/fwd', so both reported the pooled median."""
    calls = []

    class FakeWorker:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def call(self, cmd):
            assert cmd == "run"
            calls.append(self.ms)
            return {"ms": self.ms}

    runs = fwd_bwd_driver.timed_runs(
        [FakeWorker("jax/fwd", 10.0), FakeWorker("jax/fwd", 20.0), FakeWorker("torch/fwd", 30.0)], 3
    )
    assert runs == [[10.0] * 3, [20.0] * 3, [30.0] * 3]
    assert calls == [10, 20, 30] + [10, 20, 30] + [30, 20, 10] + [10, 20, 30]  # warm-up, then ABBA


def _row(impl, dtype, fwd_ms, fwd_bwd_ms, skipped=None):
    row = {**dict.fromkeys(fwd_bwd_report.RESULT_KEYS), "impl": impl, "dtype": dtype, "remat": "none"}
    row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms)
    return {**row, "skipped": skipped} if skipped else row


PEER_ROWS = [
    _row("jax", "float32", 4000.0, 9700.0),
    _row("jax", "bfloat16", 4500.0, 10800.0),
    _row("torch", "float32", 4200.0, 10600.0),
    _row("torch_channels_last", "float32", 2500.0, 7000.0),
    _row("torch_compile_channels_last", "float32", 2900.0, 6200.0),
    _row("torch_compile", "float32", None, None, skipped="torch.compile on CPU (inductor) needs a C++ compiler"),
    _row("torch_bf16", "bfloat16", 2000.0, 5300.0),
    _row("torch_bf16_channels_last", "bfloat16", 1500.0, 3800.0),
]


def test_fastest_peer_is_the_fastest_pytorch_row_of_the_dtype_that_ran():
    by = lambda dtype, key: (tref.fastest_peer(PEER_ROWS, dtype, key) or {}).get("impl")  # noqa: E731
    assert by("float32", "fwd_bwd_ms") == "torch_compile_channels_last"
    assert by("float32", "fwd_ms") == "torch_channels_last"  # each phase has its own fastest row
    assert by("bfloat16", "fwd_bwd_ms") == "torch_bf16_channels_last"
    assert by("float16", "fwd_ms") is None
    # a skipped row never wins, whatever numbers it carries; JAX rows are not peers
    rows = [*PEER_ROWS, _row("torch_compile_bf16_channels_last", "bfloat16", 1.0, 1.0, skipped="no compiler")]
    assert tref.fastest_peer(rows, "bfloat16", "fwd_bwd_ms")["impl"] == "torch_bf16_channels_last"
    assert tref.fastest_peer([_row("jax", "float32", 1.0, 1.0)], "float32", "fwd_ms") is None


def test_like_with_like_names_both_rows_and_compares_within_a_dtype():
    lines = tref.like_with_like(PEER_ROWS)
    assert lines[0] == (
        "forward + backward, jax float32 (9700 ms) against the fastest PyTorch float32, "
        "torch_compile_channels_last float32 (6200 ms): 1.56x; against the original, torch float32 (10600 ms): 0.92x"
    )
    bf16_train = next(line for line in lines if line.startswith("forward + backward, jax bfloat16"))
    assert "torch_bf16_channels_last bfloat16 (3800 ms): 2.84x" in bf16_train
    assert len(lines) == 4  # two JAX rows x two phases


def test_skipped_rows_keep_every_key_and_say_why():
    assert all(map(fwd_bwd_report.has_result_keys, PEER_ROWS))
    assert not fwd_bwd_report.has_result_keys({**PEER_ROWS[0], "extra": 1})
    assert not fwd_bwd_report.has_result_keys(dict(reversed(PEER_ROWS[0].items())))
    assert set(tref.PEERS) >= {"torch", "torch_bf16", "torch_channels_last", "torch_compile"}
    assert tref.peer_dtype("torch_bf16_channels_last") == "bfloat16" and tref.peer_dtype("torch_compile") == "float32"
    assert set(fwd_bwd_driver.TORCH_PEERS) == set(tref.PEERS) - {"torch"}


def _saved(tmp_path, name, scale=1.0, locations=(0, 0)):
    fwd, train = tmp_path / f"{name}_fwd.npz", tmp_path / f"{name}_train.npz"
    out = {k: np.full((4, 2), 0.5 * scale, np.float32) for k in ("y_global", "y_local", "y_fusion", "patch_attns")}
    np.savez(fwd, **out, saliency_map=np.ones((4, 3, 2, 2), np.float32) * scale, patch_locations=np.array(locations))
    np.savez(train, loss=np.float32(2.0 * scale), **{"grad/w": np.ones(3, np.float32) * scale})
    return {"fwd": {"saved": str(fwd)}, "train": {"saved": str(train)}}


def test_each_peer_is_checked_against_the_jax_row_of_its_dtype_and_a_disagreement_shows(tmp_path):
    def entry(impl, dtype, **kw):
        return {"impl": impl, "dtype": dtype, "tag": f"{impl}_{dtype}_none", **_saved(tmp_path, impl + dtype, **kw)}

    entries = [
        entry("jax", "float32"),
        entry("torch", "float32"),
        entry("torch_channels_last", "float32", scale=1.01),  # 1% off: beyond float32's tolerance
        entry("torch_bf16", "bfloat16", locations=(1, 1)),  # another patch: allowed for bfloat16
    ]
    agreement = fwd_bwd_driver.agreements(entries)
    assert agreement["jax_float32_none"]["against"] == "torch_float32_none"
    assert agreement["torch_channels_last_float32_none"]["against"] == "jax_float32_none"
    assert not agreement["torch_channels_last_float32_none"]["forward"]["ok"]
    assert not agreement["torch_channels_last_float32_none"]["training_step"]["ok"]
    # no JAX bfloat16 row: against the original, global outputs only, other patches allowed
    bf16 = agreement["torch_bf16_bfloat16_none"]
    assert bf16["against"] == "torch_float32_none" and not bf16["same_dtype"]
    assert bf16["forward"]["ok"] and not bf16["forward"]["patch_locations_equal"]
    assert agreement["jax_float32_none"]["forward"]["ok"]


def test_torch_profile_attributes_backward_nodes_to_the_part_of_their_forward_op():
    """Fake torch.profiler events (times in us): a backward node goes to the part whose range held
    the forward op of its sequence number; what no part holds is 'other'."""
    from types import SimpleNamespace as NS

    def ev(name, start, end, seq=-1, children=()):
        return NS(
            name=name,
            time_range=NS(start=start, end=end),
            sequence_nr=seq,
            cpu_time_total=end - start,
            cpu_children=list(children),
        )

    bwd = torch_profile._BACKWARD
    events = [
        ev("global stage 0", 0, 4000),
        ev("aten::convolution", 100, 3000, seq=7),
        ev("local layer1", 5000, 6000),
        ev("CompiledFunction", 5100, 5900, seq=9),
        ev("aten::sigmoid", 6500, 6600, seq=11),  # outside every part
        ev(bwd + "CompiledFunctionBackward", 7000, 9000, children=[ev("CompiledFunctionBackward", 7000, 9000, seq=9)]),
        ev(bwd + "ConvolutionBackward0", 9000, 15000, seq=7),
        ev(bwd + "SigmoidBackward0", 15000, 15500, seq=11),
    ]
    parts = torch_profile.by_part(events, wall_ms=20.0)
    assert parts["global stage 0 forward"] == 4.0 and parts["local layer1 forward"] == 1.0
    assert parts["local layer1 backward"] == 2.0 and parts["global stage 0 backward"] == 6.0
    assert parts["other backward"] == 0.5
    assert parts["other"] == 20.0 - 4.0 - 1.0 - 2.0 - 6.0 - 0.5
    assert set(torch_profile.PARTS) >= {"global stem", "global stage 4", "local stem", "local layer4"}


def test_median_spread():
    assert bc.median_spread([3.0, 1.0, 2.0]) == (2.0, 2.0)
    med, iqr = bc.median_spread([1.0, 2.0, 3.0, 4.0, 100.0])
    assert med == 3.0 and iqr == 2.0  # an outlier moves the range, not the interquartile spread


def test_profile_parts():
    assert profile_summary.part_of("jit(f)/transpose(jvp(GMIC))/ds_net/layer_list_3_1/conv2/conv") == "global stage 3"
    assert profile_summary.part_of("jit(f)/jvp(GMIC)/dn_resnet/layer2_0/bn1/sub") == "local layer2"
    assert profile_summary.part_of("jit(f)/GMIC/ds_net/first_conv/conv_general_dilated") == "global stem conv"
    assert profile_summary.part_of("jit(f)/GMIC/attention/mil_attn_U/dot_general") == "attention / heads"
    assert profile_summary.part_of("jit(f)/GMIC/while/body/closed_call/reduce_window_sum") == "retrieve_roi"
    assert profile_summary.part_of("jit(f)/GMIC/vmap(vmap())/gather") == "crop extraction"
    assert profile_summary.part_of("jit(f)/GMIC/top_k") == "top-t pooling"
    assert profile_summary.part_of("jit(loss_fn)/log") == "loss"
    assert profile_summary.part_of("jit(per_device)/transpose(jvp())/neg") == "loss"
    assert profile_summary.part_of("jit(per_device)/jit(_where)/select_n") == "optimizer / update"
    group = profile_summary.part_group  # the roofline's coarser parts
    assert (
        group("jit(f)/GMIC/ds_net/first_conv/conv") == group("jit(f)/GMIC/ds_net/cond/reduce_window") == "global stem"
    )
    assert group("jit(f)/GMIC/ds_net/final_bn/mul") == "global stage 4"
    assert group("jit(f)/GMIC/dn_resnet/layer2_0/bn1/sub") == "local network"
    assert group("jit(f)/GMIC/left_postprocess_net/conv") == group("jit(f)/GMIC/top_k") == "saliency"
    assert group("jit(f)/GMIC/extract_patches/reduce_min") == "ROI and crops"
    assert group("jit(per_device)/transpose(jvp())/neg") == "loss"
    assert group("jit(per_device)/jit(_where)/select_n") == "optimizer"
    assert group("") == group("jit(f)/GMIC/iota") == "other"
    assert profile_summary.part_of("x (from operands)") == "unattributed (no metadata)"
    hlo = """HloModule m
%fused_computation.1 (p0: f32[2], p1: f32[2]) -> f32[2] {
  ROOT %convolution.9 = f32[2]{0} convolution(%p0, %p1), metadata={op_name="jit(f)/GMIC/dn_resnet/layer1_0/conv1/conv"}
}
ENTRY %main (a: f32[2]) -> f32[2] {
  %ynn_fusion.1 = f32[2]{0} fusion(%a, %a), kind=kCustom, calls=%fused_computation.1
  ROOT %copy.2 = f32[2]{0} copy(%ynn_fusion.1)
}
"""
    # an asynchronous op lasts until its 'end:' event; a synchronous one its own duration
    events = [
        {"name": "conv.1", "ts": 0.0, "dur": 5.0},
        {"name": "end: conv.1", "ts": 3000.0, "dur": 1.0},
        {"name": "add.2", "ts": 3001.0, "dur": 2000.0},
        {"name": "conv.1", "ts": 6000.0, "dur": 5.0},
        {"name": "end: conv.1", "ts": 6999.0, "dur": 1.0},
    ]
    assert list(profile_summary.op_durations(events)) == [("conv.1", 3.001), ("add.2", 2.0), ("conv.1", 1.0)]
    instructions = profile_summary.hlo_instructions(hlo)
    assert instructions["ynn_fusion.1"] == ("fusion: convolution", "jit(f)/GMIC/dn_resnet/layer1_0/conv1/conv")
    assert instructions["copy.2"][1].startswith("jit(f)/GMIC/dn_resnet/layer1_0/conv1/conv")  # from its operand


# ----------------------------------------------------------------------------- compile_time.py
def test_compile_time_cold_then_warm_from_the_cache(tmp_path):
    report, stdout = _run_script(
        "compile_time.py",
        [
            "--rounds",
            "1",
            "--image-shape",
            *map(str, IMAGE),
            "--crop-shape",
            *map(str, CROP),
            "--threads",
            str(THREADS),
            "--kinds",
            "miss",
            "hit",
            "serialised",
        ],
        tmp_path,
        "ct",
    )
    runs = {kind: r[0] for kind, r in report["runs"].items()}
    assert [r["compile_cache"] for r in runs.values()] == ["miss", "hit", "serialised"]
    for r in runs.values():
        assert r["total_s"] == pytest.approx(r["trace_s"] + r["lower_s"] + r["compile_s"])
    # The serialised executable was loaded without tracing (that it computes what the traced one
    # did: --check-loaded, and the training loop's own test in tests/test_executable_cache.py).
    assert runs["warm, serialised"]["trace_s"] == 0.0
    # The cache statuses above come from JAX's monitoring events (bc.CompileCacheEvents), not from the
    # clock: the warm run's every lookup was a hit. Whether loading beats compiling is a timing, measured
    # on a quiet machine in benchmarks/RESULTS.md, not asserted on a shared one.
    assert "| warm, cache hit |" in stdout and report["cpu"]["family"] is not None


XLA_TIMER_LOG = """\
I1130 11:39:48.915 1 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_small: simplification
I1130 11:39:48.915 1 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 8 us (8 us) (cumulative: 8 us, max: 8 us, #called: 1)
I1130 11:39:48.915 1 cpu_compiler.cc:1269] Running HLO passes on [jit_small] for CPU time: 2.62 ms (2622 us) (cumulative: 2.62 ms)
I1130 11:39:48.921 1 cpu_compiler.cc:2094] Compiling [jit_small] for CPU using JIT time: 5.84 ms (5838 us) (cumulative: 5.84 ms)
I1130 11:39:49.000 1 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_loss_fn: HLO passes through layout assignment
I1130 11:39:49.001 1 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 1.20 ms (1200 us) (cumulative: 1.2 ms)
I1130 11:39:49.002 1 hlo_pass_pipeline.cc:176] HLO pass: fusion time: 40.0 ms (40000 us) (cumulative: 41.2 ms)
I1130 11:39:49.003 1 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 0.80 ms (800 us) (cumulative: 42 ms)
I1130 11:39:49.100 1 cpu_compiler.cc:1269] Running HLO passes on [jit_loss_fn] for CPU time: 50.0 ms (50000 us) (cumulative: 52.6 ms)
I1130 11:39:52.100 1 cpu_compiler.cc:2094] Compiling [jit_loss_fn] for CPU using JIT time: 3.00 s (3000000 us) (cumulative: 3 s)
"""  # noqa: E501 (XLA's log lines as it writes them)


def test_compile_profile_reads_xla_timers_of_the_largest_module():
    prof = compile_time.xla_compile_profile(XLA_TIMER_LOG)
    assert prof["module"] == "jit_loss_fn"
    assert prof["hlo_passes_s"] == pytest.approx(0.05) and prof["backend_s"] == pytest.approx(3.0)
    assert prof["passes"] == [("fusion", pytest.approx(0.04), 1), ("algsimp", pytest.approx(0.002), 2)]
    with pytest.raises(RuntimeError, match="no XLA compile timers"):
        compile_time.xla_compile_profile("nothing logged\n")


# ----------------------------------------------------------------------------- throughput.py
def test_throughput_against_devices_and_input_rate(tmp_path):
    report, stdout = _run_script("throughput.py", [*SMALL, "--devices", "1", "2", "--steps", "1"], tmp_path, "tp")
    assert [r["devices"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["global_batch_exams"] == r["devices"]
        assert r["compile_s"] > 0 and r["step_ms"] > 0
        assert tuple(r) == tp.RESULT_KEYS and r["compile_cache"] == "off"  # tests turn the cache off
        assert r["exams_per_s"] == pytest.approx(r["global_batch_exams"] / r["step_ms"] * 1e3)
    assert report["input_pipeline"]["exams_per_s"] > 0
    assert report["unit"] == "exam of 4 images" and "| devices |" in stdout
    assert report["cpu"] == bc.cpu_identity() and bc.cpu_name() in report["device"]  # family/model, AMX


def test_throughput_without_the_input_rate():
    """--input-batches 0 measures the step alone (the rendered full-size source is slow); the
    table says so instead of showing a rate."""
    assert tp.main(["--input-batches", "-1"]) == 1
    report = {
        "device": "test",
        "versions": {"jax": "0"},
        "threads": 1,
        "image_shape": [64, 32],
        "unit": bc.UNIT,
        "dtype": "float32",
        "results": [
            {
                "devices": 1,
                "global_batch_exams": 1,
                "compile_s": 1.0,
                "compile_cache": "off",
                "step_ms": 10.0,
                "step_ms_spread": 1.0,
                "exams_per_s": 100.0,
            }
        ],
        "input_pipeline": None,
        "xla_flags": "",
    }
    assert "Input pipeline: not measured (--input-batches 0)" in tp.markdown(report)


# ----------------------------------------------------------------------------- input pipeline
def test_input_pipeline_json_contract(tmp_path):
    """The keys and types other checks read; small windows (the default is 2944 x 1920)."""
    report, stdout = _run_script(
        "input_pipeline.py",
        [
            "--window",
            "128",
            "64",
            "--distinct",
            "4",
            "--images",
            "8",
            "--repeats",
            "2",
            "--workers",
            "0",
            "1",
            "--simulate-step-ms",
            "5",
            "--simulate-steps",
            "12",
            "--simulate-batch",
            "4",
            "--simulate-path",
            "cache_noise",
        ],
        tmp_path,
        "input",
    )
    m = report["machine"]
    assert isinstance(m["cpu_model"], str) and isinstance(m["amx"], bool) and isinstance(m["cpu_family"], int)
    assert [(r["path"], r["workers"]) for r in report["results"]] == [
        (p, w) for p in ("cache", "cache_noise", "png") for w in (0, 1)
    ]
    for r in report["results"]:
        assert set(r) == {"path", "workers", "images", "images_per_s", "processes", "images_per_s_per_core"}
        assert r["images"] == 16 and isinstance(r["images_per_s"], float) and r["images_per_s"] > 0
        assert r["processes"] == r["workers"] + 1 and r["images_per_s_per_core"] == r["images_per_s"] / r["processes"]
    loop = report["loop"]
    assert set(loop) == {"step_ms", "loader_wait_ms", "host_ms", "input_bound"} and loop["step_ms"] == 5
    assert loop["loader_wait_ms"] >= 0 and loop["host_ms"] >= 0 and isinstance(loop["input_bound"], bool)
    # The simulated device step really took its 5 ms in the training loop.
    assert report["details"]["simulation"]["measured_step_ms"] >= 5
    assert "loop (cache_noise, 2 workers" in stdout  # the window-noise path through the training loop


# ----------------------------------------------------------------------------- train_e2e.py
def test_train_e2e_json_contract_and_profile_pass_through(train_env, tmp_path):
    """The real loop on a 128 x 96 window cache (window noise), 2 timed steps, the keys other checks
    read. The model, crops and optimizer are the shared tiny run's (tests/conftest.py TINY_RUN_ARGS)
    and so is the compilation cache (train_env): whichever of the two compiles the step first, the
    other loads it."""
    from conftest import TINY_RUN_ARGS

    tiny_step = [a for a in TINY_RUN_ARGS if a.startswith(("--config.model.", "--config.optimizer."))]
    tiny_step = [a for a in tiny_step if not a.startswith("--config.model.image_shape")]
    out = tmp_path / "e2e.json"
    args = ["--window", "128", "96", "--config", "configs/synthetic_tiny.py", *tiny_step, "--steps", "2"]
    args += ["--dtype", "float32", "--exams-per-device", "1", "--profile-steps", "2:3"]
    args += ["--workdir", str(tmp_path / "runs"), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "train_e2e.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=train_env,
    )
    assert proc.returncode == 0, f"train_e2e.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] == bc.cpu_identity() and report["machine"]["versions"]["jax"] == jax.__version__
    [row] = report["results"]
    assert tuple(row)[: len(train_e2e.RESULT_KEYS)] == train_e2e.RESULT_KEYS
    assert (row["dtype"], row["exams_per_device"], row["devices"], row["remat"]) == ("float32", 1, 1, "none")
    assert row["steps"] == 2 and row["fits"] is True and row["batch_size"] == 4
    for key in ("exams_per_s", "step_ms", "compile_s", "device_step_ms"):
        assert _finite_number(row[key]) and row[key] > 0, key
    assert row["loader_wait_ms"] >= 0 and isinstance(row["input_bound"], bool)
    timed = [t for t in row["step_times"] if t["step"] > 1]
    assert [t["step"] for t in row["step_times"]] == [1, 2, 3]  # the first (compiling) step, then the timed ones
    seconds = sum(t["loader_wait_s"] + t["step_s"] + t["host_s"] for t in timed)  # rounded to the microsecond
    assert row["exams_per_s"] == pytest.approx(2 / seconds, rel=1e-3)
    assert row["compile_s"] == pytest.approx(row["step_times"][0]["step_s"], abs=1e-5)
    assert row["compiled_temp_bytes"] > 0  # the persistent cache is on: the step's compiled memory is read
    assert report["details"]["data"]["cache_images"] == 4 and report["details"]["window"] == [128, 96]
    [xplane] = (tmp_path / "runs" / "float32_e1_d1_remat-none" / "profile").glob("plugins/profile/*/*.xplane.pb")
    assert xplane.stat().st_size > 0
    assert "| float32 | 1 | 1 | none | 2 |" in proc.stdout
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
    assert train_e2e_worker.out_of_memory(oom) and not train_e2e_worker.out_of_memory(ValueError("shape mismatch"))
    # A configuration that did not fit: a row of its own, the error and the compiled bytes in the table.
    no_fit = {k: None for k in train_e2e.RESULT_KEYS} | {"dtype": "bfloat16", "exams_per_device": 4, "devices": 1}
    no_fit |= {"remat": "none", "steps": 0, "fits": False, "error": f"XlaRuntimeError: {oom}"}
    table = train_e2e.markdown({**report, "results": [row, no_fit | {"compiled_temp_bytes": 2**30}]})
    assert "| bfloat16 | 4 | 1 | none | 0 | - | - (-) | - | - | - | - | - | - | 1024 | False |" in table
    assert "bfloat16_e4_d1_remat-none: XlaRuntimeError: RESOURCE_EXHAUSTED" in table


# ----------------------------------------------------------------------------- side by side (local)
@pytest.mark.skipif(
    not os.environ.get("GMIC_TORCH_REF"),
    reason="needs a checkout of the original release: set GMIC_TORCH_REF=/path (not in CI)",
)
def test_side_by_side_with_the_original(tmp_path):
    report, stdout = _run_script(
        "memory_fwd_bwd.py",
        [*SMALL, "--n-runs", "1", "--percent-t", "0.1", "--torch-ref", os.environ["GMIC_TORCH_REF"]]
        + ["--torch-peers", "torch_bf16", "torch_channels_last"],
        tmp_path,
        "sbs",
    )
    jax_r, torch_r, bf16_r, cl_r = report["results"]
    assert [r["impl"] for r in report["results"]] == ["jax", "torch", "torch_bf16", "torch_channels_last"]
    assert [r["dtype"] for r in (bf16_r, cl_r)] == ["bfloat16", "float32"]
    for r in (torch_r, bf16_r, cl_r):
        assert tuple(r) == fwd_bwd_report.RESULT_KEYS and r["params"] == jax_r["params"]
        assert all(_finite_number(r[k]) for k in fwd_bwd_report.RESULT_KEYS[3:-1]), r
    agreement = report["details"]["agreement"]
    assert (
        agreement["jax_float32_none"]["forward"]["ok"]
        and agreement["jax_float32_none"]["forward"]["patch_locations_equal"]
    )
    assert agreement["jax_float32_none"]["training_step"]["loss_rel_err"] < 1e-4
    cl = agreement["torch_channels_last_float32_none"]
    assert cl["against"] == "jax_float32_none" and cl["forward"]["ok"] and cl["training_step"]["ok"]
    bf16 = agreement["torch_bf16_bfloat16_none"]  # no JAX bfloat16 row: against the original
    assert bf16["against"] == "torch_float32_none" and bf16["forward"]["ok"]
    assert "jax float32 / torch" in stdout and "torch_channels_last float32 / torch" in stdout
    assert "against the fastest PyTorch float32, torch" in stdout
    assert set(report["details"]["workers_memory"]["train"]) == {
        r["impl"] + "_" + r["dtype"] + "_none" for r in report["results"]
    }


# ----------------------------------------------------------------------------- plots.py
def test_time_against_size_draws_each_measured_row(tmp_path):
    import plots

    def report(h, w, jax_ms, skipped=None):
        torch_row = {"impl": "torch_compile", "dtype": "float32", "fwd_ms": None, "fwd_bwd_ms": None}
        torch_row.update(skipped=skipped) if skipped else torch_row.update(fwd_ms=2 * jax_ms, fwd_bwd_ms=6 * jax_ms)
        jax_row = {"impl": "jax", "dtype": "float32", "remat": "none", "fwd_ms": jax_ms, "fwd_bwd_ms": 3 * jax_ms}
        return {"image_shape": [h, w], "results": [jax_row, torch_row]}

    reports = {1.0: report(2000, 1000, 1000.0), 0.5: report(1000, 1000, 400.0, skipped="no compiler")}
    png = tmp_path / "t.png"
    lines = plots.time_against_size(reports, png)
    assert lines["jax float32"] == [(1.0, 0.4, 1.2), (2.0, 1.0, 3.0)]  # sorted by megapixels, seconds per exam
    assert lines["torch_compile float32"] == [(2.0, 2.0, 6.0)]  # the skipped row is not a point
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
