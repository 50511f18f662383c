"""Chapter 9's experiments: normalization in transformers.

Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture") at laptop scale,
on a small transformer encoder that reads MNIST images as sequences of 28 rows
(``normcourse.models.TransformerClassifier``, ``MODEL``: 6 blocks of width 32):

- ``gradient_norms_at_init``: the gradient norm of each block's second MLP weight (Xiong et al.'s
  W^{FFN,2}) at initialization, post-LN against pre-LN, and ``depth_sweep`` over depths;
- ``train_variant`` / ``lr_sweep``: post-LN with and without learning-rate warm-up, pre-LN, and
  pre-LN with RMSNorm, trained with Adam at several learning rates (``VARIANTS``, ``LRS``);
- ``residual_stream_norms`` and ``logit_scale_at_init``: where the norm sits in the residual
  stream, and what the final norm before the head does;
- ``batch_norm_in_a_transformer``: why a transformer normalizes over features, not over the
  batch (a per-sequence output that depends on the other sequences and on the padding; a batch
  of one one-token sequence that cannot be normalized at all).

Built on the shared runner (the tensors, the loop over runs) and normcourse.train / models; no
other chapter's module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from normcourse.experiments import runner
from normcourse.models import TransformerClassifier
from normcourse.train import EvalOptions, History, evaluate, train
from normcourse.utils import one_thread, seed_everything

__all__ = [
    "MODEL",
    "TRAINING",
    "LRS",
    "HEADLINE_LR",
    "WARMUP_STEPS",
    "VARIANTS",
    "mnist_tensors",
    "build",
    "block_gradient_norms",
    "gradient_norms_at_init",
    "depth_sweep",
    "TransformerRun",
    "train_variant",
    "lr_sweep",
    "residual_stream_norms",
    "logit_scale_at_init",
    "batch_norm_in_a_transformer",
    "summary",
]

# The chapter's model: 6 blocks (Xiong et al.'s encoder depth), width 32, 4 heads, MLP 64.
MODEL = dict(num_layers=6, d_model=32, num_heads=4, d_ff=64)
# Every training run: Adam, 200 steps of 32 images (6,400 images, under one epoch of the
# embedded subset), evaluated on the first 1,000 test images.
TRAINING = dict(steps=200, batch_size=32)
TEST_EXAMPLES = 1000
LRS = (1e-3, 3e-3, 1e-2)
HEADLINE_LR = 3e-3  # where post-LN without warm-up fails and the other variants train
WARMUP_STEPS = 50  # a quarter of the run, linear from lr / 50 up to lr

# name -> (model keyword arguments, warm-up steps)
VARIANTS: dict[str, tuple[dict, int]] = {
    "post-LN": ({"placement": "post", "norm": "layer"}, 0),
    "post-LN + warm-up": ({"placement": "post", "norm": "layer"}, WARMUP_STEPS),
    "pre-LN": ({"placement": "pre", "norm": "layer"}, 0),
    "pre-RMSNorm": ({"placement": "pre", "norm": "rms"}, 0),
}


def mnist_tensors(data, test_examples: int | None = TEST_EXAMPLES):
    """``runner.mnist_tensors``: images (N, 1, 28, 28) in [0, 1] (the model reads each image
    as 28 tokens, its rows); the test set cut to its first ``test_examples``."""
    return runner.mnist_tensors(data, test_examples)


def build(seed: int, **kwargs) -> TransformerClassifier:
    """``TransformerClassifier(**{**MODEL, **kwargs})``, its weights drawn after ``seed``."""
    seed_everything(seed)
    return TransformerClassifier(**{**MODEL, **kwargs})


# ---------------------------------------------------------------------------------------------
# (a) Gradients at initialization
# ---------------------------------------------------------------------------------------------
def block_gradient_norms(model: TransformerClassifier, x: torch.Tensor,
                         y: torch.Tensor) -> list[float]:
    """The norm of the cross-entropy's gradient with respect to each block's second MLP weight
    (``blocks[i].mlp.fc2.weight``), from the input block to the output block, for one batch
    x: (N, 1, 28, 28), y: (N,). The parameters' ``.grad`` are left alone."""
    weights = [block.mlp.fc2.weight for block in model.blocks]
    # only these gradients: autograd skips the other weights' (a quarter of the work)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
    return [g.norm().item() for g in grads]


@one_thread()
def gradient_norms_at_init(data, placement: str, num_layers: int = MODEL["num_layers"],
                           seed: int = 0, examples: int = 512, norm: str = "layer") -> list[float]:
    """``block_gradient_norms`` of a freshly initialized model (seed ``seed``) on the first
    ``examples`` training images: one number per block, input side first."""
    x, y = mnist_tensors(data)[:2]
    model = build(seed, placement=placement, num_layers=num_layers, norm=norm)
    return block_gradient_norms(model, x[:examples], y[:examples])


def depth_sweep(data, depths: Sequence[int] = (2, 4, 8, 16), seeds: Sequence[int] = (0, 1, 2),
                placements: Sequence[str] = ("post", "pre")) -> dict[tuple[str, int, int], list[float]]:
    """``gradient_norms_at_init`` for every placement, depth and seed:
    ``{(placement, depth, seed): [norm of block 1, ..., norm of block depth]}``."""
    return {(p, depth, s): gradient_norms_at_init(data, p, depth, s)
            for p in placements for depth in depths for s in seeds}


# ---------------------------------------------------------------------------------------------
# (b, c) Training with Adam: warm-up and the learning rates that train
# ---------------------------------------------------------------------------------------------
@dataclass
class TransformerRun:
    """One trained variant: its test accuracy (eval mode), the record of the run, the model."""

    variant: str
    lr: float
    seed: int
    accuracy: float
    history: History = field(repr=False)
    model: TransformerClassifier = field(repr=False)

    @property
    def ms_per_step(self) -> float:
        """Training time per step (forward, backward, update; evaluation excluded)."""
        return 1000.0 / self.history.steps_per_second


@one_thread()
def train_variant(data, variant: str, lr: float, seed: int, *, steps: int = TRAINING["steps"],
                  batch_size: int = TRAINING["batch_size"], eval_every: int | None = None,
                  **model_kwargs) -> TransformerRun:
    """Train ``VARIANTS[variant]`` with Adam at ``lr`` (with its warm-up, if any); the training
    loss and test accuracy are recorded every ``eval_every`` steps (None: only after the last
    step, which is all the accuracy needs). ``model_kwargs`` override ``MODEL``."""
    kwargs, warmup = VARIANTS[variant]
    tensors = mnist_tensors(data)
    model = build(seed, **kwargs, **model_kwargs)
    history = train(model, tensors, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    eval_every=eval_every or steps, optimizer="adam", warmup_steps=warmup,
                    progress=False, evaluation=EvalOptions(train_examples=1))
    # the last record evaluated the final model already, unless the run diverged before it
    final_recorded = bool(history.steps) and history.steps[-1] == history.steps_done
    accuracy = (history.test_accuracy[-1] if final_recorded
                else evaluate(model, tensors[2], tensors[3]))
    return TransformerRun(variant, lr, seed, accuracy, history, model)


def lr_sweep(data, variants: Sequence[str] = tuple(VARIANTS), lrs: Sequence[float] = LRS,
             seeds: Sequence[int] = (0,), **settings) -> dict[tuple[str, float, int], TransformerRun]:
    """``train_variant`` for every variant, learning rate and seed:
    ``{(variant, lr, seed): TransformerRun}``."""
    tensors = mnist_tensors(data)
    runs = [((v, lr, s), {"data": tensors, "variant": v, "lr": lr, "seed": s, **settings})
            for v in variants for lr in lrs for s in seeds]
    return runner.sweep(train_variant, runs, "variant, lr, seed")


# ---------------------------------------------------------------------------------------------
# The residual stream and the final norm
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def residual_stream_norms(model: TransformerClassifier, x: torch.Tensor) -> list[float]:
    """The mean norm of a token of the residual stream after the embedding and after each block
    (num_layers + 1 numbers), for images x: (N, 1, 28, 28), in eval mode."""
    was_training = model.training
    model.eval()
    stream = model.residual_stream(x)
    model.train(was_training)
    return [h.norm(dim=-1).mean().item() for h in stream]


@torch.no_grad()
def logit_scale_at_init(data, depths: Sequence[int] = (2, 4, 8, 16), seed: int = 0,
                        examples: int = 512) -> dict[tuple[bool, int], float]:
    """The standard deviation of the logits of a freshly initialized pre-LN model, with and
    without the final norm, at each depth: ``{(final_norm, depth): std}``."""
    x = mnist_tensors(data)[0][:examples]
    return {(final, depth): build(seed, placement="pre", num_layers=depth,
                                  final_norm=final)(x).std().item()
            for final in (True, False) for depth in depths}


# ---------------------------------------------------------------------------------------------
# Batch norm in a transformer
# ---------------------------------------------------------------------------------------------
def batch_norm_in_a_transformer(seed: int = 0, batch: int = 4, length: int = 10,
                                padding: int = 6) -> dict[str, dict[str, float] | str]:
    """Chapter 5's argument at sequence scale: pre-LN models with LayerNorm and with batch norm
    over all tokens of the batch, in training mode, on random token sequences (N, T, 28).

    Returns, for each norm, the largest change of sequence 0's logits when (i) the *other*
    sequences of the batch are replaced, (ii) every sequence gets ``padding`` padded positions
    (masked out of attention and of the mean); and, under ``"one_token"``, the error batch norm
    raises for a batch of one sequence of one token (or ``"no error"``).
    """
    seed_everything(seed)
    x = torch.randn(batch, length, 28)
    others = torch.cat([x[:1], torch.randn(batch - 1, length, 28)])
    padded = torch.cat([x, torch.randn(batch, padding, 28)], dim=1)
    mask = torch.zeros(batch, length + padding, dtype=torch.bool)
    mask[:, length:] = True
    changes: dict = {}
    for norm in ("layer", "batch"):
        model = build(seed, placement="pre", norm=norm).train()
        base = model(x)[0]
        changes[norm] = {
            "other sequences": (model(others)[0] - base).abs().max().item(),
            "padding": (model(padded, mask)[0] - base).abs().max().item(),
        }
    try:
        build(seed, placement="pre", norm="batch").train()(torch.randn(1, 1, 28))
        changes["one_token"] = "no error"
    except ValueError as err:
        changes["one_token"] = str(err)
    return changes


def summary(runs: dict[tuple[str, float, int], TransformerRun]) -> dict[str, dict[float, float]]:
    """``{variant: {lr: mean test accuracy over seeds}}`` of ``lr_sweep``'s runs."""
    grouped: dict[str, dict[float, list[float]]] = {}
    for (variant, lr, _), run in runs.items():
        grouped.setdefault(variant, {}).setdefault(lr, []).append(run.accuracy)
    return {v: {lr: float(np.mean(a)) for lr, a in by_lr.items()} for v, by_lr in grouped.items()}
