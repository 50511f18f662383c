"""Chapter 5's experiments: layer normalization (Ba, Kiros & Hinton 2016).

- ``invariance_table``: the LN paper's Table 1 checked numerically for batch norm and layer
  norm (NumPy reference code, float64), plus the sign flip LN(a x) = -LN(x) for a < 0;
- ``batch_size_comparison``: the LN paper's Sec. 6.6 at laptop scale, batch norm against layer
  norm on MNIST at batch 128 and batch 4;
- ``convnet_comparison``: the two on the small ConvNet, where batch norm usually wins (Sec. 6.7);
- ``recurrent_comparison``: an Elman RNN with and without layer norm on row-by-row MNIST.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from normcourse import reference
from normcourse.experiments.runner import (
    ClassifierResult,
    mnist_tensors,
    sweep,
    train_classifier,
    train_norms,
)
from normcourse.recurrent import RecurrentClassifier
from normcourse.train import History, evaluate, train
from normcourse.utils import one_thread, seed_everything
from normcourse.validation import check_choice

__all__ = [
    "TRANSFORMS",
    "PAPER_TABLE_1",
    "normalized_summed_inputs",
    "invariance_table",
    "negative_scale_check",
    "batch_size_comparison",
    "convnet_comparison",
    "recurrent_comparison",
]

# Each transformation maps (W: (H, D), X: (N, D), a) to a new (W, X); a is the factor or shift.
TRANSFORMS: dict[str, Callable] = {
    # every weight times a
    "weight matrix re-scaling": lambda W, X, a: (a * W, X),
    # the same vector added to every row of W: every unit's summed input shifts by a * sum(x)
    "weight matrix re-centering": lambda W, X, a: (W + a, X),
    # one unit's incoming weights times a
    "weight vector re-scaling": lambda W, X, a: (np.vstack([a * W[:1], W[1:]]), X),
    # every input times a
    "dataset re-scaling": lambda W, X, a: (W, a * X),
    # the same shift added to every input
    "dataset re-centering": lambda W, X, a: (W, X + a),
    # one training case times a
    "single training case re-scaling": lambda W, X, a: (W, np.vstack([a * X[:1], X[1:]])),
}

# Ba et al. 2016, Table 1 (True: invariant), for batch norm and layer norm.
PAPER_TABLE_1 = {
    "weight matrix re-scaling": {"batch": True, "layer": True},
    "weight matrix re-centering": {"batch": False, "layer": True},
    "weight vector re-scaling": {"batch": True, "layer": False},
    "dataset re-scaling": {"batch": True, "layer": True},
    "dataset re-centering": {"batch": True, "layer": False},
    "single training case re-scaling": {"batch": False, "layer": True},
}


def normalized_summed_inputs(W: np.ndarray, X: np.ndarray, norm: str, eps: float = 1e-12) -> np.ndarray:
    """norm(X W^T): the summed inputs a = X W^T (N, H) normalized by ``reference.batchnorm_forward``
    or ``reference.layernorm_forward`` with gamma = 1, beta = 0. A tiny eps makes the invariances
    exact up to rounding (with eps = 1e-5 they hold up to about eps / variance)."""
    a = X @ W.T
    ones, zeros = np.ones(a.shape[1]), np.zeros(a.shape[1])
    check_choice(norm, ("batch", "layer"), "norm")
    if norm == "batch":
        return reference.batchnorm_forward(a, ones, zeros, training=True, eps=eps)[0]
    return reference.layernorm_forward(a, ones, zeros, eps=eps)[0]


def _random_layer(seed: int, n: int = 16, d: int = 8, h: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((h, d)), rng.standard_normal((n, d))


def invariance_table(seed: int = 0, scale: float = 3.0, shift: float = 0.7) -> dict[str, dict[str, float]]:
    """For each transformation of ``TRANSFORMS`` and each norm, the largest change of the normalized
    summed inputs: ``{transform: {"batch": max|diff|, "layer": max|diff|}}``. Rescalings use the
    factor ``scale`` (> 0), re-centerings the shift ``shift``. A change below 1e-9 means invariant.
    """
    W, X = _random_layer(seed)
    table = {}
    for name, transform in TRANSFORMS.items():
        amount = shift if "re-centering" in name else scale
        W2, X2 = transform(W, X, amount)
        table[name] = {
            norm: float(np.max(np.abs(normalized_summed_inputs(W2, X2, norm) - normalized_summed_inputs(W, X, norm))))
            for norm in ("batch", "layer")
        }
    return table


def negative_scale_check(seed: int = 0, scale: float = -2.0) -> dict[str, float]:
    """Layer norm of a single case times a negative ``scale``: max|LN(a x) - LN(x)| (large: not
    invariant) and max|LN(a x) + LN(x)| (rounding only: LN(a x) = -LN(x) for a < 0)."""
    if not scale < 0:
        raise ValueError(f"negative_scale_check needs a negative scale, got {scale}")
    _, X = _random_layer(seed)
    ones, zeros = np.ones(X.shape[1]), np.zeros(X.shape[1])
    ln = lambda v: reference.layernorm_forward(v, ones, zeros, eps=1e-12)[0]  # noqa: E731
    return {"same": float(np.max(np.abs(ln(scale * X) - ln(X)))),
            "negated": float(np.max(np.abs(ln(scale * X) + ln(X))))}


# ---------------------------------------------------------------------------------------------
# Training experiments
# ---------------------------------------------------------------------------------------------
def batch_size_comparison(
    data,
    batch_sizes: Sequence[int] = (128, 4),
    norms: Sequence[str] = ("batch", "layer"),
    *,
    steps: int | Mapping[int, int] = 2000,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int | None = 100,
    test_examples: int | None = None,
) -> dict[int, dict[str, ClassifierResult]]:
    """The LN paper's Sec. 6.6 at laptop scale: the ReLU MLP 784-100-100-100-10 with Adam at each
    batch size and norm; ``{batch_size: {norm: result}}`` with training-loss curves recorded every
    ``eval_every`` steps. ``steps``: one number for every batch size, or ``{batch_size: steps}``
    (large batches converge in fewer steps). (The paper's network is 784-1000-1000-10.)"""
    tensors = mnist_tensors(data, test_examples)
    steps_for = steps if isinstance(steps, Mapping) else {b: steps for b in batch_sizes}
    missing = [b for b in batch_sizes if b not in steps_for]
    if missing:
        raise ValueError(f"steps gives no step count for batch sizes {missing}")
    runs = [(b, {"batch_size": b, "steps": steps_for[b]}) for b in batch_sizes]
    return sweep(lambda **kw: train_norms(tensors, norms, lr=lr, seed=seed,
                                          eval_every=eval_every, **kw), runs)


def convnet_comparison(
    data,
    norms: Sequence[str] = ("batch", "layer"),
    *,
    batch_size: int = 32,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int | None = 50,
    test_examples: int | None = 1000,
) -> dict[str, ClassifierResult]:
    """``normcourse.models.convnet`` (two 3x3 conv blocks, 16 and 32 channels) with each norm,
    Adam; ``{norm: result}``. Layer norm normalizes each example over all of (C, H, W)."""
    tensors = mnist_tensors(data, test_examples)
    runs = [(norm, {"norm": norm}) for norm in norms]
    return sweep(lambda **kw: train_classifier(tensors, architecture="convnet",
                                               batch_size=batch_size, steps=steps, lr=lr,
                                               seed=seed, eval_every=eval_every, **kw), runs)


@one_thread()
def recurrent_comparison(
    data,
    norms: Sequence[str] = ("none", "layer"),
    *,
    hidden_size: int = 64,
    batch_size: int = 32,
    steps: int = 400,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 50,
    train_examples: int | None = 8000,
    test_examples: int | None = 2000,
) -> dict[str, tuple[History, float]]:
    """Row-by-row MNIST: an Elman RNN reads an image as 28 time steps of 28 pixels and classifies
    its last state; with ``norm="layer"`` the summed inputs are layer-normalized at every step
    (``normcourse.recurrent``). Adam. Returns ``{norm: (history, test accuracy)}``."""
    x_train, y_train, x_test, y_test = mnist_tensors(data, test_examples)
    rows = lambda x: x.reshape(len(x), 28, 28)  # noqa: E731  (N, 1, 28, 28) -> (N, T=28, 28)
    tensors = (rows(x_train[:train_examples]), y_train[:train_examples], rows(x_test), y_test)

    def run(norm: str) -> tuple[History, float]:
        seed_everything(seed)
        model = RecurrentClassifier(28, hidden_size, 10, norm=norm)
        history = train(model, tensors, steps=steps, batch_size=batch_size, lr=lr,
                        optimizer="adam", seed=seed, eval_every=eval_every, progress=False)
        return history, evaluate(model, tensors[2], tensors[3])

    return sweep(run, [(norm, {"norm": norm}) for norm in norms])
