"""The training loop of the chapters' experiments, evaluation, and an activation probe.

``train`` runs minibatch SGD (or Adam) with cross-entropy on tensors that live on one device,
draws batches by indexing those tensors (no DataLoader: a step of the BN paper's MLP takes about a
millisecond, so per-batch overhead would dominate), evaluates every ``eval_every`` steps and
returns a ``History``. A NaN or infinite loss stops the run and is recorded (``history.diverged``)
rather than raised, so that a learning-rate sweep can run through the rates that blow up.

Evaluation comes in two flavours, because chapters 4-6 compare them:

- ``evaluate``: the model in eval mode, so batch norm uses its running statistics;
- ``evaluate_with_batch_statistics``: the normalization layers compute as in training (each test
  batch normalized with its own statistics), without changing their running statistics.

Both restore every module's train/eval flag afterwards, so a layer frozen with ``.eval()`` stays
frozen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normcourse.data import iid_batches, to_tensors
from normcourse.progress import progress_bar
from normcourse.utils import one_thread, restoring_modes, seed_everything
from normcourse.validation import check_choice, check_floating

__all__ = [
    "History",
    "EvalOptions",
    "ActivationProbe",
    "OPTIMIZERS",
    "warmup_factor",
    "train",
    "evaluate",
    "evaluate_with_batch_statistics",
]

OPTIMIZERS = ("sgd", "adam")


# ---------------------------------------------------------------------------------------------
# What a run returns
# ---------------------------------------------------------------------------------------------
@dataclass
class History:
    """What ``train`` recorded; entry ``t`` of every list belongs to step ``steps[t]``.

    steps: the steps after which the model was evaluated (eval_every, 2*eval_every, ..., and the
        last step).
    train_loss: mean minibatch cross-entropy over the steps since the previous record.
    train_accuracy: eval-mode accuracy on a fixed subset of the training set (its first
        ``EvalOptions.train_examples`` examples).
    test_accuracy: eval-mode accuracy on the test set.
    test_accuracy_batch_stats: test accuracy with batch statistics (only with
        ``EvalOptions(batch_stats=True)``).
    probe_values: one list per probe: ``probe_values[i][t]`` holds probe i's percentiles at
        ``steps[t]``.
    wall_time: seconds since the start of the run at each record (evaluation included).
    train_time: seconds spent in training steps only (drawing the batch, forward, backward,
        update), the basis of ``steps_per_second``.
    steps_done: training steps taken (fewer than asked if the run diverged).
    diverged, diverged_at_step: whether and at which step the loss became NaN or infinite; that
        step's update was not applied and the run stopped.
    """

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_accuracy_batch_stats: list[float] = field(default_factory=list)
    probe_values: list[list[list[float]]] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    train_time: float = 0.0
    steps_done: int = 0
    diverged: bool = False
    diverged_at_step: int | None = None

    @property
    def steps_per_second(self) -> float:
        """Training speed, evaluation excluded."""
        return self.steps_done / self.train_time if self.train_time > 0 else float("nan")

    def first_step_reaching(self, accuracy: float, which: str = "test") -> int | None:
        """The first recorded step whose accuracy is at least ``accuracy``; None if none is.

        ``which``: ``"test"``, ``"train"`` or ``"test_batch_stats"``. Resolution is eval_every.
        """
        check_choice(which, ("test", "train", "test_batch_stats"), "accuracy record")
        record = {"test": self.test_accuracy, "train": self.train_accuracy,
                  "test_batch_stats": self.test_accuracy_batch_stats}[which]
        return next((step for step, acc in zip(self.steps, record) if acc >= accuracy), None)


@dataclass(frozen=True)
class EvalOptions:
    """How ``train`` evaluates, beyond when (``eval_every``) and the probes.

    batch_size: evaluate in chunks of this size (memory only: eval mode does not depend on
        it); None: one pass.
    batch_stats: also record the test accuracy with batch statistics, in batches of the
        training batch size (``evaluate_with_batch_statistics``), into
        ``history.test_accuracy_batch_stats``.
    train_examples: how many training examples (the first ones) ``train_accuracy`` uses.
    """

    batch_size: int | None = None
    batch_stats: bool = False
    train_examples: int = 1000


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------
class ActivationProbe:
    """Percentiles of one unit's input (or output) to ``module``, recorded on request.

    The BN paper's Fig. 1(b, c) plots the 15th, 50th and 85th percentiles of the input to one
    sigmoid of the last hidden layer over training: ``ActivationProbe(model.act3)``.

    A forward hook collects ``x[:, unit]`` (all positions of channel ``unit`` for conv maps)
    between ``start()`` and ``stop(step)``, over however many forward passes happen in between;
    ``stop`` appends the percentiles over everything collected (``torch.quantile``, linear
    interpolation) to ``steps`` / ``values``. ``train`` does this around each test evaluation.
    Outside ``start``/``stop`` the hook does nothing. Use as a context manager or call
    ``remove()`` to detach the hook.
    """

    def __init__(self, module: nn.Module, unit: int = 0, percentiles: Sequence[float] = (15, 50, 85),
                 where: str = "input"):
        check_choice(where, ("input", "output"), "probe position")
        percentiles = tuple(float(p) for p in percentiles)
        if not percentiles or not all(0 <= p <= 100 for p in percentiles):
            raise ValueError(f"percentiles must be one or more numbers in [0, 100], got {percentiles}")
        self.module, self.unit, self.percentiles, self.where = module, unit, percentiles, where
        self.steps: list[int] = []
        self.values: list[list[float]] = []
        self._collected: list[torch.Tensor] | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._collected is None:
            return
        x = inputs[0] if self.where == "input" else output
        if not 0 <= self.unit < x.shape[1]:
            raise ValueError(f"probe unit {self.unit} does not exist: {type(module).__name__} "
                             f"sees {x.shape[1]} units (axis 1 of shape {tuple(x.shape)})")
        self._collected.append(x[:, self.unit].detach().reshape(-1))

    def start(self) -> None:
        """Begin collecting the unit's values from the forward passes that follow."""
        self._collected = []

    def stop(self, step: int) -> list[float]:
        """Stop collecting; record and return the percentiles of what was collected."""
        if not self._collected:
            raise RuntimeError("the probe saw no forward pass between start() and stop(); "
                               "is it attached to a module of this model?")
        values = torch.cat(self._collected).float()
        self._collected = None
        q = torch.tensor(self.percentiles, dtype=values.dtype, device=values.device) / 100
        result = torch.quantile(values, q).tolist()
        self.steps.append(step)
        self.values.append(result)
        return result

    def as_array(self) -> np.ndarray:
        """The recorded percentiles, shape (records, len(percentiles))."""
        return np.asarray(self.values, dtype=np.float64).reshape(len(self.values), len(self.percentiles))

    def remove(self) -> None:
        """Detach the hook from the module."""
        self._handle.remove()

    def __enter__(self) -> ActivationProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _normalizes_with_running_statistics(module: nn.Module) -> bool:
    """Batch norm and batch renorm (ours and torch's) keep a ``running_mean`` buffer."""
    return isinstance(getattr(module, "running_mean", None), torch.Tensor)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None) -> float:
    """Fraction of rows of ``x`` (N, ...) whose argmax logit equals ``y`` (N,), in chunks.

    Every chunk has ``batch_size`` examples: a short last chunk is topped up with the examples
    just before it (only its new ones are scored). That matters when the model normalizes with
    batch statistics, where a chunk of one example could not be normalized at all.
    """
    n = len(x)
    size = n if batch_size is None else min(batch_size, n)
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for start in range(0, n, size):
        stop = min(start + size, n)
        first = max(stop - size, 0)
        predictions = model(x[first:stop]).argmax(dim=1)[start - first:]
        correct += (predictions == y[start:stop]).sum()
    return correct.item() / n


def _check_positive_int(value, what: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


@one_thread()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """Accuracy of ``model`` on x: (N, ...) with labels y: (N,), in eval mode, without gradients.

    ``batch_size`` only bounds memory (eval mode does not depend on it); None: one pass. Every
    module's train/eval flag is restored afterwards.
    """
    _check_positive_int(batch_size, "batch_size", allow_none=True)
    with restoring_modes(model):
        model.eval()
        return _accuracy(model, x, y, batch_size)


@one_thread()
def evaluate_with_batch_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy when each batch of ``batch_size`` test examples is normalized with its own statistics.

    The normalization layers that keep running statistics (batch norm, batch renorm) are put in
    training mode, every other module (dropout, ...) in eval mode; their running statistics and
    ``num_batches_tracked`` are saved first and restored afterwards, so the model leaves exactly
    as it came. x: (N, ...), y: (N,); a short last batch is topped up with earlier examples.
    Batch renorm in training mode also applies its r, d correction, as it does while training.
    """
    _check_positive_int(batch_size, "batch_size", allow_none=False)
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        with restoring_modes(model):
            model.eval()
            for module in model.modules():
                if _normalizes_with_running_statistics(module):
                    module.train()
            return _accuracy(model, x, y, batch_size)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _as_tensors(data, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) on ``device``.

    ``data`` is a ``normcourse.data.MNIST`` (images become float (N, 1, 28, 28) in [0, 1]; the
    MLPs of ``normcourse.models`` flatten them) or a tuple of four tensors.
    """
    if hasattr(data, "train_images"):
        x_train, y_train = to_tensors(data.train_images, data.train_labels, device, flatten=False)
        x_test, y_test = to_tensors(data.test_images, data.test_labels, device, flatten=False)
        return x_train, y_train, x_test, y_test
    if not (isinstance(data, (tuple, list)) and len(data) == 4
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError("data must be a normcourse.data.MNIST or a tuple of four tensors "
                        "(x_train, y_train, x_test, y_test)")
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)
    for x, y, split in ((x_train, y_train, "training"), (x_test, y_test, "test")):
        check_floating(x, f"train() ({split} inputs)")
        if y.dtype != torch.long or y.shape != (len(x),):
            raise ValueError(f"train() needs int64 {split} labels of shape ({len(x)},), got "
                             f"{y.dtype} {tuple(y.shape)}")
    return x_train, y_train, x_test, y_test


def _make_optimizer(name: str, parameters: Iterable, lr: float,
                    sgd_momentum: float) -> torch.optim.Optimizer:
    check_choice(name, OPTIMIZERS, "optimizer")
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=sgd_momentum)
    if sgd_momentum:
        raise ValueError("sgd_momentum is an SGD setting; Adam has its own betas")
    return torch.optim.Adam(parameters, lr=lr)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier of a linear warm-up at training step ``step`` (1, 2, ...):
    ``step / warmup_steps`` for the first ``warmup_steps`` steps, then 1 (0 steps: always 1).

    With ``warmup_steps=4`` the first four updates use 1/4, 2/4, 3/4 and 4/4 of the rate.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 or more, got {warmup_steps}")
    return min(1.0, step / warmup_steps) if warmup_steps else 1.0


def _next_indices(batches: Iterator, step: int, batch_size: int, device: torch.device) -> torch.Tensor:
    try:
        indices = next(batches)
    except StopIteration:
        raise ValueError(f"the sampler ran out of batches at step {step}") from None
    if len(indices) != batch_size:
        raise ValueError(f"the sampler gave a batch of {len(indices)} at step {step}, "
                         f"but batch_size is {batch_size}")
    return torch.as_tensor(indices, device=device)


@one_thread()
def train(
    model: nn.Module,
    data,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    optimizer: str = "sgd",
    sgd_momentum: float = 0.0,
    warmup_steps: int = 0,
    sampler: Iterator | None = None,
    probes: Sequence[ActivationProbe] | None = None,
    evaluation: EvalOptions = EvalOptions(),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> History:
    """Train ``model`` with cross-entropy for ``steps`` minibatch steps; return its ``History``.

    Runs with one CPU thread (the caller's setting is restored): with more, PyTorch splits some
    sums differently and the same seed gives a different model.

    Args:
        model: maps x (B, ...) to logits (B, classes); moved to ``device``, trained in place.
        data: a ``normcourse.data.MNIST`` or (x_train (N, ...), y_train (N,), x_test (M, ...),
            y_test (M,)); moved to ``device`` once.
        steps, batch_size, lr: number of updates, examples per batch, learning rate.
        seed: seeds everything (``seed_everything``) and the default batch order.
        eval_every: evaluate after every ``eval_every`` steps (and after the last step).
        optimizer: ``"sgd"`` or ``"adam"``.
        sgd_momentum: SGD's momentum (heavy ball; 0: plain SGD). Not batch norm's
            ``momentum``, which weights the running statistics.
        warmup_steps: a linear learning-rate warm-up (``warmup_factor``): step t updates
            with ``lr * min(1, t / warmup_steps)``; 0 (default): ``lr`` from the first step.
        sampler: an iterator of index arrays (batch_size,) into the training set, e.g.
            ``normcourse.data.class_subset_batches`` for non-i.i.d. batches; default
            ``iid_batches`` (reshuffled each epoch).
        probes: ``ActivationProbe``s, recorded during each test evaluation.
        evaluation: ``EvalOptions`` (chunk size, batch-statistics accuracy, training subset).
        device: where the model and the data go.
        progress: show a progress bar of the steps (``normcourse.progress``: a widget in
            Jupyter, text in a terminal, none when ``NORMCOURSE_PROGRESS=0``).

    The model is in training mode during the steps and in eval mode (no gradients) during the
    evaluations. A NaN or infinite loss stops the run with ``history.diverged = True``.
    """
    if not isinstance(evaluation, EvalOptions):
        raise TypeError(f"evaluation must be an EvalOptions, got {type(evaluation).__name__}")
    eval_batch_size = evaluation.batch_size
    for value, what in ((steps, "steps"), (batch_size, "batch_size"), (eval_every, "eval_every"),
                        (evaluation.train_examples, "EvalOptions.train_examples")):
        _check_positive_int(value, what, allow_none=False)
    _check_positive_int(eval_batch_size, "EvalOptions.batch_size", allow_none=True)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    seed_everything(seed)
    device = torch.device(device)
    model.to(device)
    x_train, y_train, x_test, y_test = _as_tensors(data, device)
    x_seen, y_seen = x_train[:evaluation.train_examples], y_train[:evaluation.train_examples]
    opt = _make_optimizer(optimizer, model.parameters(), lr, sgd_momentum)
    batches = iter(sampler) if sampler is not None else iid_batches(len(x_train), batch_size, seed)
    probes = list(probes or [])
    history = History(probe_values=[[] for _ in probes])

    def record(step: int, mean_loss: float) -> None:
        history.steps.append(step)
        history.train_loss.append(mean_loss)
        for probe in probes:
            probe.start()
        history.test_accuracy.append(evaluate(model, x_test, y_test, eval_batch_size))
        for probe, values in zip(probes, history.probe_values):
            values.append(probe.stop(step))
        history.train_accuracy.append(evaluate(model, x_seen, y_seen, eval_batch_size))
        if evaluation.batch_stats:
            history.test_accuracy_batch_stats.append(
                evaluate_with_batch_statistics(model, x_test, y_test, batch_size))
        history.wall_time.append(time.perf_counter() - start)

    model.train()
    start = time.perf_counter()
    loss_sum, loss_count = 0.0, 0
    bar = progress_bar(range(1, steps + 1), desc="training", show=progress, leave=False)
    for step in bar:
        tic = time.perf_counter()
        indices = _next_indices(batches, step, batch_size, device)
        loss = F.cross_entropy(model(x_train[indices]), y_train[indices])
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            history.diverged, history.diverged_at_step = True, step
            bar.set_postfix_str(f"diverged at step {step}")
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if warmup_steps:
            for group in opt.param_groups:
                group["lr"] = lr * warmup_factor(step, warmup_steps)
        opt.step()
        history.train_time += time.perf_counter() - tic
        history.steps_done = step
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
        if step % eval_every == 0 or step == steps:
            record(step, loss_sum / loss_count)
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.3f}")
    bar.close()
    return history
