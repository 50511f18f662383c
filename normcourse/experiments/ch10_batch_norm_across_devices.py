"""Chapter 10's experiments: batch norm when one batch is split over several workers.

- ``GhostBatchNorm`` and ``ghost_batchnorm``: k data-parallel workers simulated in one process.
  The global batch is cut into k "ghost batches" (Hoffer et al. 2017); each is normalized with its
  own statistics, as k workers with plain batch norm would, and the running statistics follow
  worker 0's slices (what DistributedDataParallel broadcasts from rank 0 by default).
- ``worker_count_sweep``: the same global batch of 64 over 1, 2, 4, 8 simulated workers.
- ``real_workers_demo``: the real thing with gloo workers (``normcourse.launch.run_workers``):
  float32 error of the two ways to combine statistics, collectives and bytes per step,
  and DDP training with SyncBatchNorm against one process.

The chapter plots what these functions return; ``tests/test_claims_ch10_batch_norm_across_devices.py``
asserts its claims over several seeds by calling the same functions.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from normcourse import functional as ncF
from normcourse import models
from normcourse.distributed import train_data_parallel
from normcourse.experiments.runner import BATCHNORM_TYPES, build_model, mnist_tensors, sweep
from normcourse.launch import run_workers
from normcourse.sync_batch_norm import STATISTICS, SyncBatchNorm, global_moments
from normcourse.train import evaluate, evaluate_with_batch_statistics, train
from normcourse.utils import one_thread, seed_everything

__all__ = [
    "GhostBatchNorm",
    "ghost_batchnorm",
    "WorkerRun",
    "train_with_workers",
    "worker_count_sweep",
    "count_collectives",
    "statistics_errors",
    "collectives_per_step",
    "real_workers_demo",
]

GLOBAL_BATCH = 64
WORKER_COUNTS = (1, 2, 4, 8)


class GhostBatchNorm(nn.Module):
    """k workers' plain batch norm, simulated: each slice has its own statistics.

    Wraps a batch-norm layer ``bn`` (its parameters and buffers stay in ``bn``).
    Training: the input (N, C, *) is cut into ``workers`` equal slices; slice 0 goes
    through ``bn`` (and updates the running statistics, as worker 0 does), the others
    are normalized with their own batch statistics and the same gamma and beta.
    Eval: ``bn`` itself, with the running statistics.
    """

    def __init__(self, bn: nn.Module, workers: int):
        super().__init__()
        self.bn, self.workers = bn, workers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.workers == 1:
            return self.bn(x)
        if len(x) % self.workers:
            raise ValueError(
                f"a batch of {len(x)} cannot be split over {self.workers} workers")
        first, *rest = x.chunk(self.workers)
        outs = [self.bn(first)]
        for part in rest:
            outs.append(ncF.batch_norm(part, None, None, self.bn.weight, self.bn.bias,
                                       training=True, eps=self.bn.eps))
        return torch.cat(outs)


def ghost_batchnorm(model: nn.Module, workers: int) -> nn.Module:
    """Wrap every batch-norm layer of ``model`` (in place) in ``GhostBatchNorm(layer, workers)``."""
    for name, child in model.named_children():
        if isinstance(child, BATCHNORM_TYPES):
            setattr(model, name, GhostBatchNorm(child, workers))
        else:
            ghost_batchnorm(child, workers)
    return model


@dataclass
class WorkerRun:
    """One training run with the global batch split over ``workers`` simulated workers.

    eval_accuracy: test accuracy in eval mode (running statistics).
    batch_stats_accuracy: test accuracy normalizing each test batch of the *per-worker* size with
        its own statistics, as the workers did in training.
    """

    workers: int
    seed: int
    eval_accuracy: float
    batch_stats_accuracy: float
    train_loss: list = field(repr=False)

    @property
    def per_worker_batch(self) -> int:
        return GLOBAL_BATCH // self.workers

    @property
    def batch_stats_gap(self) -> float:
        """|eval accuracy - accuracy with per-worker batch statistics|."""
        return abs(self.eval_accuracy - self.batch_stats_accuracy)


@one_thread()
def train_with_workers(data, workers: int, *, seed: int, steps: int = 1000,
                       lr: float = 0.5) -> WorkerRun:
    """Train the chapter's MLP (sigmoid, batch norm) on global batches of 64 over ``workers``.

    ``workers=1`` is one device, and also what SyncBatchNorm computes for any number of workers.
    """
    x_train, y_train, x_test, y_test = mnist_tensors(data)
    # the batch norm paper's MLP with sigmoid units, as in chapter 3
    model = ghost_batchnorm(build_model("batch", seed=seed, activation="sigmoid"), workers)
    history = train(model, (x_train, y_train, x_test, y_test), steps=steps,
                    batch_size=GLOBAL_BATCH, lr=lr, seed=seed, eval_every=steps // 10,
                    progress=False)
    per_worker = GLOBAL_BATCH // workers
    return WorkerRun(
        workers=workers, seed=seed,
        eval_accuracy=evaluate(model, x_test, y_test),
        batch_stats_accuracy=evaluate_with_batch_statistics(model, x_test, y_test, per_worker),
        train_loss=list(history.train_loss),
    )


def worker_count_sweep(data, seeds=(0,), counts=WORKER_COUNTS, **kwargs) -> list[WorkerRun]:
    """``train_with_workers`` for every worker count and seed (global batch 64 throughout)."""
    data = mnist_tensors(data)  # converted once for all runs

    def run(workers: int, seed: int) -> WorkerRun:
        return train_with_workers(data, workers, seed=seed, **kwargs)

    runs = sweep(run, (((s, k), {"workers": k, "seed": s}) for s in seeds for k in counts))
    return list(runs.values())


# ---------------------------------------------------------------------------------------------
# With real workers
# ---------------------------------------------------------------------------------------------
@contextmanager
def count_collectives():
    """Count the Python-level collectives (calls and bytes of their result) in the block.

    Yields a Counter with keys ``(name, "calls")`` and ``(name, "bytes")``. DDP's own gradient
    all-reduce runs in C++ and is not seen here (it moves every parameter's gradient once).
    """
    counts = Counter()
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def wrap(name, function):
        def counted(*args, **kwargs):
            result_tensors = args[0] if isinstance(args[0], list) else [args[0]]
            counts[name, "calls"] += 1
            counts[name, "bytes"] += sum(t.numel() * t.element_size() for t in result_tensors)
            return function(*args, **kwargs)
        return counted

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def statistics_errors(rank: int, shift: float = 1e4, seed: int = 0) -> dict:
    """In a running group: float32 mean/variance error of "chan" and "sums" against float64.

    Every worker holds 256 x 8 values with mean ``shift`` and standard deviation 1 (different
    values on each worker). Returns {statistics: max relative error of the variance}.
    """
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64) + shift
    x = x.float()
    _, _, exact = global_moments(x.double(), statistics="chan")  # these values, in float64
    errors = {}
    for statistics in STATISTICS:
        _, _, var = global_moments(x, statistics=statistics)
        errors[statistics] = ((var.double() - exact).abs() / exact).max().item()
    return errors


def collectives_per_step(statistics: str = "chan", per_worker_batch: int = 32) -> dict:
    """In a running group: collectives and bytes of one training step of the chapter's ConvNet
    with SyncBatchNorm, and the bytes of its gradients (what DDP all-reduces anyway)."""
    seed_everything(0)
    model = models.convnet(norm="batch", channels=(8, 16))
    SyncBatchNorm.convert_sync_batchnorm(model)
    for layer in model.modules():
        if isinstance(layer, SyncBatchNorm):
            layer.statistics = statistics
    x = torch.rand(per_worker_batch, 1, 28, 28)
    with count_collectives() as counts:
        model(x).sum().backward()
    layers = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    return {
        "layers": layers,
        "calls": sum(v for (name, kind), v in counts.items() if kind == "calls"),
        "bytes": sum(v for (name, kind), v in counts.items() if kind == "bytes"),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


DEMO_CONFIG = {"steps": 100, "data": "embedded", "dtype": "float64", "lr": 0.05}


def _demo_worker(rank: int, world_size: int, config: dict) -> dict:
    result = {
        "statistics_errors": statistics_errors(rank),
        "collectives": {s: collectives_per_step(s) for s in STATISTICS},
        "training": {},
    }
    for norm in ("batch", "sync"):
        result["training"][norm] = train_data_parallel(rank, world_size, {**config, "norm": norm})
    return result


def real_workers_demo(workers: int = 2, timeout_s: float = 300.0, **config) -> dict:
    """Start ``workers`` gloo processes and run the chapter's measurements in them.

    ``config`` overrides ``DEMO_CONFIG`` (DDP training of the ConvNet, in float64 so that runs
    can be compared to rounding). Returns worker 0's results, and ``"one_process"``: the same
    training in this process with plain batch norm on the whole global batch (what
    SyncBatchNorm must reproduce), every worker's weight checksums, and ``"weight_differences"``:
    the largest difference between worker 0's weights and the one process's, per norm.
    """
    config = {**DEMO_CONFIG, **config}
    results = run_workers(_demo_worker, workers, config, timeout_s=timeout_s)
    alone = train_data_parallel(0, 1, {**config, "norm": "batch"})
    return {**results[0], "one_process": alone, "checksums": {
        norm: [r["training"][norm]["checksum"] for r in results] for norm in ("batch", "sync")},
        "weight_differences": {  # largest |weight - one process's weight|, worker 0
        norm: (results[0]["training"][norm]["weights"] - alone["weights"]).abs().max().item()
        for norm in ("batch", "sync")}}
