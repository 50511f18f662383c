"""Chapter 8's experiments: normalization without the batch.

- ``what_each_normalizes``: for one (N, C, H, W) input, which values share a mean under batch,
  layer, instance and group norm (the picture of Wu & He 2018, Fig. 2, as numbers);
- ``invariance_table``: chapter 5's invariance table extended to group norm, instance norm,
  RMSNorm and weight standardization, checked numerically with the NumPy reference code;
- ``batch_size_sweep``: Wu & He 2018, Fig. 1 at laptop scale: a ConvNet on 1x1 feature maps (so
  that batch norm's statistics come from the batch size's worth of values), or the small ConvNet
  on 28x28 images, trained on MNIST at several batch sizes with BN, GN, GN+WS, LN, WS alone and
  WS+BN; eval accuracy per run;
- ``rms_versus_layer_norm``: an MLP with RMSNorm against the same MLP with LayerNorm.

Built on the shared runner (``normcourse.experiments.runner``: the tensors and the loop over
runs) and normcourse.train / models / reference; no other chapter's module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from normcourse import reference
from normcourse.experiments import runner
from normcourse.models import convnet, mlp, pointwise_convnet
from normcourse.train import EvalOptions, evaluate, train
from normcourse.utils import one_thread, seed_everything
from normcourse.validation import check_choice

__all__ = [
    "CONFIGS",
    "BATCH_SIZES",
    "ARCHITECTURES",
    "mnist_tensors",
    "what_each_normalizes",
    "TRANSFORMS",
    "invariance_table",
    "batch_size_sweep",
    "sweep_summary",
    "rms_versus_layer_norm",
]

# Wu & He's Fig. 1 batch sizes (images per GPU there, per step here).
BATCH_SIZES = (32, 16, 8, 4, 2)

# The configurations of the sweep: convnet keyword arguments. "LN" is Wu & He's layer norm,
# group norm with one group (statistics over all of (C, H, W), one gamma and beta per channel).
CONFIGS: dict[str, dict] = {
    "BN": {"norm": "batch"},
    "GN": {"norm": "group"},
    "GN+WS": {"norm": "group", "weight_standardization": True},
    "LN": {"norm": "group", "num_groups": 1},
    "WS": {"norm": "none", "weight_standardization": True},
    "WS+BN": {"norm": "batch", "weight_standardization": True},
}


def mnist_tensors(data, train_examples: int | None = None, test_examples: int | None = None):
    """``runner.mnist_tensors`` with the training examples first among the arguments."""
    return runner.mnist_tensors(data, test_examples, train_examples)


# ---------------------------------------------------------------------------------------------
# What each normalizes over, and what it is invariant to (NumPy reference code, float64)
# ---------------------------------------------------------------------------------------------
def _normalize(x: np.ndarray, norm: str, num_groups: int = 2, eps: float = 1e-12) -> np.ndarray:
    """x: (N, C, H, W) normalized by ``norm`` with gamma = 1, beta = 0 (reference code)."""
    c = x.shape[1]
    ones, zeros = np.ones(c), np.zeros(c)
    if norm == "batch":
        return reference.spatial_batchnorm_forward(x, ones, zeros, eps=eps)[0]
    if norm == "layer":
        return reference.groupnorm_forward(x, ones, zeros, 1, eps=eps)[0]
    if norm == "instance":
        return reference.instancenorm_forward(x, ones, zeros, eps=eps)[0]
    if norm == "group":
        return reference.groupnorm_forward(x, ones, zeros, num_groups, eps=eps)[0]
    if norm == "rms":
        return reference.rmsnorm_forward(x, np.ones(x.shape[1:]), eps=eps)[0]
    raise ValueError(f"unknown norm {norm!r}")


def what_each_normalizes(shape=(4, 6, 3, 3), num_groups: int = 2, seed: int = 0) -> dict[str, int]:
    """How many values share one mean (the size of a normalization set) under each norm.

    Measured, not computed from a formula: a value perturbed in x[0, 0, 0, 0] changes exactly the
    outputs in its normalization set (plus nothing else), so the count of changed outputs is the
    set's size: N*H*W for batch norm, C*H*W for layer norm, H*W for instance norm,
    C/G*H*W for group norm.
    """
    x = np.random.default_rng(seed).standard_normal(shape)
    counts = {}
    for norm in ("batch", "layer", "instance", "group"):
        y = _normalize(x, norm, num_groups)
        x2 = x.copy()
        x2[0, 0, 0, 0] += 1.0
        counts[norm] = int((np.abs(_normalize(x2, norm, num_groups) - y) > 1e-12).sum())
    return counts


# Each maps (W: (C_out, C_in, 3, 3), X: (N, C_in, H, W), a) to a new (W, X); a conv layer's
# output is the summed input the norm sees.
TRANSFORMS = {
    "weight re-scaling": lambda W, X, a: (a * W, X),
    "one filter re-scaling": lambda W, X, a: (np.concatenate([a * W[:1], W[1:]]), X),
    "weight re-centering (per filter)": lambda W, X, a: (W + a, X),
    "dataset re-scaling": lambda W, X, a: (W, a * X),
    "single example re-scaling": lambda W, X, a: (W, np.concatenate([a * X[:1], X[1:]])),
}


def _conv(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Valid 3x3 convolution (cross-correlation), X: (N, C_in, H, W) -> (N, C_out, H-2, W-2)."""
    n, _, h, w = X.shape
    patches = np.stack([X[:, :, i:i + h - 2, j:j + w - 2] for i in range(3) for j in range(3)], -1)
    return np.einsum("ncxyk,ock->noxy", patches, W.reshape(W.shape[0], W.shape[1], 9))


def invariance_table(seed: int = 0, scale: float = 3.0, shift: float = 0.7) -> dict[str, dict[str, float]]:
    """Largest change of the normalized conv output under each transformation of ``TRANSFORMS``,
    for batch, layer, instance, group norm, RMSNorm (over (C, H, W)) and weight standardization
    (WS alone: the conv with standardized filters, no norm after it). Below 1e-9: invariant.

    The re-centering adds a constant to every weight of a filter; the input is positive (as
    images and ReLU outputs are), so it shifts each output by a constant times a local sum.
    """
    rng = np.random.default_rng(seed)
    W, X = rng.standard_normal((4, 2, 3, 3)), rng.uniform(0.0, 1.0, (6, 2, 6, 6))

    def outputs(W, X):
        out = {norm: _normalize(_conv(W, X), norm) for norm in ("batch", "layer", "instance",
                                                                 "group", "rms")}
        out["ws"] = _conv(reference.weight_standardize_forward(W, eps=1e-12)[0], X)
        return out

    base = outputs(W, X)
    table = {}
    for name, transform in TRANSFORMS.items():
        changed = outputs(*transform(W, X, shift if "re-centering" in name else scale))
        table[name] = {k: float(np.max(np.abs(changed[k] - base[k]))) for k in base}
    return table


# ---------------------------------------------------------------------------------------------
# Wu & He 2018, Fig. 1 at laptop scale
# ---------------------------------------------------------------------------------------------
# The networks of the sweep, by name: ``(widths, **CONFIGS[config]) -> model``. In "convnet" (the
# chapter's small ConvNet, widths = channels) batch norm's m = N*H*W is at least 392 even at batch
# 2; in "pointwise" (1x1 maps, widths = hidden sizes) it is N, the batch size itself.
ARCHITECTURES = {
    "pointwise": lambda widths, **kwargs: pointwise_convnet(sizes=(784, *widths, 10), **kwargs),
    "convnet": lambda widths, **kwargs: convnet(channels=tuple(widths), **kwargs),
}


@one_thread()
def batch_size_sweep(
    data,
    configs: Sequence[str] = tuple(CONFIGS),
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seeds: Sequence[int] = (0,),
    *,
    architecture: str = "pointwise",
    widths: Sequence[int] = (64, 64),
    examples: int = 3200,
    lr: float = 0.1,
    reference_batch: int = 32,
    num_groups: int = 4,
    train_examples: int | None = None,
    test_examples: int | None = 1000,
) -> dict[tuple[str, int, int], float]:
    """Train ``ARCHITECTURES[architecture](widths, **CONFIGS[config])`` at every batch size;
    eval accuracy per run.

    Every run sees the same number of training ``examples`` (steps = examples // batch size) with
    SGD (momentum 0.9) and Wu & He's linear learning-rate scaling, lr * batch / reference_batch,
    so that the batch size is the only thing that changes. Evaluation in eval mode (BN with its
    running statistics). Returns ``{(config, batch_size, seed): test accuracy}``.
    """
    check_choice(architecture, tuple(ARCHITECTURES), "architecture")
    tensors = mnist_tensors(data, train_examples, test_examples)

    def run(config, b, seed):
        kwargs = dict(CONFIGS[config])
        if kwargs.get("norm") == "group":
            kwargs.setdefault("num_groups", num_groups)
        seed_everything(seed)
        model = ARCHITECTURES[architecture](widths, **kwargs)
        steps = max(1, examples // b)
        train(model, tensors, steps=steps, batch_size=b, lr=lr * b / reference_batch,
              sgd_momentum=0.9, seed=seed, eval_every=steps, progress=False,
              evaluation=EvalOptions(train_examples=1))
        return evaluate(model, tensors[2], tensors[3])

    settings = [((c, b, s), {"config": c, "b": b, "seed": s})
                for c in configs for b in batch_sizes for s in seeds]
    return runner.sweep(run, settings)


def sweep_summary(results: Mapping[tuple[str, int, int], float]) -> dict[str, dict[int, tuple[float, float]]]:
    """``{config: {batch_size: (mean, std)}}`` of the accuracies over seeds (std with ddof=0)."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for (config, b, _), acc in results.items():
        grouped.setdefault(config, {}).setdefault(b, []).append(acc)
    return {c: {b: (float(np.mean(v)), float(np.std(v))) for b, v in by_b.items()}
            for c, by_b in grouped.items()}


# ---------------------------------------------------------------------------------------------
# RMSNorm against LayerNorm
# ---------------------------------------------------------------------------------------------
@one_thread()
def rms_versus_layer_norm(
    data,
    seeds: Sequence[int] = (0,),
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    train_examples: int | None = None,
    test_examples: int | None = 1000,
) -> dict[tuple[str, int], float]:
    """The ReLU MLP 784-100-100-100-10 (Adam) with LayerNorm or RMSNorm before each ReLU;
    ``{(norm, seed): test accuracy}`` with norm in ("layer", "rms")."""
    tensors = mnist_tensors(data, train_examples, test_examples)

    def run(norm, seed):
        seed_everything(seed)
        model = mlp(norm=norm, activation="relu")
        train(model, tensors, steps=steps, batch_size=batch_size, lr=lr, optimizer="adam",
              seed=seed, eval_every=steps, progress=False,
              evaluation=EvalOptions(train_examples=1))
        return evaluate(model, tensors[2], tensors[3])

    return runner.sweep(run, [((n, s), {"norm": n, "seed": s}) for n in ("layer", "rms")
                              for s in seeds])
