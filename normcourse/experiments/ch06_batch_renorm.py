"""Chapter 6's experiments: batch renormalization (Ioffe 2017) at laptop scale.

Two experiments of the paper, shrunk to an MLP on MNIST and a few thousand steps:

- small minibatches: batch norm, batch renorm and layer norm trained on batches of 4 and
  evaluated in eval mode (``compare_norms``);
- non-i.i.d. minibatches: every batch holds examples of only 2 classes
  (``noniid_comparison``); batch norm's network learns to rely on the batch statistics of such
  batches and fails at test time, batch renorm trains normally. The paper's own setup, batches
  made of same-label pairs, with its control (batch norm applied separately to the two halves of
  each batch, one example of every pair in each half: ``HALVES``), runs through the same function
  with ``classes_per_batch = batch_size // 2``.

``RenormRecorder`` records r and d (before clipping) at every training step, and
``plot_renorm_trace`` draws them with the schedule's limits.

The paper relaxes ``rmax``/``dmax`` after 5,000 steps and reaches its final limits at 25,000
(``dmax``) and 40,000 (``rmax``) steps. Our runs are a few thousand steps long, so
``normcourse.nn.renorm_schedule`` scales those three step counts by
``steps / REFERENCE_RUN_STEPS``: the schedule keeps its shape and ends (``rmax`` reached) at 80%
of the run. The 50,000-step reference is our choice, not a number from the paper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from normcourse.data import class_subset_batches
from normcourse.experiments.runner import (
    BATCHNORM_TYPES,
    ClassifierResult,
    mnist_tensors,
    train_classifier,
    train_norms,
)
from normcourse.nn import (
    PAPER_SCHEDULE,
    REFERENCE_RUN_STEPS,
    BatchRenorm1d,
    BatchRenorm2d,
    renorm_schedule,
)
from normcourse.train import evaluate, evaluate_with_batch_statistics

__all__ = [
    "PAPER_SCHEDULE",  # the schedule's constants and function live in normcourse.nn; re-exported
    "REFERENCE_RUN_STEPS",  # because the chapter shows them as ``brx.renorm_schedule(...)``
    "renorm_schedule",
    "compare_norms",
    "noniid_comparison",
    "noniid_test_control",
    "noniid_batches",
    "HALVES",
    "SplitBatch",
    "normalize_halves_separately",
    "RenormRecorder",
    "plot_renorm_trace",
]

HALVES = "batch_halves"  # batch norm applied separately to the two halves of each batch


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
    prepare=None,
) -> dict[str, ClassifierResult]:
    """Train the ReLU MLP 784-100-100-100-10 with each norm on i.i.d. batches of ``batch_size``
    (Adam, ``lr``; batch renorm with ``renorm_schedule(steps)``); returns ``{norm: result}`` with
    eval-mode test accuracy (and, for batch norm, the accuracy with batch statistics of the
    training batch size). The defaults are the paper's small-minibatch experiment.
    ``prepare``: applied to every freshly built model (``RenormRecorder.attach``)."""
    return train_norms(mnist_tensors(data, test_examples), norms, steps=steps,
                       batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every,
                       prepare=prepare)


def noniid_batches(labels, classes_per_batch: int, batch_size: int, seed: int,
                   steps: int | None = None) -> Iterator[np.ndarray]:
    """``class_subset_batches``; when every class gives a pair (``batch_size == 2 *
    classes_per_batch``, the paper's setup) each batch is ordered so that its first half holds
    one example of every pair and its second half the other, in the same label order."""
    labels = np.asarray(labels)
    for batch in class_subset_batches(labels, classes_per_batch, batch_size, seed=seed,
                                      steps=steps):
        if batch_size == 2 * classes_per_batch:
            batch = batch[np.argsort(labels[batch], kind="stable")]  # pairs side by side
            batch = np.concatenate([batch[0::2], batch[1::2]])
        yield batch


class SplitBatch(nn.Module):
    """Wraps a batch-norm layer so that, with batch statistics, it normalizes each of ``parts``
    consecutive chunks of the batch separately (its running statistics are then updated once per
    chunk). With running statistics (``norm`` in eval mode) it is ``norm`` itself.

    The mode is the wrapped layer's, so ``evaluate_with_batch_statistics`` (which puts only the
    normalization layers in training mode) splits too. x: (N, C, ...), N divisible by ``parts``.
    """

    def __init__(self, norm: nn.Module, parts: int = 2):
        super().__init__()
        self.norm, self.parts = norm, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.norm.training:
            return self.norm(x)
        if len(x) % self.parts:
            raise ValueError(f"SplitBatch: a batch of {len(x)} does not split into "
                             f"{self.parts} equal parts")
        return torch.cat([self.norm(chunk) for chunk in x.chunk(self.parts)])


def normalize_halves_separately(model: nn.Module) -> nn.Module:
    """The paper's control: every batch-norm layer of ``model`` wrapped in ``SplitBatch(.., 2)``
    (in place; returns ``model``)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, BATCHNORM_TYPES):
                setattr(module, name, SplitBatch(child, 2))
    return model


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
    ``classes_per_batch`` random classes (``noniid_batches``). Same MLP and optimizer as
    ``compare_norms``; the test set is ordinary (all classes, eval mode).

    ``norms`` may include ``HALVES``: batch norm on the same batches, but applied separately to
    each half (``normalize_halves_separately``); with same-label pairs (``batch_size == 2 *
    classes_per_batch``) each half then holds one example of every label of the batch.
    """
    tensors = mnist_tensors(data, test_examples)
    labels = tensors[1].numpy()
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every)
    sampler_for = lambda: noniid_batches(labels, classes_per_batch, batch_size, seed)  # noqa: E731
    results = train_norms(tensors, [n for n in norms if n != HALVES], sampler_for=sampler_for,
                          **settings)
    if HALVES in norms:
        halves = train_classifier(tensors, norm="batch", sampler=sampler_for(),
                                  prepare=normalize_halves_separately, **settings)
        results[HALVES] = dataclasses.replace(halves, norm=HALVES)
    return {norm: results[norm] for norm in norms}


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
    examples from only ``classes_per_batch`` classes each (``noniid_batches`` on
    the test labels, ``seed``) and measures ``result.model`` on them two ways:
    ``"batch_stats"``, each batch normalized with its own statistics (as in training;
    batch renorm also applies r, d), and ``"population"``, eval mode (the moving
    averages; the batch does not matter). If the network uses what a batch's statistics
    say about which classes it holds, ``batch_stats`` is far above ``population``.
    ``batch_stats`` is None for a model without running statistics (layer norm).
    """
    _, _, x_test, y_test = mnist_tensors(data, test_examples)
    size = result.batch_size
    batches = noniid_batches(y_test.numpy(), classes_per_batch, size, seed=seed,
                             steps=len(y_test) // size)
    index = torch.from_numpy(np.concatenate(list(batches)))
    x, y = x_test[index], y_test[index]  # consecutive chunks of `size` are the batches
    batch_stats = None
    if any(hasattr(module, "running_mean") for module in result.model.modules()):
        batch_stats = evaluate_with_batch_statistics(result.model, x, y, batch_size=size)
    return {"batch_stats": batch_stats, "population": evaluate(result.model, x, y)}


# ---------------------------------------------------------------------------------------------
# r and d during training
# ---------------------------------------------------------------------------------------------
class RenormRecorder:
    """Records, at every training step of every batch-renorm layer, r and d *before* clipping
    (from the batch's statistics and the running averages before the step's update, as the layer
    computes them) and the limits the schedule sets for that step.

    ``attach`` is a ``prepare`` for ``runner.train_classifier``: it registers forward pre-hooks
    on the model's batch-renorm layers (a model without them records nothing). Only training
    steps are recorded (training mode, gradients on), not evaluations. ``trace()`` returns
    arrays of shape (steps, layers).
    """

    def __init__(self):
        self.rows: dict[int, list[dict[str, float]]] = {}  # layer -> one row per step

    def attach(self, model: nn.Module) -> nn.Module:
        layers = [m for m in model.modules() if isinstance(m, (BatchRenorm1d, BatchRenorm2d))]
        for index, layer in enumerate(layers):
            self.rows[index] = []
            layer.register_forward_pre_hook(self._hook(index))
        return model

    def _hook(self, index: int):
        def record(layer, inputs):
            if not (layer.training and torch.is_grad_enabled()):
                return
            x = inputs[0].detach().double()
            dims = [0, *range(2, x.dim())]  # every axis but the channels
            sigma_b = (x.var(dim=dims, unbiased=False) + layer.eps).sqrt()
            std = layer.running_std.double()
            r = sigma_b / std
            d = (x.mean(dim=dims) - layer.running_mean.double()) / std
            rmax, dmax = layer.current_limits()
            self.rows[index].append({
                "step": int(layer.num_batches_tracked), "rmax": rmax, "dmax": dmax,
                "r_mean": float(r.mean()), "r_std": float(r.std()),
                "d_mean": float(d.mean()), "d_std": float(d.std()),
                "r_clipped": float(((r > rmax) | (r < 1 / rmax)).double().mean()),
                "d_clipped": float((d.abs() > dmax).double().mean()),
            })
        return record

    def trace(self) -> dict[str, np.ndarray]:
        """{"step": (steps,), "rmax", "dmax": (steps,), "r_mean", "r_std", "d_mean", "d_std",
        "r_clipped", "d_clipped": (steps, layers)}; r_std, d_std: spread over the channels;
        *_clipped: fraction of the channels outside the limits."""
        if not self.rows or not self.rows[0]:
            raise ValueError("RenormRecorder recorded nothing: attach it to a model with batch "
                             "renorm layers and train")
        layers = [self.rows[i] for i in sorted(self.rows)]
        out = {name: np.array([row[name] for row in layers[0]])
               for name in ("step", "rmax", "dmax")}
        for name in ("r_mean", "r_std", "d_mean", "d_std", "r_clipped", "d_clipped"):
            out[name] = np.array([[row[name] for row in rows] for rows in layers]).T
        return out


def plot_renorm_trace(trace: dict[str, np.ndarray], layer: int = 1, smooth: int = 20):
    """Four panels from ``RenormRecorder.trace()``: the schedule; r and d of ``layer`` (mean
    over channels, band: +-1 standard deviation over the channels, moving average over
    ``smooth`` steps) with the limits; the fraction of channels clipped. Returns the figure."""
    import matplotlib.pyplot as plt

    def ma(v):  # moving average, the ends padded with their own values
        padded = np.pad(v, (smooth // 2, smooth - 1 - smooth // 2), mode="edge")
        return np.convolve(padded, np.ones(smooth) / smooth, mode="valid")

    step = trace["step"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    ax = axes[0, 0]
    ax.plot(step, trace["rmax"], label="$r_{\\max}$")
    ax.plot(step, trace["dmax"], label="$d_{\\max}$")
    ax.set(title="(a) the schedule", ylabel="limit")
    ax.legend()
    for ax, name, title in ((axes[0, 1], "r", "(b) $r$ before clipping"),
                            (axes[1, 0], "d", "(c) $d$ before clipping")):
        mean, std = ma(trace[f"{name}_mean"][:, layer]), ma(trace[f"{name}_std"][:, layer])
        ax.plot(step, mean, color="tab:blue", label="mean over channels")
        ax.fill_between(step, mean - std, mean + std, color="tab:blue", alpha=0.25,
                        label="$\\pm$1 std over channels")
        upper = trace["rmax"] if name == "r" else trace["dmax"]
        lower = 1 / trace["rmax"] if name == "r" else -trace["dmax"]
        ax.plot(step, upper, "k--", linewidth=1, label="clipping limits")
        ax.plot(step, lower, "k--", linewidth=1)
        ax.set(title=title, ylim=(0, 3.2) if name == "r" else (-3, 3))
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[1, 1]
    ax.plot(step, ma(trace["r_clipped"][:, layer]), label="$r$ clipped")
    ax.plot(step, ma(trace["d_clipped"][:, layer]), label="$d$ clipped")
    ax.set(title="(d) fraction of channels clipped", ylim=(0, 1.05))
    ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("training step")
    fig.tight_layout()
    return fig
