"""The claims of chapter 4 (batch norm at test time), asserted by calling the same experiment
functions the chapter plots (``normcourse.experiments.ch04_test_time_statistics``).

The fast tests are exact facts. The ``slow`` tests train small models over three seeds and require
each claim on every seed plus a margin on the mean; they run once per data source (``claims_mnist``
in conftest.py: the embedded subset always, full MNIST when it is available, else a skip that says
why). Runs shared with the other chapters' claim tests come from ``claim_runs.py``. The measured
numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import normcourse.nn as ncnn
from claim_runs import report, runs_for
from normcourse import models
from normcourse.experiments import ch04_test_time_statistics as tt
from normcourse.train import evaluate
from normcourse.utils import seed_everything

torch.set_num_threads(1)

SEEDS = (0, 1, 2)

# ---------------------------------------------------------------------------------------------
# Fast, exact claims
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Fast, exact claims
# ---------------------------------------------------------------------------------------------
def test_momentum_none_computes_algorithm_2():
    rng = np.random.default_rng(0)
    batches = rng.normal(loc=[1.0, -2.0], scale=[0.5, 3.0], size=(30, 6, 2))
    layer = ncnn.BatchNorm1d(2, momentum=None, dtype=torch.float64).train()
    for batch in batches:
        layer(torch.from_numpy(batch))
    mean, var = tt.algorithm2_statistics(batches.mean(axis=1), batches.var(axis=1), m=6)
    assert np.allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    assert np.allclose(layer.running_var.numpy(), var, rtol=1e-12)
    # the m/(m-1) factor matters: the biased average is visibly different
    assert not np.allclose(layer.running_var.numpy(), batches.var(axis=1).mean(axis=0), rtol=1e-3)


def test_recalibration_gives_algorithm_2_with_the_final_weights():
    seed_everything(0)
    model = models.mlp((5, 8, 3), norm="batch", activation="relu")
    x = torch.randn(64, 5)
    tt.recalibrate_batchnorm(model.eval(), x, batch_size=8, seed=0)
    assert not model.training and not model.norm1.training  # modes restored
    assert model.norm1.momentum == 0.1                     # momentum restored
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.fc1(x[order]).reshape(8, 8, 8)           # (batches, m, features)
    mean, var = tt.algorithm2_statistics(z.mean(dim=1).numpy(), z.var(dim=1, unbiased=False).numpy(), m=8)
    assert np.allclose(model.norm1.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    assert np.allclose(model.norm1.running_var.numpy(), var, rtol=1e-5, atol=1e-6)


def test_moving_average_stays_noisy_and_cumulative_average_converges():
    traces = tt.running_mean_traces(momenta=(0.1, None), batches=4000, batch_size=16, true_mean=2.0, seed=1)
    # stationary std of the moving average: sqrt(alpha / (2 - alpha) * var(batch mean))
    predicted = np.sqrt(0.1 / 1.9 / 16)
    assert abs(traces[0.1][1000:].std() / predicted - 1) < 0.15
    # the cumulative average's error shrinks like 1 / sqrt(16 k): within 4 standard errors
    assert abs(traces[None][-1] - 2.0) < 4 / np.sqrt(16 * 4000) < predicted / 2


@pytest.mark.parametrize("norm", ["batch", "torch_batch"])
def test_folding_batchnorm_keeps_the_outputs(norm):
    seed_everything(0)
    model = models.mlp((12, 9, 7, 4), norm=norm, activation="relu").double()
    model.train()
    for _ in range(5):  # non-trivial running statistics and affine parameters
        model(torch.randn(16, 12, dtype=torch.float64) * 2 + 1)
    with torch.no_grad():
        for layer in tt.batchnorm_layers(model):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
    model.eval()
    folded = tt.fold_batchnorm(model)
    x = torch.randn(10, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), rtol=1e-12, atol=1e-12)
    assert not tt.batchnorm_layers(folded)
    assert sum(isinstance(m, torch.nn.Linear) for m in folded) == 3


def test_requires_grad_does_not_freeze_running_statistics_and_train_undoes_eval():
    seed_everything(0)
    net = models.mlp((6, 5, 2), norm="batch", activation="relu")
    for p in net.norm1.parameters():
        p.requires_grad_(False)
    before = net.norm1.running_mean.clone()
    net.train()(torch.randn(8, 6))
    assert not torch.equal(before, net.norm1.running_mean)
    tt.freeze_batchnorm(net)
    state = copy.deepcopy(net.norm1.state_dict())
    net(torch.randn(8, 6))
    assert all(torch.equal(state[k], v) for k, v in net.norm1.state_dict().items())
    net.train()
    assert net.norm1.training


# ---------------------------------------------------------------------------------------------
# Slow claims: trained models, three seeds, on each data source
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(claims_mnist):
    """The trained runs of chapters 4-6 on one data source (see claim_runs.py and conftest.py)."""
    return runs_for(claims_mnist)


@pytest.mark.slow
def test_ch4_batch_stats_gap_grows_as_the_batch_shrinks(runs):
    bn4 = [runs.iid("batch", 4, s) for s in SEEDS]
    gap4 = [r.batch_stats_gap for r in bn4]
    gap128 = [runs.iid("batch", 128, s).batch_stats_gap for s in SEEDS]
    report("BN@4 eval", [r.eval_accuracy for r in bn4])
    report("BN@4 batch statistics", [r.batch_stats_accuracy for r in bn4])
    report("BN gap at batch 4", gap4)
    report("BN gap at batch 128", gap128)
    assert all(a > b for a, b in zip(gap4, gap128))
    assert np.mean(gap4) > np.mean(gap128) + 0.05
    # at batch 4, eval mode is the better of the two modes
    assert all(r.eval_accuracy > r.batch_stats_accuracy for r in bn4)


# How much recalibration may change the test accuracy, by training batch size. At batch 128 it
# flips about 1% of the test predictions and the accuracy by at most 0.15 points (seeds 0-2, both
# data sets). At batch 4 the moving averages follow batches of 4 examples and are noisy, so
# recalibration flips 3-5% of the predictions; the accuracy moves by the difference between the
# ones it fixes and the ones it breaks: up to 0.9 points here, and 2.25 points for one seed under
# another machine's floating-point arithmetic, on the embedded subset, whose 2,000 test images make
# one point 20 images (the noise of that difference is about sqrt(flips) / 2,000 = 0.5 points).
RECALIBRATION_CHANGE_BOUND = {4: 0.03, 128: 0.01}


@pytest.mark.slow
def test_ch4_recalibration_changes_little_at_the_end_of_training(runs):
    for batch_size, bound in RECALIBRATION_CHANGE_BOUND.items():
        changes = []
        for seed in SEEDS:
            result = runs.iid("batch", batch_size, seed)
            before, after = tt.recalibration_gain(result, runs.data, calibration_examples=8000)
            changes.append(after - before)
        report(f"recalibration change at batch {batch_size}", changes)
        assert max(abs(c) for c in changes) < bound, (runs.source, batch_size, changes)


@pytest.mark.slow
def test_ch4_forgetting_eval_fails_on_sorted_batches(runs):
    _, _, x_test, y_test = runs.data
    for seed in SEEDS:
        model = runs.iid("batch", 128, seed).model
        good = tt.accuracy_on_sorted_batches(model, x_test, y_test, batch_size=10, training=False)
        bad = tt.accuracy_on_sorted_batches(model, x_test, y_test, batch_size=10, training=True)
        damaged = copy.deepcopy(model)
        tt.accuracy_on_sorted_batches(damaged, x_test, y_test, batch_size=10, training=True, in_place=True)
        broken = evaluate(damaged, x_test, y_test)
        tt.recalibrate_batchnorm(damaged, runs.data[0][:8000], batch_size=128)
        repaired = evaluate(damaged, x_test, y_test)
        print(f"seed {seed}: sorted batches of 10, eval mode {good:.4f}, training mode {bad:.4f}; "
              f"after the in-place pass {broken:.4f}, recalibrated {repaired:.4f}")
        assert bad < good - 0.3
        assert broken < good - 0.1
        assert repaired > good - 0.01
