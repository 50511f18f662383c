"""The claims of chapters 1-3, asserted over several seeds with a margin.

Each test calls the same experiment function, with the same settings, as the chapter that states
the claim (``normcourse.experiments.input_normalization`` and ``.batchnorm_training``). The
training claims are ``slow`` (about a minute and a half in all on one idle thread).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse import data
from normcourse.experiments import batchnorm_training as bt
from normcourse.experiments import input_normalization as inorm

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Chapter 1: standardization and the quadratic
# ---------------------------------------------------------------------------------------------
def _best_lr(problem):
    lam = np.linalg.eigvalsh(inorm.hessian(problem.x_train))
    return 2.0 / (lam[0] + lam[-1])


@pytest.mark.parametrize("seed", SEEDS)
def test_standardizing_shrinks_condition_number_and_steps(seed):
    raw = inorm.make_regression_problem(seed=seed)
    std = inorm.standardized_problem(raw)
    kappa_raw = inorm.condition_number(inorm.hessian(raw.x_train))
    kappa_std = inorm.condition_number(inorm.hessian(std.x_train))
    # chapter: "about 150" vs "about 3" (= (1 + rho) / (1 - rho) with rho = 0.5)
    assert kappa_raw > 100 and kappa_std < 4
    assert kappa_raw > 30 * kappa_std
    steps_raw = inorm.steps_to_tolerance(raw, _best_lr(raw), w0=np.zeros(2), tol=1e-6)
    steps_std = inorm.steps_to_tolerance(std, _best_lr(std), w0=np.zeros(2), tol=1e-6)
    assert steps_raw is not None and steps_std is not None
    assert steps_raw > 20 * steps_std


@pytest.mark.parametrize("seed", SEEDS)
def test_whitening_gives_identity_covariance_and_one_step(seed):
    raw = inorm.make_regression_problem(seed=seed)
    for kind in ("pca", "zca"):
        white = inorm.whitened_problem(raw, kind=kind)
        np.testing.assert_allclose(np.cov(white.x_train, rowvar=False, bias=True), np.eye(2), atol=1e-6)
        assert inorm.condition_number(inorm.hessian(white.x_train)) < 1 + 1e-6
        assert inorm.steps_to_tolerance(white, _best_lr(white), w0=np.zeros(2), tol=1e-6) <= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_two_over_lambda_max_is_the_stability_limit(seed):
    raw = inorm.make_regression_problem(seed=seed)
    for problem in (raw, inorm.standardized_problem(raw)):
        limit = inorm.max_stable_lr(inorm.hessian(problem.x_train))
        assert inorm.steps_to_tolerance(problem, 0.98 * limit, w0=np.zeros(2)) is not None
        assert inorm.steps_to_tolerance(problem, 1.02 * limit, w0=np.zeros(2)) is None


def test_whitening_rejects_unknown_kind():
    with pytest.raises(ValueError, match="pca"):
        inorm.whitening_fit(np.zeros((4, 2)), kind="svd")


# ---------------------------------------------------------------------------------------------
# Chapter 3, Sec. 3.3 of the paper: scale invariance (exact, no training)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("a", [0.01, 0.5, 7.0, 100.0])
def test_scale_invariance_of_batch_norm(seed, a):
    result = bt.scale_invariance(a, seed=seed, eps=0.0)
    assert result["output_diff"] < 1e-10       # BN((aW)u) = BN(Wu)
    assert result["du_rel_error"] < 1e-8       # same gradient with respect to u
    assert result["dW_ratio_error"] < 1e-8     # gradient with respect to aW is 1/a times


def test_scale_invariance_check_can_fail():
    # with eps > 0 and a tiny scale, eps dominates the variance and the identities break:
    # the function measures, it does not assume
    result = bt.scale_invariance(1e-4, seed=0, eps=1e-5)
    assert result["output_diff"] > 0.1


# ---------------------------------------------------------------------------------------------
# Chapter 3: training (slow)
# ---------------------------------------------------------------------------------------------
def _tensors(source):
    try:
        mnist = data.load_mnist(source=source)
    except (FileNotFoundError, OSError, ValueError) as err:
        pytest.skip(f"{source} MNIST unavailable: {err}")
    return bt.mnist_tensors(mnist)


@pytest.fixture(scope="module", params=["embedded", "full"])
def figure1_runs(request):
    """The chapter's Figure 1 runs (both placements of BN) for every seed, on each data set."""
    tensors = _tensors(request.param)
    return request.param, {seed: bt.figure1(tensors, seed=seed, variants=("none", "batch", "batch_after"))
                           for seed in SEEDS}


@pytest.fixture(scope="module")
def auto_tensors():
    return bt.mnist_tensors(data.load_mnist())


@pytest.mark.slow
def test_bn_reaches_90_percent_in_fewer_than_half_the_steps(figure1_runs):
    source, runs = figure1_runs
    for seed, histories in runs.items():
        plain = histories["none"].first_step_reaching(0.90)
        # chapter: the plain net gets to 90% after 2,500-2,900 steps, BN within 300-700
        assert plain is not None and plain >= 2000, (source, seed, plain)
        for variant in ("batch", "batch_after"):
            with_bn = histories[variant].first_step_reaching(0.90)
            assert with_bn is not None and with_bn <= 1000, (source, seed, variant, with_bn)
            assert with_bn < 0.5 * plain, (source, seed, variant, with_bn, plain)


@pytest.mark.slow
def test_plain_net_is_near_chance_at_step_500_and_bn_is_not(figure1_runs):
    source, runs = figure1_runs
    for seed, histories in runs.items():
        at_500 = {k: h.test_accuracy[h.steps.index(500)] for k, h in histories.items()}
        assert at_500["none"] < 0.2, (source, seed, at_500)          # chance is 0.1
        assert at_500["batch"] > 0.85, (source, seed, at_500)


@pytest.mark.slow
def test_sigmoid_input_distribution_is_more_stable_with_bn(figure1_runs):
    source, runs = figure1_runs
    for seed, histories in runs.items():
        drift_plain = bt.percentile_drift(histories["none"]).max()
        drift_bn = bt.percentile_drift(histories["batch"]).max()
        assert drift_plain > 2 * drift_bn, (source, seed, drift_plain, drift_bn)


@pytest.mark.slow
def test_bn_after_the_sigmoid_is_not_worse_than_before(figure1_runs):
    source, runs = figure1_runs
    for seed, histories in runs.items():
        # chapter: "after" ends slightly higher in our runs; the test guards only "not lower"
        before, after = histories["batch"].test_accuracy[-1], histories["batch_after"].test_accuracy[-1]
        assert after >= before, (source, seed, before, after)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_bn_trains_at_learning_rates_where_the_plain_net_fails(auto_tensors, seed):
    runs = bt.lr_sweep(auto_tensors, (16.0, 32.0), seed=seed, steps=1000)
    for lr in (16.0, 32.0):
        plain = bt.final_test_accuracy(runs["none", lr])
        assert np.isnan(plain) or plain < 0.15, (seed, lr, plain)     # chance is 0.1
        assert bt.final_test_accuracy(runs["batch", lr]) > 0.85, (seed, lr)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_bn_trains_from_init_scales_where_the_plain_net_fails(auto_tensors, seed):
    runs = bt.init_scale_sweep(auto_tensors, (0.001, 0.01, 3.0), seed=seed, steps=1000)
    acc = {key: bt.final_test_accuracy(history) for key, history in runs.items()}
    for scale in (0.001, 0.01):
        assert acc["none", scale] < 0.25, (seed, scale, acc)         # chance is 0.1
        assert acc["batch", scale] > 0.85, (seed, scale, acc)
    assert acc["batch", 3.0] > 0.8 and acc["batch", 3.0] > acc["none", 3.0] + 0.15, (seed, acc)
