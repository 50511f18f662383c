"""What the compiled variant does: its passes over memory and its fixed cost per call.

Usage::

    python benchmarks/compiled.py               # CPU, one thread; writes results/compiled_cpu.json
    python benchmarks/compiled.py --out DIR     # where the JSON goes (the book reads book/data)
    python benchmarks/compiled.py --layers batch_norm,layer_norm

For every memory-bound layer and benchmark shape it compiles the closed-form Function with
inductor and counts the passes over memory in the generated C++ (``normcourse.kernel_passes``:
exact, the same on every run of one torch version). Then it times each variant on a 2x4 input and
on 256x512, side by side (``benchmarking.fixed_cost_per_call``): the part of a call's time that
does not depend on the data. A script, not a test: run the timing on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from normcourse.benchmarking import (
    MEMORY_BOUND, SHAPES, applies, cpu_name, fixed_cost_per_call, format_fixed_cost,
)
from normcourse.kernel_passes import layer_passes, tensor_transfers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--layers", default=",".join(MEMORY_BOUND),
                        help=f"comma-separated layers (default: {','.join(MEMORY_BOUND)})")
    parser.add_argument("--quick", action="store_true", help="short timed blocks (a smoke run)")
    args = parser.parse_args(argv)
    layers = [name for name in args.layers.split(",") if name]
    unknown = set(layers) - set(MEMORY_BOUND)
    if unknown:
        parser.error(f"--layers: {', '.join(sorted(unknown))} not among {', '.join(MEMORY_BOUND)}")
    torch.set_num_threads(1)
    device = torch.device("cpu")

    rows = []
    for layer in layers:
        for shape_name, shape in SHAPES:
            if not applies(layer, shape):
                continue
            passes = layer_passes(layer, shape)
            rows.append({"layer": layer, "shape": shape_name, "transfers": tensor_transfers(passes),
                         "passes": [asdict(p) for p in passes]})
            print(f"{layer:<13} {shape_name:<18} {len(passes)} passes, "
                  f"{rows[-1]['transfers']} tensor transfers")
            for p in passes:
                print(f"    {p}")
    fixed = fixed_cost_per_call(device, layers=[n for n in ("batch_norm", "layer_norm") if n in layers],
                                quick=args.quick)
    print(format_fixed_cost(fixed))
    report = {"device": "cpu", "machine": cpu_name(), "threads": 1,
              "torch": torch.__version__, "passes": rows, "fixed_cost": fixed}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "compiled_cpu.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
