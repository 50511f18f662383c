"""The claims of chapter 1 (input normalization), asserted over several seeds.

Each test calls the same experiment function, with the same settings, as the chapter that states
the claim (``normcourse.experiments.ch01_input_normalization``). These claims are about a synthetic
two-feature regression problem: no MNIST, so they do not depend on the data source.
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
