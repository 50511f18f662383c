"""Chapter 1's experiments: why standardized inputs make gradient descent fast.

Second part: a small network on scikit-learn's bundled wine data (13 features on very different
scales; offline), trained on raw and on standardized features, and the statistics fitted on the
training split only (inside a scikit-learn ``Pipeline``) or leaked from the test split.
scikit-learn is imported inside those functions, so ``import normcourse`` never needs it.

The chapter studies least squares, ``L(w) = 1/(2N) ||X w - y||^2``, because its loss surface is an
exact quadratic: the Hessian ``H = X^T X / N`` does not depend on ``w``, gradient descent with step
``lr`` converges exactly when ``lr < 2 / lambda_max(H)``, and its speed is set by the condition
number ``lambda_max / lambda_min``. Everything here is NumPy, float64, deterministic.

The functions return arrays; the chapter plots them and
``tests/test_claims_ch01_input_normalization.py`` asserts the chapter's claims by calling the same
functions over several seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from normcourse import reference
from normcourse.experiments.runner import sweep, train_classifier
from normcourse.validation import check_choice

__all__ = [
    "RegressionProblem",
    "make_regression_problem",
    "standardized_problem",
    "whitened_problem",
    "whitening_fit",
    "hessian",
    "condition_number",
    "max_stable_lr",
    "loss",
    "loss_surface",
    "least_squares_solution",
    "gradient_descent",
    "steps_to_tolerance",
    "normalization_stages",
    "TabularSplit",
    "load_tabular",
    "scaled_features",
    "tabular_network",
    "tabular_comparison",
    "leaked_statistics",
    "scaler_pipeline",
    "SCALINGS",
]


@dataclass
class RegressionProblem:
    """A least-squares problem split into train and test sets.

    x_train: (N, D), y_train: (N,), x_test: (M, D), y_test: (M,). ``y_offset`` is a constant added
    to every prediction (the bias, fixed at its optimum; 0 for the raw problem).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_offset: float = 0.0
    name: str = "raw"


def make_regression_problem(
    n_train: int = 500,
    n_test: int = 200,
    means=(3.0, 0.0),
    stds=(1.5, 0.3),
    correlation: float = 0.5,
    w_true=(1.0, -2.0),
    noise: float = 0.1,
    seed: int = 0,
) -> RegressionProblem:
    """Two correlated features on different scales, one of them far from zero mean.

    ``y = x @ w_true + noise``, with no bias in the generator, so the raw 2-parameter model
    ``w . x`` can fit it exactly. Feature ``j`` has mean ``means[j]`` and standard deviation
    ``stds[j]``; the two features have correlation ``correlation``.
    """
    rng = np.random.default_rng(seed)
    stds = np.asarray(stds, dtype=np.float64)
    corr = np.array([[1.0, correlation], [correlation, 1.0]])
    cov = corr * np.outer(stds, stds)
    n = n_train + n_test
    x = rng.multivariate_normal(np.asarray(means, dtype=np.float64), cov, size=n)
    y = x @ np.asarray(w_true, dtype=np.float64) + noise * rng.standard_normal(n)
    return RegressionProblem(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 0.0, "raw")


def standardized_problem(problem: RegressionProblem) -> RegressionProblem:
    """The same problem on standardized features, with statistics from the training set only.

    With zero-mean features the bias decouples from the weights (the Hessian is block diagonal),
    and its optimum is ``mean(y_train)``: we fix it there and keep two weights to study.
    """
    mean, std = reference.standardize_fit(problem.x_train)
    x_train, _ = reference.standardize_forward(problem.x_train, mean, std)
    x_test, _ = reference.standardize_forward(problem.x_test, mean, std)
    return RegressionProblem(
        x_train, problem.y_train, x_test, problem.y_test, float(problem.y_train.mean()), "standardized"
    )


def whitening_fit(x_train: np.ndarray, kind: str = "zca", eps: float = 1e-8):
    """Fit a whitening transform on the training set: ``x_white = (x - mean) @ W``.

    x_train: (N, D) -> mean (D,), W (D, D). With the covariance ``C = U diag(s) U^T``, PCA whitening
    is ``W = U diag(s + eps)^(-1/2)`` (rotate onto the principal axes, then rescale) and ZCA is
    ``W = U diag(s + eps)^(-1/2) U^T`` (rotate back, so the result stays closest to the input).
    Both give an identity covariance on the training set.
    """
    check_choice(kind, ("pca", "zca"), "whitening kind")
    mean = x_train.mean(axis=0)
    centered = x_train - mean
    cov = centered.T @ centered / x_train.shape[0]
    s, u = np.linalg.eigh(cov)
    w = u / np.sqrt(s + eps)
    if kind == "zca":
        w = w @ u.T
    return mean, w


def whitened_problem(problem: RegressionProblem, kind: str = "zca") -> RegressionProblem:
    """The same problem on whitened features (statistics from the training set only)."""
    mean, w = whitening_fit(problem.x_train, kind)
    return RegressionProblem(
        (problem.x_train - mean) @ w,
        problem.y_train,
        (problem.x_test - mean) @ w,
        problem.y_test,
        float(problem.y_train.mean()),
        f"{kind} whitened",
    )


def hessian(x: np.ndarray) -> np.ndarray:
    """Hessian of ``1/(2N) ||x w - y||^2`` with respect to w: ``x^T x / N``. x: (N, D) -> (D, D)."""
    return x.T @ x / x.shape[0]


def condition_number(h: np.ndarray) -> float:
    """``lambda_max / lambda_min`` of a symmetric positive-definite matrix."""
    eigenvalues = np.linalg.eigvalsh(h)
    return float(eigenvalues[-1] / eigenvalues[0])


def max_stable_lr(h: np.ndarray) -> float:
    """The largest step for which gradient descent on the quadratic converges: ``2 / lambda_max``."""
    return float(2.0 / np.linalg.eigvalsh(h)[-1])


def loss(problem: RegressionProblem, w: np.ndarray, split: str = "train") -> np.ndarray:
    """Mean squared error / 2. w: (D,) or (K, D) -> scalar or (K,)."""
    x, y = (problem.x_train, problem.y_train) if split == "train" else (problem.x_test, problem.y_test)
    residual = np.atleast_2d(w) @ x.T + problem.y_offset - y  # (K, N)
    values = 0.5 * np.mean(residual**2, axis=1)
    return values if np.ndim(w) == 2 else values[0]


def loss_surface(problem: RegressionProblem, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Training loss on the grid ``w1 x w2`` (1-D arrays) -> (len(w2), len(w1)), for contour plots."""
    grid = np.stack(np.meshgrid(w1, w2), axis=-1).reshape(-1, 2)
    return loss(problem, grid).reshape(len(w2), len(w1))


def least_squares_solution(problem: RegressionProblem) -> np.ndarray:
    """The training-loss minimizer, solved directly. -> (D,)"""
    w, *_ = np.linalg.lstsq(problem.x_train, problem.y_train - problem.y_offset, rcond=None)
    return w


def gradient_descent(problem: RegressionProblem, lr: float, steps: int, w0) -> np.ndarray:
    """Full-batch gradient descent on the training loss. Returns the path, (steps + 1, D).

    Stops early (the path is then shorter) once the weights overflow, so that a divergent run
    returns what it did instead of NaNs.
    """
    x, y = problem.x_train, problem.y_train - problem.y_offset
    w = np.asarray(w0, dtype=np.float64).copy()
    path = [w.copy()]
    for _ in range(steps):
        w = w - lr * x.T @ (x @ w - y) / x.shape[0]
        if not np.all(np.isfinite(w)) or np.abs(w).max() > 1e12:
            break
        path.append(w.copy())
    return np.array(path)


def steps_to_tolerance(
    problem: RegressionProblem, lr: float, w0, tol: float = 1e-6, max_steps: int = 100_000
) -> int | None:
    """Steps of gradient descent until the training loss is within ``tol`` of its minimum.

    Returns None when it does not get there in ``max_steps`` (or diverges).
    """
    x, y = problem.x_train, problem.y_train - problem.y_offset
    best = loss(problem, least_squares_solution(problem))
    w = np.asarray(w0, dtype=np.float64).copy()
    for step in range(max_steps + 1):
        current = loss(problem, w)
        if current - best <= tol:
            return step
        if not np.isfinite(current) or current > 1e12:
            return None
        w = w - lr * x.T @ (x @ w - y) / x.shape[0]
    return None


def normalization_stages(x: np.ndarray) -> dict[str, np.ndarray]:
    """The same 2-D data raw, centred, standardized and ZCA-whitened (statistics from ``x``).

    x: (N, 2) -> {title: (N, 2)}, for ``normcourse.figures.data_panels``. Standardized with
    ``reference.standardize_fit``/``standardize_forward``, whitened with ``whitening_fit``.
    """
    mean, std = reference.standardize_fit(x)
    standardized, _ = reference.standardize_forward(x, mean, std)
    white_mean, w = whitening_fit(x, kind="zca")
    return {
        "raw": x,
        "centred": x - mean,
        "standardized": standardized,
        "ZCA whitened": (x - white_mean) @ w,
    }


# ---------------------------------------------------------------------------------------------
# A tabular data set: scikit-learn's wine data
# ---------------------------------------------------------------------------------------------
# How the features reach the network: as they are, standardized with training statistics, or
# standardized with statistics fitted on training + test data (the leak).
SCALINGS = ("raw", "standardized", "leaked")


@dataclass
class TabularSplit:
    """A stratified train/test split of a bundled scikit-learn data set.

    x_train: (N, D) float64, y_train: (N,) int64, x_test: (M, D), y_test: (M,);
    feature_names: D names.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]


def load_tabular(seed: int = 0, test_fraction: float = 0.3) -> TabularSplit:
    """scikit-learn's wine data (178 wines, 13 chemical measurements, 3 cultivars), split
    stratified by class with ``random_state=seed``. Bundled with scikit-learn: no download."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    bunch = load_wine()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_fraction, random_state=seed,
        stratify=bunch.target)
    return TabularSplit(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                        tuple(bunch.feature_names))


def scaled_features(split: TabularSplit, scaling: str):
    """(x_train, x_test) as the network sees them under ``scaling`` (one of ``SCALINGS``)."""
    check_choice(scaling, SCALINGS, "scaling")
    if scaling == "raw":
        return split.x_train, split.x_test
    fitted_on = split.x_train if scaling == "standardized" else np.vstack([split.x_train,
                                                                          split.x_test])
    mean, std = reference.standardize_fit(fitted_on)
    return (reference.standardize_forward(split.x_train, mean, std)[0],
            reference.standardize_forward(split.x_test, mean, std)[0])


def tabular_network(split: TabularSplit, scaling: str, *, seed: int, optimizer: str = "sgd",
                    lr: float = 0.1, steps: int = 300, batch_size: int = 32,
                    hidden=(32, 32)) -> float:
    """Train a small ReLU MLP (D-32-32-classes) on ``split`` with ``scaling``; test accuracy.

    Same network, seed, optimizer and steps for every scaling: only the features differ.
    """
    x_train, x_test = scaled_features(split, scaling)
    tensors = (torch.tensor(x_train, dtype=torch.float32), torch.from_numpy(split.y_train),
               torch.tensor(x_test, dtype=torch.float32), torch.from_numpy(split.y_test))
    classes = int(max(split.y_train.max(), split.y_test.max())) + 1
    result = train_classifier(tensors, norm="none", batch_size=batch_size, steps=steps, lr=lr,
                              seed=seed, optimizer=optimizer,
                              sizes=(x_train.shape[1], *hidden, classes))
    return result.eval_accuracy


def tabular_comparison(seeds=(0, 1, 2), scalings=SCALINGS,
                       optimizers=(("sgd", 0.1), ("adam", 0.001)), **settings) -> dict:
    """Test accuracy for every (optimizer, scaling, seed): {(optimizer, scaling, seed): acc}.

    The seed sets both the train/test split and the network's initialization.
    """
    splits = {seed: load_tabular(seed) for seed in seeds}
    runs = [((optimizer, scaling, seed),
             dict(split=splits[seed], scaling=scaling, seed=seed, optimizer=optimizer, lr=lr,
                  **settings))
            for optimizer, lr in optimizers for scaling in scalings for seed in seeds]
    return sweep(tabular_network, runs, desc="wine")


def leaked_statistics(split: TabularSplit) -> dict[str, np.ndarray]:
    """How much the standardization statistics move when the test split leaks into them.

    Returns per-feature arrays: ``mean_shift`` = (leaked mean - training mean) / training std
    (in training standard deviations) and ``std_ratio`` = leaked std / training std.
    """
    mean, std = reference.standardize_fit(split.x_train)
    leaked_mean, leaked_std = reference.standardize_fit(np.vstack([split.x_train, split.x_test]))
    return {"mean_shift": (leaked_mean - mean) / std, "std_ratio": leaked_std / std}


def scaler_pipeline(split: TabularSplit, seed: int = 0, hidden=(32, 32)):
    """scikit-learn's way: ``StandardScaler`` then ``MLPClassifier`` in one ``Pipeline``,
    fitted on the training split only. Returns the fitted pipeline (score it on the test split).
    """
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(),
                             MLPClassifier(hidden_layer_sizes=hidden, max_iter=1000,
                                           random_state=seed))
    return pipeline.fit(split.x_train, split.y_train)
