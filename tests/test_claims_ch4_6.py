"""The claims of chapters 4-6 (test-time statistics, layer norm, batch renorm), asserted by calling
the same experiment functions the chapters plot.

The fast tests are exact facts (Algorithm 2, folding, freezing, invariances, train/inference
equivalence). The ``slow`` tests train small models over three seeds and require each claim on
every seed plus a margin on the mean. Runs shared by several claims (the batch-norm MLP at batch
4, say) are trained once per seed and cached. The data is ``load_mnist()``: full MNIST where the
cache holds it (NORMCOURSE_DATA), else the embedded subset; the measured numbers are printed
(``pytest -s``).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import numpy as np
import pytest
import torch

import normcourse.nn as ncnn
from normcourse import models
from normcourse.data import load_mnist
from normcourse.experiments import batch_renorm as brx
from normcourse.experiments import layer_norm as lnx
from normcourse.experiments import test_time as tt
from normcourse.train import evaluate
from normcourse.utils import seed_everything

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
STEPS = 2000  # the chapters' run length


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


def test_layer_norm_invariances_match_the_paper_table():
    for seed in SEEDS:
        table = lnx.invariance_table(seed=seed)
        measured = {name: {k: v < 1e-9 for k, v in row.items()} for name, row in table.items()}
        assert measured == lnx.PAPER_TABLE_1
        # and the non-invariances are large, not rounding
        assert all(v > 0.1 for row in table.values() for v in row.values() if v >= 1e-9)


def test_layer_norm_flips_sign_for_negative_scale():
    for seed in SEEDS:
        check = lnx.negative_scale_check(seed=seed, scale=-0.5)
        assert check["negated"] < 1e-9 and check["same"] > 1.0


def test_batch_renorm_training_output_equals_inference_output():
    seed_everything(0)
    layer = ncnn.BatchRenorm1d(4, warmup_steps=0, rmax_steps=1, dmax_steps=1, rmax=1e3, dmax=1e3,
                               dtype=torch.float64)
    for _ in range(10):
        layer.train()(torch.randn(4, 4, dtype=torch.float64) * 3 + 2)
    x = torch.randn(4, 4, dtype=torch.float64) * 3 + 2
    with torch.no_grad():
        inference = layer.eval()(x)
        training = layer.train()(x)
    assert torch.allclose(training, inference, atol=1e-12)


def test_renorm_schedule_is_the_paper_schedule_scaled():
    assert brx.renorm_schedule(50000) == {"rmax": 3.0, "dmax": 5.0, **brx.PAPER_SCHEDULE}
    assert brx.renorm_schedule(2000) == {"rmax": 3.0, "dmax": 5.0, "warmup_steps": 200,
                                         "dmax_steps": 1000, "rmax_steps": 1600}


# ---------------------------------------------------------------------------------------------
# Slow claims: trained models, three seeds
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _data():
    data = load_mnist()
    print("\ndata:", data.source)
    return tt.mnist_tensors(data)


@lru_cache(maxsize=None)
def _iid(norm: str, batch_size: int, seed: int) -> tt.ClassifierResult:
    return brx.compare_norms(_data(), (norm,), batch_size=batch_size, steps=STEPS, lr=1e-3, seed=seed)[norm]


@lru_cache(maxsize=None)
def _noniid(norm: str, seed: int) -> tt.ClassifierResult:
    return brx.noniid_comparison(_data(), (norm,), steps=STEPS, lr=3e-3, seed=seed)[norm]


def _report(name, values):
    print(f"{name}: " + ", ".join(f"{v:.4f}" for v in values) + f" (mean {np.mean(values):.4f})")


@pytest.mark.slow
def test_ch4_train_eval_gap_grows_as_the_batch_shrinks():
    gap4 = [_iid("batch", 4, s).train_eval_gap for s in SEEDS]
    gap128 = [_iid("batch", 128, s).train_eval_gap for s in SEEDS]
    _report("BN gap at batch 4", gap4)
    _report("BN gap at batch 128", gap128)
    assert all(a > b for a, b in zip(gap4, gap128))
    assert np.mean(gap4) > np.mean(gap128) + 0.05


@pytest.mark.slow
def test_ch4_forgetting_eval_fails_on_sorted_batches():
    _, _, x_test, y_test = _data()
    for seed in SEEDS:
        model = _iid("batch", 128, seed).model
        good = tt.accuracy_on_sorted_batches(model, x_test, y_test, batch_size=100, training=False)
        bad = tt.accuracy_on_sorted_batches(model, x_test, y_test, batch_size=100, training=True)
        print(f"seed {seed}: sorted test set, eval mode {good:.4f}, training mode {bad:.4f}")
        assert bad < good - 0.3
        damaged = copy.deepcopy(model)
        tt.accuracy_on_sorted_batches(damaged, x_test, y_test, batch_size=100, training=True, in_place=True)
        assert evaluate(damaged, x_test, y_test) < good - 0.1
        tt.recalibrate_batchnorm(damaged, _data()[0][:8000], batch_size=128)
        assert evaluate(damaged, x_test, y_test) > good - 0.01


@pytest.mark.slow
def test_ch5_layer_norm_is_robust_at_batch_4_and_batch_norm_is_not():
    bn4 = [_iid("batch", 4, s).eval_accuracy for s in SEEDS]
    ln4 = [_iid("layer", 4, s).eval_accuracy for s in SEEDS]
    bn128 = [_iid("batch", 128, s).eval_accuracy for s in SEEDS]
    ln128 = [_iid("layer", 128, s).eval_accuracy for s in SEEDS]
    for name, values in (("BN@4", bn4), ("LN@4", ln4), ("BN@128", bn128), ("LN@128", ln128)):
        _report(name, values)
    assert all(ln > bn for ln, bn in zip(ln4, bn4))
    assert np.mean(ln4) > np.mean(bn4) + 0.01
    # at batch 128 the two are close, and layer norm loses little from 128 to 4
    assert abs(np.mean(ln128) - np.mean(bn128)) < 0.02
    assert np.mean(ln128) - np.mean(ln4) < np.mean(bn128) - np.mean(bn4)


@pytest.mark.slow
def test_ch5_layer_norm_rnn_beats_the_plain_rnn():
    data = _data()
    results = [lnx.recurrent_comparison(data, steps=400, seed=s) for s in SEEDS]
    plain = [r["none"][1] for r in results]
    layer = [r["layer"][1] for r in results]
    _report("row-MNIST RNN test accuracy, no norm", plain)
    _report("row-MNIST RNN test accuracy, layer norm", layer)
    assert all(ln > p for ln, p in zip(layer, plain))
    assert np.mean(layer) > np.mean(plain) + 0.03


@pytest.mark.slow
def test_ch6_batch_renorm_beats_batch_norm_at_batch_4():
    bn = [_iid("batch", 4, s).eval_accuracy for s in SEEDS]
    renorm = [_iid("renorm", 4, s).eval_accuracy for s in SEEDS]
    _report("BN@4 eval", bn)
    _report("renorm@4 eval", renorm)
    assert all(r > b for r, b in zip(renorm, bn))
    assert np.mean(renorm) > np.mean(bn) + 0.01


@pytest.mark.slow
def test_ch6_noniid_batches_break_batch_norm_not_batch_renorm():
    bn = [_noniid("batch", s) for s in SEEDS]
    renorm = [_noniid("renorm", s).eval_accuracy for s in SEEDS]
    _report("non-iid BN eval", [r.eval_accuracy for r in bn])
    _report("non-iid BN batch statistics", [r.batch_stats_accuracy for r in bn])
    _report("non-iid renorm eval", renorm)
    assert all(r > b.eval_accuracy + 0.1 for r, b in zip(renorm, bn))
    assert min(renorm) > 0.9
