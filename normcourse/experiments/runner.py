"""The experiment runner every chapter's experiment module builds on.

A chapter module (``normcourse/experiments/chNN_topic.py``) imports what it needs from here and
never from another chapter module, so that editing one chapter cannot move another chapter's
figures or claims (``tests/test_structure.py`` enforces it). This module holds the jobs the
chapters share:

- ``mnist_tensors``: MNIST as tensors, in one shape contract (images (N, 1, 28, 28));
- ``build_model``: a seeded MLP or ConvNet from ``normcourse.models``;
- ``train_classifier`` and its record ``ClassifierResult``: train a classifier, then measure
  its test accuracy in eval mode and with batch statistics;
- ``train_norms``: one classifier per norm, batch renorm with its ``rmax``/``dmax`` schedule
  scaled to the run (``normcourse.nn.renorm_schedule``);
- ``sweep``: run one function over a list of settings and collect the results (the one loop
  over the runs of an experiment, where a progress bar over runs belongs).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from normcourse import models, progress
from normcourse import nn as ncnn
from normcourse.data import MNIST, to_tensors
from normcourse.train import History, evaluate, evaluate_with_batch_statistics, train
from normcourse.utils import one_thread, seed_everything
from normcourse.validation import check_choice

__all__ = [
    "MLP_SIZES",
    "ARCHITECTURES",
    "BATCHNORM_TYPES",
    "ClassifierResult",
    "batchnorm_layers",
    "mnist_tensors",
    "build_model",
    "train_classifier",
    "train_norms",
    "sweep",
]

MLP_SIZES = (784, 100, 100, 100, 10)  # the BN paper's MNIST network (Sec. 4.1)
ARCHITECTURES = ("mlp", "convnet")

# Both ours and torch's: every helper here works with either.
BATCHNORM_TYPES = (ncnn.BatchNorm1d, ncnn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm2d)

Result = TypeVar("Result")


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers of ``model`` (ours and torch's), in registration order."""
    return [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES)]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def mnist_tensors(data, test_examples: int | None = None,
                  train_examples: int | None = None) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) from an ``MNIST``: images (N, 1, 28, 28) in [0, 1].

    Converted once, so that the many runs of a sweep do not convert the images again each time.
    ``test_examples`` and ``train_examples`` keep only the first test or training examples (to
    save time). A tuple of four tensors is passed through (cut the same way). The MLPs of
    ``normcourse.models`` flatten the images themselves.
    """
    if isinstance(data, MNIST):
        x_train, y_train = to_tensors(data.train_images, data.train_labels, flatten=False)
        x_test, y_test = to_tensors(data.test_images, data.test_labels, flatten=False)
    else:
        x_train, y_train, x_test, y_test = data
    if test_examples is not None:
        x_test, y_test = x_test[:test_examples], y_test[:test_examples]
    if train_examples is not None:
        x_train, y_train = x_train[:train_examples], y_train[:train_examples]
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def build_model(
    norm: str,
    *,
    architecture: str = "mlp",
    seed: int | None = None,
    sizes: Sequence[int] = MLP_SIZES,
    activation: str = "relu",
    norm_position: str = "before",
    init_scale: float | None = None,
    renorm_kwargs: dict | None = None,
) -> nn.Module:
    """``models.mlp`` or ``models.convnet`` with ``norm``; seeded first when ``seed`` is given.

    ``sizes``, ``norm_position`` and ``init_scale`` are MLP settings (the ConvNet ignores them).
    """
    check_choice(architecture, ARCHITECTURES, "architecture")
    if seed is not None:
        seed_everything(seed)  # the initial weights
    if architecture == "mlp":
        return models.mlp(sizes, norm=norm, activation=activation, norm_position=norm_position,
                          init_scale=init_scale, renorm_kwargs=renorm_kwargs)
    return models.convnet(norm=norm, activation=activation, renorm_kwargs=renorm_kwargs)


# ---------------------------------------------------------------------------------------------
# Training one classifier and measuring it in both modes
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassifierResult:
    """One trained classifier and its test accuracies.

    eval_accuracy: eval mode (running statistics for batch norm / renorm).
    batch_stats_accuracy: batch norm's statistics taken from test batches of the *training*
        batch size, as in training (None for models without batch norm).
    history: what ``normcourse.train.train`` returned (training-loss curve, ...).
    """

    norm: str
    batch_size: int
    seed: int
    eval_accuracy: float
    batch_stats_accuracy: float | None
    history: History = field(repr=False)
    model: nn.Module = field(repr=False)

    @property
    def batch_stats_gap(self) -> float | None:
        """|eval accuracy - accuracy with batch statistics| (None without batch norm)."""
        if self.batch_stats_accuracy is None:
            return None
        return abs(self.eval_accuracy - self.batch_stats_accuracy)


@one_thread()
def train_classifier(
    data,
    *,
    norm: str,
    batch_size: int,
    steps: int,
    lr: float,
    seed: int,
    optimizer: str = "adam",
    sizes: Sequence[int] = MLP_SIZES,
    activation: str = "relu",
    architecture: str = "mlp",
    sampler: Iterable | None = None,
    renorm_kwargs: dict | None = None,
    eval_every: int | None = None,
    test_examples: int | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> ClassifierResult:
    """Train an MLP (or the small ConvNet) with ``norm``; measure its test accuracy both ways.

    data: an ``MNIST`` or the tuple ``mnist_tensors`` returns. ``sampler`` yields index arrays
    into the training set (default: i.i.d. batches); pass ``normcourse.data.class_subset_batches``
    for non-i.i.d. batches. ``eval_every``: steps between the points of the recorded curves
    (default: only at the end). ``prepare``: applied to the freshly built (seeded) model before
    training, e.g. to attach recording hooks or wrap layers; returns the model to train.
    Deterministic given ``seed``: the same numbers in any process,
    whatever ran before (the seeds are set here and the run is single-threaded).
    """
    tensors = mnist_tensors(data, test_examples)
    model = build_model(norm, architecture=architecture, seed=seed, sizes=sizes,
                        activation=activation, renorm_kwargs=renorm_kwargs)
    if prepare is not None:
        model = prepare(model)
    history = train(
        model, tensors, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
        seed=seed, eval_every=eval_every or steps, sampler=sampler, progress=False,
    )
    _, _, x_test, y_test = tensors
    eval_accuracy = evaluate(model, x_test, y_test)
    batch_stats = None
    if batchnorm_layers(model):
        batch_stats = evaluate_with_batch_statistics(model, x_test, y_test, batch_size=batch_size)
    return ClassifierResult(norm, batch_size, seed, eval_accuracy, batch_stats, history, model)


# ---------------------------------------------------------------------------------------------
# Training one model per norm
# ---------------------------------------------------------------------------------------------
def train_norms(
    data,
    norms: Sequence[str],
    *,
    steps: int,
    sampler_for: Callable[[], Iterable] | None = None,
    **settings,
) -> dict[str, ClassifierResult]:
    """``train_classifier`` once per norm with the same ``settings``; ``{norm: result}``.

    Batch renorm gets ``normcourse.nn.renorm_schedule(steps)``. ``sampler_for``: called before
    each run for a fresh batch sampler (a sampler is an iterator, used up by one run); default
    i.i.d.
    """
    def run(norm: str) -> ClassifierResult:
        renorm_kwargs = ncnn.renorm_schedule(steps) if norm == "renorm" else None
        sampler = sampler_for() if sampler_for is not None else None
        return train_classifier(data, norm=norm, steps=steps, renorm_kwargs=renorm_kwargs,
                                sampler=sampler, **settings)

    return sweep(run, ((norm, {"norm": norm}) for norm in norms), "norm")


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------
def sweep(
    run: Callable[..., Result],
    settings: Iterable[tuple[Hashable, Mapping]] | Mapping[Hashable, Mapping],
    desc: str = "runs",
) -> dict[Hashable, Result]:
    """Call ``run(**kwargs)`` for each ``(key, kwargs)`` of ``settings``, in order.

    Returns ``{key: result}``. ``settings`` is a sequence of pairs or a mapping
    ``{key: kwargs}``. Every experiment that trains several models loops here, so this is
    where its progress bar is: runs done / runs total, ``desc: <key of the current run>``
    (``normcourse.progress``: a widget in Jupyter, text in a terminal, none in the book).
    """
    pairs: Iterator = iter(settings.items() if isinstance(settings, Mapping) else settings)
    results = {}
    key_of_run = lambda pair: progress.describe(pair[0])  # noqa: E731
    for key, kwargs in progress.sweep(pairs, desc, describe=key_of_run):
        results[key] = run(**kwargs)
    return results
