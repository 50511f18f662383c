"""Page faults per forward+backward call of the eager variants, with and without heap trimming.

Usage::

    python benchmarks/page_faults.py               # one thread; writes results/page_faults_cpu.json
    python benchmarks/page_faults.py --out DIR     # where the JSON goes (the book reads book/data)
    python benchmarks/page_faults.py --layers batch_norm --shapes "fc 4096x256"

Every layer and shape is measured in two fresh processes (so that no case inherits another's
heap): one with glibc's default allocator settings, one with ``GLIBC_TUNABLES`` set to
``normcourse.page_faults.KEEP_FREED_MEMORY``, which keeps freed memory in the process. See
``normcourse/page_faults.py`` for why that matters. Linux with glibc only. A script, not a test:
the times depend on the machine's load (the fault counts do not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from normcourse.benchmarking import SHAPES, cpu_name, make_cases
from normcourse.page_faults import (
    KEEP_FREED_MEMORY, format_page_faults, glibc_version, os_cost_per_call,
)

LAYERS = ("batch_norm", "layer_norm", "batch_renorm")  # the eager table of the appendix
SETTINGS = {"default": None, "keep_freed": KEEP_FREED_MEMORY}


def measure_case(layer: str, shape_name: str) -> dict:
    """In this process: the allocator settings it runs with and, for native, function and
    autograd, ``os_cost_per_call``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    runs, _, _ = make_cases(layer, dict(SHAPES)[shape_name], torch.device("cpu"))
    return {"glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "variants": {variant: os_cost_per_call(run) for variant, run in runs.items()}}


def in_fresh_process(layer: str, shape_name: str, tunables: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, __file__, "--case", layer, shape_name], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--shapes", default=",".join(name for name, _ in SHAPES))
    parser.add_argument("--case", nargs=2, metavar=("LAYER", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # a child: one case, JSON on stdout
        print(json.dumps(measure_case(*args.case)))
        return
    if glibc_version() is None:  # said, not failed: make benchmark runs this on every system
        print("page_faults.py: the allocator settings it compares are glibc's (Linux); this "
              "system's C library is another: nothing measured", file=sys.stderr)
        return
    layers, shapes = args.layers.split(","), args.shapes.split(",")
    for value, known, what in ((layers, LAYERS, "layer"), (shapes, dict(SHAPES), "shape")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    rows = []
    for layer in layers:
        for shape_name in shapes:
            row = {"layer": layer, "shape": shape_name}
            for setting, tunables in SETTINGS.items():
                row[setting] = in_fresh_process(layer, shape_name, tunables)
            rows.append(row)
            header, *lines = format_page_faults([row]).splitlines()
            print("\n".join(lines if len(rows) > 1 else [header, *lines]), flush=True)
    report = {"device": "cpu", "machine": cpu_name(), "threads": 1, "torch": torch.__version__,
              "glibc": glibc_version(), "keep_freed_memory": KEEP_FREED_MEMORY, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "page_faults_cpu.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
