"""A roofline of GMIC's compiled GPU programs, computed without a GPU from a deviceless compile.

    python benchmarks/roofline.py --deviceless h100 --dtype bfloat16 float32 --json h100.json
    python benchmarks/roofline.py --deviceless h100 --dtype bfloat16 --plot docs/roofline_h100.png

Compiles for the target (benchmarks/deviceless.py; needs jaxlib's CUDA plugin) the training step
the training loop runs (`gmic_jax.train.step.make_train_step`: forward, backward, pmean over the
one-device 'data' mesh, Adam of `gmic_jax.train.state.make_optimizer`, the non-finite guard;
loss beta = 0 as benchmarks/throughput.py, which measured it), the forward in inference mode and,
with --phases fwd_bwd, forward + backward without the update (`DevicelessRunner`'s programs, the
ones memory_fwd_bwd.py times), then reads the optimised HLO (`compiled.as_text()`). Every instruction
that launches work is a kernel: fusions, custom calls (cuDNN convolutions, cuBLAS gemms), copies,
sorts, scatters, reduces, ...; parameter, tuple, get-tuple-element, bitcast, constant and the
'-done' halves of asynchronous pairs launch nothing, and a while / call / conditional is replaced
by the kernels of the computations it runs. Per kernel:

* bytes = operand bytes + result bytes (tuples summed). This is the traffic of reading each input
  once and writing each output once: a fusion that reads a slice of an operand, or updates a
  buffer in place, is charged the whole buffer; L2 reuse between kernels is not credited.
* FLOPs: a convolution (HLO convolution or cuDNN custom call; the custom calls keep the forward
  convolution's window and labels) is 2 x output elements x kernel spatial size x input features
  per group = 2 |y| |w| / (output features), with y and w the forward convolution's output and
  filter (for the backward-input call, y is the incoming gradient; for backward-filter, w is the
  result). A dot / cuBLAS gemm is 2 x result elements x contracted size. Elementwise work: 1 FLOP
  per result element of every arithmetic instruction (add, multiply, exp, compare, select, ...;
  data movement such as convert, broadcast, transpose, slice, gather counts 0); a reduce counts its
  input elements, a reduce-window its output elements x window size, a scatter its update
  elements, a select-and-scatter its operand plus source elements, a sort n log2 n per row, each
  times the arithmetic instructions of the applied computation. Fusions sum what they contain.
* a kernel in a while body counts times the loop's `known_trip_count` (backend_config); where XLA
  gives none it counts once and the kernel says `trip_count: null`. Each conditional branch
  counts once (an upper bound).
* peak: a kernel with a convolution or dot runs all its FLOPs at the tensor-core rate of its input
  dtype (bf16/f16: bf16 tensor; f32 at the default precision: TF32 tensor, XLA's default on GPU;
  precision=highest: FP32); everything else at the FP32 non-tensor rate. Rates and bandwidth are
  the card's public peaks, benchmarks/gpu_targets/peaks.json (sources there).
* bound = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth); memory-bound when the bytes term wins.
* part: the instruction's op_name (the Flax module path) through `profile_summary.part_group`.

The program's bound is the sum of its kernels' bounds (taking them as run one after another, as
on one stream; none beats its roofline), so a measured runtime divided by it says how far the
program is from this limit (launch gaps, cuDNN algorithms, occupancy). Everything reported - bound_ms, bytes and
FLOPs, per program and per kernel - is per exam (4 images): the batch's value / batch_exams.

--json OUT: {"target", "device", "versions", "peaks", "unit", "results": [{"target", "phase",
"dtype", "remat", "batch_exams", "image_shape", "bound_ms", "memory_bound_share", "by_part",
"arg_bytes", "temp_bytes", "kernels": [{"name", "part", "bytes", "flops", "bound_ms", "kind",
"peak", "memory_bound", "trip_count", "op_name"}, ...]}]} (largest bound first). --plot PNG draws
compiled memory and bound per exam against exams per batch and image size (benchmarks/plots.py).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the gmic_jax of this checkout

import bench_common as bc  # noqa: E402
import deviceless  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import plots  # noqa: E402
import profile_summary  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from gmic_jax import init_variables  # noqa: E402
from gmic_jax.config import REMAT_POLICIES  # noqa: E402
from gmic_jax.train.state import TrainState, make_optimizer  # noqa: E402
from gmic_jax.train.step import DATA_AXIS, make_train_step  # noqa: E402

PEAKS_FILE = deviceless.BENCH_DIR / "gpu_targets" / "peaks.json"
RESULT_KEYS = ("target", "phase", "dtype", "remat", "batch_exams", "bound_ms", "memory_bound_share", "kernels")
KERNEL_KEYS = ("name", "part", "bytes", "flops", "bound_ms")
PAPER_SHAPE = (2944, 1920)
SIDE_MULTIPLE = 32  # image sides of --image-scale are rounded to this (the model itself takes any size)

NO_LAUNCH = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "add-dependency"}
ARITHMETIC = set(
    "add subtract multiply divide remainder power atan2 maximum minimum and or xor not negate abs sign "
    "exponential exponential-minus-one log log-plus-one logistic sqrt rsqrt cbrt tanh sine cosine tan "
    "floor ceil round-nearest-afz round-nearest-even compare select clamp erf is-finite".split()
)
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s=\s(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]")
_APPLIED = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
    r"(?:\{([^}]*)\}|%?([\w.\-]+))"
)


# ============================================================================ HLO text -> kernels
def _arrays(type_text: str) -> list[tuple[str, list[int]]]:
    """(dtype, dims) of every array in a shape's text (one, or a tuple's elements)."""
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(type_text)]


def _bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _arrays(type_text):
        bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
        total += math.prod(dims) * bits // 8
    return total


def _elements(type_text: str) -> int:
    return sum(math.prod(dims) for _, dims in _arrays(type_text))


def parse_module(hlo_text: str):
    """({computation: [instruction]}, entry name, {instruction name: instruction}); an instruction
    is a dict: name, type (result shape text), opcode, operands (names), attrs (the rest)."""
    computations, by_name, current, entry = collections.defaultdict(list), {}, None, None
    for line in hlo_text.splitlines():
        head = profile_summary.COMPUTATION_HEAD.match(line)
        if head and " = " not in line:
            current = head.group(1)
            entry = current if line.lstrip().startswith("ENTRY") else entry
            continue
        m = INSTRUCTION.match(line)
        if not m or current is None:
            continue
        rest, depth = m.group(4), 1
        for i, ch in enumerate(rest):  # the operand list ends at the matching parenthesis
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        ins = {
            "name": m.group(1),
            "type": m.group(2),
            "opcode": m.group(3),
            "operands": re.findall(r"%([\w.\-]+)", rest[:i]),
            "attrs": rest[i + 1 :],
        }
        computations[current].append(ins)
        by_name[ins["name"]] = ins
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry, by_name


def _applied(ins: dict, key: str) -> list[str]:
    found = [listed or one for k, listed, one in _APPLIED.findall(ins["attrs"]) if k == key]
    return [c.strip().lstrip("%") for v in found for c in v.split(",")]


def _conv_flops(out_type: str, filter_type: str, attrs: str) -> int:
    """2 |y| |w| / output features: 2 x output elements x kernel spatial size x input features per group."""
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    [(_, w)] = _arrays(filter_type)[:1]
    o = labels.group(1).index("o") if labels else len(w) - 1
    return 2 * _first_elements(out_type) * math.prod(w) // max(w[o], 1)


def _first_elements(type_text: str) -> int:
    """Elements of the first array of a shape (a cuDNN call's result is (output, workspace))."""
    return math.prod(_arrays(type_text)[0][1]) if _arrays(type_text) else 0


class HloProgram:
    """Counts FLOPs of instructions of one parsed module (memoised per applied computation)."""

    def __init__(self, hlo_text: str):
        self.computations, self.entry, self.by_name = parse_module(hlo_text)
        self.op_names = profile_summary.hlo_instructions(hlo_text)

    def shape(self, name: str) -> str:
        return self.by_name[name]["type"] if name in self.by_name else ""

    def arithmetic(self, computation: str) -> int:
        return max(1, sum(i["opcode"] in ARITHMETIC for i in self.computations.get(computation, ())))

    def flops(self, ins: dict) -> tuple[int, str | None]:
        """(FLOPs, tensor dtype or None): the dtype of the first convolution / dot's input."""
        op, attrs, ops = ins["opcode"], ins["attrs"], ins["operands"]
        if op == "convolution" or (op == "custom-call" and "__cudnn$conv" in attrs):
            y, w = ins["type"], self.shape(ops[1])
            if "BackwardInput" in attrs:
                y = self.shape(ops[0])
            elif "BackwardFilter" in attrs:
                y, w = self.shape(ops[1]), ins["type"]
            return _conv_flops(y, w, attrs), self._tensor_dtype(ops[0], attrs)
        if op == "dot" or (op == "custom-call" and re.search(r"__cublas|gemm", attrs)):
            dims = re.search(r'lhs_contracting_dim\w*"?[=:]\{?\[?([\d",\s]*)', attrs)
            lhs = _arrays(self.shape(ops[0]))[0][1]
            k = math.prod(lhs[int(d)] for d in re.findall(r"\d+", dims.group(1))) if dims else 1
            return 2 * _first_elements(ins["type"]) * k, self._tensor_dtype(ops[0], attrs)
        if op in ("fusion", "call"):
            total, tensor = 0, None
            for inner in self.computations.get((_applied(ins, "calls") or _applied(ins, "to_apply"))[0], ()):
                f, t = self.flops(inner)
                total, tensor = total + f, tensor or t
            return total, tensor
        applied = _applied(ins, "to_apply")
        per = self.arithmetic(applied[0]) if applied else 1
        if op == "reduce":
            return _elements(self.shape(ops[0])) * per, None
        if op == "reduce-window":
            window = re.search(r"size=([\dx]+)", attrs)
            size = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
            return _elements(ins["type"]) * size * per, None
        if op == "scatter":
            return _elements(self.shape(ops[-1])) * per, None
        if op == "select-and-scatter":
            return _elements(self.shape(ops[0])) + _elements(self.shape(ops[1])), None
        if op == "sort":
            dims = _arrays(self.shape(ops[0]))[0][1] or [1]
            n = dims[int(re.search(r"dimensions=\{(\d+)", attrs).group(1))] if "dimensions=" in attrs else dims[-1]
            return _elements(self.shape(ops[0])) * max(1, math.ceil(math.log2(max(n, 2)))), None
        return (_elements(ins["type"]) if op in ARITHMETIC else 0), None

    def _tensor_dtype(self, lhs: str, attrs: str) -> str:
        if re.search(r"operand_precision[^}\]]*highest", attrs, re.I):
            return "f32 highest"
        arrays = _arrays(self.shape(lhs))
        return arrays[0][0] if arrays else "f32"

    def kernels(self) -> list[dict]:
        out = []

        def walk(computation: str, times: int, trip):
            for ins in self.computations.get(computation, ()):
                op = ins["opcode"]
                if op in NO_LAUNCH or op.endswith("-done"):
                    continue
                if op == "while":
                    n = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins["attrs"])
                    n = int(n.group(1)) if n else None
                    for c in _applied(ins, "body") + _applied(ins, "condition"):
                        walk(c, times * (n or 1), n)
                elif op == "call":
                    walk(_applied(ins, "to_apply")[0], times, trip)
                elif op == "conditional":
                    branches = _applied(ins, "branch_computations")
                    for c in branches or _applied(ins, "true_computation") + _applied(ins, "false_computation"):
                        walk(c, times, trip)
                else:
                    out.append(self.kernel(ins, times, trip))

        walk(self.entry, 1, 1)
        return out

    def kernel(self, ins: dict, times: int, trip) -> dict:
        flops, tensor = self.flops(ins)
        nbytes = sum(_bytes(self.shape(o)) for o in ins["operands"]) + _bytes(ins["type"])
        target = re.search(r'custom_call_target="([^"]+)"', ins["attrs"])
        kind = re.search(r"kind=(k\w+)", ins["attrs"])
        label = ins["opcode"] + (f" {target.group(1)}" if target else "") + (f" {kind.group(1)}" if kind else "")
        tensor_peaks = {"bf16": "bf16_tensor_flops", "f16": "bf16_tensor_flops", "f32": "tf32_tensor_flops"}
        peak = tensor_peaks.get(tensor if flops else None, "fp32_flops")  # 'f32 highest': FP32
        op_name = self.op_names.get(ins["name"], ("", ""))[1]
        out = dict(
            name=ins["name"], part=profile_summary.part_group(op_name), bytes=nbytes * times, flops=flops * times
        )
        return {**out, "kind": label, "peak": peak, "trip_count": trip, "op_name": op_name}


def hlo_kernels(hlo_text: str) -> list[dict]:
    """The kernels of an optimised GPU HLO module's text with their bytes, FLOPs, peak and part."""
    return HloProgram(hlo_text).kernels()


def roofline(kernels: list[dict], peaks: dict, per: int = 1) -> dict:
    """Bound of every kernel and of the program (their sum), per `per` exams: {"bound_ms",
    "memory_bound_share", "by_part": {part: ms}, "kernels": [...] largest bound first}."""
    rows = []
    for k in kernels:
        compute_s = k["flops"] / peaks[k["peak"]]
        memory_s = k["bytes"] / peaks["hbm_bytes_per_s"]
        bound_ms, memory_bound = max(compute_s, memory_s) * 1e3 / per, memory_s >= compute_s
        rows.append({**k, "bytes": k["bytes"] / per, "flops": k["flops"] / per, "bound_ms": bound_ms})
        rows[-1]["memory_bound"] = memory_bound
    rows.sort(key=lambda r: -r["bound_ms"])
    total = sum(r["bound_ms"] for r in rows)
    by_part = collections.Counter()
    for r in rows:
        by_part[r["part"]] += r["bound_ms"]
    return {
        "bound_ms": total,
        "memory_bound_share": sum(r["bound_ms"] for r in rows if r["memory_bound"]) / total if total else 0.0,
        "by_part": {p: by_part[p] for p in profile_summary.PART_GROUPS if p in by_part},
        "kernels": rows,
    }


# ============================================================================ compile and report
def scaled_shape(scale: float) -> tuple[int, int]:
    """The paper's image with `scale` times its pixels: both sides times sqrt(scale), rounded to a
    multiple of SIDE_MULTIPLE."""
    return tuple(max(SIDE_MULTIPLE, round(s * math.sqrt(scale) / SIDE_MULTIPLE) * SIDE_MULTIPLE) for s in PAPER_SHAPE)


def compile_program(config: dict) -> dict:
    """Deviceless compile of the training step (config phase 'train') or the forward ('fwd') on the
    target's one-device 'data' mesh: {"hlo", "arg_bytes", "temp_bytes", "compile_s"} (of the batch)."""
    target, batch_exams = config["target"], config["batch_exams"]
    spec = {**config, "deviceless": target, "image_shape": list(config["image_shape"])}
    spec.update(crop_shape=[256, 256], K=6, percent_t=0.02)
    t0 = time.perf_counter()
    if config["phase"] in ("fwd", "fwd_bwd"):
        runner = deviceless.DevicelessRunner({**spec, "phase": "fwd" if config["phase"] == "fwd" else "train"})
        compiled = runner.fn.lower(*runner.args).compile()
    else:
        cfg, mesh = bc.make_config(spec), deviceless.target_mesh(target)
        replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        tx = make_optimizer({"learning_rate": 1e-5}, total_steps=1)
        v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
        step, rng = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32)
        state = TrainState(step, v["params"], v["batch_stats"], jax.eval_shape(tx.init, v["params"]), rng)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
        n = bc.IMAGES_PER_EXAM * batch_exams
        batch = {
            "image": jax.ShapeDtypeStruct((n, *cfg.image_shape, 1), jnp.float32, sharding=split),
            "label": jax.ShapeDtypeStruct((n, 2), jnp.float32, sharding=split),
        }
        compiled = make_train_step(cfg, tx, mesh, beta=0.0).lower(state, batch).compile()
    mem, compile_s = compiled.memory_analysis(), time.perf_counter() - t0
    out = dict(hlo=compiled.as_text(), arg_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes)
    jax.clear_caches()
    return {**out, "compile_s": compile_s}


def result(config: dict, compiled: dict, peaks: dict) -> dict:
    """One program's roofline in the JSON contract (RESULT_KEYS first; per exam)."""
    n = config["batch_exams"]
    line = roofline(hlo_kernels(compiled["hlo"]), peaks, per=n)
    out = {**{k: config[k] for k in RESULT_KEYS[:5]}, **{k: line[k] for k in RESULT_KEYS[5:]}}
    out.update(image_shape=list(config["image_shape"]), by_part=line["by_part"], compile_s=compiled["compile_s"])
    return {**out, "arg_bytes": compiled["arg_bytes"] / n, "temp_bytes": compiled["temp_bytes"] / n}


def markdown(report: dict, top: int = 15) -> str:
    lines = [f"Target: {report['device']}; per {report['unit']}; a bound, not a runtime", ""]
    lines += ["| phase | dtype | remat | exams/batch | image | bound (ms/exam) | memory-bound | GiB/exam compiled |"]
    lines += ["|---|---|---|---:|---|---:|---:|---:|"]
    for r in report["results"]:
        gib, (h, w) = (r["arg_bytes"] + r["temp_bytes"]) / 2**30, r["image_shape"]
        lines.append(
            f"| {r['phase']} | {r['dtype']} | {r['remat']} | {r['batch_exams']} | {h}x{w} "
            f"| {r['bound_ms']:.2f} | {100 * r['memory_bound_share']:.0f}% | {gib:.3f} |"
        )
    for r in report["results"]:
        lines += ["", f"### {r['phase']}, {r['dtype']}, remat {r['remat']}, {r['batch_exams']} exam(s) per batch", ""]
        lines += ["| kernel | kind | part | MB | GFLOP | bound (ms) | bound by |", "|---|---|---|---:|---:|---:|---|"]
        for k in r["kernels"][:top]:
            lines.append(
                f"| {k['name']} | {k['kind'][:48]} | {k['part']} | {k['bytes'] / 1e6:.1f} | {k['flops'] / 1e9:.2f} "
                f"| {k['bound_ms']:.3f} | {'memory' if k['memory_bound'] else 'compute'} |"
            )
        lines += ["", "| part | bound (ms) | share |", "|---|---:|---:|"]
        lines += [f"| {p} | {ms:.3f} | {100 * ms / r['bound_ms']:.1f}% |" for p, ms in r["by_part"].items()]
    return "\n".join(lines)


def make_report(target: str, peaks: dict, results: list[dict], kernels_variant: str) -> dict:
    return {
        "target": target,
        "device": f"{peaks['name']} (deviceless compile for {deviceless.TARGETS[target].name})",
        "versions": bc.versions(extra=bc.GPU_PACKAGES),
        "host_cpu": bc.cpu_name(),
        "peaks": peaks,
        "unit": bc.UNIT,
        "kernels_variant": kernels_variant,
        "results": results,
    }


def configs(args) -> list[dict]:
    """Each phase per dtype, batch, image scale and remat policy (the forward: 'none' only)."""
    out = []
    for dtype, batch, scale, phase in itertools.product(args.dtype, args.batch_exams, args.image_scale, args.phases):
        base = dict(target=args.deviceless, dtype=dtype, batch_exams=batch, image_shape=scaled_shape(scale))
        out += [dict(base, phase=phase, remat=r) for r in (["none"] if phase == "fwd" else args.remat)]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deviceless", required=True, choices=sorted(deviceless.TARGETS), help="GPU target")
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["bfloat16"], help="[bfloat16]")
    p.add_argument("--remat", nargs="+", choices=tuple(REMAT_POLICIES), default=["none"], help="[none]")
    p.add_argument(
        "--phases", nargs="+", choices=("fwd", "fwd_bwd", "train"), default=["fwd", "train"], help="[fwd train]"
    )
    p.add_argument("--batch-exams", type=int, nargs="+", default=[1], help="exams (4 images) per batch [1]")
    p.add_argument("--image-scale", type=float, nargs="+", default=[1.0], help="times the paper's pixels [1]")
    p.add_argument("--kernels", choices=("auto", "cpu", "xla"), default="auto", help="gmic_jax.models.fast_ops [auto]")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the report there [off]")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw cost against work (data: PNG.json) [off]")
    p.add_argument("--plot-remat", nargs="+", default=["none", "global_stem", "all"], help="lines of --plot")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    env = {**deviceless.WORKER_ENV, "GMIC_JAX_KERNELS": args.kernels}
    if any(os.environ.get(k) != v for k, v in env.items()):  # read when JAX starts: run again with them
        os.execve(
            sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], {**os.environ, **env}
        )
    if not deviceless.plugin_available():
        print(f"roofline: error: {deviceless.PLUGIN_MISSING}", file=sys.stderr)
        return 1
    peaks = json.loads(PEAKS_FILE.read_text())[args.deviceless]
    results = []
    for config in configs(args):
        print(f"[roofline] compiling {config} ...", file=sys.stderr, flush=True)
        results.append(result(config, compile_program(config), peaks))
    report = make_report(args.deviceless, peaks, results, args.kernels)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(args, peaks)
    return 0


def plot(args, peaks: dict) -> None:
    """Compiled memory and bound per exam of the training step (bf16 unless one --dtype says
    otherwise) against exams per batch (1 2 4 8) and image size (0.5 1 1.5 2 x the paper's pixels)."""
    dtype = args.dtype[0]
    series = collections.defaultdict(list)
    points = [(b, 1.0) for b in (1, 2, 4, 8)] + [(1, s) for s in (0.5, 1.5, 2.0)]
    for remat in args.plot_remat:
        for batch, scale in points:
            print(f"[roofline plot] {remat} batch {batch} scale {scale} ...", file=sys.stderr, flush=True)
            config = dict(target=args.deviceless, phase="train", dtype=dtype, remat=remat, batch_exams=batch)
            config["image_shape"] = scaled_shape(scale)
            r = result(config, compile_program(config), peaks)
            memory_gib = (r["arg_bytes"] + r["temp_bytes"]) / 2**30
            series[remat].append(
                dict(batch_exams=batch, image_scale=scale, bound_ms=r["bound_ms"], memory_gib=memory_gib)
            )
    plots.cost_against_work(dict(series), args.plot, title=f"{peaks['name']}, training step, {dtype} (deviceless)")
    Path(args.plot).with_suffix(".json").write_text(json.dumps(series, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
