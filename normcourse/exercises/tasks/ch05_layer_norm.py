"""Chapter 5, layer normalization: per-example statistics, backward pass, channels-first images."""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, rng
from normcourse.exercises.tasks._variants import normalized, per_channel_affine
from normcourse.gradcheck import random_upstream

EPS = 1e-5


def _examples(seed: int, n: int = 6, d: int = 4) -> np.ndarray:
    """(n, d): each example with its own mean and scale, one example with a tiny spread."""
    g = rng(seed)
    means = 5.0 * g.standard_normal((n, 1))
    scales = np.exp(g.standard_normal((n, 1)))
    scales[min(1, n - 1)] = 1e-3
    return means + scales * g.standard_normal((n, d))


# ---- 05.layernorm_forward -------------------------------------------------------------------
def _forward_case(description, seed, n):
    def make():
        x = _examples(seed, n)
        gamma, beta = affine(seed + 1, x.shape[1])
        return {"x": x, "gamma": gamma, "beta": beta, "eps": EPS}

    return Case(description, make)


def _ln(x, gamma, beta, eps, axis=-1, ddof=0, eps_outside=False):
    return gamma * normalized(x, axis, eps, ddof, eps_outside) + beta


LAYERNORM_FORWARD = OutputTask(
    id="05.layernorm_forward",
    title="layer norm forward pass",
    function="layernorm_forward",
    points=2,
    correct=lambda x, gamma, beta, eps: reference.layernorm_forward(x, gamma, beta, eps)[0],
    cases=(
        _forward_case("x of shape (6, 4), examples of different means and scales", 200, 6),
        _forward_case("a single example, x of shape (1, 4)", 201, 1),
    ),
    mistakes=(
        Mistake("batch_axis", "You normalized each feature over the batch (axis=0), which is "
                "batch norm; layer norm normalizes each example over its features: axis=-1 "
                "(and so works with a batch of one).",
                lambda x, gamma, beta, eps: _ln(x, gamma, beta, eps, axis=0)),
        Mistake("unbiased_variance", "You used the unbiased variance (N - 1); layer norm uses "
                "the biased one over the D features.",
                lambda x, gamma, beta, eps: _ln(x, gamma, beta, eps, ddof=1)),
        Mistake("eps_outside_root", "eps belongs inside the square root: sqrt(var + eps).",
                lambda x, gamma, beta, eps: _ln(x, gamma, beta, eps, eps_outside=True)),
        Mistake("forgot_gamma_beta", "You forgot the learned gain and bias: out = gamma * xhat "
                "+ beta.", lambda x, gamma, beta, eps: _ln(x, 1.0, 0.0, eps)),
    ),
)


# ---- 05.layernorm_backward ------------------------------------------------------------------
def _backward_case(description, seed):
    def make():
        x = _examples(seed)
        gamma, _ = affine(seed + 1, x.shape[1])
        return {"dout": random_upstream(x.shape, seed + 2), "x": x, "gamma": gamma, "eps": EPS}

    return Case(description, make)


def _backward_correct(dout, x, gamma, eps):
    _, cache = reference.layernorm_forward(x, gamma, np.zeros_like(gamma), eps)
    return reference.layernorm_backward(dout, cache)


def _statistics_constant(dout, x, gamma, eps):
    _, dgamma, dbeta = _backward_correct(dout, x, gamma, eps)
    return dout * gamma / np.sqrt(x.var(1, keepdims=True) + eps), dgamma, dbeta


def _batchnorm_backward(dout, x, gamma, eps):
    _, cache = reference.batchnorm_forward(x, gamma, np.zeros_like(gamma), training=True, eps=eps)
    return reference.batchnorm_backward_closed_form(dout, cache)


def _no_gamma_in_dx(dout, x, gamma, eps):
    dx, dgamma, dbeta = _backward_correct(dout, x, gamma, eps)
    dx_without_gamma, _, _ = _backward_correct(dout, x, np.ones_like(gamma), eps)
    return dx_without_gamma, dgamma, dbeta


def _per_example_sums(dout, x, gamma, eps):
    dx, _, _ = _backward_correct(dout, x, gamma, eps)
    xhat = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps)
    return dx, (dout * xhat).sum(1), dout.sum(1)


LAYERNORM_BACKWARD = OutputTask(
    id="05.layernorm_backward",
    title="layer norm backward pass",
    function="layernorm_backward",
    points=4,
    correct=_backward_correct,
    outputs=("dx", "dgamma", "dbeta"),
    output_points=(2, 1, 1),
    cases=(_backward_case("x of shape (6, 4), random upstream gradient", 210),),
    mistakes=(
        Mistake("statistics_as_constants", "Your dx treats each example's mean and variance as "
                "constants; they depend on the example's features, which adds two terms: "
                "dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * gamma.",
                _statistics_constant),
        Mistake("batchnorm_backward", "You computed batch norm's backward (statistics over the "
                "batch, axis=0); layer norm's statistics are per example, over axis=-1.",
                _batchnorm_backward),
        Mistake("no_gamma_in_dx", "Your dx forgot gamma: the gradient reaching xhat is "
                "g = dout * gamma.", _no_gamma_in_dx),
        Mistake("per_example_sums", "dgamma and dbeta are summed over the features; gamma and "
                "beta are shared by all examples, so sum over the batch (axis=0), giving shape "
                "(D,).", _per_example_sums),
    ),
)


# ---- 05.layernorm_channels_first ------------------------------------------------------------
def _channels_case(description, seed):
    def make():
        g = rng(seed)
        x = 3.0 * g.standard_normal((2, 3, 4, 5)) + g.standard_normal((2, 1, 4, 5)) * 4.0
        gamma, beta = affine(seed + 1, 3)
        return {"x": x, "gamma": gamma, "beta": beta, "eps": EPS}

    return Case(description, make)


def _channels_correct(x, gamma, beta, eps):
    channels_last = x.transpose(0, 2, 3, 1)  # (N, H, W, C): layer norm over the last axis
    out, _ = reference.layernorm_forward(channels_last, gamma, beta, eps)
    return out.transpose(0, 3, 1, 2)


def _channels_over(x, gamma, beta, eps, axes):
    return per_channel_affine(normalized(x, axes, eps), gamma, beta)


def _reshape_without_transpose(x, gamma, beta, eps):
    """x.reshape(-1, C) on (N, C, H, W): each row mixes channels and positions."""
    flat = x.reshape(-1, x.shape[1])
    return (gamma * normalized(flat, -1, eps) + beta).reshape(x.shape)


LAYERNORM_CHANNELS_FIRST = OutputTask(
    id="05.layernorm_channels_first",
    title="layer norm over the channels of an (N, C, H, W) image",
    function="layernorm_channels_first",
    points=2,
    correct=_channels_correct,
    cases=(_channels_case("x of shape (2, 3, 4, 5), gamma and beta of shape (3,)", 220),),
    mistakes=(
        Mistake("per_example", "You normalized each example over (C, H, W); here every pixel "
                "is normalized over its C channels: axis=1.",
                lambda x, gamma, beta, eps: _channels_over(x, gamma, beta, eps, (1, 2, 3))),
        Mistake("batchnorm", "You normalized each channel over (N, H, W), which is batch norm; "
                "layer norm over channels uses axis=1 at every position.",
                lambda x, gamma, beta, eps: reference.spatial_batchnorm_forward(
                    x, gamma, beta, training=True, eps=eps)[0]),
        Mistake("per_channel_image", "You normalized each channel of each image over (H, W) "
                "(instance norm); normalize over the channels, axis=1.",
                lambda x, gamma, beta, eps: _channels_over(x, gamma, beta, eps, (2, 3))),
        Mistake("reshape_without_transpose", "x.reshape(-1, C) on an (N, C, H, W) array does not "
                "put one pixel's C channels in a row: reshape reads the values in memory order. "
                "Move the channel axis last first, x.transpose(0, 2, 3, 1), normalize over the "
                "last axis and transpose back (or reduce over axis=1 with keepdims=True).",
                _reshape_without_transpose),
    ),
)



# ---- 05.batch_dependence: an experiment -----------------------------------------------------
# Predict, then measure: how much one example's output changes when its batch-mates are
# replaced, for batch norm in training mode, batch norm in eval mode and layer norm.
BATCH_SIZES = (2, 4, 16, 64)


def _dependence_case(description, seed):
    def make():
        g = rng(seed)
        others = 2.0 + 3.0 * g.standard_normal((2 * max(BATCH_SIZES), 10))
        return {"x": 2.0 + 3.0 * g.standard_normal(10), "others": others,
                "batch_sizes": np.array(BATCH_SIZES)}

    return Case(description, make)


def _dependence(x, others, batch_sizes, whole_batch=False, second_start=None):
    """For each m: max |change| of x's output (row 0) between batches [x, others[:m-1]] and
    [x, others[m-1:2m-2]], under BatchNorm1d (train, eval; fresh layers) and LayerNorm."""
    import torch

    from normcourse import nn

    d = x.shape[0]
    layers = {"bn_train": nn.BatchNorm1d(d, dtype=torch.float64).train(),
              "bn_eval": nn.BatchNorm1d(d, dtype=torch.float64).eval(),
              "ln": nn.LayerNorm(d, dtype=torch.float64)}
    changes = {name: [] for name in layers}
    for m in batch_sizes:
        m = int(m)
        first = torch.from_numpy(np.vstack([x, others[: m - 1]]))
        start = m - 1 if second_start is None else second_start
        second = torch.from_numpy(np.vstack([x, others[start: start + m - 1]]))
        for name, layer in layers.items():
            with torch.no_grad():
                a, b = layer(first), layer(second)
            rows = slice(None) if whole_batch else 0
            changes[name].append(float((a[rows] - b[rows]).abs().max()))
    return tuple(np.array(changes[name]) for name in layers)


BATCH_DEPENDENCE = OutputTask(
    id="05.batch_dependence",
    title="experiment: does one example's output depend on the rest of the batch?",
    function="batch_dependence",
    points=2,
    correct=_dependence,
    outputs=("bn_train", "bn_eval", "ln"),
    cases=(_dependence_case("one example and 126 others with 10 features, batch sizes 2 to 64",
                            40),),
    mistakes=(
        Mistake("overlapping_batch_mates", "The two batches must share no batch-mate: the "
                "first is [x, others[0 : m-1]], the second [x, others[m-1 : 2m-2]].",
                lambda x, others, batch_sizes: _dependence(x, others, batch_sizes,
                                                           second_start=1)),
        Mistake("whole_batch", "Compare only example x's output (row 0): the other rows are "
                "different examples in the two batches.",
                lambda x, others, batch_sizes: _dependence(x, others, batch_sizes,
                                                           whole_batch=True)),
    ),
)

TASKS = (LAYERNORM_FORWARD, LAYERNORM_BACKWARD, LAYERNORM_CHANNELS_FIRST, BATCH_DEPENDENCE)
