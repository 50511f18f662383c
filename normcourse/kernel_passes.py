"""Count the passes over memory in the C++ that torch.compile (inductor) generates for a layer.

A normalization layer is memory-bound (see the performance appendix): its time is set by how many
times it reads and writes tensors of the input's size. Inductor's CPU backend turns a forward or
backward graph into one C++ ``kernel`` function made of loop nests; each outermost loop nest that
touches a tensor-sized array is one pass over memory. This module compiles a function, captures
that source (``torch._inductor.utils.run_and_get_code``) and lists its passes:

    >>> passes = compiled_passes(run, numel=x.numel())     # doctest: +SKIP
    >>> [str(p) for p in passes]                           # doctest: +SKIP
    ['forward: loops 256 (by 8) > 2 x 4096; reads 1, writes 0 (a reduction)', ...]

An access is tensor-sized when the loop variables in its index span ``numel`` values together:
``in_ptr0 + (x0 + 256L*x1)`` inside ``x0 < 256``, ``x1 < 4096`` touches all 4096 * 256 elements,
``in_ptr2[x0]`` only 256 of them (a per-channel vector). Written against the C++ of torch 2.13's
inductor; a test checks the counts on batch norm, so a torch that writes its loops differently
fails there rather than here in silence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from normcourse.benchmarking import variant_runs

# `for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(4096L); x1+=static_cast<int64_t>(8L))`
_FOR = re.compile(r"for\s*\(\s*int64_t\s+(\w+)\s*=\s*static_cast<int64_t>\((-?\d+)L\);\s*\1\s*<\s*"
                  r"static_cast<int64_t>\((\d+)L\);\s*\1\s*\+=\s*static_cast<int64_t>\((\d+)L\)\)")
# `in_ptr0 + static_cast<int64_t>(x0 + 256L*x1)` (vector load or store) or `out_ptr0[static_cast<int64_t>(x0)]`
_ACCESS = re.compile(r"\b((?:in_out|in|out)_ptr\d+)\s*(\+|\[)\s*static_cast<int64_t>\(([^;]*?)\)\s*(\]|,|\))")
_STORE_BEFORE = re.compile(r"\.store\(\s*$")
_ASSIGNED_AFTER = re.compile(r"^\]\s*=[^=]")


@dataclass
class Pass:
    """One outermost loop nest of a generated kernel that touches tensor-sized arrays."""

    direction: str  # "forward" or "backward"
    loops: tuple[tuple[int, int, int], ...]  # (extent, step, depth) of each loop, in source order
    reads: tuple[str, ...]  # the tensor-sized arrays it loads (inductor's pointer names)
    writes: tuple[str, ...]  # the tensor-sized arrays it stores

    def __str__(self) -> str:
        kind = "" if self.writes else " (a reduction)"
        return (f"{self.direction}: loops {self.loop_structure()}; reads {len(self.reads)}, "
                f"writes {len(self.writes)}{kind}")

    def loop_structure(self) -> str:
        """The nest as ``outer > inner``; ``2 x 4096``: two sweeps of 4096 one after the other
        inside each outer step (e.g. a block of columns read for the mean, then the variance)."""
        levels: dict[int, list] = {}
        for extent, step, depth in self.loops:
            levels.setdefault(depth, []).append(f"{extent} (by {step})" if step > 1 else f"{extent}")
        parts = []
        for _, loops in sorted(levels.items()):
            same = len(set(loops)) == 1
            parts.append(f"{len(loops)} x {loops[0]}" if same and len(loops) > 1
                         else loops[0] if same else ", ".join(loops))
        return " > ".join(parts)


def _kernel_bodies(source: str) -> list[str]:
    """The bodies of the ``extern "C" void kernel(...)`` functions in one generated module."""
    bodies = []
    for match in re.finditer(r'extern\s+"C"\s+void\s+\w+\s*\([^)]*\)\s*\{', source):
        depth, start = 1, match.end()
        for i in range(start, len(source)):
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            if depth == 0:
                bodies.append(source[start:i])
                break
    return bodies


def memory_passes(body: str, numel: int, direction: str = "forward") -> list[Pass]:
    """The passes over memory of one kernel body: its outermost loop nests with an access whose
    index spans ``numel`` elements, in the order the kernel runs them."""
    passes = []
    # scan the braces, keeping the loops open at each point: (variable, extent, step, depth)
    open_loops, depth, pending, nest = [], 0, None, None
    tokens = re.finditer(r"\{|\}|" + _FOR.pattern + "|" + _ACCESS.pattern, body)
    for token in tokens:
        text = token.group(0)
        if text == "{":
            depth += 1
            if pending is not None:  # the brace that opens the for's body
                open_loops.append(pending + (depth,))
                pending = None
        elif text == "}":
            while open_loops and open_loops[-1][3] == depth:
                open_loops.pop()
            if not open_loops and nest is not None:
                passes.append(nest)
                nest = None
            depth -= 1
        elif text.startswith("for"):
            var, _, extent, step = _FOR.match(text).groups()
            pending = (var, int(extent), int(step))
            if not open_loops:
                nest = {"loops": [], "reads": [], "writes": []}
            nest["loops"].append((int(extent), int(step), len(open_loops)))
        elif open_loops and nest is not None:
            pointer, _, index, _ = _ACCESS.match(text).groups()
            extents = {v: n for v, n, _, _ in open_loops}
            span = math.prod(n for v, n in extents.items() if re.search(rf"\b{v}\b", index))
            if span < numel:
                continue
            before, after = body[max(0, token.start() - 12):token.start()], body[token.end() - 1:]
            stored = _STORE_BEFORE.search(before) or _ASSIGNED_AFTER.match(after)
            kind = "writes" if stored else "reads"
            if pointer not in nest[kind]:
                nest[kind].append(pointer)
    return [Pass(direction, tuple(n["loops"]), tuple(n["reads"]), tuple(n["writes"]))
            for n in passes if n["reads"] or n["writes"]]


def compiled_passes(run, numel: int) -> list[Pass]:
    """Passes over memory of everything inductor generates while ``run()`` executes.

    ``run`` calls a freshly ``torch.compile``-d function and, for a training step, backpropagates
    through it: the first kernel is the forward pass, the second the backward pass.
    """
    from torch._inductor.utils import run_and_get_code

    _, sources = run_and_get_code(run)
    passes = []
    for number, source in enumerate(sources):
        direction = "forward" if number == 0 else "backward"
        for body in _kernel_bodies(source):
            passes += memory_passes(body, numel, direction)
    return passes


def tensor_transfers(passes) -> int:
    """Tensor-sized reads plus writes over all passes: 5 is the least a normalization layer's
    forward plus backward can do (read x, write y; read dy and x, write dx)."""
    return sum(len(p.reads) + len(p.writes) for p in passes)


def layer_passes(layer: str, shape) -> list[Pass]:
    """The passes of the compiled closed-form Function for one of the benchmark's layers and
    shapes (the benchmark's ``compiled`` run), on the CPU, forward then backward."""
    run = variant_runs(layer, shape, torch.device("cpu"))["compiled"]
    return compiled_passes(run, math.prod(shape))
