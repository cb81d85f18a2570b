"""Where a compiled step spends its time: a `jax.profiler` trace of a few calls,
each traced XLA operation's time put in a class by what the compiled HLO says
it computes, summed per class and per operation.

`profile_calls` traces a warmed-up call and `summarize` sums the trace;
`classify` puts a fusion in the first of `CLASSES` it contains (a convolution
with its BatchNorm epilogue is the convolution); `control` is left out of the
sums. `rsjax bench steps --profile` adds this to every train step it times, on
CPU (XLA:CPU's thunks) and on accelerators (the device's "XLA Ops" line).
docs/benchmarks.md (section "How `--profile` classifies time") says what each
class holds and how its seconds add up.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Callable, Iterable, Mapping, NamedTuple, Optional

CLASSES = ("convolution/matmul", "pooling", "reduction", "concatenate", "copy/transpose",
           "elementwise", "other")
CONTROL = "control"
_BY_OPCODE = (
    ("convolution/matmul", {"convolution", "dot", "custom-call"}),
    ("pooling", {"reduce-window", "select-and-scatter"}),
    ("reduction", {"reduce", "all-reduce", "reduce-scatter"}),
    ("concatenate", {"concatenate"}),
)
_MOVES = {"copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice",
          "dynamic-update-slice", "pad", "broadcast", "parameter", "constant",
          "get-tuple-element", "tuple", "iota", "reverse", "gather", "scatter"}
_CONTROL_OPS = {"while", "call", "conditional", "async-start", "async-done"}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)")


class Instruction(NamedTuple):
    opcode: str
    called: list        # the computations it calls (fused, loop bodies, reducers)
    shape: str          # its result type, layout left out: "f32[4,256,256,64]"
    op_name: str        # the JAX operation it came from, when XLA kept it


def _split_type(rhs: str) -> tuple[str, str]:
    """(result type, rest) of an instruction's right-hand side: a tuple type
    may hold spaces and /*index*/ comments."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[:i + 1], rhs[i + 1:]
    head, _, rest = rhs.partition(" ")
    return head, " " + rest


def _instruction(rhs: str) -> Instruction:
    shape, rest = _split_type(rhs)
    match = re.match(r"\s*([a-z][\w\-]*)\(", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    return Instruction(match.group(1) if match else "", _CALLED.findall(rest),
                       re.sub(r"\{[^}]*\}", "", shape), op_name.group(1) if op_name else "")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instructions, computations) of an HLO module's text:
    instructions {name: Instruction},
    computations {name: [instruction names]}."""
    instructions: dict = {}
    computations: dict = {}
    current: Optional[list] = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and " = " not in line.split("(", 1)[0]:
            current = computations.setdefault(head.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, rhs = match.groups()
            instructions[name] = _instruction(rhs)
            current.append(name)
    return instructions, computations


def _opcodes_within(name: str, instructions: Mapping, computations: Mapping,
                    seen: Optional[set] = None) -> set:
    """Every opcode an instruction runs, through the computations it calls."""
    seen = set() if seen is None else seen
    opcode, called = instructions[name][:2] if name in instructions else ("", [])
    found = {opcode}
    for comp in called:
        if comp in seen:
            continue
        seen.add(comp)
        for inner in computations.get(comp, ()):
            found |= _opcodes_within(inner, instructions, computations, seen)
    return found


def classify(name: str, instructions: Mapping, computations: Mapping) -> str:
    """The class of one traced operation (docs/benchmarks.md, "How `--profile` classifies time")."""
    if name not in instructions:
        return "other"
    opcode = instructions[name][0]
    if opcode in _CONTROL_OPS:
        return CONTROL
    ops = _opcodes_within(name, instructions, computations) - {"fusion"}
    for cls, members in _BY_OPCODE:
        if ops & members:
            return cls
    if ops and ops <= _MOVES | {""}:
        return "copy/transpose"
    return "elementwise"


def traced_operations(trace_dir: str) -> list[tuple[str, float]]:
    """(HLO operation name, seconds) of every XLA operation in the trace: on an
    accelerator the device planes' "XLA Ops" lines, on CPU the host threads'
    thunks (events that carry an `hlo_op` stat)."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        return []
    data = ProfileData.from_file(files[-1])
    device_planes = [p for p in data.planes if p.name.startswith("/device:")
                     and any(line.name == "XLA Ops" for line in p.lines)]
    out = []
    if device_planes:
        for plane in device_planes:
            for line in plane.lines:
                if line.name == "XLA Ops":
                    out += [(e.name, e.duration_ns / 1e9) for e in line.events]
        return out
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for e in line.events:
                if e.duration_ns <= 0:
                    continue
                stats = dict(e.stats)
                if "hlo_op" in stats:
                    out.append((str(stats["hlo_op"]), e.duration_ns / 1e9))
    return out


def summarize(events: Iterable[tuple[str, float]], hlo_text: str, steps: int,
              wall_seconds: float, top: int = 15, per_class: int = 5) -> dict:
    """Per-step seconds by class, the `top` operations and the `per_class`
    heaviest of each class, from the trace's events."""
    instructions, computations = parse_hlo(hlo_text)
    by_op = collections.Counter()
    for name, seconds in events:
        by_op[name] += seconds
    class_of = {name: classify(name, instructions, computations) for name in by_op}
    by_class = collections.Counter({c: 0.0 for c in CLASSES})
    unknown = 0
    for name, seconds in by_op.items():
        if class_of[name] == CONTROL:
            continue
        unknown += name not in instructions
        by_class[class_of[name]] += seconds
    total = sum(by_class.values())
    per_step = lambda s: round(s / steps, 4)
    ranked = by_op.most_common()            # heaviest first, sorted once

    def row(name: str, seconds: float) -> list:
        # [name, class, seconds per step, result shape, the JAX operation it came from]
        return [name, class_of[name], per_step(seconds),
                *(instructions[name][2:] if name in instructions else ("", ""))]
    return {
        "traced_steps": steps,
        "wall_seconds_per_step": per_step(wall_seconds),
        "op_seconds_per_step": per_step(total),
        "seconds_per_step_by_class": {c: per_step(by_class[c]) for c in CLASSES},
        "share_by_class": {c: round(by_class[c] / total, 3) if total else None for c in CLASSES},
        "top_operations": [row(name, s) for name, s in ranked[:top]],
        # The heaviest few of each class: the convolutions crowd the top list,
        # and what is left outside them is where a conv-bound step can still gain.
        "top_by_class": {c: [row(name, s) for name, s in ranked
                             if class_of[name] == c][:per_class] for c in CLASSES},
        "operations_not_in_the_hlo": unknown,
    }


def profile_calls(call: Callable[[], object], hlo_text: str, steps: int = 1,
                  trace_dir: Optional[str] = None) -> dict:
    """Traces `steps` calls of `call` (each waits for its result) and summarizes
    them. `call` must already be compiled and warmed up."""
    import jax

    with tempfile.TemporaryDirectory(prefix="rsjax_trace_") as tmp:
        directory = trace_dir or tmp
        jax.profiler.start_trace(directory)
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(call())
            wall = time.perf_counter() - t0
        finally:
            jax.profiler.stop_trace()
        events = traced_operations(directory)
    return summarize(events, hlo_text, steps, wall)
