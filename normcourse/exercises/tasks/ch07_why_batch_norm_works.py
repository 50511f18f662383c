"""Chapter 7, why batch norm works: Santurkar et al.'s gradient-change measure, the effective
learning rate and angle update of a scale-invariant layer, noisy batch norm's forward pass and
the loss along the gradient of a small non-quadratic loss (given in closed form)."""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, features, rng

EPS = 1e-5


def _norm(v) -> float:
    return float(np.sqrt(np.sum(v ** 2)))


# ---- 07.gradient_change ---------------------------------------------------------------------
def _gradients_case():
    g = rng(700)
    before = g.standard_normal((4, 5))
    after = 0.7 * before + 0.5 * g.standard_normal((4, 5))  # a moved gradient, far from cos 1
    after[0] *= 3.0  # rows of different sizes: per-row cosines differ from the whole one
    return {"g_before": before, "g_after": after}


def _change_correct(g_before, g_after):
    distance = _norm(g_before - g_after)
    return distance, float(np.sum(g_before * g_after)) / (_norm(g_before) * _norm(g_after))


def _change_per_row(g_before, g_after):
    cos = (g_before * g_after).sum(1) / (np.linalg.norm(g_before, axis=1)
                                         * np.linalg.norm(g_after, axis=1))
    return _change_correct(g_before, g_after)[0], float(cos.mean())


GRADIENT_CHANGE = OutputTask(
    id="07.gradient_change",
    title="Santurkar et al.'s gradient change: ||G - G'|| and cos(G, G')",
    function="gradient_change",
    points=2,
    correct=_change_correct,
    outputs=("distance", "cosine"),
    output_points=(1, 1),
    cases=(Case("G and G' of shape (4, 5)", _gradients_case),),
    mistakes=(
        Mistake("relative_distance", "Your distance is divided by ||G||; the task asks for the "
                "plain Euclidean norm ||G - G'|| (the chapter divides afterwards, to compare "
                "networks).", lambda g_before, g_after: (
                    _norm(g_before - g_after) / _norm(g_before),
                    _change_correct(g_before, g_after)[1])),
        Mistake("squared_distance", "Your distance is the squared norm; take the square root "
                "of the sum of squares.", lambda g_before, g_after: (
                    _norm(g_before - g_after) ** 2, _change_correct(g_before, g_after)[1])),
        Mistake("unnormalized_cosine", "Your cosine is the plain inner product <G, G'>; divide "
                "it by ||G|| * ||G'||.", lambda g_before, g_after: (
                    _norm(g_before - g_after), float(np.sum(g_before * g_after)))),
        Mistake("per_row_cosine", "Your cosine is the mean of one cosine per row; the measure "
                "treats the layer's whole gradient as one vector: flatten it first.",
                _change_per_row),
    ),
)


# ---- 07.effective_learning_rate -------------------------------------------------------------
def _conv_weight(seed):
    def make():
        g = rng(seed)
        w = np.exp(g.standard_normal((4, 1, 1, 1))) * g.standard_normal((4, 3, 3, 3))
        return {"w": w, "lr": 0.1}

    return make


def _unit_norms(w):
    return np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))


EFFECTIVE_LEARNING_RATE = OutputTask(
    id="07.effective_learning_rate",
    title="effective learning rate lr / ||w_i||^2 of each output unit",
    function="effective_learning_rate",
    points=2,
    correct=lambda w, lr: lr / _unit_norms(w) ** 2,
    cases=(Case("conv weight w of shape (C_out, C_in, kh, kw) = (4, 3, 3, 3), lr = 0.1",
                _conv_weight(710)),),
    mistakes=(
        Mistake("not_squared", "You divided by ||w_i||; the direction w_i / ||w_i|| moves by "
                "lr * ||g|| / ||w_i|| with ||g|| itself proportional to 1 / ||w_i||: divide "
                "by ||w_i||^2.", lambda w, lr: lr / _unit_norms(w)),
        Mistake("whole_tensor", "You used the norm of the whole weight tensor; batch norm "
                "makes each output unit (each row, each filter) scale invariant on its own: one "
                "norm per unit, over all axes but the first.",
                lambda w, lr: np.full(w.shape[0], lr / np.sum(w ** 2))),
        Mistake("times_norm", "You multiplied by ||w_i||^2; a larger weight makes the step "
                "in direction *smaller*: lr / ||w_i||^2.", lambda w, lr: lr * _unit_norms(w) ** 2),
    ),
)


# ---- 07.angle_update ------------------------------------------------------------------------
def _angle_case():
    g = rng(720)
    before = g.standard_normal((5, 6))
    after = 1.5 * before + 0.4 * g.standard_normal((5, 6))  # turned, and longer
    return {"w_before": before, "w_after": after}


def _angle_correct(w_before, w_after):
    cos = (w_before * w_after).sum(1) / (np.linalg.norm(w_before, axis=1)
                                         * np.linalg.norm(w_after, axis=1))
    return np.arccos(np.clip(cos, -1.0, 1.0))


ANGLE_UPDATE = OutputTask(
    id="07.angle_update",
    title="the angle each unit's weights turn by in one step",
    function="angle_update",
    points=2,
    correct=_angle_correct,
    cases=(Case("w before and after a step, shape (5, 6): each row turned and lengthened",
                _angle_case),),
    mistakes=(
        Mistake("degrees", "Your angles are in degrees; return radians (np.arccos gives them).",
                lambda w_before, w_after: np.degrees(_angle_correct(w_before, w_after))),
        Mistake("cosine_not_angle", "You returned the cosine; the angle is its arccos.",
                lambda w_before, w_after: np.cos(_angle_correct(w_before, w_after))),
        Mistake("length_change", "You measured how much ||w_i|| changed; a scale-invariant unit "
                "ignores that, only the angle between w_i before and after counts.",
                lambda w_before, w_after: np.linalg.norm(w_after, axis=1)
                - np.linalg.norm(w_before, axis=1)),
        Mistake("whole_matrix", "You computed one angle for the whole matrix; each output "
                "unit (row) has its own.", lambda w_before, w_after: np.full(
                    w_before.shape[0], float(_angle_correct(w_before.reshape(1, -1),
                                                            w_after.reshape(1, -1))[0]))),
    ),
)


# ---- 07.noisy_batchnorm_forward -------------------------------------------------------------
def _noisy_case():
    x = features(730)
    gamma, beta = affine(731, x.shape[1])
    g = rng(732)
    return {"x": x, "gamma": gamma, "beta": beta, "scale": g.uniform(0.5, 2.0, x.shape[1]),
            "shift": g.uniform(-1.0, 1.0, x.shape[1]), "eps": EPS}


def _bn(x, gamma, beta, eps):
    return reference.batchnorm_forward(x, gamma, beta, eps=eps)[0]


NOISY_BATCHNORM_FORWARD = OutputTask(
    id="07.noisy_batchnorm_forward",
    title="noisy batch norm forward pass (training mode)",
    function="noisy_batchnorm_forward",
    points=2,
    correct=lambda x, gamma, beta, scale, shift, eps: scale * _bn(x, gamma, beta, eps) + shift,
    cases=(Case("x of shape (8, 5), gamma, beta, scale and shift of shape (5,)", _noisy_case),),
    mistakes=(
        Mistake("noise_before_bn", "You added the noise to batch norm's input, where the "
                "normalization removes it again; noisy BN puts it on the output: "
                "scale * BN(x) + shift.",
                lambda x, gamma, beta, scale, shift, eps: _bn(scale * x + shift, gamma, beta, eps)),
        Mistake("noise_before_affine", "You applied the noise to x_hat, before gamma and beta; "
                "the noise comes after the whole layer, gamma and beta included.",
                lambda x, gamma, beta, scale, shift, eps: gamma * (
                    scale * _bn(x, np.ones_like(gamma), np.zeros_like(beta), eps) + shift) + beta),
        Mistake("unbiased_variance", "You normalized with the unbiased variance (N - 1); batch "
                "norm normalizes with the biased one.",
                lambda x, gamma, beta, scale, shift, eps: scale * (
                    gamma * (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + eps) + beta) + shift),
        Mistake("eps_outside_root", "eps belongs inside the square root: sqrt(var + eps).",
                lambda x, gamma, beta, scale, shift, eps: scale * (
                    gamma * (x - x.mean(0)) / (np.sqrt(x.var(0)) + eps) + beta) + shift),
    ),
)


# ---- 07.loss_along_gradient -----------------------------------------------------------------
def _quadratic_case():
    g = rng(740)
    q, _ = np.linalg.qr(g.standard_normal((4, 4)))
    a = q @ np.diag([0.5, 1.0, 4.0, 9.0]) @ q.T  # symmetric, curvatures 0.5 ... 9
    return {"A": a, "b": g.standard_normal(4), "w": g.standard_normal(4),
            "etas": np.array([0.02, 0.05, 0.1, 0.2])}


def _loss(A, b, p):
    return 0.5 * p @ A @ p - b @ p + 0.25 * np.sum(p ** 4)


def _grad(A, b, p):
    return A @ p - b + p ** 3


def _path(A, b, w, etas, sign=-1.0):
    g = _grad(A, b, w)
    points = [w + sign * eta * g for eta in etas]
    losses = np.array([_loss(A, b, p) for p in points])
    changes = np.array([_norm(_grad(A, b, p) - g) for p in points])
    return g, losses, changes


def _along_correct(A, b, w, etas):
    g, losses, changes = _path(A, b, w, etas)
    return losses, float(np.max(changes / (etas * _norm(g))))


def _along_predictiveness(A, b, w, etas):
    _, losses, changes = _path(A, b, w, etas)
    return losses, float(np.max(changes))


def _along_eta_only(A, b, w, etas):
    _, losses, changes = _path(A, b, w, etas)
    return losses, float(np.max(changes / etas))


def _along_ascent(A, b, w, etas):
    g, losses, changes = _path(A, b, w, etas, sign=1.0)
    return losses, float(np.max(changes / (etas * _norm(g))))


def _along_mean(A, b, w, etas):
    g, losses, changes = _path(A, b, w, etas)
    return losses, float(np.mean(changes / (etas * _norm(g))))


LOSS_ALONG_GRADIENT = OutputTask(
    id="07.loss_along_gradient",
    title="loss along the gradient and the effective beta-smoothness",
    function="loss_along_gradient",
    points=3,
    correct=_along_correct,
    outputs=("losses", "beta"),
    output_points=(1, 2),
    cases=(Case("L(w) = w^T A w / 2 - b^T w + sum(w^4) / 4 in 4 dimensions, four steps",
                _quadratic_case),),
    mistakes=(
        Mistake("uphill", "You stepped to w + eta * g, up the gradient; the optimizer goes "
                "to w - eta * g.", _along_ascent),
        Mistake("no_step_length", "Your beta is max ||grad(w - eta g) - g||, the gradient "
                "predictiveness; divide each change by the distance moved, ||eta * g||.",
                _along_predictiveness),
        Mistake("eta_only", "You divided by eta alone; the distance moved is eta * ||g||.",
                _along_eta_only),
        Mistake("mean_not_max", "You averaged over the steps; the effective beta is the "
                "largest ratio (a Lipschitz constant along the path).", _along_mean),
    ),
)

TASKS = (GRADIENT_CHANGE, EFFECTIVE_LEARNING_RATE, ANGLE_UPDATE, NOISY_BATCHNORM_FORWARD,
         LOSS_ALONG_GRADIENT)
