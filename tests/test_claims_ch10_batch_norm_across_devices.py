"""The claims of chapter 10 (batch norm across devices), asserted by calling the same experiment
functions the chapter plots.

- Simulated workers (ghost batches), global batch 64 over 1, 2, 4, 8 workers, three seeds: the
  training loss grows with the number of workers, the accuracy with per-worker batch statistics
  falls and its gap to eval mode grows, while eval-mode accuracy moves by at most a few points.
  On the embedded subset always; on full MNIST too when it is there (``claims_mnist``; else a
  visible skip).
- Real gloo workers: SyncBatchNorm makes two DDP workers train what one process trains on the whole
  batch; plain batch norm does not; Chan's merge keeps float32 variances where summed squares lose
  them; two collectives per batch-norm layer and step.
The measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from normcourse.experiments import ch10_batch_norm_across_devices as ch10

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
_SWEEPS: dict[str, dict] = {}


def _sweep(mnist) -> dict:
    """The worker-count sweep on one data source (``claims_mnist``: embedded, or full MNIST)."""
    if mnist.source not in _SWEEPS:
        runs = ch10.worker_count_sweep(mnist, seeds=SEEDS)
        for r in runs:
            print(f"seed {r.seed}, {r.workers} workers: eval {r.eval_accuracy:.4f}, "
                  f"batch stats {r.batch_stats_accuracy:.4f}, gap {r.batch_stats_gap:.4f}, "
                  f"loss {r.train_loss[-1]:.3f}")
        _SWEEPS[mnist.source] = {(r.seed, r.workers): r for r in runs}
    return _SWEEPS[mnist.source]


def test_training_loss_grows_with_the_number_of_workers(claims_mnist):
    runs = _sweep(claims_mnist)
    for seed in SEEDS:
        losses = [runs[seed, k].train_loss[-1] for k in ch10.WORKER_COUNTS]
        assert all(a < b for a, b in zip(losses, losses[1:])), (seed, losses)


def test_per_worker_statistics_open_a_batch_stats_gap(claims_mnist):
    runs = _sweep(claims_mnist)
    gaps = {k: [runs[s, k].batch_stats_gap for s in SEEDS] for k in (1, 8)}
    drops = [runs[s, 1].batch_stats_accuracy - runs[s, 8].batch_stats_accuracy for s in SEEDS]
    for seed in range(len(SEEDS)):
        assert gaps[8][seed] > gaps[1][seed]
        assert drops[seed] > 0
    assert np.mean(gaps[8]) - np.mean(gaps[1]) > 0.015, gaps
    assert np.mean(drops) > 0.015, drops


def test_eval_accuracy_moves_by_at_most_a_few_points(claims_mnist):
    runs = _sweep(claims_mnist)
    one = np.mean([runs[s, 1].eval_accuracy for s in SEEDS])
    for k in ch10.WORKER_COUNTS[1:]:
        assert abs(np.mean([runs[s, k].eval_accuracy for s in SEEDS]) - one) < 0.03


@lru_cache(maxsize=None)
def _demo() -> dict:
    return ch10.real_workers_demo(workers=2)


def test_sync_batch_norm_makes_two_workers_train_like_one_process():
    demo = _demo()
    sync, plain = demo["checksums"]["sync"], demo["checksums"]["batch"]
    one = demo["one_process"]["checksum"]
    print(f"checksums: sync {sync}, batch {plain}, one process {one}")
    assert sync[0] == sync[1] and plain[0] == plain[1]
    differences = demo["weight_differences"]
    print(f"largest weight difference to one process: {differences}")
    assert differences["sync"] < 1e-10  # float64 training: equal to rounding
    assert differences["batch"] > 1e-3


def test_chan_merge_keeps_the_float32_variance_that_summed_squares_lose():
    errors = _demo()["statistics_errors"]
    print(f"float32 variance relative errors: {errors}")
    assert errors["chan"] < 1e-3
    assert errors["sums"] > 1.0


def test_two_collectives_per_layer_and_step():
    for statistics, counted in _demo()["collectives"].items():
        c = counted
        assert c["calls"] == 2 * c["layers"] == 4, (statistics, c)
        # (2C + 1) forward and 2C backward numbers per layer, C = 8 and 16, float32; the
        # all-gather of "chan" receives one (2C + 1) vector per worker
        forward = sum(2 * ch + 1 for ch in (8, 16)) * (2 if statistics == "chan" else 1)
        assert c["bytes"] == 4 * (forward + sum(2 * ch for ch in (8, 16))), c
        assert c["bytes"] < 0.02 * c["gradient_bytes"]
