"""What a compiled XLA GPU program holds, from its text: cuDNN convolution calls, fusions, host
transfers, and the buffers live at the memory peak attributed to the parts of GMIC.

Pure text processing (no JAX, no GPU), so tests run it on a small GPU HLO text checked into
tests/. Inputs are what XLA writes: the optimized HLO module (`compiled.as_text()`) and, under
`xla_dump_to`, its buffer assignment (`*-buffer-assignment.txt`: every allocation and the values
packed into it at fixed offsets) and live ranges (`*-live-range.txt`: each value's first and last
position in the schedule). The peak is reconstructed from both; the dump's own "Live ranges at N
(peak)" section is not used: it misses most of what the temporary allocation holds.
"""

from __future__ import annotations

import collections
import re

import profile_summary

_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_HOST_MEMORY = re.compile(r"\{[^{}]*S\(5\)[^{}]*\}")  # layouts in host memory space (S(5))
_HOST_OPCODES = {"infeed", "outfeed", "send", "recv", "send-done", "recv-done"}
_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <\d+ ([\w.\-]+(?:\{[\d,]*\})?) @\d+> \(size=(\d+),offset=(\d+)\)")
_RANGE = re.compile(r"^\s+([\w.\-]+\{[\d,]*\}):(\d+)-(\d+)$", re.M)
CUDNN_PREFIX = "__cudnn$conv"


def _instruction_lines(hlo_text: str):
    """(name, opcode, line) of every instruction of the module text."""
    for line in hlo_text.splitlines():
        m = profile_summary.INSTRUCTION.match(line)
        if m:
            yield m.group(1), m.group(2), line


def program_counts(hlo_text: str) -> dict:
    """cuDNN convolution calls (total and by kind), fusions, custom-call targets and host
    transfers (infeed/outfeed/send/recv, host callbacks, buffers in host memory) of a module."""
    cudnn: collections.Counter = collections.Counter()
    custom_calls: collections.Counter = collections.Counter()
    fusions = 0
    host = []
    for name, opcode, line in _instruction_lines(hlo_text):
        if opcode == "fusion":
            fusions += 1
        if opcode == "custom-call":
            target = _CUSTOM_CALL_TARGET.search(line)
            target = target.group(1) if target else "?"
            custom_calls[target] += 1
            if target.startswith(CUDNN_PREFIX):
                cudnn[target[len(CUDNN_PREFIX) :]] += 1
            if "callback" in target.lower() or "host" in target.lower():
                host.append(f"{name}: custom-call {target}")
        if opcode in _HOST_OPCODES:
            host.append(f"{name}: {opcode}")
        elif _HOST_MEMORY.search(line.split(" = ", 1)[1].split("metadata=")[0]):
            host.append(f"{name}: {opcode} in host memory")
    return {
        "cudnn_convs": sum(cudnn.values()),
        "cudnn_by_kind": dict(sorted(cudnn.items())),
        "fusions": fusions,
        "custom_calls": dict(sorted(custom_calls.items())),
        "host_transfers": host,
    }


def buffer_allocations(buffer_assignment_text: str) -> list[dict]:
    """Allocations of XLA's buffer-assignment dump: index, size, kind ('parameter', 'temp',
    'output' for maybe-live-out / output, 'constant', 'thread-local') and their values
    [(value, size, offset)], a value named 'instruction{index}'."""
    allocations = []
    for line in buffer_assignment_text.splitlines():
        m = _ALLOCATION.match(line)
        if m:
            flags = m.group(3)
            kind = (
                "parameter"
                if "parameter" in flags
                else "temp"
                if "preallocated-temp" in flags
                else "output"
                if ("live-out" in flags or "output shape" in flags)
                else "constant"
                if "constant" in flags
                else "thread-local"
            )
            allocations.append({"index": int(m.group(1)), "size": int(m.group(2)), "kind": kind, "values": []})
            continue
        v = _VALUE.match(line)
        if v and allocations:
            name = v.group(1) if v.group(1).endswith("}") else v.group(1) + "{}"
            allocations[-1]["values"].append((name, int(v.group(2)), int(v.group(3))))
    return allocations


def live_ranges(live_range_text: str) -> dict[str, tuple[int, int]]:
    """{value: (first, last) position in the schedule} from XLA's live-range dump."""
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in _RANGE.finditer(live_range_text)}


def _union(chunks) -> int:
    total, end = 0, -1
    for lo, hi in sorted(chunks):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def temp_peak(buffer_assignment_text: str, live_range_text: str) -> dict:
    """When the temporary allocation is fullest, and with what: XLA packs the program's
    temporaries into one allocation at fixed offsets; at each schedule position the bytes in use
    are the union of the live values' [offset, offset + size) (values sharing bytes are aliases).
    Returns {'position', 'bytes' (in use at the peak), 'allocation_bytes' (the allocation; the
    rest is packing slack), 'argument_bytes', 'chunks': [(value, bytes)] largest first}."""
    allocations = buffer_allocations(buffer_assignment_text)
    ranges = live_ranges(live_range_text)
    temps = [a for a in allocations if a["kind"] == "temp"]
    if not temps:
        raise ValueError("no preallocated-temp allocation in the buffer-assignment dump")
    values = [(name, size, offset) for a in temps for name, size, offset in a["values"] if size and name in ranges]
    if not values:
        raise ValueError("no live range for any temporary value: are the dumps of the same module?")
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for value in values:
        first, last = ranges[value[0]]
        starts[first].append(value)
        ends[last + 1].append(value)
    live: collections.Counter = collections.Counter()
    best_bytes, best_position = -1, 0
    for position in sorted(set(starts) | set(ends)):
        for _, size, offset in ends.get(position, ()):
            live[(offset, offset + size)] -= 1
        for _, size, offset in starts.get(position, ()):
            live[(offset, offset + size)] += 1
        live = +live  # drop chunks no longer live
        in_use = _union(live)
        if in_use > best_bytes:
            best_bytes, best_position = in_use, position
    chunks: dict[tuple[int, int], str] = {}
    for name, size, offset in values:
        first, last = ranges[name]
        if first <= best_position <= last:
            chunks.setdefault((offset, offset + size), name)
    named = sorted(((name, hi - lo) for (lo, hi), name in chunks.items()), key=lambda kv: -kv[1])
    return {
        "position": best_position,
        "bytes": best_bytes,
        "allocation_bytes": sum(a["size"] for a in temps),
        "argument_bytes": sum(a["size"] for a in allocations if a["kind"] == "parameter"),
        "chunks": named,
    }


def attribute_peak(buffer_assignment_text: str, live_range_text: str, hlo_text: str) -> dict:
    """`temp_peak` with each live temporary attributed to the part of GMIC and the pass (forward
    / backward) of the instruction that produced it; totals by part."""
    peak = temp_peak(buffer_assignment_text, live_range_text)
    instructions = profile_summary.hlo_instructions(hlo_text)
    rows, by_part = [], collections.Counter()
    for value, size in peak["chunks"]:
        name = value.split("{", 1)[0]
        opcode, op_name = instructions.get(name, ("?", ""))
        part = profile_summary.part_of(op_name)
        direction = "backward" if "transpose(" in op_name else "forward"
        rows.append({"buffer": value, "bytes": size, "part": part, "pass": direction, "op_name": op_name})
        by_part[(part, direction)] += size
    return {
        **{k: v for k, v in peak.items() if k != "chunks"},
        "buffers": rows,
        "by_part": [{"part": p, "pass": d, "bytes": b} for (p, d), b in by_part.most_common()],
    }


def peak_markdown(peak: dict, per: int = 1, top_parts: int = 8, top_buffers: int = 6) -> str:
    """Markdown of `attribute_peak`'s result, bytes divided by `per` (exams)."""

    def mib(b):
        return f"{b / per / 2**20:.0f}"

    lines = [
        f"Temporaries in use at the peak: {mib(peak['bytes'])} MiB per exam of a {mib(peak['allocation_bytes'])} "
        f"MiB temporary allocation (the rest: XLA's packing); arguments {mib(peak['argument_bytes'])} MiB",
        "",
        "| part | pass | MiB per exam |",
        "|---|---|---:|",
    ]
    lines += [f"| {r['part']} | {r['pass']} | {mib(r['bytes'])} |" for r in peak["by_part"][:top_parts]]
    lines += ["", "| largest buffers | part | pass | MiB per exam |", "|---|---|---|---:|"]
    lines += [
        f"| {r['buffer']} | {r['part']} | {r['pass']} | {mib(r['bytes'])} |" for r in peak["buffers"][:top_buffers]
    ]
    return "\n".join(lines)
