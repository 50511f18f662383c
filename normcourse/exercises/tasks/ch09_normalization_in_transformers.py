"""Chapter 9, normalization in transformers: a pre-LN and a post-LN residual block (MLP branch),
the linear learning-rate warm-up, and per-block gradient norms of a linear layer's weight."""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, rng
from normcourse.exercises.tasks._variants import normalized

EPS = 1e-5
N, T, D, F = 2, 5, 4, 6  # sequences, tokens, features, MLP width


def _block_case(description, seed):
    """x (N, T, D) whose tokens have different means and scales (a residual stream is not
    normalized), a LayerNorm's gamma, beta (D,) and the MLP's weights."""
    def make():
        g = rng(seed)
        x = 3.0 * g.standard_normal((N, T, 1)) + np.exp(g.standard_normal((N, T, 1))) * \
            g.standard_normal((N, T, D))
        gamma, beta = affine(seed + 1, D)
        return {"x": x, "gamma": gamma, "beta": beta,
                "W1": g.standard_normal((D, F)) / np.sqrt(D), "b1": 0.1 * g.standard_normal(F),
                "W2": g.standard_normal((F, D)) / np.sqrt(F), "b2": 0.1 * g.standard_normal(D),
                "eps": EPS}

    return Case(description, make)


def _ln(x, gamma, beta, eps):
    """Layer norm of each token over its D features (the reference code, last axis)."""
    return reference.layernorm_forward(x, gamma, beta, eps)[0]


def _mlp(h, W1, b1, W2, b2):
    return np.maximum(h @ W1 + b1, 0.0) @ W2 + b2


def _pre(x, gamma, beta, W1, b1, W2, b2, eps):
    return x + _mlp(_ln(x, gamma, beta, eps), W1, b1, W2, b2)


def _post(x, gamma, beta, W1, b1, W2, b2, eps):
    return _ln(x + _mlp(x, W1, b1, W2, b2), gamma, beta, eps)


def _over_tokens(x, gamma, beta, eps):
    """Layer norm with the statistics over the T tokens of each feature (the wrong axis)."""
    return gamma * normalized(x, 1, eps) + beta


def _over_batch(x, gamma, beta, eps):
    """Batch norm: each feature over all N * T tokens of the batch."""
    return gamma * normalized(x, (0, 1), eps) + beta


# ---- 09.pre_ln_block ------------------------------------------------------------------------
PRE_LN_BLOCK = OutputTask(
    id="09.pre_ln_block",
    title="a pre-LN residual block (MLP branch)",
    function="pre_ln_block",
    points=2,
    correct=_pre,
    cases=(_block_case("x of shape (2, 5, 4), an MLP 4 -> 6 -> 4", 900),),
    mistakes=(
        Mistake("post_ln", "You normalized after the residual addition (post-LN); pre-LN "
                "normalizes only the branch's input: x + mlp(LN(x)).", _post),
        Mistake("no_residual", "You returned the branch alone; the residual stream carries "
                "x past it: x + mlp(LN(x)).",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: _mlp(_ln(x, gamma, beta, eps),
                                                               W1, b1, W2, b2)),
        Mistake("normalized_residual", "You added the branch to LN(x); the stream keeps the "
                "raw x (pre-LN never normalizes the stream): x + mlp(LN(x)).",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: _ln(x, gamma, beta, eps) + _mlp(
                    _ln(x, gamma, beta, eps), W1, b1, W2, b2)),
        Mistake("over_tokens", "Your layer norm's statistics run over the tokens (axis 1); "
                "each token is normalized over its own D features (the last axis).",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: x + _mlp(
                    _over_tokens(x, gamma, beta, eps), W1, b1, W2, b2)),
        Mistake("over_batch", "Your statistics run over the batch and the tokens (batch "
                "norm); layer norm normalizes each token over its D features.",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: x + _mlp(
                    _over_batch(x, gamma, beta, eps), W1, b1, W2, b2)),
    ),
)


# ---- 09.post_ln_block -----------------------------------------------------------------------
POST_LN_BLOCK = OutputTask(
    id="09.post_ln_block",
    title="a post-LN residual block (MLP branch)",
    function="post_ln_block",
    points=2,
    correct=_post,
    cases=(_block_case("x of shape (2, 5, 4), an MLP 4 -> 6 -> 4", 910),),
    mistakes=(
        Mistake("pre_ln", "You normalized the branch's input (pre-LN); post-LN normalizes "
                "the sum after the residual addition: LN(x + mlp(x)).", _pre),
        Mistake("norm_before_addition", "You normalized the branch's output before adding "
                "it; post-LN normalizes the sum: LN(x + mlp(x)).",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: x + _ln(
                    _mlp(x, W1, b1, W2, b2), gamma, beta, eps)),
        Mistake("no_residual", "You normalized the branch alone; the residual x belongs inside "
                "the norm: LN(x + mlp(x)).",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: _ln(_mlp(x, W1, b1, W2, b2),
                                                              gamma, beta, eps)),
        Mistake("over_tokens", "Your layer norm's statistics run over the tokens (axis 1); "
                "each token is normalized over its own D features (the last axis).",
                lambda x, gamma, beta, W1, b1, W2, b2, eps: _over_tokens(
                    x + _mlp(x, W1, b1, W2, b2), gamma, beta, eps)),
    ),
)


# ---- 09.warmup_schedule ---------------------------------------------------------------------
def _schedule(lr, warmup_steps, steps, factor):
    return np.array([lr * factor(t) for t in range(1, steps + 1)], dtype=np.float64)


def _warmup_correct(lr, warmup_steps, steps):
    return _schedule(lr, warmup_steps, steps, lambda t: min(1.0, t / warmup_steps))


WARMUP_SCHEDULE = OutputTask(
    id="09.warmup_schedule",
    title="the linear learning-rate warm-up",
    function="warmup_schedule",
    points=2,
    correct=_warmup_correct,
    cases=(Case("lr 0.003, 4 warm-up steps, 7 steps", lambda: {"lr": 0.003, "warmup_steps": 4,
                                                              "steps": 7}),
           Case("lr 0.5, 10 warm-up steps, 12 steps", lambda: {"lr": 0.5, "warmup_steps": 10,
                                                              "steps": 12})),
    mistakes=(
        Mistake("starts_at_zero", "Your first step has learning rate 0 (you counted steps from "
                "0): step t = 1, 2, ... uses lr * min(1, t / warmup_steps), so the first update "
                "already moves and step warmup_steps reaches lr.",
                lambda lr, warmup_steps, steps: _schedule(
                    lr, warmup_steps, steps, lambda t: min(1.0, (t - 1) / warmup_steps))),
        Mistake("never_capped", "Your rate keeps rising after the warm-up; it stays at lr from "
                "step warmup_steps on: min(1, t / warmup_steps).",
                lambda lr, warmup_steps, steps: _schedule(lr, warmup_steps, steps,
                                                          lambda t: t / warmup_steps)),
        Mistake("one_step_late", "Your warm-up reaches lr one step late (t / (warmup_steps "
                "+ 1)); step warmup_steps should already use the full rate.",
                lambda lr, warmup_steps, steps: _schedule(
                    lr, warmup_steps, steps, lambda t: min(1.0, t / (warmup_steps + 1)))),
    ),
)


# ---- 09.weight_gradient_norms ---------------------------------------------------------------
def _gradient_case(description, seed, blocks=3):
    def make():
        g = rng(seed)
        # each block's gradient a different size, as in a real model
        return {"hidden": [np.maximum(g.standard_normal((N, T, F)), 0.0) for _ in range(blocks)],
                "grad_out": [(b + 1.0) * g.standard_normal((N, T, D)) for b in range(blocks)]}

    return Case(description, make)


def _weight_gradients(hidden, grad_out):
    """dL/dW of y = h @ W, summed over every token of the batch: (F, D) per block."""
    return [np.einsum("ntf,ntd->fd", h, dy) for h, dy in zip(hidden, grad_out)]


WEIGHT_GRADIENT_NORMS = OutputTask(
    id="09.weight_gradient_norms",
    title="per-block gradient norms of the MLP's second weight",
    function="weight_gradient_norms",
    points=2,
    correct=lambda hidden, grad_out: np.array(
        [np.linalg.norm(g) for g in _weight_gradients(hidden, grad_out)]),
    cases=(_gradient_case("3 blocks: hidden (2, 5, 6) and gradients (2, 5, 4) each", 920),),
    mistakes=(
        Mistake("mean_over_tokens", "You averaged over the tokens; the weight is shared by "
                "every token of every sequence, so its gradient is the sum of their "
                "contributions: dW = sum over n, t of outer(h[n, t], dy[n, t]).",
                lambda hidden, grad_out: np.array(
                    [np.linalg.norm(g) / (N * T) for g in _weight_gradients(hidden, grad_out)])),
        Mistake("squared_norm", "You returned the squared norm; take the square root of the "
                "sum of squares (np.linalg.norm).",
                lambda hidden, grad_out: np.array(
                    [np.sum(g ** 2) for g in _weight_gradients(hidden, grad_out)])),
        Mistake("norm_per_sequence", "You took each sequence's gradient norm and added them; "
                "add the gradients first, then take one norm per block.",
                lambda hidden, grad_out: np.array(
                    [sum(np.linalg.norm(h[n].T @ dy[n]) for n in range(N))
                     for h, dy in zip(hidden, grad_out)])),
        Mistake("last_token_only", "You used one token per sequence (the last); every token "
                "contributes to the shared weight's gradient: sum over n and t.",
                lambda hidden, grad_out: np.array(
                    [np.linalg.norm(np.einsum("nf,nd->fd", h[:, -1], dy[:, -1]))
                     for h, dy in zip(hidden, grad_out)])),
    ),
)

TASKS = (PRE_LN_BLOCK, POST_LN_BLOCK, WARMUP_SCHEDULE, WEIGHT_GRADIENT_NORMS)
