"""Chapter 1, input normalization: standardize with statistics fitted on the training set."""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import features
from normcourse.gradcheck import random_upstream


# ---- 01.standardize_fit ---------------------------------------------------------------------
def _train_set(seed: int, n: int = 12) -> np.ndarray:
    x = features(seed, n)
    x[:, 2] = 7.0  # a constant feature, like an MNIST corner pixel
    return x


def _fit_case(description, seed, offset=0.0, eps=1e-3):
    return Case(description, lambda: {"x_train": _train_set(seed) + offset, "eps": eps})


def _fit_unbiased(x_train, eps):
    return x_train.mean(axis=0), np.maximum(x_train.std(axis=0, ddof=1), eps)


def _fit_per_example(x_train, eps):
    return x_train.mean(axis=1), np.maximum(x_train.std(axis=1), eps)


def _fit_global(x_train, eps):
    return x_train.mean(), max(x_train.std(), eps)


def _fit_no_floor(x_train, eps):
    return x_train.mean(axis=0), x_train.std(axis=0)


def _fit_eps_in_root(x_train, eps):
    return x_train.mean(axis=0), np.sqrt(x_train.var(axis=0) + eps)


def _fit_eps_added(x_train, eps):
    return x_train.mean(axis=0), x_train.std(axis=0) + eps


def _fit_variance(x_train, eps):
    return x_train.mean(axis=0), np.maximum(x_train.var(axis=0), eps)


def _fit_one_pass(x_train, eps):
    mean = x_train.mean(axis=0)
    return mean, np.maximum(np.sqrt(np.maximum((x_train**2).mean(axis=0) - mean**2, 0.0)), eps)


STANDARDIZE_FIT = OutputTask(
    id="01.standardize_fit",
    title="per-feature mean and std of the training set",
    function="standardize_fit",
    points=2,
    correct=reference.standardize_fit,
    outputs=("mean", "std"),
    output_points=(1, 1),
    cases=(
        _fit_case("x_train of shape (12, 5) with a constant feature, eps=1e-3", 0),
        _fit_case("x_train of shape (12, 5) shifted by 1e7 (large mean, small spread)", 1, offset=1e7),
    ),
    mistakes=(
        Mistake("unbiased_std", "You divided by N - 1 (ddof=1): standardization uses the biased "
                "standard deviation, dividing by N, as np.std does by default.", _fit_unbiased),
        Mistake("wrong_axis", "You computed one mean and std per example (axis=1); the statistics "
                "are per feature, over the examples: axis=0, shape (D,).", _fit_per_example),
        Mistake("global_statistics", "You computed a single mean and std for the whole array; "
                "each feature needs its own (axis=0, shape (D,)).", _fit_global),
        Mistake("no_floor", "A constant feature gets std 0, and dividing by it gives NaN: floor "
                "the std at eps with np.maximum(std, eps).", _fit_no_floor),
        Mistake("eps_in_root", "You added eps inside the square root; this task floors the std "
                "instead: np.maximum(np.sqrt(var), eps).", _fit_eps_in_root),
        Mistake("eps_added", "You added eps to the std; floor it instead: np.maximum(std, eps), "
                "which leaves every non-constant feature's std exact.", _fit_eps_added),
        Mistake("returned_variance", "You returned the variance; the std is its square root.",
                _fit_variance),
        Mistake("one_pass_variance", "E[x^2] - E[x]^2 loses every digit when the mean is large "
                "compared with the spread: subtract the mean first, then average the squares.",
                _fit_one_pass),
    ),
)


# ---- 01.standardize -------------------------------------------------------------------------
def _standardize_case(description, seed):
    def make():
        mean, std = reference.standardize_fit(features(seed, 12))
        # Test data from a shifted distribution: its own statistics differ from the training ones.
        x = 2.0 * features(seed + 100, 6) + 1.0
        return {"x": x, "mean": mean, "std": std}

    return Case(description, make)


def _standardize_own_statistics(x, mean, std):
    return (x - x.mean(axis=0)) / x.std(axis=0)


def _standardize_times_std(x, mean, std):
    return (x - mean) * std


def _standardize_no_centering(x, mean, std):
    return x / std


def _standardize_divide_first(x, mean, std):
    return x / std - mean


STANDARDIZE = OutputTask(
    id="01.standardize",
    title="standardize new data with the training statistics",
    function="standardize",
    correct=lambda x, mean, std: reference.standardize_forward(x, mean, std)[0],
    cases=(_standardize_case("test data of shape (6, 5), statistics fitted on a training set", 2),),
    mistakes=(
        Mistake("own_statistics", "You standardized the test data with its own mean and std; use "
                "the training set's `mean` and `std` that are passed in (the model was trained "
                "on data transformed with those numbers).", _standardize_own_statistics),
        Mistake("times_std", "You multiplied by the std; divide by it.", _standardize_times_std),
        Mistake("no_centering", "You forgot to subtract the mean.", _standardize_no_centering),
        Mistake("divide_first", "Subtract the mean first, then divide: (x - mean) / std.",
                _standardize_divide_first),
    ),
)


# ---- 01.standardize_backward ----------------------------------------------------------------
def _backward_case(description, seed):
    def make():
        mean, std = reference.standardize_fit(features(seed, 12))
        return {"dout": random_upstream((6, 5), seed), "mean": mean, "std": std}

    return Case(description, make)


def _backward_correct(dout, mean, std):
    return reference.standardize_backward(dout, {"std": std})


STANDARDIZE_BACKWARD = OutputTask(
    id="01.standardize_backward",
    title="gradient of standardization with fixed statistics",
    function="standardize_backward",
    correct=_backward_correct,
    outputs=("dx",),
    cases=(_backward_case("random upstream gradient of shape (6, 5)", 3),),
    mistakes=(
        Mistake("times_std", "You multiplied by the std: out = (x - mean) / std, so "
                "d out / d x = 1 / std.", lambda dout, mean, std: dout * std),
        Mistake("forgot_dout", "You returned d out / d x without multiplying by the upstream "
                "gradient `dout` (chain rule).", lambda dout, mean, std: np.ones_like(dout) / std),
        Mistake("statistics_as_variables", "The mean and std here are constants fitted on the "
                "training set, not functions of x: no gradient flows through them.",
                lambda dout, mean, std: (dout - dout.mean(axis=0)) / std),
    ),
)


# ---- 01.largest_stable_lr -------------------------------------------------------------------
def _lr_case(description, seed):
    return Case(description, lambda: {"x": features(seed, 20, scales=[1.0, 4.0, 0.5],
                                                    means=[3.0, 0.0, -1.0])})


def _lr_from_hessian(h, eigenvalue=-1, factor=2.0):
    """factor / an eigenvalue of the Hessian; the defaults give the answer, 2 / lambda_max."""
    return factor / np.linalg.eigvalsh(h)[eigenvalue]


# Computed here rather than imported from the chapter's experiment module: exercises depend on
# no chapter's code.
def _hessian(x):
    """The Hessian of (1/2N)||Xw - y||^2 with respect to w: X^T X / N."""
    return x.T @ x / len(x)


LARGEST_STABLE_LR = OutputTask(
    id="01.largest_stable_lr",
    title="the largest stable learning rate of least squares",
    function="largest_stable_lr",
    correct=lambda x: _lr_from_hessian(_hessian(x)),
    outputs=("lr",),
    cases=(_lr_case("x of shape (20, 3), features with non-zero means", 4),),
    mistakes=(
        Mistake("no_factor_two", "Gradient descent on a quadratic converges for every step "
                "below 2 / lambda_max, not 1 / lambda_max (that is the fastest step for the top "
                "direction).", lambda x: _lr_from_hessian(_hessian(x), factor=1.0)),
        Mistake("smallest_eigenvalue", "The step is limited by the *largest* eigenvalue of the "
                "Hessian: 2 / lambda_max.", lambda x: _lr_from_hessian(_hessian(x), 0)),
        Mistake("centered_covariance", "The Hessian of (1/2N)||Xw - y||^2 is X^T X / N, with the "
                "raw (uncentered) features: the features' means enlarge lambda_max.",
                lambda x: _lr_from_hessian(np.cov(x.T, bias=True))),
        Mistake("sum_not_mean", "The loss averages over the N examples, so the Hessian is "
                "X^T X / N, not X^T X.", lambda x: _lr_from_hessian(x.T @ x)),
    ),
)

TASKS = (STANDARDIZE_FIT, STANDARDIZE, STANDARDIZE_BACKWARD, LARGEST_STABLE_LR)
