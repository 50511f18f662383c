"""Chapter 3's experiments: training the BN paper's MNIST network with and without batch norm.

Every function returns ``normcourse.train.History`` objects (or plain dicts of numbers), so that
the chapter plots what it gets and ``tests/test_claims_ch03_training_with_batch_norm.py`` asserts the chapter's claims
over several seeds by calling the same functions with the same settings. The data are the
tensors of ``runner.mnist_tensors``; models come from ``runner.build_model``.

The network is the paper's (Sec. 4.1): 784-100-100-100-10, sigmoid hidden units, batch 60,
cross-entropy. The paper gives no optimizer or learning rate; we use plain SGD (no momentum) with
learning rate 0.5 and PyTorch's default initialization unless a function says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from normcourse import reference
from normcourse.experiments.runner import (
    MLP_SIZES, batchnorm_layers, build_model, mnist_tensors, sweep,
)
from normcourse.gradcheck import rel_error
from normcourse.train import ActivationProbe, History, train
from normcourse.utils import one_thread
from normcourse.validation import check_choice

__all__ = [
    "PAPER_SIZES",
    "BATCH_SIZE",
    "DEFAULT_LR",
    "train_mlp",
    "figure1",
    "percentile_drift",
    "final_test_accuracy",
    "lr_sweep",
    "init_scale_sweep",
    "scale_invariance",
    "init_preactivation_variance",
    "time_per_step",
    "IMAGENET_RESULTS",
]

PAPER_SIZES = MLP_SIZES  # 784-100-100-100-10
BATCH_SIZE = 60
DEFAULT_LR = 0.5


def train_mlp(
    tensors: tuple[torch.Tensor, ...],
    *,
    norm: str,
    seed: int,
    steps: int,
    lr: float = DEFAULT_LR,
    eval_every: int | None = None,
    init_scale: float | None = None,
    norm_position: str = "before",
    probe: bool = False,
    optimizer: str = "sgd",
) -> History:
    """Build the paper's MLP (seeded by ``seed``) and train it with SGD on ``tensors``.

    norm: ``"none"`` or ``"batch"`` (``normcourse.nn.BatchNorm1d``; any ``models.NORMS`` works).
    eval_every: None evaluates once, after the last step.
    optimizer: ``"sgd"`` (the chapter's default, no momentum) or ``"adam"``.
    probe: record the 15th/50th/85th percentiles of the input to one sigmoid of the last hidden
        layer (unit 0 of ``model.act3``) over the test set at every evaluation, into
        ``history.probe_values[0]`` (the paper's Fig. 1(b, c)).
    """
    # seeded here for the initial weights; train() reseeds for the batch order
    model = build_model(norm, seed=seed, sizes=PAPER_SIZES, activation="sigmoid",
                        norm_position=norm_position, init_scale=init_scale)
    probes = [ActivationProbe(model.act3, unit=0, percentiles=(15, 50, 85))] if probe else []
    try:
        return train(model, tensors, steps=steps, batch_size=BATCH_SIZE, lr=lr, optimizer=optimizer,
                     seed=seed, eval_every=eval_every or steps, probes=probes, progress=False)
    finally:
        for p in probes:
            p.remove()


def figure1(
    tensors: tuple[torch.Tensor, ...],
    *,
    seed: int = 0,
    steps: int = 4000,
    eval_every: int = 100,
    lr: float = DEFAULT_LR,
    variants: Sequence[str] = ("none", "batch"),
) -> dict[str, History]:
    """The paper's Fig. 1: the MLP without and with batch norm, test accuracy and sigmoid-input
    percentiles every ``eval_every`` steps.

    variants: ``"none"``, ``"batch"`` (BN before the sigmoid, as in the paper) and
    ``"batch_after"`` (BN after the sigmoid). Returns {variant: History}.
    """
    settings = {"none": ("none", "before"), "batch": ("batch", "before"),
                "batch_after": ("batch", "after")}
    for variant in variants:
        check_choice(variant, tuple(settings), "variant")
    runs = [(v, {"norm": settings[v][0], "norm_position": settings[v][1]}) for v in variants]
    return sweep(lambda **kw: train_mlp(tensors, seed=seed, steps=steps, lr=lr,
                                        eval_every=eval_every, probe=True, **kw), runs,
                 "Fig. 1 variant")


def percentile_drift(history: History, window: int = 5) -> np.ndarray:
    """How far each probed percentile of the sigmoid input moved over training -> (3,).

    For the 15th, 50th and 85th percentile: max minus min over training of its moving average over
    ``window`` consecutive records. The average separates the systematic drift that the paper's
    Fig. 1(b) shows from record-to-record noise (batch norm's running statistics and the SGD
    steps jiggle every record a little).
    """
    values = np.asarray(history.probe_values[0], dtype=np.float64)  # (records, 3)
    if len(values) < window:
        raise ValueError(f"need at least {window} probe records, got {len(values)}")
    kernel = np.ones(window) / window
    smoothed = np.stack([np.convolve(values[:, k], kernel, mode="valid") for k in range(values.shape[1])], axis=1)
    return smoothed.max(axis=0) - smoothed.min(axis=0)


def final_test_accuracy(history: History) -> float:
    """Test accuracy after the last step; NaN if the loss blew up (the run stopped early)."""
    return float("nan") if history.diverged else history.test_accuracy[-1]


def lr_sweep(
    tensors: tuple[torch.Tensor, ...],
    lrs: Sequence[float],
    *,
    seed: int = 0,
    steps: int = 1000,
    norms: Sequence[str] = ("none", "batch"),
    optimizer: str = "sgd",
    eval_every: int | None = None,
) -> dict[tuple[str, float], History]:
    """Train the MLP at each learning rate, with each norm. Returns {(norm, lr): History}."""
    runs = [((norm, lr), {"norm": norm, "lr": lr}) for norm in norms for lr in lrs]
    return sweep(lambda **kw: train_mlp(tensors, seed=seed, steps=steps, optimizer=optimizer,
                                        eval_every=eval_every, **kw), runs,
                 "norm, learning rate")


def init_scale_sweep(
    tensors: tuple[torch.Tensor, ...],
    scales: Sequence[float],
    *,
    seed: int = 0,
    steps: int = 1000,
    lr: float = DEFAULT_LR,
    norms: Sequence[str] = ("none", "batch"),
) -> dict[tuple[str, float], History]:
    """Train the MLP with every weight drawn from N(0, scale^2) (biases 0), with each norm.

    Returns {(norm, scale): History}.
    """
    runs = [((norm, scale), {"norm": norm, "init_scale": scale})
            for norm in norms for scale in scales]
    return sweep(lambda **kw: train_mlp(tensors, seed=seed, steps=steps, lr=lr, **kw), runs,
                 "norm, weight scale")


def scale_invariance(a: float, seed: int = 0, batch: int = 60, fan_in: int = 50, width: int = 20,
                     eps: float = 0.0) -> dict[str, float]:
    """Check the BN paper's Sec. 3.3 numerically for x = u W^T followed by batch norm.

    With weights ``W`` (width, fan_in) and ``a * W``, inputs ``u`` (batch, fan_in) and a random
    upstream gradient, returns:

    - ``output_diff``: max |BN((aW)u) - BN(Wu)| (0 up to rounding when eps = 0);
    - ``du_rel_error``: relative error between the gradients with respect to u;
    - ``dW_ratio_error``: relative error between ``a * dL/d(aW)`` and ``dL/dW``, i.e. how far the
      gradient with respect to the scaled weights is from ``1/a`` times the original one.

    ``eps`` is batch norm's epsilon: the paper's identities ignore it; with eps > 0 they hold up
    to terms of order eps / variance.
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(batch, fan_in))
    w = rng.normal(size=(width, fan_in)) / np.sqrt(fan_in)
    gamma, beta = rng.normal(size=width), rng.normal(size=width)
    dout = rng.normal(size=(batch, width))  # random upstream gradient

    def forward_backward(weights):
        out, cache = reference.batchnorm_forward(u @ weights.T, gamma, beta, eps=eps)
        dx, _, _ = reference.batchnorm_backward_closed_form(dout, cache)
        return out, dx @ weights, dx.T @ u  # output, dL/du, dL/dW

    out, du, dw = forward_backward(w)
    out_a, du_a, dw_a = forward_backward(a * w)
    return {
        "output_diff": float(np.abs(out_a - out).max()),
        "du_rel_error": rel_error(du_a, du),
        "dW_ratio_error": rel_error(a * dw_a, dw),
    }


def init_preactivation_variance(
    tensors: tuple[torch.Tensor, ...],
    scales: Sequence[float],
    *,
    seed: int = 0,
    examples: int = BATCH_SIZE,
) -> dict[float, dict[str, np.ndarray]]:
    """At initialization, how much of each hidden layer's input variance batch norm restores.

    For each ``scale`` (every weight from N(0, scale^2), as in ``init_scale_sweep``) builds the MLP
    with batch norm and runs one training-mode forward pass on the first ``examples`` training
    images (one batch of the paper's size). For each of the three batch-norm layers, averaged over
    its 100 units, returns ``{scale: {"pre": (3,), "post": (3,)}}``:

    - ``pre``: the batch variance of the layer's input (the pre-activation ``Wu``);
    - ``post``: the variance of its normalized output ``xhat``, ``var / (var + eps)``, which is 1
      only while ``var`` is large compared with ``eps``.
    """
    x = tensors[0][:examples]
    results = {}
    for scale in scales:
        model = build_model("batch", seed=seed, sizes=PAPER_SIZES, activation="sigmoid",
                            init_scale=scale)
        layers = batchnorm_layers(model)
        inputs: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
                 for layer in layers]
        try:
            with torch.no_grad():
                model.train()(x)
        finally:
            for hook in hooks:
                hook.remove()
        pre = np.array([float(v.double().var(dim=0, unbiased=False).mean()) for v in inputs])
        post = np.array([float((v.double().var(dim=0, unbiased=False)
                                / (v.double().var(dim=0, unbiased=False) + layer.eps)).mean())
                         for v, layer in zip(inputs, layers)])
        results[scale] = {"pre": pre, "post": post}
    return results


# The BN paper's ImageNet results (Sec. 4.2, Inception, batch 32): steps to reach Inception's
# best accuracy, 72.2% (None: never reached), and each network's best accuracy.
IMAGENET_RESULTS = {
    "Inception": (31.0e6, 0.722),
    "BN-Baseline": (13.3e6, 0.727),
    "BN-x5": (2.1e6, 0.730),
    "BN-x30": (2.7e6, 0.748),
    "BN-x5-Sigmoid": (None, 0.698),
}


@one_thread()
def time_per_step(
    tensors: tuple[torch.Tensor, ...],
    norms: Sequence[str] = ("none", "batch", "torch_batch"),
    *,
    seed: int = 0,
    steps: int = 50,
    rounds: int = 7,
) -> dict[str, float]:
    """Seconds per SGD step (forward, backward, update) of the chapter's network, batch 60.

    Every network trains on the same ``steps`` batches in each of ``rounds`` rounds, the
    networks taking turns within a round (so that a burst of load elsewhere hits all of them);
    returns ``{norm: fastest round's time / steps}``, the usual benchmark estimate (other load
    only ever adds time). ``"batch"`` is ``normcourse.nn.BatchNorm1d`` (an autograd Function
    written in Python), ``"torch_batch"`` is ``torch.nn.BatchNorm1d`` (a C++ kernel).
    """
    x, y = tensors[0], tensors[1]
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(len(x), (BATCH_SIZE,), generator=generator) for _ in range(steps)]
    models = {norm: build_model(norm, seed=seed, sizes=PAPER_SIZES, activation="sigmoid").train()
              for norm in norms}
    optimizers = {norm: torch.optim.SGD(m.parameters(), lr=DEFAULT_LR) for norm, m in models.items()}
    fastest = dict.fromkeys(norms, float("inf"))
    for _ in range(rounds):
        for norm, model in models.items():
            tic = time.perf_counter()
            for index in batches:
                loss = F.cross_entropy(model(x[index]), y[index])
                optimizers[norm].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[norm].step()
            fastest[norm] = min(fastest[norm], (time.perf_counter() - tic) / steps)
    return fastest
