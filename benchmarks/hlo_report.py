"""What a compiled XLA GPU program holds, from its text: cuDNN convolution calls, fusions, host
transfers, and the buffers live at the memory peak attributed to the parts of GMIC.

Pure text processing (no JAX, no GPU), so tests run it on a small GPU HLO text checked into
tests/. Inputs are what XLA writes: the optimized HLO module (`compiled.as_text()`) and the
live-range dump of its buffer assignment (`*-live-range.txt` under `xla_dump_to`), whose
"Live ranges at N (peak)" section lists every buffer live at the peak with its size.
"""
from __future__ import annotations

import collections
import re

import profile_summary

_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_HOST_MEMORY = re.compile(r"\{[^{}]*S\(5\)[^{}]*\}")  # layouts in host memory space (S(5))
_HOST_OPCODES = {"infeed", "outfeed", "send", "recv", "send-done", "recv-done"}
_PEAK = re.compile(r"^\s*Live ranges at (\d+) \(peak\):\s*$")
_LIVE = re.compile(r"^\s*([\w.\-]+)\{[\d,\s]*\}: (\d+) bytes")
CUDNN_PREFIX = "__cudnn$conv"
ARGUMENTS = "arguments (parameters, images)"


def _instruction_lines(hlo_text: str):
    """(name, opcode, line) of every instruction of the module text."""
    for line in hlo_text.splitlines():
        m = profile_summary._INSTR.match(line)
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
                cudnn[target[len(CUDNN_PREFIX):]] += 1
            if "callback" in target.lower() or "host" in target.lower():
                host.append(f"{name}: custom-call {target}")
        if opcode in _HOST_OPCODES:
            host.append(f"{name}: {opcode}")
        elif _HOST_MEMORY.search(line.split(" = ", 1)[1].split("metadata=")[0]):
            host.append(f"{name}: {opcode} in host memory")
    return {"cudnn_convs": sum(cudnn.values()), "cudnn_by_kind": dict(sorted(cudnn.items())), "fusions": fusions,
            "custom_calls": dict(sorted(custom_calls.items())), "host_transfers": host}


def peak_live_buffers(live_range_text: str) -> tuple[int, list[tuple[str, int]]]:
    """(schedule position of the peak, [(instruction, bytes)]) from XLA's live-range dump. A tuple
    value's elements are summed into their instruction."""
    lines = live_range_text.splitlines()
    for i, line in enumerate(lines):
        m = _PEAK.match(line)
        if m:
            break
    else:
        raise ValueError("no 'Live ranges at N (peak):' section in the live-range dump")
    sizes: dict[str, int] = collections.defaultdict(int)
    for line in lines[i + 1:]:
        live = _LIVE.match(line)
        if not live:
            break
        sizes[live.group(1)] += int(live.group(2))
    return int(m.group(1)), sorted(sizes.items(), key=lambda kv: -kv[1])


def attribute_peak(live_range_text: str, hlo_text: str) -> dict:
    """The buffers live at the peak, each with the part of GMIC and the pass (forward / backward)
    that produced it; totals by part. Parameters are the program's arguments."""
    position, buffers = peak_live_buffers(live_range_text)
    instructions = profile_summary.hlo_instructions(hlo_text)
    rows, by_part = [], collections.Counter()
    for name, size in buffers:
        opcode, op_name = instructions.get(name, ("?", ""))
        if opcode == "parameter":
            part, direction = ARGUMENTS, ""
        else:
            part = profile_summary.part_of(op_name)
            direction = "backward" if "transpose(" in op_name else "forward"
        rows.append({"buffer": name, "bytes": size, "part": part, "pass": direction, "op_name": op_name})
        by_part[(part, direction)] += size
    return {"position": position, "peak_bytes": sum(size for _, size in buffers), "buffers": rows,
            "by_part": [{"part": p, "pass": d, "bytes": b} for (p, d), b in by_part.most_common()]}


def peak_markdown(peak: dict, per: int = 1, top_parts: int = 8, top_buffers: int = 6) -> str:
    """Markdown of `attribute_peak`'s result, bytes divided by `per` (exams)."""
    mib = lambda b: f"{b / per / 2**20:.0f}"
    lines = [f"Live at the peak: {mib(peak['peak_bytes'])} MiB per exam (arguments included)", "",
             "| part | pass | MiB per exam |", "|---|---|---:|"]
    lines += [f"| {r['part']} | {r['pass'] or '-'} | {mib(r['bytes'])} |" for r in peak["by_part"][:top_parts]]
    lines += ["", "| largest buffers | part | pass | MiB per exam |", "|---|---|---|---:|"]
    lines += [f"| {r['buffer']} | {r['part']} | {r['pass'] or '-'} | {mib(r['bytes'])} |"
              for r in peak["buffers"][:top_buffers]]
    return "\n".join(lines)
