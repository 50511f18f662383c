"""Chapter 8, normalization without the batch: group norm (forward, the group reshape,
backward), RMSNorm's backward and weight standardization."""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, rng
from normcourse.exercises.tasks._variants import normalized, per_channel_affine
from normcourse.gradcheck import random_upstream

EPS = 1e-5
GROUPS = 3


def _images(seed: int, n: int = 2, c: int = 6, h: int = 3, w: int = 4) -> np.ndarray:
    """(n, c, h, w): every channel with its own mean and scale, so that grouping the wrong
    channels together, or normalizing per channel, gives visibly different numbers; channels 2
    and 3 (the second of 3 groups) vary very little."""
    g = rng(seed)
    means = 4.0 * g.standard_normal((1, c, 1, 1))
    scales = np.exp(g.standard_normal((1, c, 1, 1)))
    scales[:, 2:4] = 1e-3  # one group (of 3) with a tiny spread: eps outside the root shows
    means[:, 3] = means[:, 2]
    return means + scales * g.standard_normal((n, c, h, w))


def _group_case(description, seed, with_upstream=False):
    def make():
        x = _images(seed)
        gamma, beta = affine(seed + 1, x.shape[1])
        if with_upstream:
            return {"dout": random_upstream(x.shape, seed + 2), "x": x, "gamma": gamma,
                    "num_groups": GROUPS, "eps": EPS}
        return {"x": x, "gamma": gamma, "beta": beta, "num_groups": GROUPS, "eps": EPS}

    return Case(description, make)


def _strided(x, num_groups):
    """The wrong reshape: (N, C/G, G, H*W) puts channels c, c + G, c + 2G, ... in one group."""
    n, c = x.shape[:2]
    return x.reshape(n, c // num_groups, num_groups, -1)


def _gn_over(x, gamma, beta, eps, grouped, axes):
    return per_channel_affine(normalized(grouped, axes, eps).reshape(x.shape), gamma, beta)


# ---- 08.group_statistics --------------------------------------------------------------------
def _statistics_correct(x, num_groups):
    xg = x.reshape(x.shape[0], num_groups, -1)
    return xg.mean(axis=2), xg.var(axis=2)


def _statistics_strided(x, num_groups):
    xs = _strided(x, num_groups)
    return xs.mean(axis=(1, 3)), xs.var(axis=(1, 3))


def _statistics_over_batch(x, num_groups):
    xg = x.reshape(x.shape[0], num_groups, -1)
    shape = (x.shape[0], num_groups)
    return (np.broadcast_to(xg.mean(axis=(0, 2)), shape).copy(),
            np.broadcast_to(xg.var(axis=(0, 2)), shape).copy())


GROUP_STATISTICS = OutputTask(
    id="08.group_statistics",
    title="the group reshape: mean and variance of each (example, group)",
    function="group_statistics",
    points=2,
    correct=_statistics_correct,
    outputs=("mean", "var"),
    cases=(Case("x of shape (2, 6, 3, 4), 3 groups",
                lambda: {"x": _images(300), "num_groups": GROUPS}),),
    mistakes=(
        Mistake("strided_groups", "Your groups take every G-th channel (a reshape to "
                "(N, C/G, G, ...)); group g holds the consecutive channels g*C/G ... "
                "(g+1)*C/G - 1: reshape to (N, G, C/G * H * W).", _statistics_strided),
        Mistake("over_the_batch", "You averaged over the batch too; group norm's statistics "
                "are per example: reduce over the last axis of (N, G, M) only.",
                _statistics_over_batch),
        Mistake("unbiased_variance", "You used the unbiased variance (M - 1); group norm uses "
                "the biased one.", lambda x, num_groups: (
                    _statistics_correct(x, num_groups)[0],
                    x.reshape(x.shape[0], num_groups, -1).var(axis=2, ddof=1))),
    ),
)


# ---- 08.groupnorm_forward -------------------------------------------------------------------
GROUPNORM_FORWARD = OutputTask(
    id="08.groupnorm_forward",
    title="group norm forward pass",
    function="groupnorm_forward",
    points=2,
    correct=lambda x, gamma, beta, num_groups, eps: reference.groupnorm_forward(
        x, gamma, beta, num_groups, eps)[0],
    cases=(_group_case("x of shape (2, 6, 3, 4), 3 groups, gamma and beta of shape (6,)", 310),),
    mistakes=(
        Mistake("strided_groups", "Your groups take every G-th channel; reshape to (N, G, "
                "C/G * H * W) so that each group is C/G consecutive channels.",
                lambda x, gamma, beta, num_groups, eps: _gn_over(
                    x, gamma, beta, eps, _strided(x, num_groups), (1, 3))),
        Mistake("instance_norm", "You normalized each channel on its own (instance norm, "
                "G = C); a group holds C/G channels.",
                lambda x, gamma, beta, num_groups, eps: _gn_over(x, gamma, beta, eps, x, (2, 3))),
        Mistake("layer_norm", "You normalized each example over all its channels (layer norm, "
                "G = 1); use num_groups groups.",
                lambda x, gamma, beta, num_groups, eps: _gn_over(x, gamma, beta, eps, x,
                                                                 (1, 2, 3))),
        Mistake("over_the_batch", "Your statistics include the batch axis; group norm "
                "normalizes each example on its own.",
                lambda x, gamma, beta, num_groups, eps: _gn_over(
                    x, gamma, beta, eps, x.reshape(x.shape[0], num_groups, -1), (0, 2))),
        Mistake("eps_outside_root", "eps belongs inside the square root: sqrt(var + eps).",
                lambda x, gamma, beta, num_groups, eps: per_channel_affine(normalized(
                    x.reshape(x.shape[0], num_groups, -1), 2, eps, eps_outside=True
                ).reshape(x.shape), gamma, beta)),
    ),
)


# ---- 08.groupnorm_backward ------------------------------------------------------------------
def _gn_backward_correct(dout, x, gamma, num_groups, eps):
    _, cache = reference.groupnorm_forward(x, gamma, np.zeros_like(gamma), num_groups, eps)
    return reference.groupnorm_backward_closed_form(dout, cache)


def _gn_statistics_constant(dout, x, gamma, num_groups, eps):
    _, dgamma, dbeta = _gn_backward_correct(dout, x, gamma, num_groups, eps)
    var = x.reshape(x.shape[0], num_groups, -1).var(axis=2)[:, :, None]
    std = np.repeat(np.sqrt(var + eps), x.shape[1] // num_groups, axis=1)[..., None]
    return dout * gamma[None, :, None, None] / std, dgamma, dbeta


def _gn_backward_instance(dout, x, gamma, num_groups, eps):
    return _gn_backward_correct(dout, x, gamma, x.shape[1], eps)


def _gn_no_gamma(dout, x, gamma, num_groups, eps):
    _, dgamma, dbeta = _gn_backward_correct(dout, x, gamma, num_groups, eps)
    dx, _, _ = _gn_backward_correct(dout, x, np.ones_like(gamma), num_groups, eps)
    return dx, dgamma, dbeta


GROUPNORM_BACKWARD = OutputTask(
    id="08.groupnorm_backward",
    title="group norm backward pass",
    function="groupnorm_backward",
    points=3,
    correct=_gn_backward_correct,
    outputs=("dx", "dgamma", "dbeta"),
    cases=(_group_case("x of shape (2, 6, 3, 4), 3 groups, random upstream gradient", 320,
                       with_upstream=True),),
    mistakes=(
        Mistake("statistics_as_constants", "Your dx treats each group's mean and variance as "
                "constants; per group, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with "
                "g = dout * gamma and the means over the group's values.",
                _gn_statistics_constant),
        Mistake("per_channel_statistics", "Your dx uses per-channel statistics (instance "
                "norm's backward); the means run over the whole group of C/G channels.",
                _gn_backward_instance),
        Mistake("no_gamma_in_dx", "Your dx forgot gamma: the gradient reaching xhat is "
                "g = dout * gamma, one gamma per channel.", _gn_no_gamma),
    ),
)


# ---- 08.rmsnorm_backward --------------------------------------------------------------------
def _rms_case(description, seed):
    def make():
        g = rng(seed)
        x = 2.0 + 3.0 * g.standard_normal((5, 4))  # a non-zero mean: RMSNorm is not layer norm
        gamma, _ = affine(seed + 1, 4)
        return {"dout": random_upstream(x.shape, seed + 2), "x": x, "gamma": gamma, "eps": EPS}

    return Case(description, make)


def _rms_correct(dout, x, gamma, eps):
    _, cache = reference.rmsnorm_forward(x, gamma, eps)
    return reference.rmsnorm_backward_closed_form(dout, cache)


def _rms_with_layernorm_term(dout, x, gamma, eps):
    dx, dgamma = _rms_correct(dout, x, gamma, eps)
    rstd = 1.0 / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + eps)
    return dx - rstd * (dout * gamma).mean(axis=1, keepdims=True), dgamma


def _rms_as_constant(dout, x, gamma, eps):
    _, dgamma = _rms_correct(dout, x, gamma, eps)
    return dout * gamma / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + eps), dgamma


def _rms_per_example_dgamma(dout, x, gamma, eps):
    dx, _ = _rms_correct(dout, x, gamma, eps)
    xhat = x / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + eps)
    return dx, (dout * xhat).sum(axis=1)


RMSNORM_BACKWARD = OutputTask(
    id="08.rmsnorm_backward",
    title="RMSNorm backward pass",
    function="rmsnorm_backward",
    points=3,
    correct=_rms_correct,
    outputs=("dx", "dgamma"),
    cases=(_rms_case("x of shape (5, 4) with a non-zero mean, random upstream gradient", 330),),
    mistakes=(
        Mistake("layernorm_mean_term", "Your dx has layer norm's -mean(g) term; RMSNorm "
                "subtracts no mean, so dx = (g - xhat * mean(g * xhat)) / RMS(x).",
                _rms_with_layernorm_term),
        Mistake("rms_as_constant", "Your dx treats RMS(x) as a constant; it depends on x, "
                "which adds the term -xhat * mean(g * xhat) / RMS(x).", _rms_as_constant),
        Mistake("per_example_dgamma", "dgamma is summed over the examples (axis=0): gamma is "
                "shared by every example.", _rms_per_example_dgamma),
    ),
)


# ---- 08.weight_standardize ------------------------------------------------------------------
def _ws_case(description, seed):
    def make():
        g = rng(seed)
        # filters with different means and scales
        w = g.standard_normal((4, 1, 1, 1)) + np.exp(g.standard_normal((4, 1, 1, 1))) * \
            g.standard_normal((4, 3, 3, 3))
        return {"w": w, "eps": EPS}

    return Case(description, make)


WEIGHT_STANDARDIZE = OutputTask(
    id="08.weight_standardize",
    title="weight standardization of a conv weight",
    function="weight_standardize",
    points=2,
    correct=lambda w, eps: reference.weight_standardize_forward(w, eps)[0],
    cases=(_ws_case("w of shape (C_out, C_in, kh, kw) = (4, 3, 3, 3)", 340),),
    mistakes=(
        Mistake("per_input_channel", "You standardized over the output filters (axis 0); each "
                "output filter w[o] is standardized over its own fan-in, axes (1, 2, 3).",
                lambda w, eps: normalized(w, 0, eps)),
        Mistake("whole_tensor", "You used one mean and std for the whole weight tensor; each "
                "output filter gets its own, over axes (1, 2, 3).",
                lambda w, eps: normalized(w, (0, 1, 2, 3), eps)),
        Mistake("forgot_centring", "You divided by the std but did not subtract each filter's "
                "mean.", lambda w, eps: w / np.sqrt(w.var(axis=(1, 2, 3), keepdims=True) + eps)),
    ),
)

TASKS = (GROUP_STATISTICS, GROUPNORM_FORWARD, GROUPNORM_BACKWARD, RMSNORM_BACKWARD,
         WEIGHT_STANDARDIZE)
