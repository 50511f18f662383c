"""Chapter 2, batch normalization: forward and backward by hand, images, gradient checks."""

from __future__ import annotations

import numpy as np

from normcourse import gradcheck, reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, features, rng
from normcourse.exercises.tasks._variants import normalized, per_channel_affine
from normcourse.gradcheck import random_upstream

EPS = 1e-5


# ---- 02.batchnorm_forward -------------------------------------------------------------------
def _forward_case(description, seed):
    def make():
        x = features(seed)
        gamma, beta = affine(seed + 1, x.shape[1])
        return {"x": x, "gamma": gamma, "beta": beta, "eps": EPS}

    return Case(description, make)


def _bn(x, gamma, beta, eps, axis=0, ddof=0, eps_outside=False):
    """Batch norm with knobs for the usual mistakes (statistics over ``axis``)."""
    return gamma * normalized(x, axis, eps, ddof, eps_outside) + beta


def _forward_correct(x, gamma, beta, eps):
    return reference.batchnorm_forward(x, gamma, beta, training=True, eps=eps)[0]


FORWARD_MISTAKES = (
    Mistake("unbiased_variance", "You normalized with the unbiased variance (divided by N - 1); "
            "batch norm normalizes with the biased batch variance, dividing by N (np.var's "
            "default, ddof=0).", lambda x, gamma, beta, eps: _bn(x, gamma, beta, eps, ddof=1)),
    Mistake("eps_outside_root", "You added eps outside the square root; it belongs inside: "
            "sqrt(var + eps).", lambda x, gamma, beta, eps: _bn(x, gamma, beta, eps, eps_outside=True)),
    Mistake("no_eps", "You left out eps: divide by sqrt(var + eps), which keeps a feature with "
            "(almost) no spread finite.", lambda x, gamma, beta, eps: _bn(x, gamma, beta, 0.0)),
    Mistake("wrong_axis", "You computed the statistics per example (axis=1), which is layer "
            "norm; batch norm averages each feature over the batch: axis=0.",
            lambda x, gamma, beta, eps: _bn(x, gamma, beta, eps, axis=1)),
    Mistake("forgot_gamma_beta", "You returned the normalized x without the learned scale and "
            "shift: out = gamma * xhat + beta.",
            lambda x, gamma, beta, eps: _bn(x, 1.0, 0.0, eps)),
    Mistake("swapped_gamma_beta", "You swapped gamma and beta: gamma scales, beta shifts.",
            lambda x, gamma, beta, eps: _bn(x, beta, gamma, eps)),
)

BATCHNORM_FORWARD = OutputTask(
    id="02.batchnorm_forward",
    title="batch norm forward pass, training mode",
    function="batchnorm_forward",
    points=2,
    correct=_forward_correct,
    cases=(_forward_case("x of shape (8, 5), features of very different scales", 10),),
    mistakes=FORWARD_MISTAKES,
)


# ---- 02.batchnorm_backward ------------------------------------------------------------------
def _backward_case(description, seed):
    def make():
        x = features(seed)
        gamma, _ = affine(seed + 1, x.shape[1])
        return {"dout": random_upstream(x.shape, seed + 2), "x": x, "gamma": gamma, "eps": EPS}

    return Case(description, make)


def _backward_correct(dout, x, gamma, eps):
    _, cache = reference.batchnorm_forward(x, gamma, np.zeros_like(gamma), training=True, eps=eps)
    return reference.batchnorm_backward(dout, cache)


def _parts(x, eps):
    mu, var = x.mean(axis=0), x.var(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    return (x - mu) * invstd, invstd


def _statistics_constant(dout, x, gamma, eps):
    xhat, invstd = _parts(x, eps)
    return dout * gamma * invstd, (dout * xhat).sum(0), dout.sum(0)


def _no_mean_path(dout, x, gamma, eps):
    xhat, invstd = _parts(x, eps)
    dx = gamma * invstd * (dout - xhat * (dout * xhat).mean(0))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def _no_variance_path(dout, x, gamma, eps):
    xhat, invstd = _parts(x, eps)
    dx = gamma * invstd * (dout - dout.mean(0))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def _no_gamma_in_dx(dout, x, gamma, eps):
    dx, dgamma, dbeta = _backward_correct(dout, x, gamma, eps)
    return dx / gamma, dgamma, dbeta


def _dgamma_from_x(dout, x, gamma, eps):
    dx, _, dbeta = _backward_correct(dout, x, gamma, eps)
    return dx, (dout * x).sum(0), dbeta


def _sums_over_features(dout, x, gamma, eps):
    dx, _, _ = _backward_correct(dout, x, gamma, eps)
    xhat, _ = _parts(x, eps)
    return dx, (dout * xhat).sum(1), dout.sum(1)


BATCHNORM_BACKWARD = OutputTask(
    id="02.batchnorm_backward",
    title="batch norm backward pass, training mode",
    function="batchnorm_backward",
    points=4,
    correct=_backward_correct,
    outputs=("dx", "dgamma", "dbeta"),
    output_points=(2, 1, 1),
    cases=(_backward_case("x of shape (8, 5), random upstream gradient", 20),),
    mistakes=(
        Mistake("statistics_as_constants", "Your dx treats the batch mean and variance as "
                "constants (dx = dout * gamma / std, the eval-mode gradient); in training they "
                "depend on every x in the batch, which adds two terms.", _statistics_constant),
        Mistake("no_mean_path", "Your dx misses the path through the batch mean: subtract "
                "mean(dout * gamma) over the batch.", _no_mean_path),
        Mistake("no_variance_path", "Your dx misses the path through the batch variance: the "
                "term xhat * mean(dout * xhat) over the batch.", _no_variance_path),
        Mistake("no_gamma_in_dx", "Your dx forgot gamma: out = gamma * xhat + beta, so the "
                "gradient reaching xhat is dout * gamma.", _no_gamma_in_dx),
        Mistake("dgamma_from_x", "dgamma must use the normalized input: sum(dout * xhat), not "
                "sum(dout * x).", _dgamma_from_x),
        Mistake("sums_over_features", "dgamma and dbeta are summed over the features (axis=1); "
                "gamma and beta are shared by the examples of the batch, so sum over axis=0.",
                _sums_over_features),
    ),
)


# ---- 02.spatial_batchnorm_forward -----------------------------------------------------------
def _spatial_case(description, seed):
    def make():
        g = rng(seed)
        channel_means = np.array([2.0, -1.0, 0.0])[None, :, None, None]
        channel_scales = np.array([1.0, 5.0, 0.01])[None, :, None, None]
        x = channel_means + channel_scales * g.standard_normal((4, 3, 2, 5))
        gamma, beta = affine(seed + 1, 3)
        return {"x": x, "gamma": gamma, "beta": beta, "eps": EPS}

    return Case(description, make)


def _spatial(x, gamma, beta, eps, axes, ddof=0):
    return per_channel_affine(normalized(x, axes, eps, ddof), gamma, beta)


def _reshape_without_transpose(x, gamma, beta, eps):
    """x.reshape(-1, C) on (N, C, H, W): the rows mix channels and positions."""
    flat = x.reshape(-1, x.shape[1])
    return (gamma * normalized(flat, 0, eps) + beta).reshape(x.shape)


SPATIAL_BATCHNORM_FORWARD = OutputTask(
    id="02.spatial_batchnorm_forward",
    title="batch norm for images (N, C, H, W)",
    function="spatial_batchnorm_forward",
    points=2,
    correct=lambda x, gamma, beta, eps: reference.spatial_batchnorm_forward(
        x, gamma, beta, training=True, eps=eps)[0],
    cases=(_spatial_case("x of shape (4, 3, 2, 5), three channels of different scales", 30),),
    mistakes=(
        Mistake("per_position", "You normalized over the batch axis only, giving every pixel "
                "its own statistics; a convolutional batch norm has one mean and variance per "
                "channel, over N, H and W: axis=(0, 2, 3).",
                lambda x, gamma, beta, eps: _spatial(x, gamma, beta, eps, (0,))),
        Mistake("per_example", "You normalized each example over (C, H, W), which is layer "
                "norm; batch norm uses axis=(0, 2, 3).",
                lambda x, gamma, beta, eps: _spatial(x, gamma, beta, eps, (1, 2, 3))),
        Mistake("per_example_channel", "You normalized each channel of each example separately "
                "(axis=(2, 3), instance norm); batch norm also averages over the batch: "
                "axis=(0, 2, 3).", lambda x, gamma, beta, eps: _spatial(x, gamma, beta, eps, (2, 3))),
        Mistake("unbiased_variance", "You normalized with the unbiased variance; use the biased "
                "one (divide by N*H*W).",
                lambda x, gamma, beta, eps: _spatial(x, gamma, beta, eps, (0, 2, 3), ddof=1)),
        Mistake("reshape_without_transpose", "x.reshape(-1, C) on an (N, C, H, W) array does not "
                "give one column per channel: reshape reads the values in memory order, so each "
                "row mixes channels and positions. Move the channel axis last first: "
                "x.transpose(0, 2, 3, 1).reshape(-1, C), and undo both afterwards (or reduce over "
                "axis=(0, 2, 3) directly).", _reshape_without_transpose),
    ),
)


# ---- 02.numerical_gradient ------------------------------------------------------------------
def _gradient_case(description, seed, h):
    def make():
        g = rng(seed)
        weights = g.standard_normal((4, 2))

        def f(x):
            return np.tanh(x @ weights) * x[:, :2]

        return {"f": f, "x": g.standard_normal((3, 4)), "dout": random_upstream((3, 2), seed),
                "h": h}

    return Case(description, make)


def _centered(f, x, dout, h, combine):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + h
        plus = np.array(f(x))
        x[index] = original - h
        minus = np.array(f(x))
        x[index] = original
        grad[index] = combine(plus, minus, original)
    return grad


def _forward_difference(f, x, dout, h):
    grad = np.zeros_like(x)
    base = np.array(f(x))
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + h
        plus = np.array(f(x))
        x[index] = original
        grad[index] = np.sum((plus - base) * dout) / h
    return grad


NUMERICAL_GRADIENT = OutputTask(
    id="02.numerical_gradient",
    title="centered-difference gradient check",
    function="numerical_gradient",
    correct=gradcheck.numerical_gradient,
    outputs=("grad",),
    cases=(_gradient_case("f(x) = tanh(x @ W) * x[:, :2], x of shape (3, 4), h = 1e-3", 40, 1e-3),),
    mutation_message=(
        "`{function}` left its input `{name}` changed: restore every entry you perturb "
        "(x[i] = original) before moving on, or the next entries are checked at the wrong point"
    ),
    mistakes=(
        Mistake("forward_difference", "You used a one-sided difference (f(x + h) - f(x)) / h, "
                "whose error is of order h; the centered difference (f(x + h) - f(x - h)) / (2h) "
                "is accurate to order h^2.", _forward_difference),
        Mistake("ignored_dout", "You differentiated sum(f(x)), ignoring `dout`: the gradient "
                "of sum(f(x) * dout) weights each output by dout. (With dout = 1 a batch-norm "
                "check cannot fail: sum(BN(x)) does not depend on x.)",
                lambda f, x, dout, h: _centered(f, x, dout, h, lambda p, m, o: np.sum(p - m) / (2 * h))),
        Mistake("no_factor_two", "The centered difference divides by 2h, the distance between "
                "x - h and x + h.",
                lambda f, x, dout, h: _centered(f, x, dout, h, lambda p, m, o: np.sum((p - m) * dout) / h)),
    ),
)



# ---- 02.projection_sums: an experiment ------------------------------------------------------
# Predict, then measure: the column sums of dx, and of xhat * dx, for several eps. The first is 0
# (rounding); the second is gamma / std * sum(dout * xhat) * eps / (var + eps): 0 only up to O(eps).
def _sums_case(description, seed):
    def make():
        x = features(seed, 16)  # column 2 has a spread of 1e-3: variance ~1e-6, below eps
        gamma, _ = affine(seed + 1, x.shape[1])
        return {"x": x, "gamma": gamma, "dout": random_upstream(x.shape, seed + 2),
                "eps_values": np.array([1e-8, 1e-5, 1e-2])}

    return Case(description, make)


def _sums(x, gamma, dout, eps_values, xhat_eps=True, of_dout=False):
    sum_dx, sum_xhat_dx = [], []
    for eps in eps_values:
        dx = dout if of_dout else _backward_correct(dout, x, gamma, eps)[0]
        xhat, _ = _parts(x, eps if xhat_eps else 0.0)
        sum_dx.append(dx.sum(axis=0))
        sum_xhat_dx.append((xhat * dx).sum(axis=0))
    return np.array(sum_dx), np.array(sum_xhat_dx)


PROJECTION_SUMS = OutputTask(
    id="02.projection_sums",
    title="experiment: what the batch-norm gradient projects out, and the O(eps) term",
    function="projection_sums",
    points=2,
    correct=_sums,
    outputs=("sum_dx", "sum_xhat_dx"),
    output_points=(1, 1),
    cases=(_sums_case("x of shape (16, 5) with one tiny-variance feature, eps 1e-8 to 1e-2",
                      30),),
    uses=(BATCHNORM_BACKWARD,),
    mistakes=(
        Mistake("xhat_without_eps", "xhat is (x - mean) / sqrt(var + eps), with the same eps as "
                "the backward pass; without eps the sums hide the O(eps) term you are measuring.",
                lambda x, gamma, dout, eps_values: _sums(x, gamma, dout, eps_values,
                                                         xhat_eps=False)),
        Mistake("sums_of_dout", "Sum the gradient with respect to x (dx from your "
                "batchnorm_backward), not the upstream gradient dout.",
                lambda x, gamma, dout, eps_values: _sums(x, gamma, dout, eps_values,
                                                         of_dout=True)),
    ),
)

TASKS = (BATCHNORM_FORWARD, BATCHNORM_BACKWARD, SPATIAL_BATCHNORM_FORWARD, NUMERICAL_GRADIENT,
         PROJECTION_SUMS)
