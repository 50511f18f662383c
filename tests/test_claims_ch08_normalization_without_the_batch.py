"""The claims of chapter 8 (normalization without the batch), asserted by calling the experiment
functions the chapter plots, over three seeds.

Exact facts (the normalization sets, the invariance table) are fast. The ``slow`` tests train the
chapter's runs (the same settings: ``SWEEP``) on the embedded MNIST subset, which every user has,
and again on full MNIST when it is there (``claims_mnist``; else a visible skip).
Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse.experiments import ch08_normalization_without_the_batch as ch8

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
SWEEP = dict(examples=1600, lr=0.05, test_examples=1000)  # the chapter's settings


# ---------------------------------------------------------------------------------------------
# Exact claims
# ---------------------------------------------------------------------------------------------
def test_normalization_sets_are_those_of_the_table():
    n, c, h, w = 3, 8, 2, 5
    assert ch8.what_each_normalizes((n, c, h, w), num_groups=4) == {
        "batch": n * h * w, "layer": c * h * w, "instance": h * w, "group": c // 4 * h * w}


def test_invariance_table():
    invariant = {t: {k: v < 1e-9 for k, v in row.items()} for t, row in ch8.invariance_table(seed=3).items()}
    assert all(invariant["weight re-scaling"].values())
    assert [k for k, v in invariant["one filter re-scaling"].items() if v] == ["batch", "instance", "ws"]
    assert [k for k, v in invariant["weight re-centering (per filter)"].items() if v] == ["ws"]
    assert [k for k, v in invariant["dataset re-scaling"].items() if not v] == ["ws"]
    assert [k for k, v in invariant["single example re-scaling"].items() if not v] == ["batch", "ws"]
    # and "not invariant" means a visible change, not rounding
    assert ch8.invariance_table(seed=3)["one filter re-scaling"]["group"] > 1e-2


# ---------------------------------------------------------------------------------------------
# Trained claims, three seeds, on each data set the tests use
# ---------------------------------------------------------------------------------------------
_TENSORS: dict[str, tuple] = {}
_SWEEPS: dict[tuple[str, str], dict] = {}


def _tensors(mnist) -> tuple:
    """The chapter's tensors of one data source (``claims_mnist``: embedded, or full MNIST)."""
    if mnist.source not in _TENSORS:
        _TENSORS[mnist.source] = ch8.mnist_tensors(mnist)
    return _TENSORS[mnist.source]


def _sweep(mnist, config: str) -> dict:
    key = (mnist.source, config)
    if key not in _SWEEPS:
        result = ch8.batch_size_sweep(_tensors(mnist), (config,), (32, 2), SEEDS, **SWEEP)
        print(config, {k[1:]: round(v, 3) for k, v in result.items()})
        _SWEEPS[key] = result
    return _SWEEPS[key]


def _mean(result, config, batch):
    return float(np.mean([result[config, batch, s] for s in SEEDS]))


@pytest.mark.slow
def test_group_norm_loses_nothing_at_batch_2(claims_mnist):
    """GN at batch 2 is at least as accurate as at batch 32 (within 3 points on the mean).
    Not "equal": on full MNIST the batch-32 runs (50 steps) are still learning and batch 2 is
    ahead by several points."""
    gn = _sweep(claims_mnist, "GN")
    assert _mean(gn, "GN", 2) > _mean(gn, "GN", 32) - 0.03
    assert min(gn.values()) > 0.8  # and it learned


@pytest.mark.slow
def test_batch_norm_does_not_collapse_at_batch_2_in_this_convnet(claims_mnist):
    """The chapter's negative result: with m = N*H*W >= 392 values per statistic, BN at batch 2
    is about as accurate as at batch 32 (within 3 points on the mean, and not worse than GN by
    more than 3 points at batch 2)."""
    bn, gn = _sweep(claims_mnist, "BN"), _sweep(claims_mnist, "GN")
    assert _mean(bn, "BN", 2) > _mean(bn, "BN", 32) - 0.03
    assert _mean(bn, "BN", 2) > _mean(gn, "GN", 2) - 0.03


@pytest.mark.slow
def test_rms_norm_is_as_accurate_as_layer_norm(claims_mnist):
    data = _tensors(claims_mnist)
    acc = ch8.rms_versus_layer_norm(data, SEEDS, steps=300)
    print("RMS vs LN", acc)
    rms = np.mean([acc["rms", s] for s in SEEDS])
    layer = np.mean([acc["layer", s] for s in SEEDS])
    assert abs(rms - layer) < 0.02
    assert min(acc.values()) > 0.8


@pytest.mark.slow
def test_weight_standardization_alone_does_not_train(claims_mnist):
    """WS without an activation normalization stays far below every normalized network: its
    mean accuracy is under 30 % at both batch sizes (near chance on the embedded subset; one
    full-MNIST run at batch 2 reached 43 %), where GN's is above 80 %."""
    ws = _sweep(claims_mnist, "WS")
    assert all(_mean(ws, "WS", b) < 0.3 for b in (32, 2))
