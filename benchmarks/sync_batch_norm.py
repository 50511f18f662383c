"""Benchmark SyncBatchNorm: its single-process overhead and the cost of a 2-process step, as ratios.

Usage::

    python benchmarks/sync_batch_norm.py            # CPU, one thread per process
    python benchmarks/sync_batch_norm.py --quick    # fewer repetitions (a smoke run)
    python benchmarks/sync_batch_norm.py --out DIR  # where the JSON and the markdown table go

Rows (forward + backward of one layer, median CPU time as in ``normcourse.benchmarking``):

- ``no group``: ``normcourse.nn.SyncBatchNorm`` without a process group (it falls back to batch
  norm) against ``normcourse.nn.BatchNorm`` and torch's: what converting a model costs when it
  runs in one process;
- ``sync path, group of 1``: the synchronized code path itself (``SyncBatchNormFunction``, with
  its collectives on a gloo group of one process) against torch's batch norm: the price of the
  per-channel reductions written for all-reducing, without any waiting for other workers;
- ``2 processes``: wall time per training step of the chapter's ConvNet with DDP over 2 gloo
  processes, ``--norm sync`` against ``--norm batch`` (the same global batch of 64).

A script, not a test: timings depend on the machine and its load; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as tF

import normcourse.nn as ncnn
from normcourse.benchmarking import SHAPES, median_time
from normcourse.distributed import train_data_parallel
from normcourse.launch import free_port, run_workers
from normcourse.sync_batch_norm import SyncBatchNormFunction

CPU = torch.device("cpu")


def _step(layer_call, x, dy, params):
    def run():
        for p in params:
            p.grad = None
        layer_call(x).backward(dy)

    return run


def layer_rows(repeats: int, min_time: float) -> list[dict]:
    rows = []
    for shape_name, shape in SHAPES:
        torch.manual_seed(0)
        c = shape[1]
        x = torch.randn(shape).requires_grad_()
        dy = torch.randn(shape)
        norm = ncnn.BatchNorm2d if len(shape) == 4 else ncnn.BatchNorm1d
        ours, sync = norm(c), ncnn.SyncBatchNorm(c)
        weight, bias = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)

        def native(t):
            return tF.batch_norm(t, rm, rv, weight, bias, True, 0.1, 1e-5)

        def sync_path(t):
            return SyncBatchNormFunction.apply(t, rm, rv, weight, bias, 0.1, 1e-5, None, "chan")

        cases = {
            "torch": _step(native, x, dy, [x, weight, bias]),
            "normcourse BatchNorm": _step(ours, x, dy, [x, *ours.parameters()]),
            "SyncBatchNorm, no group": _step(sync, x, dy, [x, *sync.parameters()]),
            "sync path, group of 1": _step(sync_path, x, dy, [x, weight, bias]),
        }
        row = {"shape": shape_name}
        for name, run in cases.items():
            if name == "sync path, group of 1":
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                        rank=0, world_size=1, timeout=timedelta(seconds=60))
            try:
                row[name] = median_time(run, CPU, repeats, min_time)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
        rows.append(row)
        ratios = ", ".join(f"{k} x{row[k] / row['torch']:.2f}" for k in cases if k != "torch")
        print(f"{shape_name:<18} torch {row['torch'] * 1e3:7.3f} ms | {ratios}", flush=True)
    return rows


def two_process_rows(steps: int) -> dict:
    result = {}
    for norm in ("batch", "sync"):
        config = {"norm": norm, "steps": steps, "data": "embedded"}
        per_rank = run_workers(train_data_parallel, 2, config, timeout_s=600)
        result[norm] = max(r["seconds_per_step"] for r in per_rank)
    alone = train_data_parallel(0, 1, {"norm": "batch", "steps": steps, "data": "embedded"})
    result["one process, batch"] = alone["seconds_per_step"]
    print(f"2 processes, ConvNet step: batch {result['batch'] * 1e3:.1f} ms, sync "
          f"{result['sync'] * 1e3:.1f} ms (x{result['sync'] / result['batch']:.2f}); one process "
          f"{result['one process, batch'] * 1e3:.1f} ms", flush=True)
    return result


def markdown(rows: list[dict], step: dict) -> str:
    names = [k for k in rows[0] if k not in ("shape", "torch")]
    lines = ["| shape | torch ms | " + " | ".join(f"{n} (x torch)" for n in names) + " |",
             "|" + " --- |" * (2 + len(names))]
    for r in rows:
        cells = " | ".join(f"{r[n] * 1e3:.3f} ({r[n] / r['torch']:.2f}x)" for n in names)
        lines.append(f"| {r['shape']} | {r['torch'] * 1e3:.3f} | {cells} |")
    lines.append("")
    lines.append(f"ConvNet training step, 2 gloo processes, global batch 64: batch norm "
                 f"{step['batch'] * 1e3:.1f} ms, SyncBatchNorm {step['sync'] * 1e3:.1f} ms "
                 f"({step['sync'] / step['batch']:.2f}x); one process {step['one process, batch'] * 1e3:.1f} ms")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="few repetitions, few steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats, min_time, steps = (3, 0.01, 20) if args.quick else (7, 0.2, 200)
    rows = layer_rows(repeats, min_time)
    step = two_process_rows(steps)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "quick": args.quick, "layers": rows, "two_process": step}
    (args.out / "benchmark_sync_batch_norm.json").write_text(json.dumps(report, indent=1))
    (args.out / "benchmark_sync_batch_norm.md").write_text(markdown(rows, step))
    print(f"wrote {args.out}/benchmark_sync_batch_norm.{{json,md}}")


if __name__ == "__main__":
    main()
