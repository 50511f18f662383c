"""Benchmark the normalization layers: forward+backward time and memory, as ratios to torch.

Usage::

    python benchmarks/run.py                 # CPU, one thread; CUDA too when a GPU is present
    python benchmarks/run.py --device cuda   # one device only (cuda without a GPU: an error)
    python benchmarks/run.py --quick         # fewer repetitions, no torch.compile (a smoke run)
    python benchmarks/run.py --out DIR       # where the JSON, the markdown table and the plot go
    python benchmarks/run.py --layers layer_norm,group_norm   # some layers only (names: LAYERS)

What is measured and how: see ``normcourse/benchmarking.py``. This is a script, not a test:
timings depend on the machine and on its load, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import matplotlib

matplotlib.use("Agg")  # files only: no window

from normcourse.benchmarking import (
    LAYERS,
    benchmark_devices,
    cpu_name,
    format_rms_versus_layer_norm,
    markdown_table,
    measure_bandwidth,
    plot_ratios,
    rms_versus_layer_norm,
    run_benchmarks,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="few repetitions, no torch.compile")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="cpu, cuda (default: cpu, and cuda if present)")
    parser.add_argument("--layers", action="append",
                        help=f"comma-separated layers to measure, repeatable (default: all of "
                             f"{', '.join(LAYERS)})")
    args = parser.parse_args(argv)
    asked = {name for names in args.layers or [",".join(LAYERS)] for name in names.split(",") if name}
    if asked - set(LAYERS):
        parser.error(f"--layers: unknown layer {', '.join(sorted(asked - set(LAYERS)))}; "
                     f"choose from {', '.join(LAYERS)}")
    layers = [name for name in LAYERS if name in asked]  # the report's order

    torch.set_num_threads(args.threads)
    try:
        devices, note = benchmark_devices(args.device)
    except ValueError as error:
        parser.error(str(error))
    print(f"# {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in devices:
        device = torch.device(name)
        machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
        bandwidth = measure_bandwidth(device)
        print(f"# {name}: {machine}, {args.threads} thread(s), copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}")
        results = run_benchmarks(device, args.quick, layers=layers)
        # chapter 8: what dropping layer norm's re-centring saves (operation counts and time)
        rms_rows = rms_versus_layer_norm(device, quick=args.quick)
        rms_table = format_rms_versus_layer_norm(rms_rows)
        print("# RMSNorm vs LayerNorm, forward+backward\n" + rms_table)
        report = {
            "device": name,
            "machine": machine,
            "threads": args.threads,
            "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "quick": args.quick,
            "results": results,
            "rms_versus_layer_norm": rms_rows,
        }
        (args.out / f"benchmark_{name}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"benchmark_{name}.md").write_text(markdown_table(results))
        (args.out / f"benchmark_{name}_rms_vs_layer_norm.md").write_text(rms_table)
        title = f"forward+backward time relative to torch ({name}, {args.threads} thread)"
        plot_ratios(results, title).savefig(args.out / f"benchmark_{name}.png", dpi=120)
        print(f"wrote {args.out}/benchmark_{name}.{{json,md,png}}")


if __name__ == "__main__":
    main()
