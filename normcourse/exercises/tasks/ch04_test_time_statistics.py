"""Chapter 4, test-time statistics: running averages, train versus eval mode, folding BN away,
and an experiment (the batch-vs-population gap at two batch sizes)."""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, features, rng
from normcourse.exercises.tasks._runs import accuracies, as_array, small_mnist, trained
from normcourse.exercises.tasks._variants import rebinding_message

EPS = 1e-5


def _running(seed: int, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Running statistics far from the batch's, with one tiny variance (to expose eps bugs)."""
    g = rng(seed)
    mean = g.standard_normal(d) * 3.0
    var = np.exp(g.standard_normal(d))
    var[2] = 1e-6
    return mean, var


# ---- 04.update_running_stats ----------------------------------------------------------------
def _update_case(description, seed, momentum):
    def make():
        mean, var = _running(seed)
        return {"running_mean": mean, "running_var": var, "x": features(seed + 1),
                "momentum": momentum}

    return Case(description, make)


def _update_correct(running_mean, running_var, x, momentum):
    new_mean, new_var = running_mean.copy(), running_var.copy()
    d = x.shape[1]
    reference.batchnorm_forward(x, np.ones(d), np.zeros(d), new_mean, new_var, training=True,
                                momentum=momentum)
    return new_mean, new_var


def _update_biased(running_mean, running_var, x, momentum):
    return ((1 - momentum) * running_mean + momentum * x.mean(0),
            (1 - momentum) * running_var + momentum * x.var(0))


def _update_per_example(running_mean, running_var, x, momentum):
    return ((1 - momentum) * running_mean.mean() + momentum * x.mean(1),
            (1 - momentum) * running_var.mean() + momentum * x.var(1, ddof=1))


KERAS_MESSAGE = (
    "You used the Keras sense of momentum (running = momentum * running + (1 - momentum) * "
    "batch); in PyTorch momentum is the weight of the *new* batch: running = (1 - momentum) * "
    "running + momentum * batch."
)

UPDATE_RUNNING_STATS = OutputTask(
    id="04.update_running_stats",
    title="update the running mean and variance",
    function="update_running_stats",
    points=2,
    correct=_update_correct,
    outputs=("new_mean", "new_var"),
    output_points=(1, 1),
    cases=(
        _update_case("a batch of shape (8, 5), momentum = 0.1", 100, 0.1),
        _update_case("a batch of shape (8, 5), momentum = 0.3", 101, 0.3),
    ),
    mutation_message=(
        "`{function}` changed its input `{name}` in place; this task returns new arrays and "
        "leaves the old running statistics untouched"
    ),
    mistakes=(
        Mistake("keras_momentum", KERAS_MESSAGE,
                lambda running_mean, running_var, x, momentum: _update_correct(
                    running_mean, running_var, x, 1 - momentum)),
        Mistake("biased_running_var", "You stored the biased batch variance; running_var keeps "
                "the unbiased one, var * N / (N - 1) (PyTorch, and the paper's inference step).",
                _update_biased),
        Mistake("wrong_axis", "You computed per-example statistics (axis=1); the running "
                "statistics are per feature, averaged over the batch: axis=0.", _update_per_example),
    ),
)


# ---- 04.batchnorm_forward -------------------------------------------------------------------
def _forward_case(description, seed, training):
    def make():
        x = features(seed)
        gamma, beta = affine(seed + 1, x.shape[1])
        mean, var = _running(seed + 2)
        return {"x": x, "gamma": gamma, "beta": beta, "running_mean": mean, "running_var": var,
                "training": training, "momentum": 0.1, "eps": EPS}

    return Case(description, make)


def _forward_correct(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    return reference.batchnorm_forward(x, gamma, beta, running_mean, running_var, training,
                                       momentum, eps)[0]


def _collect_forward(kwargs, returned):
    return returned, kwargs["running_mean"], kwargs["running_var"]


def _ignores_training(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    return _forward_correct(x, gamma, beta, running_mean, running_var, True, momentum, eps)


def _eval_batch_statistics(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    if training:
        return _forward_correct(x, gamma, beta, running_mean, running_var, True, momentum, eps)
    return _forward_correct(x, gamma, beta, None, None, True, momentum, eps)


def _updates_in_eval(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    out = _forward_correct(x, gamma, beta, running_mean.copy(), running_var.copy(), training,
                           momentum, eps)
    _forward_correct(x, gamma, beta, running_mean, running_var, True, momentum, eps)
    return out


def _no_update(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    return _forward_correct(x, gamma, beta, running_mean.copy(), running_var.copy(), training,
                            momentum, eps)


def _biased_running_var(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    out = _forward_correct(x, gamma, beta, running_mean, running_var, training, momentum, eps)
    if training:
        running_var[...] = running_var - momentum * x.var(0, ddof=1) + momentum * x.var(0)
    return out


def _eval_no_eps(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    if training:
        return _forward_correct(x, gamma, beta, running_mean, running_var, True, momentum, eps)
    return gamma * (x - running_mean) / np.sqrt(running_var) + beta


def _unbiased_normalization(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    out = _forward_correct(x, gamma, beta, running_mean, running_var, training, momentum, eps)
    if not training:
        return out
    return gamma * (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + eps) + beta


def _keras(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    return _forward_correct(x, gamma, beta, running_mean, running_var, training, 1 - momentum, eps)


BATCHNORM_FORWARD = OutputTask(
    id="04.batchnorm_forward",
    title="batch norm forward with running statistics, train and eval",
    function="batchnorm_forward",
    points=3,
    correct=_forward_correct,
    outputs=("out", "running_mean", "running_var"),
    output_points=(1, 1, 1),
    collect=_collect_forward,
    uses=(UPDATE_RUNNING_STATS,),
    mutable=("running_mean", "running_var"),
    cases=(
        _forward_case("training mode, x of shape (8, 5)", 110, True),
        _forward_case("eval mode, x of shape (8, 5), running statistics far from the batch's",
                      111, False),
    ),
    mistakes=(
        Mistake("ignores_training_flag", "In eval mode (training=False) you still normalized "
                "with the batch statistics and updated the running averages; eval mode uses "
                "running_mean and running_var and changes nothing.", _ignores_training),
        Mistake("eval_batch_statistics", "In eval mode normalize with running_mean and "
                "running_var, not with the batch's own statistics: a test prediction must not "
                "depend on the other examples in the batch.", _eval_batch_statistics),
        Mistake("updates_in_eval", "Your eval mode changed the running statistics; only "
                "training steps update them.", _updates_in_eval),
        Mistake("no_update", rebinding_message("running_mean", "running_var"), _no_update),
        Mistake("biased_running_var", "You stored the biased batch variance in running_var; "
                "store the unbiased one, var * N / (N - 1), as PyTorch does.", _biased_running_var),
        Mistake("keras_momentum", KERAS_MESSAGE, _keras),
        Mistake("eval_no_eps", "In eval mode you divided by sqrt(running_var) without eps: "
                "use sqrt(running_var + eps), the same formula as in training.", _eval_no_eps),
        Mistake("unbiased_normalization", "In training, normalize the batch with its biased "
                "variance (divide by N); only the running average stores the unbiased one.",
                _unbiased_normalization),
    ),
)


# ---- 04.fold_batchnorm_into_linear ----------------------------------------------------------
def _fold_case(description, seed, with_bias):
    def make():
        g = rng(seed)
        W = g.standard_normal((3, 4))
        b = g.standard_normal(3) if with_bias else None
        gamma, beta = affine(seed + 1, 3)
        mean, var = _running(seed + 2, 3)
        return {"W": W, "b": b, "gamma": gamma, "beta": beta, "running_mean": mean,
                "running_var": var, "eps": EPS}

    return Case(description, make)


def _fold_parts(W, b, gamma, running_var, eps):
    b = np.zeros(W.shape[0]) if b is None else b
    return b, gamma / np.sqrt(running_var + eps)


def _fold_no_mean(W, b, gamma, beta, running_mean, running_var, eps):
    b, scale = _fold_parts(W, b, gamma, running_var, eps)
    return scale[:, None] * W, scale * b + beta


def _fold_ignores_b(W, b, gamma, beta, running_mean, running_var, eps):
    return reference.fold_batchnorm_into_linear(W, None, gamma, beta, running_mean, running_var, eps)


def _fold_unscaled_shift(W, b, gamma, beta, running_mean, running_var, eps):
    b, scale = _fold_parts(W, b, gamma, running_var, eps)
    return scale[:, None] * W, b - running_mean + beta


def _fold_eps_outside(W, b, gamma, beta, running_mean, running_var, eps):
    b = np.zeros(W.shape[0]) if b is None else b
    scale = gamma / (np.sqrt(running_var) + eps)
    return scale[:, None] * W, scale * (b - running_mean) + beta


def _fold_variance(W, b, gamma, beta, running_mean, running_var, eps):
    b = np.zeros(W.shape[0]) if b is None else b
    scale = gamma / (running_var + eps)
    return scale[:, None] * W, scale * (b - running_mean) + beta


FOLD_BATCHNORM_INTO_LINEAR = OutputTask(
    id="04.fold_batchnorm_into_linear",
    title="fold an eval-mode batch norm into the linear layer before it",
    function="fold_batchnorm_into_linear",
    points=2,
    correct=reference.fold_batchnorm_into_linear,
    outputs=("W2", "b2"),
    output_points=(1, 1),
    cases=(
        _fold_case("W of shape (3, 4) with a bias b", 120, True),
        _fold_case("W of shape (3, 4) without bias (b=None)", 121, False),
    ),
    mistakes=(
        Mistake("forgot_mean", "b2 forgot the running mean: BN subtracts it, so b2 = "
                "scale * (b - running_mean) + beta.", _fold_no_mean),
        Mistake("ignored_bias", "b2 ignores the linear layer's own bias b: b2 = scale * "
                "(b - running_mean) + beta.", _fold_ignores_b),
        Mistake("unscaled_shift", "The shift b - running_mean must be scaled too: b2 = scale * "
                "(b - running_mean) + beta.", _fold_unscaled_shift),
        Mistake("eps_outside_root", "eps belongs inside the root: scale = gamma / "
                "sqrt(running_var + eps).", _fold_eps_outside),
        Mistake("divided_by_variance", "Divide by the standard deviation, sqrt(running_var + "
                "eps), not by the variance.", _fold_variance),
        Mistake("forgot_gamma", "The scale includes gamma: scale = gamma / sqrt(running_var + "
                "eps).", lambda W, b, gamma, beta, running_mean, running_var, eps:
                reference.fold_batchnorm_into_linear(W, b, np.ones_like(gamma), beta,
                                                     running_mean, running_var, eps)),
    ),
)

# ---- 04.batch_size_gap (an experiment) ------------------------------------------------------
def _gap(data, batch_sizes, steps, seed, *, optimizer="adam", lr=1e-3, stats_batch=None):
    rows = []
    for batch_size in batch_sizes:
        model, _ = trained(data, norm="batch", activation="relu", steps=steps,
                           batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed)
        rows.append(accuracies(model, data, stats_batch or batch_size))
    return as_array(rows)


def _gap_correct(data, batch_sizes, steps, seed):
    return _gap(data, batch_sizes, steps, seed)


BATCH_SIZE_GAP = OutputTask(
    id="04.batch_size_gap",
    title="experiment: eval mode against batch statistics at two batch sizes",
    function="batch_size_gap",
    points=2,
    correct=_gap_correct,
    outputs=("accuracy",),
    cases=(Case("1,000 training and 500 test images, batch sizes (4, 64), 150 steps, seed 0",
                lambda: {"data": small_mnist(), "batch_sizes": (4, 64), "steps": 150,
                         "seed": 0}),),
    mistakes=(
        Mistake("columns_swapped", "Column 0 is the eval-mode accuracy, column 1 the accuracy "
                "with batch statistics.",
                lambda data, batch_sizes, steps, seed: _gap_correct(
                    data, batch_sizes, steps, seed)[:, ::-1]),
        Mistake("stats_batch_128", "The batch statistics come from test batches of the training "
                "batch size (what the network saw while training), not from batches of 128.",
                lambda data, batch_sizes, steps, seed: _gap(data, batch_sizes, steps, seed,
                                                            stats_batch=128)),
        Mistake("sgd", "The chapter's experiment trains with Adam at learning rate 1e-3, not "
                "with SGD.",
                lambda data, batch_sizes, steps, seed: _gap(data, batch_sizes, steps, seed,
                                                            optimizer="sgd")),
    ),
)

TASKS = (UPDATE_RUNNING_STATS, BATCHNORM_FORWARD, FOLD_BATCHNORM_INTO_LINEAR, BATCH_SIZE_GAP)
