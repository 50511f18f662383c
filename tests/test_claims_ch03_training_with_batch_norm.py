"""The claims of chapter 3 (training with batch norm), asserted over several seeds with a margin.

Each test calls the same experiment function, with the same settings, as the chapter that states
the claim (``normcourse.experiments.ch03_training_with_batch_norm``). The training claims are ``slow`` and
run once per data source (``claims_mnist`` in conftest.py: the embedded subset always, full
MNIST when it is available, else a skip that says why).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse.experiments import ch03_training_with_batch_norm as bt

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


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
@pytest.fixture(scope="module")
def tensors(claims_mnist):
    """The chapter's tensors, (N, 784), for one data source (``claims_mnist`` in conftest.py)."""
    return claims_mnist.source, bt.mnist_tensors(claims_mnist)


@pytest.fixture(scope="module")
def figure1_runs(tensors):
    """The chapter's Figure 1 runs (both placements of BN) for every seed, on one data set."""
    source, data = tensors
    return source, {seed: bt.figure1(data, seed=seed, variants=("none", "batch", "batch_after"))
                    for seed in SEEDS}


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


# At learning rate 32 the run with batch norm is still climbing after 1,000 steps and its test
# accuracy swings by 5-15 points from one evaluation to the next (batch norm's scale invariance
# lets the weights grow until the effective step lr / |w|^2 is small, and that takes most of the
# run). Its last value is a draw from that swing: 0.81-0.90 over seeds 0-8 on the embedded subset,
# 0.87-0.89 over seeds 0-2 on full MNIST, and 0.823 for seed 2 on another machine's arithmetic.
# So the chapter claims "above 85%" at 16 only and "far above chance, above 75%" at 32.
BN_ACCURACY_AFTER_1000_STEPS = {16.0: 0.85, 32.0: 0.75}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_bn_trains_at_learning_rates_where_the_plain_net_fails(tensors, seed):
    source, data = tensors
    runs = bt.lr_sweep(data, (16.0, 32.0), seed=seed, steps=1000)
    for lr, floor in BN_ACCURACY_AFTER_1000_STEPS.items():
        plain = bt.final_test_accuracy(runs["none", lr])
        with_bn = bt.final_test_accuracy(runs["batch", lr])
        print(f"{source}, seed {seed}, lr {lr}: plain {plain:.4f}, BN {with_bn:.4f}")
        assert np.isnan(plain) or plain < 0.15, (source, seed, lr, plain)     # chance is 0.1
        assert with_bn > floor, (source, seed, lr, with_bn)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_bn_trains_from_init_scales_where_the_plain_net_fails(tensors, seed):
    source, data = tensors
    runs = bt.init_scale_sweep(data, (0.001, 0.01, 3.0), seed=seed, steps=1000)
    acc = {key: bt.final_test_accuracy(history) for key, history in runs.items()}
    print(f"{source}, seed {seed}: " + ", ".join(f"{k}: {v:.4f}" for k, v in acc.items()))
    for scale in (0.001, 0.01):
        assert acc["none", scale] < 0.25, (source, seed, scale, acc)         # chance is 0.1
        assert acc["batch", scale] > 0.85, (source, seed, scale, acc)
    assert acc["batch", 3.0] > 0.8 and acc["batch", 3.0] > acc["none", 3.0] + 0.15, (source, seed, acc)


# ---------------------------------------------------------------------------------------------
# Chapter 3: where eps takes over from the weight scale (one forward pass, no training)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_eps_takes_over_below_weight_scale_0_01(tensors, seed):
    source, data = tensors
    variances = bt.init_preactivation_variance(data, (0.001, 0.01, 0.1, 1.0, 3.0), seed=seed)
    for scale in (0.1, 1.0, 3.0):  # batch norm restores unit variance in every layer
        assert variances[scale]["post"].min() > 0.99, (source, seed, scale, variances[scale])
    assert variances[0.01]["post"].min() > 0.95, (source, seed, variances[0.01])
    tiny = variances[0.001]
    # chapter: layers 2 and 3 get an input variance below eps = 1e-5, and their normalized
    # outputs a variance far below 1; layer 1 (raw pixels) keeps more
    assert tiny["pre"][1:].max() < 1e-5 and tiny["post"][1:].max() < 0.5, (source, seed, tiny)
    assert tiny["post"][0] > tiny["post"][1:].max(), (source, seed, tiny)


# ---------------------------------------------------------------------------------------------
# Chapter 3: with Adam at a rate that suits the plain network, batch norm gains nothing
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_with_adam_batch_norm_is_behind_at_step_500_and_needed_at_a_raised_rate(tensors, seed):
    source, data = tensors
    runs = bt.lr_sweep(data, (0.01, 0.1), seed=seed, steps=1000, optimizer="adam",
                       eval_every=250)
    acc = {key: h.test_accuracy for key, h in runs.items()}
    print(f"{source}, seed {seed}: " + "; ".join(f"{k}: {v}" for k, v in acc.items()))
    at_500 = {key: h.test_accuracy[h.steps.index(500)] for key, h in runs.items()}
    assert at_500["batch", 0.01] < at_500["none", 0.01], (source, seed, acc)
    final = {key: bt.final_test_accuracy(h) for key, h in runs.items()}
    assert abs(final["batch", 0.01] - final["none", 0.01]) < 0.015, (source, seed, final)
    assert not final["none", 0.1] >= 0.15, (source, seed, final)          # chance is 0.1
    assert final["batch", 0.1] > 0.9, (source, seed, final)
