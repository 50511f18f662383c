"""Chapter 6, batch renormalization: r and d, the forward and backward passes, the schedule, and an
experiment (batch norm against batch renorm on batches of two classes)."""

from __future__ import annotations

import numpy as np
import torch

from normcourse import functional, reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, features, rng
from normcourse.exercises.tasks._runs import accuracies, as_array, small_mnist, trained
from normcourse.exercises.tasks._variants import rebinding_message
from normcourse.data import class_subset_batches
from normcourse.gradcheck import random_upstream

EPS = 1e-5


# ---- 06.renorm_r_d --------------------------------------------------------------------------
def _r_d_case(description):
    def make():
        # Feature by feature: no clipping, r above rmax, r below 1/rmax, d beyond +dmax, -dmax.
        return {
            "batch_mean": np.array([0.3, 1.0, -1.0, 4.0, -4.0]),
            "batch_std": np.array([1.2, 5.0, 0.1, 1.0, 1.0]),
            "running_mean": np.array([0.1, 0.5, -0.5, 0.0, 0.0]),
            "running_std": np.array([1.0, 1.0, 1.0, 2.0, 2.0]),
            "rmax": 2.0,
            "dmax": 1.0,
        }

    return Case(description, make)


def _r_d_correct(batch_mean, batch_std, running_mean, running_std, rmax, dmax):
    r, d = functional.renorm_correction(*(torch.from_numpy(v) for v in (
        batch_mean, batch_std, running_mean, running_std)), rmax, dmax)
    return r.numpy(), d.numpy()


def _r_d(batch_mean, batch_std, running_mean, running_std, rmax, dmax, r_low=None, invert=False,
         d_scale=None, d_sign=1.0, clip=True, swap_bounds=False):
    r = running_std / batch_std if invert else batch_std / running_std
    d = d_sign * (batch_mean - running_mean) / (running_std if d_scale is None else d_scale)
    r_bounds = (1.0 / rmax if r_low is None else r_low, rmax)
    d_bounds = (-dmax, dmax)
    if swap_bounds:  # np.clip(a, high, low) returns `low` everywhere
        r_bounds, d_bounds = r_bounds[::-1], d_bounds[::-1]
    if clip:
        r = np.clip(r, *r_bounds)
        d = np.clip(d, *d_bounds)
    return r, d


RENORM_R_D = OutputTask(
    id="06.renorm_r_d",
    title="the batch renorm corrections r and d",
    function="renorm_r_d",
    points=2,
    correct=_r_d_correct,
    outputs=("r", "d"),
    output_points=(1, 1),
    cases=(_r_d_case("five features, some inside the limits and some clipped, rmax=2, dmax=1"),),
    mistakes=(
        Mistake("inverted_r", "r is the batch std over the running std, sigma_B / sigma: "
                "it turns the batch-normalized value into the running-normalized one.",
                lambda *a: _r_d(*a, invert=True)),
        Mistake("no_clipping", "r and d must be clipped: r to [1/rmax, rmax], d to [-dmax, dmax].",
                lambda *a: _r_d(*a, clip=False)),
        Mistake("r_lower_limit", "r is clipped to [1/rmax, rmax], not [0, rmax]: the batch may "
                "not shrink the scale by more than rmax either.", lambda *a: _r_d(*a, r_low=0.0)),
        Mistake("d_over_batch_std", "d divides by the running std, sigma: d = (mu_B - mu) / sigma.",
                lambda bm, bs, rm, rs, rmax, dmax: _r_d(bm, bs, rm, rs, rmax, dmax, d_scale=bs)),
        Mistake("d_sign", "d = (mu_B - mu) / sigma: batch mean minus running mean.",
                lambda *a: _r_d(*a, d_sign=-1.0)),
        Mistake("clip_bounds_swapped", "np.clip(a, a_min, a_max) takes the lower bound first: "
                "with the bounds swapped every value becomes the lower one. Use np.clip(r, "
                "1 / rmax, rmax) and np.clip(d, -dmax, dmax).", lambda *a: _r_d(*a, swap_bounds=True)),
    ),
)


# ---- 06.batch_renorm_forward ----------------------------------------------------------------
def _running(seed: int, d: int = 5):
    g = rng(seed)
    return g.standard_normal(d) * 2.0, np.exp(g.standard_normal(d))


def _forward_case(description, seed, training):
    def make():
        x = features(seed, scales=np.array([1.0, 4.0, 0.01, 0.5, 2.0]),
                     means=np.array([0.0, 1.0, 0.5, -2.0, 3.0]))
        gamma, beta = affine(seed + 1, x.shape[1])
        mean, std = _running(seed + 2)
        return {"x": x, "gamma": gamma, "beta": beta, "running_mean": mean, "running_std": std,
                "training": training, "rmax": 1.5, "dmax": 0.5, "momentum": 0.1, "eps": EPS}

    return Case(description, make)


def _forward_correct(x, gamma, beta, running_mean, running_std, training, rmax, dmax, momentum,
                     eps):
    return reference.batch_renorm_forward(x, gamma, beta, running_mean, running_std, training,
                                          rmax, dmax, momentum, eps)[0]


def _collect_forward(kwargs, returned):
    return returned, kwargs["running_mean"], kwargs["running_std"]


def _renorm(x, gamma, beta, running_mean, running_std, training, rmax, dmax, momentum, eps,
            update_first=False, track_var=False, affine_first=False, ddof=0, ignore_training=False):
    """Batch renorm with knobs for the usual mistakes."""
    if not training and not ignore_training:
        return gamma * (x - running_mean) / running_std + beta
    mu_b = x.mean(0)
    sigma_b = np.sqrt(x.var(0, ddof=ddof) + eps)
    new_mean = running_mean + momentum * (mu_b - running_mean)
    batch_value = sigma_b**2 if track_var else sigma_b
    new_std = running_std + momentum * (batch_value - running_std)
    mu, sigma = (new_mean, new_std) if update_first else (running_mean, running_std)
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mu_b - mu) / sigma, -dmax, dmax)
    xhat_b = (x - mu_b) / sigma_b
    out = (gamma * xhat_b + beta) * r + d if affine_first else gamma * (xhat_b * r + d) + beta
    running_mean[...] = new_mean
    running_std[...] = new_std
    return out


def _knob(**knobs):
    return lambda *args: _renorm(*args, **knobs)


def _no_update(x, gamma, beta, running_mean, running_std, training, rmax, dmax, momentum, eps):
    return _renorm(x, gamma, beta, running_mean.copy(), running_std.copy(), training, rmax, dmax,
                   momentum, eps)


def _updates_in_eval(x, gamma, beta, running_mean, running_std, training, rmax, dmax, momentum,
                     eps):
    out = _renorm(x, gamma, beta, running_mean, running_std, training, rmax, dmax, momentum, eps)
    if not training:
        _renorm(x, gamma, beta, running_mean, running_std, True, rmax, dmax, momentum, eps)
    return out


BATCH_RENORM_FORWARD = OutputTask(
    id="06.batch_renorm_forward",
    title="batch renorm forward pass, train and eval",
    function="batch_renorm_forward",
    points=3,
    correct=_forward_correct,
    outputs=("out", "running_mean", "running_std"),
    output_points=(1, 1, 1),
    collect=_collect_forward,
    uses=(RENORM_R_D,),
    mutable=("running_mean", "running_std"),
    cases=(
        _forward_case("training mode, x of shape (8, 5), rmax=1.5, dmax=0.5", 300, True),
        _forward_case("eval mode, x of shape (8, 5)", 301, False),
    ),
    mistakes=(
        Mistake("r_d_after_update", "r and d must use the running statistics from *before* "
                "this step's update; you updated them first.", _knob(update_first=True)),
        Mistake("tracks_variance", "Batch renorm tracks the running standard deviation "
                "(running_std += momentum * (sigma_B - running_std)), not the variance.",
                _knob(track_var=True)),
        Mistake("affine_before_correction", "Apply r and d to the normalized value, before "
                "gamma and beta: out = gamma * (xhat_B * r + d) + beta.",
                _knob(affine_first=True)),
        Mistake("unbiased_batch_std", "sigma_B uses the biased batch variance: "
                "sqrt(mean((x - mu_B)^2) + eps).", _knob(ddof=1)),
        Mistake("ignores_training_flag", "In eval mode normalize with the running statistics, "
                "out = gamma * (x - running_mean) / running_std + beta, and update nothing.",
                _knob(ignore_training=True)),
        Mistake("updates_in_eval", "Your eval mode changed the running statistics; only "
                "training steps update them.", _updates_in_eval),
        Mistake("no_update", rebinding_message("running_mean", "running_std"), _no_update),
    ),
)


# ---- 06.batch_renorm_backward ---------------------------------------------------------------
def _backward_case(description, seed):
    def make():
        x = features(seed, scales=np.array([1.0, 4.0, 0.5, 2.0]), means=np.array([0.0, 1.0, -2.0, 3.0]))
        gamma, _ = affine(seed + 1, 4)
        g = rng(seed + 2)
        # Running statistics close to the batch's: r and d stay inside the limits, where
        # differentiating through them (the mistake) changes the gradient.
        running_mean = x.mean(0) + 0.1 * g.standard_normal(4)
        running_std = x.std(0) * np.exp(0.1 * g.standard_normal(4))
        return {"dout": random_upstream(x.shape, seed + 3), "x": x, "gamma": gamma,
                "running_mean": running_mean, "running_std": running_std, "rmax": 3.0,
                "dmax": 5.0, "eps": EPS}

    return Case(description, make)


def _backward_correct(dout, x, gamma, running_mean, running_std, rmax, dmax, eps):
    _, cache = reference.batch_renorm_forward(x, gamma, np.zeros_like(gamma), running_mean.copy(),
                                              running_std.copy(), True, rmax, dmax, 0.01, eps)
    return reference.batch_renorm_backward(dout, cache)


def _through_r_d(dout, x, gamma, running_mean, running_std, rmax, dmax, eps):
    """Autograd through everything, r and d included (no stop_gradient)."""
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.zeros_like(gt, requires_grad=True)
    mu_b = xt.mean(0)
    sigma_b = torch.sqrt(xt.var(0, unbiased=False) + eps)
    rs, rm = torch.tensor(running_std), torch.tensor(running_mean)
    r = (sigma_b / rs).clamp(1.0 / rmax, rmax)
    d = ((mu_b - rm) / rs).clamp(-dmax, dmax)
    out = gt * ((xt - mu_b) / sigma_b * r + d) + bt
    out.backward(torch.tensor(dout))
    return xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


def _plain_batchnorm(dout, x, gamma, running_mean, running_std, rmax, dmax, eps):
    _, cache = reference.batchnorm_forward(x, gamma, np.zeros_like(gamma), training=True, eps=eps)
    return reference.batchnorm_backward_closed_form(dout, cache)


def _dgamma_batch_xhat(dout, x, gamma, running_mean, running_std, rmax, dmax, eps):
    dx, _, dbeta = _backward_correct(dout, x, gamma, running_mean, running_std, rmax, dmax, eps)
    _, dgamma, _ = _plain_batchnorm(dout, x, gamma, running_mean, running_std, rmax, dmax, eps)
    return dx, dgamma, dbeta


BATCH_RENORM_BACKWARD = OutputTask(
    id="06.batch_renorm_backward",
    title="batch renorm backward pass, training mode",
    function="batch_renorm_backward",
    points=4,
    correct=_backward_correct,
    outputs=("dx", "dgamma", "dbeta"),
    output_points=(2, 1, 1),
    uses=(RENORM_R_D,),
    cases=(_backward_case("x of shape (8, 4), r and d inside their limits", 310),),
    mistakes=(
        Mistake("through_r_d", "You differentiated through r and d; the paper treats them as "
                "constants (stop_gradient), so dx is batch norm's backward with gamma replaced "
                "by gamma * r.", _through_r_d),
        Mistake("plain_batchnorm", "You returned batch norm's backward: with r and d constants, "
                "dx uses gamma * r in place of gamma, and dgamma = sum(dout * (xhat_B * r + d)).",
                _plain_batchnorm),
        Mistake("dgamma_batch_xhat", "dgamma multiplies dout by the corrected value "
                "xhat = xhat_B * r + d, not by xhat_B.", _dgamma_batch_xhat),
    ),
)


# ---- 06.renorm_limits -----------------------------------------------------------------------
SCHEDULE = {"rmax": 3.0, "dmax": 5.0, "warmup_steps": 5000, "rmax_steps": 40000, "dmax_steps": 25000}


def _limits_case(step):
    return Case(f"step {step} of the paper's schedule", lambda: {"step": step, **SCHEDULE})


def _limits(step, rmax, dmax, warmup_steps, rmax_steps, dmax_steps, start=None, clamp=True,
            flat=True):
    """A linear ramp with knobs: ``start`` is where the ramp is measured from."""
    start = warmup_steps if start is None else start

    def progress(end):
        if flat and step < warmup_steps:
            return 0.0
        value = (step - start) / (end - start)
        return min(1.0, value) if clamp else value

    return 1.0 + (rmax - 1.0) * progress(rmax_steps), dmax * progress(dmax_steps)


RENORM_LIMITS = OutputTask(
    id="06.renorm_limits",
    title="the rmax / dmax schedule",
    function="renorm_limits",
    correct=functional.renorm_limits,
    outputs=("rmax_now", "dmax_now"),
    cases=tuple(_limits_case(s) for s in (0, 4999, 5000, 15000, 30000, 40000, 100000)),
    mistakes=(
        Mistake("no_warmup", "rmax stays 1 and dmax 0 (plain batch norm) for the first "
                "warmup_steps steps; the running averages are not yet reliable.",
                lambda *a: _limits(*a, start=0, flat=False)),
        Mistake("ramp_from_zero", "The linear ramp starts at the end of the warm-up: progress "
                "= (step - warmup_steps) / (end - warmup_steps).", lambda *a: _limits(*a, start=0)),
        Mistake("no_clamp", "After rmax_steps (dmax_steps) the limits stay at rmax (dmax); "
                "clamp the progress at 1.", lambda *a: _limits(*a, clamp=False)),
        Mistake("swapped_ends", "rmax reaches its final value at rmax_steps and dmax at "
                "dmax_steps; you swapped them.",
                lambda step, rmax, dmax, w, rs, ds: _limits(step, rmax, dmax, w, ds, rs)),
    ),
)

# ---- 06.noniid_accuracy (an experiment) -----------------------------------------------------
def _noniid(data, norms, steps, seed, *, iid=False, measure="eval"):
    values = []
    for norm in norms:
        sampler = None if iid else class_subset_batches(data[1].numpy(), 2, 32, seed=seed)
        model, _ = trained(data, norm=norm, activation="relu", steps=steps, batch_size=32,
                           lr=3e-3, optimizer="adam", seed=seed, sampler=sampler)
        eval_mode, batch_stats = accuracies(model, data, 32)
        values.append(eval_mode if measure == "eval" else batch_stats)
    return as_array(values)


def _noniid_correct(data, norms, steps, seed):
    return _noniid(data, norms, steps, seed)


NONIID_ACCURACY = OutputTask(
    id="06.noniid_accuracy",
    title="experiment: batch norm and batch renorm trained on batches of two classes",
    function="noniid_accuracy",
    points=2,
    correct=_noniid_correct,
    outputs=("accuracy",),
    cases=(Case("1,000 training and 500 test images, norms (batch, renorm), 200 steps, seed 0",
                lambda: {"data": small_mnist(), "norms": ("batch", "renorm"), "steps": 200,
                         "seed": 0}),),
    mistakes=(
        Mistake("batch_statistics", "You returned the accuracy with batch statistics; the "
                "question is about the deployed network: eval mode (r.eval_accuracy).",
                lambda data, norms, steps, seed: _noniid(data, norms, steps, seed,
                                                         measure="batch")),
        Mistake("iid_batches", "You trained on ordinary (i.i.d.) batches; the experiment draws "
                "every batch of 32 from 2 classes (brx.noniid_comparison does).",
                lambda data, norms, steps, seed: _noniid(data, norms, steps, seed, iid=True)),
    ),
)

TASKS = (RENORM_R_D, BATCH_RENORM_FORWARD, BATCH_RENORM_BACKWARD, RENORM_LIMITS, NONIID_ACCURACY)
