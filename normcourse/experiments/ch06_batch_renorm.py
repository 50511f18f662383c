"""Chapter 6's experiments: batch renormalization (Ioffe 2017) at laptop scale.

Two experiments of the paper, shrunk to an MLP on MNIST and a few thousand steps:

- small minibatches: batch norm, batch renorm and layer norm trained on batches of 4 and
  evaluated in eval mode (``compare_norms``);
- non-i.i.d. minibatches: every batch holds examples of only 2 classes
  (``noniid_comparison``); batch norm's network learns to rely on the batch statistics of such
  batches and fails at test time, batch renorm trains normally.

The paper relaxes ``rmax``/``dmax`` after 5,000 steps and reaches its final limits at 25,000
(``dmax``) and 40,000 (``rmax``) steps. Our runs are a few thousand steps long, so
``runner.renorm_schedule`` scales those three step counts by ``steps / REFERENCE_RUN_STEPS``: the
schedule keeps its shape and ends (``rmax`` reached) at 80% of the run. The 50,000-step reference
is our choice, not a number from the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from normcourse.data import class_subset_batches
from normcourse.experiments.runner import (
    PAPER_SCHEDULE,
    REFERENCE_RUN_STEPS,
    ClassifierResult,
    mnist_tensors,
    renorm_schedule,
    train_norms,
)
from normcourse.train import evaluate, evaluate_with_batch_statistics

__all__ = [
    "PAPER_SCHEDULE",  # the schedule's constants and function live in the runner; re-exported
    "REFERENCE_RUN_STEPS",  # because the chapter shows them as ``brx.renorm_schedule(...)``
    "renorm_schedule",
    "compare_norms",
    "noniid_comparison",
    "noniid_test_control",
]


def compare_norms(
    data,
    norms: Sequence[str] = ("batch", "renorm", "layer"),
    *,
    batch_size: int = 4,
    steps: int = 2000,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int | None = None,
    test_examples: int | None = None,
) -> dict[str, ClassifierResult]:
    """Train the ReLU MLP 784-100-100-100-10 with each norm on i.i.d. batches of ``batch_size``
    (Adam, ``lr``; batch renorm with ``renorm_schedule(steps)``); returns ``{norm: result}`` with
    eval-mode test accuracy (and, for batch norm, the accuracy with batch statistics of the
    training batch size). The defaults are the paper's small-minibatch experiment."""
    return train_norms(mnist_tensors(data, test_examples), norms, steps=steps,
                       batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every)


def noniid_comparison(
    data,
    norms: Sequence[str] = ("batch", "renorm", "layer"),
    *,
    classes_per_batch: int = 2,
    batch_size: int = 32,
    steps: int = 2000,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int | None = None,
    test_examples: int | None = None,
) -> dict[str, ClassifierResult]:
    """Train with non-i.i.d. batches: each of ``batch_size`` examples drawn from only
    ``classes_per_batch`` random classes (``class_subset_batches``). Same MLP and optimizer as
    ``compare_norms``; the test set is ordinary (all classes, eval mode)."""
    tensors = mnist_tensors(data, test_examples)
    labels = tensors[1].numpy()
    return train_norms(
        tensors, norms, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        eval_every=eval_every,
        sampler_for=lambda: class_subset_batches(labels, classes_per_batch, batch_size, seed=seed),
    )


def noniid_test_control(
    result: ClassifierResult,
    data,
    *,
    classes_per_batch: int = 2,
    seed: int = 0,
    test_examples: int | None = None,
) -> dict[str, float]:
    """The paper's control for the non-i.i.d. experiment: test batches built the same way.

    Draws ``len(test set) // batch_size`` test batches of ``result.batch_size``
    examples from only ``classes_per_batch`` classes each (``class_subset_batches`` on
    the test labels, ``seed``) and measures ``result.model`` on them two ways:
    ``"batch_stats"``, each batch normalized with its own statistics (as in training;
    batch renorm also applies r, d), and ``"population"``, eval mode (the moving
    averages; the batch does not matter). If the network uses what a batch's statistics
    say about which classes it holds, ``batch_stats`` is far above ``population``.
    ``batch_stats`` is None for a model without running statistics (layer norm).
    """
    _, _, x_test, y_test = mnist_tensors(data, test_examples)
    size = result.batch_size
    batches = class_subset_batches(y_test.numpy(), classes_per_batch, size, seed=seed,
                                   steps=len(y_test) // size)
    index = torch.from_numpy(np.concatenate(list(batches)))
    x, y = x_test[index], y_test[index]  # consecutive chunks of `size` are the batches
    batch_stats = None
    if any(hasattr(module, "running_mean") for module in result.model.modules()):
        batch_stats = evaluate_with_batch_statistics(result.model, x, y, batch_size=size)
    return {"batch_stats": batch_stats, "population": evaluate(result.model, x, y)}
