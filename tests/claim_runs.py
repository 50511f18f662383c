"""Trained models that the claim tests of chapters 4, 5 and 6 share, one set per data source.

Chapters 4-6 compare the same MLPs (batch norm at batch 4, layer norm at batch 4, ...), so a run
is trained once per process and data source and reused by every test that needs it. Each test
file asks for the runs of its ``claims_mnist`` (conftest.py) through ``runs_for``.
"""

from __future__ import annotations

import numpy as np

from normcourse.experiments import ch06_batch_renorm as brx
from normcourse.experiments import ch04_test_time_statistics as tt

STEPS = 2000  # the chapters' run length
STEPS_AT_128_CH5 = 1000  # chapter 5 stops its batch-128 runs earlier (their loss has flattened)


class ChapterRuns:
    """The runs of chapters 4-6 on one data set, trained on first use and kept."""

    def __init__(self, mnist):
        self.source = mnist.source
        self.data = tt.mnist_tensors(mnist)
        self._iid: dict[tuple, tt.ClassifierResult] = {}
        self._noniid: dict[tuple, tt.ClassifierResult] = {}
        self._pairs: dict[int, dict[str, tt.ClassifierResult]] = {}
        self.renorm_traces: dict[tuple, dict] = {}  # (batch_size, seed, steps) -> r, d trace

    def iid(self, norm: str, batch_size: int, seed: int, steps: int = STEPS) -> tt.ClassifierResult:
        """The MLP with ``norm`` trained on i.i.d. batches (Adam, learning rate 1e-3)."""
        key = (norm, batch_size, seed, steps)
        if key not in self._iid:
            recorder = brx.RenormRecorder()  # records only batch renorm's r and d (chapter 6)
            self._iid[key] = brx.compare_norms(self.data, (norm,), batch_size=batch_size,
                                               steps=steps, lr=1e-3, seed=seed,
                                               prepare=recorder.attach)[norm]
            if norm == "renorm":
                self.renorm_traces[batch_size, seed, steps] = recorder.trace()
        return self._iid[key]

    def renorm_trace(self, batch_size: int, seed: int, steps: int = STEPS) -> dict:
        """r and d at every step of the batch-renorm run ``iid("renorm", ...)`` (chapter 6)."""
        self.iid("renorm", batch_size, seed, steps)
        return self.renorm_traces[batch_size, seed, steps]

    def pairs(self, seed: int) -> dict[str, tt.ClassifierResult]:
        """Chapter 6's runs on batches of same-label pairs (8 labels x 2), with the halves control."""
        if seed not in self._pairs:
            self._pairs[seed] = brx.noniid_comparison(
                self.data, ("batch", brx.HALVES, "renorm"), classes_per_batch=8, batch_size=16,
                steps=STEPS, lr=3e-3, seed=seed)
        return self._pairs[seed]

    def noniid(self, norm: str, seed: int) -> tt.ClassifierResult:
        """The MLP with ``norm`` trained on batches of two classes (chapter 6)."""
        key = (norm, seed)
        if key not in self._noniid:
            self._noniid[key] = brx.noniid_comparison(self.data, (norm,), steps=STEPS, lr=3e-3,
                                                      seed=seed)[norm]
        return self._noniid[key]


_RUNS: dict[str, ChapterRuns] = {}


def runs_for(mnist) -> ChapterRuns:
    """The shared runs for this MNIST (keyed by its ``source`` sentence)."""
    if mnist.source not in _RUNS:
        _RUNS[mnist.source] = ChapterRuns(mnist)
    return _RUNS[mnist.source]


def report(name: str, values) -> None:
    """Print measured numbers (visible with ``pytest -s``)."""
    print(f"{name}: " + ", ".join(f"{v:.4f}" for v in values) + f" (mean {np.mean(values):.4f})")
