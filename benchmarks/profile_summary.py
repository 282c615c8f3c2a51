"""Where the time of a compiled GMIC program goes: a JAX profiler trace summed by part of the model.

`summarize(logdir, hlo_text)` reads the trace that `jax.profiler.trace(logdir,
create_perfetto_trace=True)` wrote around one execution, maps every XLA op event to its HLO
instruction (and through the instruction's `op_name` metadata to the Flax module that emitted it),
and returns markdown: time by part of the model and pass (forward / backward), then the slowest ops.
Times are summed over threads (and asynchronous ops overlap others), so parts can add up to more
than the wall time.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s=\s.*?([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
COMPUTATION_HEAD = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_WRAPPERS = ("ThunkExecutor", "$")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (opcode, op_name metadata)} of an HLO module's text. A fusion without
    metadata of its own takes that of the convolution or dot inside it, else of its root."""
    out, calls, operands, computations = {}, {}, {}, collections.defaultdict(list)
    current = None
    for line in hlo_text.splitlines():
        head = COMPUTATION_HEAD.match(line)
        if head:
            current = head.group(1)
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        op_name = _OP_NAME.search(line)
        name, opcode, op_name = m.group(1), m.group(2), op_name.group(1) if op_name else ""
        out[name] = (opcode, op_name)
        if current is not None:
            computations[current].append((opcode, op_name, line.lstrip().startswith("ROOT")))
        called = _CALLS.search(line)
        if called:
            calls[name] = called.group(1)
        args = line.split(" = ", 1)[1].split("calls=")[0].split("metadata=")[0]
        operands[name] = _OPERAND.findall(args)
    for name, (opcode, op_name) in out.items():
        if name not in calls:
            continue
        inner = computations.get(calls[name], [])
        main = [o for o, _, _ in inner if o in ("convolution", "dot")] or [o for o, _, root in inner if root]
        if main:
            opcode = f"{opcode}: {main[0]}"
            out[name] = (opcode, op_name)
        if op_name:
            continue
        pick = (
            [n for o, n, _ in inner if o in ("convolution", "dot") and n]
            or [n for _, n, root in inner if root and n]
            or [n for _, n, _ in inner if n]
        )
        if pick:
            out[name] = (opcode, pick[0])
    # XLA drops the metadata of some rewritten ops (weight-gradient convolutions): take it from
    # their operands, preferring one of the backward pass.
    for _ in range(3):
        for name, (opcode, op_name) in list(out.items()):
            if op_name:
                continue
            sources = [out[o][1] for o in operands.get(name, ()) if o in out and out[o][1]]
            sources.sort(key=lambda n: "transpose(" not in n)
            if sources:
                source = sources[0].removesuffix(" (from operands)")
                out[name] = (opcode, source + " (from operands)")
    return out


# Name-stack entries that wrap a module's ops without being a module: jax.checkpoint (remat), the
# per-platform kernel choice (cond branches, the CPU kernels' scope), lifted functions.
_WRAPPERS_IN_PATH = re.compile(
    r"^(checkpoint|rematted_computation|remat\d*|cond|branch_\d+_fun|cpu_kernel|jit|"
    r"[\w.]*<locals>[\w.<>]*|(ds_net|dn_resnet)\.\w+|)$"
)


def _module_path(path: list[str], net: str) -> list[str]:
    """The module names below the last `net` entry of a name stack, wrappers left out."""
    last = len(path) - 1 - path[::-1].index(net)
    return [p for p in path[last + 1 :] if not _WRAPPERS_IN_PATH.match(p)]


def part_of(op_name: str) -> str:
    """Part of GMIC an op belongs to, from its op_name ('jit(f)/transpose(jvp(GMIC))/ds_net/...')."""
    path = re.sub(r"[a-z_]+\(|\)", "", op_name).split("/")
    if "ds_net" in path:
        sub = _module_path(path, "ds_net")
        head = sub[0] if sub else ""
        m = re.match(r"layer_list_(\d+)_\d+", head)
        if m:
            return f"global stage {m.group(1)}"
        return {"first_conv": "global stem conv", "final_bn": "global final BN"}.get(head, "global stem pool / other")
    if "dn_resnet" in path:
        sub = _module_path(path, "dn_resnet")
        head = sub[0] if sub else ""
        m = re.match(r"(layer\d+)_\d+", head)
        if m:
            return f"local {m.group(1)}"
        return {"conv1": "local stem conv", "bn1": "local stem BN"}.get(head, "local pool / mean")
    if "left_postprocess_net" in path:
        return "saliency head"
    if any(p in path for p in ("attention", "classifier_linear", "fusion_dnn")):
        return "attention / heads"
    if "/" not in op_name:
        return "unattributed (no metadata)"
    if "GMIC" not in path:
        # Outside the model: the loss is differentiated (under jvp / transpose) or is a function of
        # its own named loss*; the rest of a training step (gradient norm, Adam, the non-finite
        # guard's selects) follows the backward pass.
        if "jvp(" in op_name or "transpose(" in op_name or any(p.startswith("loss") for p in path):
            return "loss"
        return "optimizer / update"
    # Functions outside modules: a named scope when the model sets one, else what they lower to.
    if "retrieve_roi" in path or "while" in path:
        return "retrieve_roi"
    if "extract_patches" in path or "vmap(" in op_name:
        return "crop extraction"
    if "top_k" in path:
        return "top-t pooling"
    return "other model glue"


# The coarser parts of a roofline (benchmarks/roofline.py), in the model's order, and which of
# `part_of`'s parts each holds. The final BN + ReLU of the global network follows stage 4; top-t
# pooling turns the saliency maps into the global prediction.
PART_GROUPS = {
    "global stem": ("global stem conv", "global stem pool / other"),
    **{f"global stage {s}": (f"global stage {s}",) for s in range(4)},
    "global stage 4": ("global stage 4", "global final BN"),
    "saliency": ("saliency head", "top-t pooling"),
    "ROI and crops": ("retrieve_roi", "crop extraction"),
    "local network": (
        "local stem conv",
        "local stem BN",
        "local pool / mean",
        *(f"local layer{i}" for i in range(1, 5)),
    ),
    "heads": ("attention / heads",),
    "loss": ("loss",),
    "optimizer": ("optimizer / update",),
    "other": ("other model glue", "unattributed (no metadata)"),
}
_GROUP_OF = {part: group for group, parts in PART_GROUPS.items() for part in parts}


def part_group(op_name: str) -> str:
    """The roofline part (a key of PART_GROUPS) of an op, from its op_name."""
    return _GROUP_OF.get(part_of(op_name), "other")


def trace_events(logdir: Path) -> list[dict]:
    files = sorted(Path(logdir).rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"{logdir}: no *.trace.json.gz written by the profiler")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def op_durations(events: list[dict]):
    """(name, ms) per executed op. XLA:CPU runs some ops (library convolutions) asynchronously:
    the op's event covers only the launch and an 'end: NAME' event marks completion, so such an
    op lasts from its start to the end of its k-th 'end:' event."""
    ends = collections.defaultdict(list)
    for e in events:
        if e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e)
    for queue in ends.values():
        queue.sort(key=lambda e: e["ts"])
    seen = collections.Counter()
    for e in sorted(events, key=lambda e: e["ts"]):
        name = e["name"]
        if name.startswith("end: "):
            continue
        k = seen[name]
        seen[name] += 1
        dur = e["dur"]
        if k < len(ends.get(name, ())):
            end = ends[name][k]
            dur = max(dur, end["ts"] + end["dur"] - e["ts"])
        yield name, dur / 1e3


def summarize(logdir, hlo_text: str, top: int = 12) -> str:
    instructions = hlo_instructions(hlo_text)
    by_part: dict[tuple[str, str], float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    wall = 0.0
    for name, ms in op_durations(trace_events(Path(logdir))):
        if name.startswith("ThunkExecutor::Execute") and "wait" in name:
            wall = max(wall, ms)
        if name.startswith(_WRAPPERS) or name not in instructions:
            continue
        _, op_name = instructions[name]
        direction = "backward" if "transpose(" in op_name else "forward"
        by_part[(part_of(op_name), direction)] += ms
        by_op[name] += ms
    total = sum(by_part.values())
    if not total:
        return "(no XLA op events in the trace)"
    lines = [
        f"Wall time of the traced execution: {wall:.0f} ms; XLA ops summed over threads: {total:.0f} ms.",
        "",
        "| part | pass | ms | share |",
        "|---|---|---:|---:|",
    ]
    for (part, direction), ms in sorted(by_part.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {direction} | {ms:.1f} | {100 * ms / total:.1f}% |")
    lines += ["", "| slowest ops | HLO | emitted by | ms |", "|---|---|---|---:|"]
    for name, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        opcode, op_name = instructions[name]
        lines.append(f"| {name} | {opcode} | {op_name[:90]} | {ms:.1f} |")
    return "\n".join(lines)
