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



# ---- 01.lr_sweep: an experiment -------------------------------------------------------------
# Predict, then run: gradient descent at fractions of 2 / lambda_max on the raw and on the
# standardized problem, counting the steps until the loss is within tol of its minimum.
DIVERGED_LOSS = 1e12


def _sweep_case(description, seed):
    def make():
        g = np.random.default_rng(seed)
        cov = np.array([[1.0, 0.5], [0.5, 1.0]]) * np.outer([1.5, 0.3], [1.5, 0.3])
        x = g.multivariate_normal([3.0, 0.0], cov, size=200)  # the chapter's problem
        y = x @ np.array([1.0, -2.0]) + 0.1 * g.standard_normal(200)
        return {"x": x, "y": y, "factors": np.array([0.5, 0.9, 0.98, 1.02]), "tol": 1e-6,
                "max_steps": 3000}

    return Case(description, make)


def _steps(x, t, lr, tol, max_steps, halved=True, per_example=True):
    """Steps of gradient descent from w = 0 until the loss is within tol of its minimum; -1."""
    n = len(x) if per_example else 1
    scale = 0.5 if halved else 1.0
    w_star = np.linalg.lstsq(x, t, rcond=None)[0]
    best = scale * np.mean((x @ w_star - t) ** 2)
    w = np.zeros(x.shape[1])
    for step in range(max_steps + 1):
        gap = scale * np.mean((x @ w - t) ** 2) - best
        if gap <= tol:
            return float(step)
        if not gap < DIVERGED_LOSS:
            return -1.0
        w = w - lr * x.T @ (x @ w - t) / n
    return -1.0


def _sweep(x, y, factors, tol, max_steps, shared_limit=False, **variant):
    mean, std = reference.standardize_fit(x)
    x_std, _ = reference.standardize_forward(x, mean, std)
    # centring y (the bias at its optimum, as in the chapter) leaves the steps unchanged: the
    # standardized columns sum to 0, so X^T y = X^T (y - mean(y)) and the loss gap is the same
    problems = [(x, y), (x_std, y - y.mean())]
    raw_limit = _lr_from_hessian(_hessian(x))
    out = []
    for features_, targets in problems:
        limit = raw_limit if shared_limit else _lr_from_hessian(_hessian(features_))
        out.append(np.array([_steps(features_, targets, f * limit, tol, max_steps, **variant)
                             for f in factors]))
    return tuple(out)


LR_SWEEP = OutputTask(
    id="01.lr_sweep",
    title="experiment: a learning-rate sweep on raw and standardized features",
    function="lr_sweep",
    points=2,
    correct=_sweep,
    outputs=("steps_raw", "steps_standardized"),
    output_points=(1, 1),
    cases=(_sweep_case("the chapter's two-feature problem, 200 examples, factors 0.5 to 1.02",
                       5),),
    uses=(STANDARDIZE_FIT, STANDARDIZE, LARGEST_STABLE_LR),
    mistakes=(
        Mistake("raw_limit_for_both", "Each problem has its own limit: compute "
                "largest_stable_lr on the standardized features for the standardized run.",
                lambda x, y, factors, tol, max_steps: _sweep(x, y, factors, tol, max_steps,
                                                             shared_limit=True)),
        Mistake("gradient_not_averaged", "The gradient of (1/2N)||Xw - y||^2 is "
                "X^T (Xw - y) / N: without the 1/N every step is N times too large.",
                lambda x, y, factors, tol, max_steps: _sweep(x, y, factors, tol, max_steps,
                                                             per_example=False)),
        Mistake("loss_not_halved", "The loss is (1/2N)||Xw - y||^2, half the mean squared "
                "error: compare half the gap with tol.",
                lambda x, y, factors, tol, max_steps: _sweep(x, y, factors, tol, max_steps,
                                                             halved=False)),
    ),
)

TASKS = (STANDARDIZE_FIT, STANDARDIZE, STANDARDIZE_BACKWARD, LARGEST_STABLE_LR, LR_SWEEP)
