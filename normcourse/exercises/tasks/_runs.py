"""Small, seeded training runs for the experiment tasks (chapters 3, 4 and 6).

An experiment task asks a student to run a small experiment through the package and return
its numbers; the checker runs the same experiment itself and compares. The runs here rebuild
what the chapters' experiment functions do from the layers below them (``normcourse.models``,
``normcourse.train``): the exercises never import ``normcourse.experiments``, and a test
(tests/test_exercises.py) checks that the chapters' functions give the same numbers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from normcourse import models
from normcourse.data import load_mnist, to_tensors
from normcourse.nn import renorm_schedule  # the schedule chapter 6 uses, scaled to the run
from normcourse.train import evaluate, evaluate_with_batch_statistics, train
from normcourse.utils import seed_everything

SIZES = (784, 100, 100, 100, 10)


@lru_cache(maxsize=1)
def _embedded() -> tuple[torch.Tensor, ...]:
    mnist = load_mnist(source="embedded")
    return (*to_tensors(mnist.train_images, mnist.train_labels, flatten=False),
            *to_tensors(mnist.test_images, mnist.test_labels, flatten=False))


def small_mnist(train_examples: int = 1000, test_examples: int = 500) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): the first examples of the embedded MNIST subset."""
    x_train, y_train, x_test, y_test = _embedded()
    return (x_train[:train_examples].clone(), y_train[:train_examples].clone(),
            x_test[:test_examples].clone(), y_test[:test_examples].clone())


def trained(data, *, norm: str, activation: str, steps: int, batch_size: int, lr: float,
            optimizer: str, seed: int, sampler=None):
    """The MLP 784-100-100-100-10 with ``norm``, seeded, trained; returns (model, history)."""
    seed_everything(seed)
    renorm_kwargs = renorm_schedule(steps) if norm == "renorm" else None
    model = models.mlp(SIZES, norm=norm, activation=activation, renorm_kwargs=renorm_kwargs)
    history = train(model, data, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                    seed=seed, eval_every=steps, sampler=sampler, progress=False)
    return model, history


def accuracies(model, data, batch_size: int) -> tuple[float, float]:
    """(eval-mode test accuracy, test accuracy with batch statistics of ``batch_size``)."""
    x_test, y_test = data[2], data[3]
    return (evaluate(model, x_test, y_test),
            evaluate_with_batch_statistics(model, x_test, y_test, batch_size=batch_size))


def as_array(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)
