"""The claims of chapter 1 (input normalization), asserted over several seeds.

Each test calls the same experiment function, with the same settings, as the chapter that states
the claim (``normcourse.experiments.ch01_input_normalization``). These claims are about a synthetic
two-feature regression problem and scikit-learn's bundled wine data: no MNIST, so they do not
depend on the data source (and need no ``claims_mnist`` parametrization).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse.experiments import ch01_input_normalization as inorm

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
# Chapter 1: a small network on scikit-learn's wine data (bundled, no MNIST: one data source)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wine_runs():
    """The chapter's comparison, same settings: {(optimizer, scaling, seed): test accuracy}."""
    return inorm.tabular_comparison(seeds=SEEDS)


def _majority_fraction(split):
    return np.bincount(split.y_test).max() / len(split.y_test)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_standardizing_the_wine_features_is_what_lets_the_network_learn(wine_runs, seed):
    split = inorm.load_tabular(seed)
    # chapter: with SGD on raw features the network predicts one class for every wine
    assert wine_runs["sgd", "raw", seed] <= _majority_fraction(split) + 1e-9
    for optimizer in ("sgd", "adam"):
        assert wine_runs[optimizer, "standardized", seed] >= 0.95
    # chapter: Adam's per-weight step sizes get part of the way on raw features, not all of it
    assert wine_runs["adam", "raw", seed] > _majority_fraction(split) + 0.15
    assert wine_runs["adam", "standardized", seed] > wine_runs["adam", "raw", seed] + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_the_leak_moves_the_statistics_but_not_the_accuracy(wine_runs, seed):
    split = inorm.load_tabular(seed)
    one_example = 1.0 / len(split.y_test)
    for optimizer in ("sgd", "adam"):
        honest, leaked = wine_runs[optimizer, "standardized", seed], wine_runs[optimizer, "leaked", seed]
        # chapter: the leak changes test accuracy by at most one of the 54 test wines
        assert abs(honest - leaked) <= one_example + 1e-9
    moved = inorm.leaked_statistics(split)
    # chapter: the leaked means move by up to ~0.1 training standard deviations, the stds by
    # up to ~8 %: different statistics, not a different model on this i.i.d. split
    assert 0.03 < np.abs(moved["mean_shift"]).max() < 0.2
    assert 0.0 < np.abs(moved["std_ratio"] - 1).max() < 0.15


@pytest.mark.parametrize("seed", SEEDS)
def test_standard_scaler_is_the_oracle_for_standardize(seed):
    from sklearn.preprocessing import StandardScaler

    split = inorm.load_tabular(seed)
    scaler = StandardScaler().fit(split.x_train)
    mean, std = inorm.reference.standardize_fit(split.x_train)
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-12, atol=0)
    np.testing.assert_allclose(std, scaler.scale_, rtol=1e-12, atol=0)  # both biased (ddof=0)
    ours, _ = inorm.reference.standardize_forward(split.x_test, mean, std)
    np.testing.assert_allclose(ours, scaler.transform(split.x_test), rtol=1e-10, atol=1e-12)
    # chapter: where they differ, a constant feature: sklearn divides by 1, we by the floor eps
    x_train = np.column_stack([split.x_train[:, 0], np.full(len(split.x_train), 2.0)])
    x_new = np.array([[13.0, 2.0], [13.0, 2.5]])
    scaler = StandardScaler().fit(x_train)
    mean, std = inorm.reference.standardize_fit(x_train)
    assert scaler.scale_[1] == 1.0 and std[1] == 1e-8
    ours, _ = inorm.reference.standardize_forward(x_new, mean, std)
    theirs = scaler.transform(x_new)
    np.testing.assert_allclose(ours[:, 0], theirs[:, 0], rtol=1e-12)
    assert ours[0, 1] == theirs[0, 1] == 0.0
    assert theirs[1, 1] == pytest.approx(0.5) and ours[1, 1] == pytest.approx(0.5e8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_the_pipeline_fits_its_scaler_on_the_training_split_only(seed):
    split = inorm.load_tabular(seed)
    pipeline = inorm.scaler_pipeline(split, seed)
    mean, std = inorm.reference.standardize_fit(split.x_train)
    scaler = pipeline.named_steps["standardscaler"]
    np.testing.assert_allclose(scaler.mean_, mean, rtol=1e-12)
    np.testing.assert_allclose(scaler.scale_, std, rtol=1e-12)
    assert pipeline.score(split.x_test, split.y_test) >= 0.95


def test_normalization_stages_use_the_packages_transforms():
    x = inorm.make_regression_problem(seed=0).x_train
    stages = inorm.normalization_stages(x)
    assert list(stages) == ["raw", "centred", "standardized", "ZCA whitened"]
    np.testing.assert_allclose(stages["centred"].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(stages["standardized"].std(0), 1, rtol=1e-12)
    np.testing.assert_allclose(np.cov(stages["ZCA whitened"], rowvar=False, bias=True), np.eye(2),
                               atol=1e-6)


def test_scaled_features_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="leaked"):
        inorm.scaled_features(inorm.load_tabular(0), "minmax")
