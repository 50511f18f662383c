"""Chapter 4's experiments: batch norm at test time.

What a batch-norm layer does when there is no batch to normalize over: population statistics
(the BN paper's Algorithm 2) against exponential moving averages, recalibrating the statistics
after training, what happens when ``eval()`` is forgotten, freezing batch norm for fine-tuning, and
folding an eval-mode batch norm into the linear layer before it. The classifiers are trained by
``runner.train_classifier`` (``batchnorm_layers`` and ``ClassifierResult`` come from the runner).

The chapter plots what these functions return and
``tests/test_claims_ch04_test_time_statistics.py`` asserts its claims by calling the same
functions over several seeds.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from normcourse import nn as ncnn
from normcourse import reference
from normcourse.experiments.runner import (
    BATCHNORM_TYPES,
    ClassifierResult,
    batchnorm_layers,
    mnist_tensors,
    sweep,
    train_classifier,
)
from normcourse.train import evaluate
from normcourse.utils import one_thread, restoring_modes

__all__ = [
    "algorithm2_statistics",
    "running_mean_traces",
    "recalibrate_batchnorm",
    "batch_size_sweep",
    "recalibration_gain",
    "accuracy_on_sorted_batches",
    "freeze_batchnorm",
    "fold_batchnorm",
]


# ---------------------------------------------------------------------------------------------
# Population statistics (Algorithm 2) and moving averages
# ---------------------------------------------------------------------------------------------
def algorithm2_statistics(batch_means: np.ndarray, batch_variances: np.ndarray, m: int):
    """The BN paper's inference statistics from per-batch statistics.

    batch_means, batch_variances: (B, D), the mean and *biased* variance of each of B training
    batches of m examples. Returns E[x] = mean of the batch means and
    Var[x] = m / (m - 1) * mean of the batch variances, both (D,).
    """
    if m < 2:
        raise ValueError(f"algorithm2_statistics needs batches of at least 2 examples, got m={m}")
    batch_means, batch_variances = np.asarray(batch_means), np.asarray(batch_variances)
    return batch_means.mean(axis=0), m / (m - 1) * batch_variances.mean(axis=0)


def running_mean_traces(
    momenta: Sequence[float | None] = (0.1, 0.01, None),
    batches: int = 500,
    batch_size: int = 16,
    true_mean: float = 2.0,
    true_std: float = 1.0,
    seed: int = 0,
) -> dict:
    """How a BatchNorm1d(1)'s running_mean follows a stream of batches from N(true_mean, true_std^2).

    One layer per momentum (None: the cumulative average) sees the same batches. Returns
    ``{momentum: (batches,) array of running_mean after each batch}``. The cumulative average
    converges to the population mean; a moving average keeps a noise floor set by the momentum
    (its variance is about momentum / (2 - momentum) times the variance of one batch mean).
    """
    rng = np.random.default_rng(seed)
    stream = rng.normal(true_mean, true_std, size=(batches, batch_size, 1))
    traces = {}
    for momentum in momenta:
        layer = ncnn.BatchNorm1d(1, momentum=momentum, dtype=torch.float64).train()
        trace = np.empty(batches)
        with torch.no_grad():
            for i, batch in enumerate(stream):
                layer(torch.from_numpy(batch))
                trace[i] = layer.running_mean.item()
        traces[momentum] = trace
    return traces


@torch.no_grad()
@one_thread()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int, seed: int = 0) -> nn.Module:
    """Replace every batch norm's running statistics by population statistics of the final weights.

    Runs ``x`` (N, ...) through the model in training mode, in shuffled batches of ``batch_size``
    (the training batch size: the statistics the layers saw in training), with ``momentum=None``,
    so that each layer's buffers become the *cumulative* average of its batch means and of its
    unbiased batch variances: exactly Algorithm 2 for equal-size batches. Gradients are off and
    no parameter changes; momenta and train/eval modes are restored afterwards, also on error.
    """
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    with restoring_modes(model):  # train/eval flags back even if a batch fails
        try:
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None
            model.train()
            for start in range(0, len(x) - batch_size + 1, batch_size):  # full batches only
                model(x[order[start : start + batch_size]])
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
    return model


# ---------------------------------------------------------------------------------------------
# The batch-vs-population gap against the batch size, and recalibration
# ---------------------------------------------------------------------------------------------
def batch_size_sweep(
    data,
    batch_sizes: Sequence[int] = (4, 16, 64, 128),
    *,
    steps: int = 1500,
    lr: float = 1e-3,
    seed: int = 0,
    test_examples: int | None = None,
) -> list[ClassifierResult]:
    """Train the batch-norm MLP (Adam, same steps and learning rate) once per batch size; each
    result holds the eval-mode accuracy and the accuracy with batch statistics of that size."""
    tensors = mnist_tensors(data, test_examples)
    runs = [(i, {"batch_size": b}) for i, b in enumerate(batch_sizes)]
    results = sweep(lambda **kw: train_classifier(tensors, norm="batch", steps=steps, lr=lr,
                                                  seed=seed, **kw), runs, "batch size")
    return list(results.values())


@one_thread()
def recalibration_gain(result: ClassifierResult, data, calibration_examples: int = 8000,
                       test_examples: int | None = None) -> tuple[float, float]:
    """(eval accuracy with the moving averages, eval accuracy after ``recalibrate_batchnorm``).

    The model is copied; calibration uses the first ``calibration_examples`` training images in
    batches of the training batch size.
    """
    x_train, _, x_test, y_test = mnist_tensors(data, test_examples)
    model = _copy(result.model)
    before = evaluate(model, x_test, y_test)
    recalibrate_batchnorm(model, x_train[:calibration_examples], result.batch_size, seed=result.seed)
    return before, evaluate(model, x_test, y_test)


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------
# Forgetting eval(): predictions that depend on the rest of the batch
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
@one_thread()
def accuracy_on_sorted_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                               training: bool, in_place: bool = False) -> float:
    """Accuracy when the test set arrives sorted by label, in batches of ``batch_size``.

    In eval mode the order cannot matter. In training mode (``eval()`` forgotten) every batch is
    normalized with its own statistics, and a batch of one digit has very different statistics from
    the training batches. The model is copied, so its running statistics are not disturbed,
    unless ``in_place=True`` (to show the damage: training mode updates them with every batch).
    """
    model = (model if in_place else _copy(model)).train(training)
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        if training and len(xb) < 2:
            continue  # a batch of one cannot be batch-normalized in training mode
        correct += (model(xb).argmax(dim=1) == y[start : start + batch_size]).sum().item()
    return correct / len(x)


# ---------------------------------------------------------------------------------------------
# Freezing batch norm for fine-tuning
# ---------------------------------------------------------------------------------------------
def freeze_batchnorm(model: nn.Module) -> list[nn.Module]:
    """Put every batch norm of ``model`` in eval mode and stop its gamma/beta from training.

    Both halves are needed: ``requires_grad=False`` alone still lets the running statistics move
    in training mode, and eval mode alone still lets the optimizer change gamma and beta. Call it
    again after every ``model.train()``, which puts the layers back in training mode.
    Returns the frozen layers.
    """
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.eval()
        for p in layer.parameters():
            p.requires_grad_(False)
    return layers


# ---------------------------------------------------------------------------------------------
# Folding batch norm into the linear layer before it
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` in which every ``Linear -> BatchNorm1d`` pair is one ``Linear``.

    Valid for inference only (the batch norm must be in eval mode: its running statistics become
    constants). The arithmetic is ``reference.fold_batchnorm_into_linear`` (float64 NumPy); the new
    layers take the model's dtype. Other layers are copied unchanged.
    """
    children = list(model.named_children())
    folded: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(children):
        name, layer = children[i]
        following = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(layer, nn.Linear) and isinstance(following, BATCHNORM_TYPES):
            folded.append((name, _folded_linear(layer, following)))
            i += 2
            continue
        folded.append((name, _copy(layer)))
        i += 1
    return nn.Sequential(OrderedDict(folded))


def _folded_linear(linear: nn.Linear, bn: nn.Module) -> nn.Linear:
    def numpy64(t):
        return None if t is None else t.detach().cpu().double().numpy()

    ones = torch.ones(bn.num_features)
    zeros = torch.zeros(bn.num_features)
    gamma = bn.weight if bn.weight is not None else ones
    beta = bn.bias if bn.bias is not None else zeros
    W2, b2 = reference.fold_batchnorm_into_linear(
        numpy64(linear.weight), numpy64(linear.bias), numpy64(gamma), numpy64(beta),
        numpy64(bn.running_mean), numpy64(bn.running_var), eps=bn.eps,
    )
    dtype, device = linear.weight.dtype, linear.weight.device
    merged = nn.Linear(linear.in_features, linear.out_features, bias=True, device=device, dtype=dtype)
    merged.weight.copy_(torch.from_numpy(W2))
    merged.bias.copy_(torch.from_numpy(b2))
    return merged
