"""Chapter 7's experiments: why batch norm works, measured.

One training loop (``train_run``) with the probes of the later papers, and the chapter's five
measurements built on it:

- ``covariate_shift``: internal covariate shift two ways, the BN paper's (how the moments of a
  layer's input move over training) and Santurkar et al.'s (how much a layer's gradient changes
  when the layers below take their step), with and without batch norm, on chapter 3's MLP (ReLU units)
  and on a small ReLU ConvNet; the same runs record the loss landscape along the gradient
  (loss variation, gradient predictiveness, effective beta-smoothness: Santurkar et al. Sec. 3);
- ``noisy_batch_norm``: the plain MLP, BN and "noisy BN" (``normcourse.nn.NoisyBatchNorm1d``:
  random, time-varying shifts and scales after each BN), trained alike;
- ``weight_decay``: with BN after a layer, ||w|| and the effective learning rate lr / ||w||^2 of
  that layer over training, with and without weight decay, and the angle each step turns w by;
- ``batch_statistics_noise``: BN's statistics from the real (small) batch, or from a larger
  batch that contains it (the gradient still comes from the small batch only): the noise of the
  statistics as a regularizer (Hoffer et al. 2017);
- ``dropout_variance_shift``: dropout before BN against dropout after the last BN (Li et al.
  2019): the variance shift between BN's running variance and its test-time input.

Built on the shared runner (``normcourse.experiments.runner``: the tensors, the models, the
loop over runs) and ``normcourse.landscape``; no other chapter's module.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from normcourse import landscape, models
from normcourse import nn as ncnn
from normcourse.experiments import runner
from normcourse.train import evaluate
from normcourse.utils import one_thread, seed_everything
from normcourse.validation import check_choice

__all__ = [
    "NORMS",
    "SIZES",
    "BATCH_SIZE",
    "LR",
    "ETAS",
    "mnist_tensors",
    "build",
    "Run",
    "train_run",
    "covariate_shift",
    "noisy_batch_norm",
    "weight_decay",
    "batch_statistics_noise",
    "dropout_variance_shift",
    "variance_shift",
]

NORMS = ("none", "batch", "noisy")
SIZES = (784, 100, 100, 100, 10)  # chapter 3's network, the BN paper's MNIST MLP
ACTIVATION = "relu"  # not the paper's sigmoid: without BN, that one barely moves in 300 steps
BATCH_SIZE = 60  # chapter 3's batch size
LR = 0.1
CONV_CHANNELS = (8, 16)
CONV_LR = 0.05
ETAS = (0.25, 0.5, 1.0, 2.0)  # steps along the gradient, as multiples of the learning rate
PROBE = {"mlp": ("fc3.weight", "act3"), "convnet": ("conv2.weight", "act2")}


def mnist_tensors(data, train_examples: int | None = None, test_examples: int | None = 1000):
    """``runner.mnist_tensors`` with this chapter's default of 1,000 test examples."""
    return runner.mnist_tensors(data, test_examples, train_examples)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def build(norm: str, architecture: str = "mlp", seed: int = 0, dropout: str | None = None,
          p: float = 0.5, noise: dict | None = None) -> nn.Sequential:
    """Chapter 3's MLP (with ReLU units), or the small ReLU ConvNet, with ``norm`` in ``NORMS``.

    ``"noisy"``: every batch norm replaced by a noisy one (``NoisyBatchNorm1d``/``2d`` with the
    same parameters; ``noise``: its ``shift_range``/``scale_range``), its noise drawn from a
    generator seeded with ``seed``. ``dropout`` (MLP only): ``"before_bn"`` puts
    ``nn.Dropout(p)`` after every hidden activation but the last, so that it feeds the next
    linear layer and its batch norm; ``"after_bn"`` puts one after the last hidden layer only,
    before the output layer (no batch norm follows it).
    """
    check_choice(norm, NORMS, "norm")
    base = "none" if norm == "none" else "batch"
    if architecture == "mlp":
        model = runner.build_model(base, seed=seed, sizes=SIZES, activation=ACTIVATION)
    else:
        check_choice(architecture, runner.ARCHITECTURES, "architecture")
        seed_everything(seed)
        model = models.convnet(base, channels=CONV_CHANNELS, activation="relu")
    if norm == "noisy":
        generator = torch.Generator().manual_seed(seed)
        for name, layer in list(model.named_children()):
            if isinstance(layer, runner.BATCHNORM_TYPES):
                two_d = isinstance(layer, (ncnn.BatchNorm2d, nn.BatchNorm2d))
                cls = ncnn.NoisyBatchNorm2d if two_d else ncnn.NoisyBatchNorm1d
                noisy = cls(layer.num_features, generator=generator, **(noise or {}))
                noisy.load_state_dict(layer.state_dict())
                setattr(model, name, noisy)
    if dropout is not None:
        check_choice(dropout, ("before_bn", "after_bn"), "dropout")
        hidden = len(SIZES) - 2
        where = range(1, hidden) if dropout == "before_bn" else (hidden,)
        layers = []
        for name, layer in model.named_children():
            layers.append((name, layer))
            if name in {f"act{i}" for i in where}:
                layers.append((f"drop{name[3:]}", nn.Dropout(p)))
        model = nn.Sequential(OrderedDict(layers))
    return model


# ---------------------------------------------------------------------------------------------
# The training loop with its probes
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run and what its probes recorded (lists over the probe steps)."""

    norm: str
    architecture: str
    seed: int
    train_loss: list[float] = field(default_factory=list)  # every step
    probe_steps: list[int] = field(default_factory=list)
    input_mean: list[np.ndarray] = field(default_factory=list)  # per unit, probe layer's input
    input_std: list[np.ndarray] = field(default_factory=list)
    gradient_change: list[landscape.GradientChange] = field(default_factory=list)
    along_gradient: list[landscape.LossAlongGradient] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)  # ||w|| of the watched layer
    effective_lr: list[float] = field(default_factory=list)  # mean over its units
    angle: list[float] = field(default_factory=list)  # mean angle of this step's update
    test_accuracy: float = float("nan")
    train_accuracy: float = float("nan")
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def generalization_gap(self) -> float:
        return self.train_accuracy - self.test_accuracy

    def moment_drift(self) -> float:
        """The BN paper's covariate shift, as one number: how far the per-unit mean of the
        probed layer's input moves over training (mean over units of max - min over the probe
        steps), in units of its average standard deviation."""
        means = np.stack(self.input_mean)
        return float((means.max(0) - means.min(0)).mean() / np.mean(self.input_std))


@one_thread()
def train_run(tensors, *, norm: str = "batch", architecture: str = "mlp", seed: int = 0,
              steps: int = 300, lr: float | None = None, batch_size: int = BATCH_SIZE,
              weight_decay: float = 0.0, stats_batch: int | None = None,
              dropout: str | None = None, dropout_p: float = 0.5,
              probe_every: int | None = None,
              watch: str = "fc2.weight", noise: dict | None = None,
              keep_model: bool = False) -> Run:
    """Train ``build(norm, architecture, seed, dropout, dropout_p)`` with plain SGD on
    cross-entropy.

    weight_decay: SGD's L2 term on the weights of the linear/conv layers (not on BN's gamma and
    beta, nor on biases). stats_batch: forward a batch of this many examples, which starts with
    the ``batch_size`` examples of the step, and take the loss (the gradient) on those alone:
    batch norm's statistics then come from the larger batch. probe_every: every so many steps
    (and at the last), before the update, record on the step's batch Santurkar et al.'s
    gradient change of the probed layer (``PROBE``) and the loss along the gradient (``ETAS``
    times lr), and the moments of the probed layer's input on 500 fixed training examples.
    ``watch``: the weight whose norm, effective learning rate and angle updates are recorded.
    """
    lr = lr if lr is not None else (LR if architecture == "mlp" else CONV_LR)
    x_train, y_train, x_test, y_test = tensors
    model = build(norm, architecture, seed, dropout, dropout_p, noise=noise)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": weight_decay},
                                 {"params": others, "weight_decay": 0.0}], lr=lr)
    watched = dict(model.named_parameters())[watch] if watch else None
    probe_param, probe_module = PROBE[architecture]
    fixed = x_train[:500]
    run = Run(norm, architecture, seed)
    generator = np.random.default_rng(seed)
    forward = stats_batch or batch_size
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(generator.choice(len(x_train), forward, replace=False))
        x, y = x_train[idx], y_train[idx]

        def loss_fn(m, x=x, y=y):
            return nn.functional.cross_entropy(m(x)[:batch_size], y[:batch_size])

        if probe_every and (step % probe_every == 0 or step == steps - 1):
            run.probe_steps.append(step)
            run.gradient_change.append(landscape.gradient_change(model, loss_fn, probe_param, lr))
            run.along_gradient.append(landscape.loss_along_gradient(
                model, loss_fn, [eta * lr for eta in ETAS]))
            mean, std = _input_moments(model, getattr(model, probe_module), fixed)
            run.input_mean.append(mean)
            run.input_std.append(std)
        before = watched.detach().clone() if watched is not None else None
        optimizer.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        run.train_loss.append(float(loss.detach()))
        if watched is not None:
            run.weight_norm.append(float(watched.detach().norm()))
            run.effective_lr.append(float(landscape.effective_learning_rate(watched, lr).mean()))
            run.angle.append(float(landscape.angle_update(before, watched).mean()))
    run.test_accuracy = evaluate(model, x_test, y_test)
    run.train_accuracy = evaluate(model, x_train[:2000], y_train[:2000])
    if keep_model:
        run.model = model
    return run


def _input_moments(model: nn.Module, module: nn.Module, x: torch.Tensor):
    """Per-unit mean and std of ``module``'s input on x, in eval mode (as the BN paper's Fig. 1
    shows the trained network): (units,) each; a conv input's channels over (N, H, W)."""
    seen = []
    handle = module.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    try:
        evaluate(model, x, torch.zeros(len(x), dtype=torch.long))
    finally:
        handle.remove()
    h = seen[0].transpose(0, 1).flatten(1)  # (units, values)
    return h.mean(1).numpy(), h.std(1).numpy()


# ---------------------------------------------------------------------------------------------
# The chapter's five measurements
# ---------------------------------------------------------------------------------------------
def covariate_shift(data, architectures: Sequence[str] = ("mlp", "convnet"),
                    seeds: Sequence[int] = (0,), *, steps: int = 300, conv_steps: int = 150,
                    probe_every: int = 25) -> dict[tuple[str, str, int], Run]:
    """Each architecture without and with batch norm, probed every ``probe_every`` steps:
    ``{(architecture, norm, seed): Run}`` (the ConvNet trains ``conv_steps`` steps)."""
    tensors = mnist_tensors(data)
    settings = [((a, n, s), {"architecture": a, "norm": n, "seed": s})
                for a in architectures for n in ("none", "batch") for s in seeds]
    return runner.sweep(lambda **kw: train_run(
        tensors, steps=steps if kw["architecture"] == "mlp" else conv_steps,
        probe_every=probe_every, watch=None, **kw), settings, "covariate shift")


def noisy_batch_norm(data, seeds: Sequence[int] = (0,), *, steps: int = 300,
                     noise: dict | None = None) -> dict[tuple[str, int], Run]:
    """The MLP without BN, with BN and with noisy BN: ``{(norm, seed): Run}``."""
    tensors = mnist_tensors(data)
    settings = [((n, s), {"norm": n, "seed": s}) for n in NORMS for s in seeds]
    return runner.sweep(lambda **kw: train_run(tensors, steps=steps, noise=noise, **kw),
                        settings, "noisy BN")


def weight_decay(data, decays: Sequence[float] = (0.0, 5e-3), seeds: Sequence[int] = (0,), *,
                 steps: int = 300) -> dict[tuple[float, int], Run]:
    """The MLP with BN trained with each weight decay: ``{(decay, seed): Run}``; each run
    records ||w||, the mean effective learning rate and the mean angle update of fc2."""
    tensors = mnist_tensors(data)
    settings = [((d, s), {"weight_decay": d, "seed": s}) for d in decays for s in seeds]
    return runner.sweep(lambda **kw: train_run(tensors, steps=steps, **kw), settings,
                        "weight decay")


def batch_statistics_noise(data, stats_batches: Sequence[int | None] = (None, 300),
                           seeds: Sequence[int] = (0,), *, steps: int = 400,
                           train_examples: int = 1000) -> dict[tuple[int | None, int], Run]:
    """The MLP with BN on a small training set, BN's statistics from the real batch (None) or
    from a larger batch containing it: ``{(stats_batch, seed): Run}``."""
    tensors = mnist_tensors(data, train_examples)
    settings = [((b, s), {"stats_batch": b, "seed": s}) for b in stats_batches for s in seeds]
    return runner.sweep(lambda **kw: train_run(tensors, steps=steps, watch=None, **kw),
                        settings, "statistics batch")


def variance_shift(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Li et al.'s variance shift at each batch norm: the mean over its units of
    running_var / (the variance of its input in eval mode on x). Above 1: the statistics
    learned in training overstate the test-time variance."""
    layers = runner.batchnorm_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, i[0].detach()))
               for k, m in enumerate(layers)]
    try:
        evaluate(model, x, torch.zeros(len(x), dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return [float((m.running_var / seen[k].var(0)).mean()) for k, m in enumerate(layers)]


def _recalibrated_accuracy(model: nn.Module, tensors) -> float:
    """Test accuracy after re-estimating every BN's running statistics on the training set
    with dropout off (its test-time behaviour): the variance shift removed."""
    model = copy.deepcopy(model)
    x_train, _, x_test, y_test = tensors
    model.eval()
    with torch.no_grad():
        for bn in runner.batchnorm_layers(model):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches below
            bn.train()
        for chunk in x_train.split(500):
            model(chunk)
    return evaluate(model, x_test, y_test)


def dropout_variance_shift(data, placements: Sequence[str] = ("before_bn", "after_bn"),
                           seeds: Sequence[int] = (0,), *, p: float = 0.5, steps: int = 400,
                           train_examples: int = 1000) -> dict[tuple[str, int], dict]:
    """The MLP with BN and dropout ``p`` before BN or after the last BN: per run
    ``{"shift": [variance shift per BN layer], "accuracy": eval accuracy,
    "recalibrated": accuracy with statistics re-estimated without dropout, "run": Run}``."""
    tensors = mnist_tensors(data, train_examples)

    def one(placement, seed):
        run = train_run(tensors, steps=steps, seed=seed, dropout=placement, dropout_p=p,
                        watch=None, keep_model=True)
        return {"shift": variance_shift(run.model, tensors[2]), "accuracy": run.test_accuracy,
                "recalibrated": _recalibrated_accuracy(run.model, tensors), "run": run}

    settings = [((pl, s), {"placement": pl, "seed": s}) for pl in placements for s in seeds]
    return runner.sweep(one, settings, "dropout")
