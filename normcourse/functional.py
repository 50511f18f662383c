"""Batch norm, layer norm and batch renorm in PyTorch, with the backward pass written by hand.

Each layer comes twice:

- an ``autograd.Function`` (``BatchNormFunction``, ``LayerNormFunction``, ``BatchRenormFunction``)
  whose ``backward`` is the closed-form gradient derived in the book. It saves the input and a
  few numbers per channel (or per row), not every intermediate of the forward pass, so it needs
  less memory than letting autograd record the graph. The backward is itself written in
  differentiable tensor operations, so the layers can be differentiated twice (gradient
  penalties, Hessian-vector products), as torch's can;
- a plain composition of tensor operations (``batch_norm_autograd``, ...) that autograd
  differentiates for us, used to check the Functions and in the benchmarks.

Both run the *same* forward code (``_batch_norm_forward`` and friends): the Function adds only the
hand-written backward. The public wrappers copy the signatures of ``torch.nn.functional``.

Conventions (PyTorch's, see CONTRIBUTING.md):

- statistics per channel over every axis but axis 1 for batch norm, over the trailing
  ``normalized_shape`` axes for layer norm; the biased variance normalizes, ``eps`` sits inside
  the square root;
- ``momentum`` is the weight of the *new* batch; ``running_var`` stores the unbiased variance
  ``var * m / (m - 1)`` where ``m`` is the number of values per channel; running statistics are
  updated in place inside the forward pass (never recorded by autograd);
- float16/bfloat16 inputs are normalized with statistics accumulated in float32, and the output is
  cast back to the input's dtype;
- NaN or inf in the input propagate to the output as in torch.nn (no check: it would cost a
  reduction and a device synchronisation per call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normcourse.validation import (
    check_channel_input,
    check_channels,
    check_floating,
    check_groups,
    check_layer_norm_input,
    check_rank,
    check_running_pair,
    check_same_dtype,
)

__all__ = [
    "BatchNormFunction",
    "LayerNormFunction",
    "BatchRenormFunction",
    "batch_norm",
    "layer_norm",
    "batch_renorm",
    "batch_norm_autograd",
    "layer_norm_autograd",
    "batch_renorm_autograd",
    "renorm_limits",
    "renorm_correction",
    "update_batch_norm_running_stats",
    "GroupNormFunction",
    "RMSNormFunction",
    "WeightStandardizationFunction",
    "group_norm",
    "group_norm_autograd",
    "instance_norm",
    "instance_norm_autograd",
    "rms_norm",
    "rms_norm_autograd",
    "weight_standardization",
    "weight_standardization_autograd",
    "check_group_norm_input",
    "check_instance_norm_input",
    "NotScriptable",
]


class NotScriptable:
    """Mixin for the modules that run these Functions (``normcourse.nn``, ``SyncBatchNorm``):
    ``torch.jit.script`` cannot compile an ``autograd.Function``, so it gets a clear error that
    points to torch.compile and torch.export instead of a TorchScript parse error."""

    def __prepare_scriptable__(self):  # called by torch.jit.script on every submodule
        raise RuntimeError(
            f"normcourse.nn.{type(self).__name__} cannot be compiled by torch.jit.script: it runs "
            "a torch.autograd.Function, which TorchScript does not support (and TorchScript is "
            "deprecated). Use torch.compile(model) or torch.export.export(model, args) instead."
        )


# --------------------------------------------------------------------------------------------
# Small helpers shared by the Functions and the compositions
#
# Speed. A normalization layer does a handful of operations per number it reads, so its time is
# set by how many times it passes over the data, not by arithmetic (see the book's performance
# appendix); on small inputs, by how many separate tensor operations Python launches. The code
# therefore (1) keeps per-channel statistics with size-1 axes, e.g. (1, C, 1, 1), so that they
# broadcast against x without reshaping or copying x; (2) combines every per-channel factor on
# the C numbers first and then applies it to the data in one fused pass (torch.addcmul and
# in-place operations on its own temporaries); (3) skips casts that would do nothing.
# --------------------------------------------------------------------------------------------
def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (their sums would lose digits), else the input's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _cast(t, dtype):
    """t converted to dtype; None stays None, and a tensor already in dtype is returned as is."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The axes batch norm averages over: every axis but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` as ``(1, C, 1, ...)`` so that it broadcasts against x."""
    return v.view((1, -1) + (1,) * (x.ndim - 2))


def _channel_factor(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector ``(C,)`` that only multiplies or adds: as is for an (N, C) input, whose
    last axis it already lines up with, else ``_per_channel``. (One operation less per vector,
    which counts on small inputs: see the performance appendix.)"""
    return v if x.ndim == 2 else _per_channel(v, x)


def _values_per_channel(x: torch.Tensor) -> int:
    """m: how many numbers one channel's statistics are computed from (N, N*L or N*H*W)."""
    return x.numel() // x.shape[1]


def _multiply_add(t: torch.Tensor, scale, shift) -> torch.Tensor:
    """t * scale + shift, where scale and shift (either may be None) broadcast against t.

    One fused pass (``torch.addcmul``) when both are given, except when they repeat along t's
    innermost axis (per-channel factors of an (N, C, H, W) input): for two such operands
    PyTorch's CPU kernel is not vectorized, and a multiplication followed by an in-place
    addition is faster.
    """
    if scale is None:
        return t if shift is None else t + shift
    if shift is None:
        return t * scale
    if scale.shape[-1] == 1 < t.shape[-1]:
        return (t * scale).add_(shift)
    return torch.addcmul(shift, t, scale)


def _centered_moments(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x - mean, mean, biased variance), the statistics over ``dims`` kept as size-1 axes.

    Two passes, the numerically stable way: the mean first, then the mean of the squared
    deviations. The one-pass E[x^2] - E[x]^2 cancels catastrophically when the mean is large next
    to the spread; ``torch.var_mean`` is as stable (Welford's algorithm) but several times slower
    on a CPU. The centered x comes back because every caller needs it next. Half-precision inputs
    are accumulated in float32.
    """
    x = _cast(x, _stats_dtype(x))
    n = math.prod([x.shape[d] for d in dims])
    if n == 0:
        # nothing to average (an empty batch): mean 0 and variance 1 keep every product that
        # follows finite (the gradients of gamma and beta are then 0, as torch's)
        mean = x.new_zeros([1 if d in dims else size for d, size in enumerate(x.shape)])
        return x - mean, mean, torch.ones_like(mean)
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    if dims == tuple(range(x.ndim - len(dims), x.ndim)):
        # the trailing axes (layer norm): each row lies contiguous in memory, and a vector norm
        # sums its squares in one read without storing them (over other axes it is slow)
        var = torch.linalg.vector_norm(centered, dim=dims, keepdim=True).square() / n
    else:
        var = (centered * centered).mean(dims, keepdim=True)
    return centered, mean, var


def _update_running_average(running: torch.Tensor, batch_value: torch.Tensor, momentum: float) -> None:
    """running <- running + momentum * (batch_value - running), in place, outside autograd.

    That is (1 - momentum) * running + momentum * batch_value, in one operation (``lerp_``).
    ``batch_value`` may carry size-1 axes, (1, C, 1, 1) for a running buffer (C,).
    """
    # detached, so that autograd never records the update (see renorm_correction: no no_grad
    # block); inside a Function's forward nothing is recorded, and the detach is skipped
    if batch_value.requires_grad:
        batch_value = batch_value.detach()
    running.lerp_(_cast(batch_value.view(running.shape), running.dtype), momentum)


def update_batch_norm_running_stats(running_mean, running_var, mean, var, momentum, m) -> None:
    """PyTorch's update: the mean as is, the variance made unbiased with m / (m - 1) first."""
    _update_running_average(running_mean, mean, momentum)
    _update_running_average(running_var, var * (m / (m - 1)), momentum)


def renorm_correction(mean, sigma, running_mean, running_std, rmax, dmax):
    """Batch renorm's r = clip(sigma_B / sigma, 1/rmax, rmax), d = clip((mu_B - mu) / sigma, +-dmax).

    All arguments are per-channel tensors whose shapes broadcast together, ``(C,)`` or
    ``(1, C, 1, ...)``. The result is detached: the paper treats r and d as constants for the
    gradient (stop_gradient).
    """
    # detach() rather than a torch.no_grad() block: torch.compile mishandles a no_grad block
    # inside an autograd.Function that also updates its inputs in place (the backward pass then
    # saw r and d computed from the *updated* running averages)
    # (inside a Function's forward nothing requires grad, and the detach is skipped)
    sigma = sigma.detach() if sigma.requires_grad else sigma
    mean = mean.detach() if mean.requires_grad else mean
    running_std = _cast(running_std, sigma.dtype)
    r = (sigma / running_std).clamp_(1.0 / rmax, rmax)
    d = ((mean - _cast(running_mean, mean.dtype)) / running_std).clamp_(-dmax, dmax)
    return r, d


def renorm_limits(step, rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000):
    """The batch renorm paper's schedule for the clipping limits at training step ``step``.

    rmax = 1 and dmax = 0 (plain batch norm) for the first ``warmup_steps`` steps, then both are
    relaxed linearly, reaching ``rmax`` at ``rmax_steps`` and ``dmax`` at ``dmax_steps``, and stay
    there. ``step`` may be an int or a 0-d tensor (a module's ``num_batches_tracked``).
    Returns ``(rmax_now, dmax_now)`` as Python floats.
    """
    step = int(step)

    def progress(end: int) -> float:
        if step < warmup_steps:
            return 0.0
        if end <= warmup_steps:
            return 1.0
        return min(1.0, (step - warmup_steps) / (end - warmup_steps))

    return 1.0 + (rmax - 1.0) * progress(rmax_steps), dmax * progress(dmax_steps)


# --------------------------------------------------------------------------------------------
# Forward passes: one implementation each, run by the Function (grad off) and the composition
# (autograd records it)
# --------------------------------------------------------------------------------------------
def _channel_scale_shift(x, invstd, weight, bias, r=None, d=None):
    """Per-channel (scale, shift), shapes (1, C, 1, ...), with y = (x - mean) * scale + shift.

    y = gamma * ((x - mean) * invstd * r + d) + beta, so scale = gamma * r * invstd and
    shift = gamma * d + beta (batch norm: r = 1, d = 0; shift None when it is 0). Combining
    these C numbers first lets a single pass over the data produce y.
    """
    gamma = None if weight is None else _channel_factor(_cast(weight, invstd.dtype), x)
    beta = None if bias is None else _channel_factor(_cast(bias, invstd.dtype), x)
    scale = invstd if r is None else invstd * r
    if gamma is not None:
        scale = scale * gamma
    if d is None:
        return scale, beta
    shift = d if gamma is None else d * gamma
    return scale, shift if beta is None else shift + beta


def _normalize_with_fixed_statistics(x, mean, invstd, weight, bias):
    """Eval mode: y = (x - mean) * scale + shift = x * scale + (shift - mean * scale).

    The statistics are constants, so y is one affine map of x: one pass, as torch does it.
    """
    scale, shift = _channel_scale_shift(x, invstd, weight, bias)
    shift = -mean * scale if shift is None else shift - mean * scale
    return _multiply_add(_cast(x, mean.dtype), scale, shift)


def _batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """Returns (out, mean, invstd); mean and invstd (1, C, 1, ...) in the statistics dtype."""
    if training:
        centered, mean, var = _centered_moments(x, _reduce_dims(x))
        if running_mean is not None and x.numel() > 0:  # an empty batch leaves them alone
            update_batch_norm_running_stats(
                running_mean, running_var, mean, var, momentum, _values_per_channel(x)
            )
        invstd = torch.rsqrt(var + eps)
        out = _multiply_add(centered, *_channel_scale_shift(x, invstd, weight, bias))
    else:
        # a copy, so that a later in-place update of the buffer cannot alter what backward reads
        mean = _per_channel(running_mean.to(_stats_dtype(x), copy=True), x)
        invstd = torch.rsqrt(_per_channel(_cast(running_var, mean.dtype), x) + eps)
        out = _normalize_with_fixed_statistics(x, mean, invstd, weight, bias)
    return _cast(out, x.dtype), mean, invstd


def _batch_renorm_forward(x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps):
    """Returns (out, mean, invstd, r, d), per-channel (1, C, 1, ...); r, d None in eval mode.

    Order matters (a known mistake is to get it wrong): normalize with the batch statistics, then
    correct with r and d, then apply gamma and beta. r and d come from the running averages
    *before* this step's update.
    """
    if training:
        centered, mean, var = _centered_moments(x, _reduce_dims(x))
        sigma = torch.sqrt(var + eps)
        # r and d use a copy of the running averages taken before this step's update. (Not the
        # buffers themselves: torch.compile 2.13 may recompute r and d in the backward pass from
        # the buffers, after the update, and get the gradient wrong; it never recomputes a stack.)
        before = _cast(torch.stack((running_mean, running_std)), mean.dtype)
        r, d = renorm_correction(mean, sigma, _channel_factor(before[0], x),
                                 _channel_factor(before[1], x), rmax, dmax)
        if x.numel() > 0:  # an empty batch leaves the running averages alone
            _update_running_average(running_mean, mean, momentum)
            _update_running_average(running_std, sigma, momentum)
        invstd = sigma.reciprocal()
        out = _multiply_add(centered, *_channel_scale_shift(x, invstd, weight, bias, r, d))
    else:
        # inference: y = gamma * (x - mu) / sigma + beta, no eps (sigma already includes it)
        mean = _per_channel(running_mean.to(_stats_dtype(x), copy=True), x)
        invstd = _per_channel(_cast(running_std, mean.dtype), x).reciprocal()
        r = d = None
        out = _normalize_with_fixed_statistics(x, mean, invstd, weight, bias)
    return _cast(out, x.dtype), mean, invstd, r, d


def _normalized_dims(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def _layer_norm_forward(x, normalized_shape, weight, bias, eps):
    """Returns (out, mean, rstd); mean, rstd: x's shape with the normalized axes kept as 1."""
    centered, mean, var = _centered_moments(x, _normalized_dims(x, normalized_shape))
    rstd = torch.rsqrt(var + eps)
    # rstd varies across rows and gamma, beta (shape normalized_shape) along them: they cannot be
    # combined into one factor as in batch norm, so xhat is formed, in the centered x's memory
    # unless autograd records the forward (the composition), which needs centered as it was
    xhat = centered * rstd if torch.is_grad_enabled() else centered.mul_(rstd)
    out = _multiply_add(xhat, _cast(weight, xhat.dtype), _cast(bias, xhat.dtype))
    return _cast(out, x.dtype), mean, rstd


def _row_norm_dx(centered, dy, gamma, sum_g, sum_g_xhat, rstd, n):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma, xhat = centered * rstd,
    the means over the n values that share one mean and rstd (a row of layer norm, a group of
    group norm).

    sum_g, sum_g_xhat and rstd carry size-1 axes that broadcast against centered; gamma (None: 1)
    broadcasts too. In a recorded backward pass (a second derivative) every step is a new tensor;
    otherwise dx is built in place in centered's memory, a temporary of the caller's: four passes
    and no new tensor of x's size. (No torch.addcmul with the per-row factors: on a CPU it is not
    vectorized for such operands; a multiplication and an addition are several times faster.)
    """
    n = max(1, n)  # rows of no values
    mean_g, xhat_factor = sum_g / n, sum_g_xhat * rstd / -n  # centered * xhat_factor = -xhat * mean(g xhat)
    if torch.is_grad_enabled():
        g = dy if gamma is None else dy * gamma
        return (g - mean_g + centered * xhat_factor) * rstd
    dx = centered.mul_(xhat_factor).sub_(mean_g)
    dx = dx.add_(dy) if gamma is None else dx.addcmul_(dy, gamma)
    return dx.mul_(rstd)


# --------------------------------------------------------------------------------------------
# Closed-form backward passes
#
# Each is written in differentiable tensor operations, so that autograd can record it when the
# caller asks for a graph of the gradient (create_graph=True: gradient penalties, Hessian-vector
# products). Grad mode is on inside a backward pass exactly then; the fast path works in place
# on its own temporaries, the recorded path cannot (autograd needs the values it saved).
# --------------------------------------------------------------------------------------------
def _statistics_for_backward(x, mean, invstd, eps, dims):
    """The saved (mean, 1/sqrt(var + eps)), or, in a recorded backward pass or when none were
    saved (mean None), the same numbers recomputed from x: the saved ones were computed outside
    autograd, and a second derivative needs how they depend on x."""
    if mean is not None and not torch.is_grad_enabled():
        return mean, invstd
    _, mean, var = _centered_moments(x, dims)
    return mean, torch.rsqrt(var + eps)


def _per_channel_backward(needs, dy, x, weight, mean, invstd, batch_stats, r=None, d=None):
    """Gradients of y = gamma * (xhat * r + d) + beta, xhat = (x - mean) * invstd, per channel.

    x, dy: (N, C, *); mean, invstd, r, d: (1, C, 1, ...); weight: (C,) or None.
    With k = gamma * r * invstd and means over the n values of a channel:
        batch statistics:  dx = k * (dy - mean(dy) - xhat * mean(dy * xhat))
        fixed statistics (eval mode):  dx = k * dy
    dgamma = sum(dy * (xhat * r + d)), dbeta = sum(dy). Batch norm is r = 1, d = 0.
    Returns dx (statistics dtype), dgamma and dbeta (C,) (None where not needed).
    """
    need_dx, need_dweight, need_dbias = needs
    need_dweight = need_dweight and weight is not None
    dims = _reduce_dims(x)
    dy = _cast(dy, mean.dtype)
    sum_dy = dy.sum(dims, keepdim=True)
    if need_dweight or (need_dx and batch_stats):
        # x - mean once more (it was not kept, to save memory), then sum(dy * xhat) as
        # invstd * sum(dy * (x - mean)), the multiplication by invstd done on C numbers only.
        # (sum(dy * x) - mean * sum(dy) would save a pass but cancels when the mean is large.)
        centered = _cast(x, mean.dtype) - mean
        sum_dy_xhat = (dy * centered).sum(dims, keepdim=True) * invstd

    dx = dweight = dbias = None
    if need_dx:
        k, _ = _channel_scale_shift(x, invstd, weight, None, r)
        if batch_stats:
            # Expanded: dx = (x - mean) * (-k/n * invstd * sum(dy * xhat)) + k * dy - k/n * sum(dy),
            # per-channel numbers times one tensor each (max: an empty batch has n = 0)
            minus_k_n = k * (-1.0 / max(1, _values_per_channel(x)))
            x_factor, shift = minus_k_n * invstd * sum_dy_xhat, minus_k_n * sum_dy
            if torch.is_grad_enabled():  # recorded for a second derivative: no in-place
                dx = centered * x_factor + torch.addcmul(shift, dy, k)
            else:  # built in place in the centered x's memory
                dx = centered.mul_(x_factor).addcmul_(dy, k).add_(shift)
        else:
            dx = dy * k
    if need_dweight:
        dweight = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
        dweight = _cast(dweight.flatten(), weight.dtype)
    if need_dbias:
        dbias = sum_dy.flatten()
    return dx, dweight, dbias


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with the closed-form backward. x: (N, C, *); weight, bias, running stats: (C,).

    Saves x itself (no new memory: the caller holds x anyway), gamma, and two numbers per
    channel (mean and invstd); backward recomputes x - mean from them.
    Running statistics are updated in place in the forward pass (training mode only).
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        out, mean, invstd = _batch_norm_forward(
            x, running_mean, running_var, weight, bias, training, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        if ctx.training:
            mean, invstd = _statistics_for_backward(x, mean, invstd, ctx.eps, _reduce_dims(x))
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dweight, dbias = _per_channel_backward(needs, dy, x, weight, mean, invstd, ctx.training)
        # no gradient for the running statistics, training, momentum, eps
        return _cast(dx, ctx.dtypes[0]), None, None, dweight, _cast(dbias, ctx.dtypes[1]), None, None, None


class BatchRenormFunction(torch.autograd.Function):
    """Batch renormalization with the closed-form backward. x: (N, C, *); the rest: (C,).

    r and d are constants for the gradient, so dx is batch norm's backward with gamma * r and
    dgamma = sum(dy * (r * xhat_B + d)). In eval mode it is an affine map of x. Saves what
    BatchNormFunction saves, plus r and d.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps):
        out, mean, invstd, r, d = _batch_renorm_forward(
            x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd, r, d)
        ctx.training, ctx.eps = training, eps
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        if ctx.training:  # invstd = 1 / sigma_B = 1 / sqrt(var + eps)
            mean, invstd = _statistics_for_backward(x, mean, invstd, ctx.eps, _reduce_dims(x))
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dweight, dbias = _per_channel_backward(
            needs, dy, x, weight, mean, invstd, ctx.training, r, d
        )
        return _cast(dx, ctx.dtypes[0]), None, None, dweight, _cast(dbias, ctx.dtypes[1]), None, None, None, None, None


class LayerNormFunction(torch.autograd.Function):
    """Layer norm with the closed-form backward. x: (*, *normalized_shape); weight, bias:
    normalized_shape.

    Saves x (as torch does), gamma, and mean and rstd per row; backward recomputes xhat from
    them. Per row, with g = dy * gamma and the means over the row's H values:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        out, mean, rstd = _layer_norm_forward(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.normalized_shape, ctx.eps = tuple(normalized_shape), eps
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        k = len(ctx.normalized_shape)
        dims = _normalized_dims(x, ctx.normalized_shape)
        rows = tuple(range(x.ndim - k))
        mean, rstd = _statistics_for_backward(x, mean, rstd, ctx.eps, dims)
        centered = _cast(x, mean.dtype) - mean
        dy = _cast(dy, centered.dtype)
        # dy * xhat = (dy * (x - mean)) * rstd: the per-row rstd is applied to the sums below
        # (matrix-vector products) instead of forming xhat, which saves a pass over the data
        dy_centered = dy * centered
        flat = lambda t: t.flatten(-k).flatten(0, -2) if rows else t.flatten().unsqueeze(0)  # noqa: E731 (rows, H)

        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            gamma = None if weight is None else _cast(weight, centered.dtype)
            if gamma is None:
                sum_g = dy.sum(dims, keepdim=True)
                sum_g_xhat = dy_centered.sum(dims, keepdim=True) * rstd
            else:
                # sum(g) and sum(g * xhat) per row, g = dy * gamma, as matrix-vector products
                # with gamma: they read dy and dy * (x - mean) once and store nothing
                sum_g = (flat(dy) @ gamma.flatten()).view(rstd.shape)
                sum_g_xhat = (flat(dy_centered) @ gamma.flatten()).view(rstd.shape) * rstd
            dx = _row_norm_dx(centered, dy, gamma, sum_g, sum_g_xhat, rstd,
                              math.prod(ctx.normalized_shape))
            dx = _cast(dx, ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            # sum over the rows of dy * xhat: rstd (one number per row) times dy * (x - mean),
            # as a matrix-vector product (torch.compile turns it into a fused sum)
            dweight = (flat(dy_centered).t() @ rstd.flatten()).view(weight.shape)
            dweight = _cast(dweight, weight.dtype)
        if ctx.needs_input_grad[3]:
            dbias = _cast(flat(dy).sum(0).view(ctx.normalized_shape), ctx.dtypes[1])
        return dx, None, dweight, dbias, None


# --------------------------------------------------------------------------------------------
# Input checks (through normcourse.validation) and the public wrappers
# --------------------------------------------------------------------------------------------
def _channel_counts(*per_channel) -> list[int]:
    return [t.numel() for t in per_channel if t is not None]


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, training):
    check_running_pair(
        running_mean, running_var, ("running_mean", "running_var"), "batch_norm",
        None if training else "in eval mode (training=False)",
    )
    check_channel_input(x, _channel_counts(running_mean, running_var, weight, bias), training, "batch_norm")
    check_same_dtype(x, "batch_norm", weight=weight, bias=bias, running_mean=running_mean,
                     running_var=running_var)


def _check_batch_renorm_args(x, running_mean, running_std, weight, bias, training):
    check_running_pair(
        running_mean, running_std, ("running_mean", "running_std"), "batch_renorm",
        "(r and d are computed from them)",
    )
    check_channel_input(x, _channel_counts(running_mean, running_std, weight, bias), training, "batch_renorm")
    check_same_dtype(x, "batch_renorm", weight=weight, bias=bias, running_mean=running_mean,
                     running_std=running_std)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch norm like ``torch.nn.functional.batch_norm``, through ``BatchNormFunction``.

    x: (N, C), (N, C, L) or (N, C, H, W); running_mean, running_var, weight, bias: (C,) or None.
    Training: normalize with the batch statistics and, when given, update the running statistics
    in place. Eval: normalize with the running statistics (which are then required).
    """
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, training)
    return BatchNormFunction.apply(x, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_autograd(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Same as ``batch_norm``, but autograd differentiates the forward composition."""
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, training)
    return _batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps)[0]


def batch_renorm(x, running_mean, running_std, weight=None, bias=None, training=False, rmax=3.0, dmax=5.0, momentum=0.01, eps=1e-5):
    """Batch renormalization (Ioffe 2017), through ``BatchRenormFunction``.

    x: (N, C), (N, C, L) or (N, C, H, W); running_mean, running_std (sigma, not the variance),
    weight, bias: (C,). Training: y = gamma * ((x - mu_B) / sigma_B * r + d) + beta with
    sigma_B = sqrt(biased var + eps), r and d clipped to [1/rmax, rmax] and [-dmax, dmax] and
    computed from the running averages before they are updated in place. Eval:
    y = gamma * (x - running_mean) / running_std + beta.
    """
    _check_batch_renorm_args(x, running_mean, running_std, weight, bias, training)
    return BatchRenormFunction.apply(
        x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps
    )


def batch_renorm_autograd(x, running_mean, running_std, weight=None, bias=None, training=False, rmax=3.0, dmax=5.0, momentum=0.01, eps=1e-5):
    """Same as ``batch_renorm``, but autograd differentiates the forward (r and d detached)."""
    _check_batch_renorm_args(x, running_mean, running_std, weight, bias, training)
    return _batch_renorm_forward(
        x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps
    )[0]


def layer_norm(x, normalized_shape: int | Sequence[int], weight=None, bias=None, eps=1e-5):
    """Layer norm like ``torch.nn.functional.layer_norm``, through ``LayerNormFunction``.

    x: (*, *normalized_shape); weight, bias: normalized_shape or None. Statistics per row over the
    trailing axes, biased variance; the same computation in training and evaluation.
    """
    normalized_shape = check_layer_norm_input(x, normalized_shape)
    check_same_dtype(x, "layer_norm", weight=weight, bias=bias)
    return LayerNormFunction.apply(x, normalized_shape, weight, bias, eps)


def layer_norm_autograd(x, normalized_shape: int | Sequence[int], weight=None, bias=None, eps=1e-5):
    """Same as ``layer_norm``, but autograd differentiates the forward composition."""
    normalized_shape = check_layer_norm_input(x, normalized_shape)
    check_same_dtype(x, "layer_norm", weight=weight, bias=bias)
    return _layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]



# --------------------------------------------------------------------------------------------
# Normalization without the batch (chapter 8): group norm, instance norm, RMSNorm, weight
# standardization.
#
# Their backward passes are written with differentiable tensor operations (no
# @once_differentiable): autograd can differentiate the backward itself, so double backward
# (gradient penalties, gradgradcheck) works. RMSNorm and weight standardization recompute their
# statistics from the saved input (one more pass over x); group norm keeps mean and rstd per
# group, as layer norm does, and recomputes them only in a recorded backward pass. The memory
# saved stays one tensor of x's size.
# --------------------------------------------------------------------------------------------
def _group_view(x, num_groups: int):
    """x: (N, C, *) viewed as (N, G, C/G, L), L = prod(*): the statistics of one (example, group)
    are over its two trailing axes, contiguous in memory, as a row of layer norm."""
    return x.reshape(x.shape[0], num_groups, x.shape[1] // num_groups, math.prod(x.shape[2:]))


def _group_norm_forward(x, num_groups, weight, bias, eps):
    """y = gamma * xhat + beta with per-group statistics and per-channel gamma, beta.

    Returns (out, mean, rstd); mean, rstd: (N, G, 1, 1) in the statistics dtype. The factor
    rstd * gamma is formed on the N * C numbers first, so y = (x - mean) * factor + beta.
    """
    xg = _group_view(x, num_groups)
    centered, mean, var = _centered_moments(xg, (2, 3))
    rstd = torch.rsqrt(var + eps)
    per_channel = lambda v: _cast(v, rstd.dtype).view(num_groups, -1, 1)  # noqa: E731 (G, C/G, 1)
    scale = rstd if weight is None else rstd * per_channel(weight)
    out = _multiply_add(centered, scale, None if bias is None else per_channel(bias))
    return _cast(out.view(x.shape), x.dtype), mean, rstd


def _group_norm_backward(needs, dy, x, weight, mean, rstd, bias_dtype, num_groups, eps):
    """dx, dgamma, dbeta of group norm; per (example, group), with g = dy * gamma and means over
    the group's M values: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).

    Only two reductions read the large tensors: the sums of dy and dy * xhat over the positions
    of each (example, channel). The group sums (for dx) and the sums over the batch (dgamma,
    dbeta) are then taken on those N * C numbers.
    """
    xg = _group_view(x, num_groups)
    mean, rstd = _statistics_for_backward(xg, mean, rstd, eps, (2, 3))  # mean None: not kept
    centered = _cast(xg, mean.dtype) - mean
    dy = _cast(dy, centered.dtype).reshape(centered.shape)
    # (N, G, C/G, 1); one position per channel ((N, C) input): the sums are the values
    per_position = (lambda t: t) if centered.shape[3] == 1 else (lambda t: t.sum(3, keepdim=True))
    sum_dy = per_position(dy)
    sum_dy_xhat = per_position(dy * centered) * rstd  # xhat = centered * rstd
    dx = dweight = dbias = None
    if needs[0]:
        gamma = None if weight is None else _cast(weight, centered.dtype).view(num_groups, -1, 1)
        sum_g = sum_dy if gamma is None else sum_dy * gamma
        sum_g_xhat = sum_dy_xhat if gamma is None else sum_dy_xhat * gamma
        dx = _row_norm_dx(centered, dy, gamma, sum_g.sum(2, keepdim=True),
                          sum_g_xhat.sum(2, keepdim=True), rstd, math.prod(centered.shape[2:]))
        dx = _cast(dx.view(x.shape), x.dtype)
    if needs[1]:
        dweight = _cast(sum_dy_xhat.sum(0).flatten(), weight.dtype)
    if needs[2]:
        dbias = _cast(sum_dy.sum(0).flatten(), bias_dtype)
    return dx, dweight, dbias


class GroupNormFunction(torch.autograd.Function):
    """Group norm (Wu & He 2018) with the closed-form backward. x: (N, C, *); weight, bias: (C,).

    Saves x, gamma, and mean and rstd per (example, group) (unless the groups hold at most two
    values); the backward recomputes xhat from them. Recorded by autograd (create_graph=True),
    the backward recomputes the statistics from x with differentiable operations, so the
    backward is itself differentiable (double backward).
    """

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        out, mean, rstd = _group_norm_forward(x, num_groups, weight, bias, eps)
        if 2 * mean.numel() >= x.numel():
            # groups of one or two values: the statistics would take as much memory as x, so
            # the backward recomputes them instead (a degenerate case; torch keeps them)
            mean = rstd = None
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups, ctx.eps = num_groups, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dx, dweight, dbias = _group_norm_backward(
            needs, dy, x, weight, mean, rstd, ctx.bias_dtype, ctx.num_groups, ctx.eps
        )
        return dx, None, dweight, dbias, None


def _rms_normalize(x, normalized_shape, eps):
    """Return (xhat, rstd): x / sqrt(mean(x^2) + eps) over the trailing axes, and 1 / that root."""
    x = _cast(x, _stats_dtype(x))
    dims = _normalized_dims(x, normalized_shape)
    # the mean square of each row through a vector norm: one read, no squared copy of x stored
    n = math.prod(normalized_shape)
    rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=dims, keepdim=True).square() / n + eps)
    return x * rstd, rstd


def _rms_norm_forward(x, normalized_shape, weight, eps):
    xhat, _ = _rms_normalize(x, normalized_shape, eps)
    return _cast(xhat if weight is None else xhat * _cast(weight, xhat.dtype), x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm (Zhang & Sennrich 2019) with the closed-form backward. x: (*, *normalized_shape).

    Per row, with g = dy * gamma and the mean over the row: dx = rstd * (g - xhat * mean(g * xhat)),
    layer norm's formula without the mean(g) term. Saves x and gamma; double backward works.
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.normalized_shape, ctx.eps = tuple(normalized_shape), eps
        return _rms_norm_forward(x, normalized_shape, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        xhat, rstd = _rms_normalize(x, ctx.normalized_shape, ctx.eps)
        dy = _cast(dy, xhat.dtype)
        dims = _normalized_dims(x, ctx.normalized_shape)
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            g = dy if weight is None else dy * _cast(weight, dy.dtype)
            dx = _cast(rstd * (g - xhat * (g * xhat).mean(dims, keepdim=True)), x.dtype)
        if ctx.needs_input_grad[2]:
            rows = tuple(range(x.ndim - len(ctx.normalized_shape)))
            dy_xhat = dy * xhat
            dweight = _cast(dy_xhat.sum(rows) if rows else dy_xhat, weight.dtype)
        return dx, None, dweight, None


def _standardize_filters(w, eps):
    """Return (w_hat, rstd): each output filter w[o] standardized over its fan-in (biased)."""
    centered, _, var = _centered_moments(w.flatten(1), (1,))
    rstd = torch.rsqrt(var + eps)
    return centered * rstd, rstd


class WeightStandardizationFunction(torch.autograd.Function):
    """Weight standardization (Qiao et al. 2019) of w: (C_out, C_in, kh, kw) with the closed-form
    backward: per filter, dw = rstd * (g - mean(g) - w_hat * mean(g * w_hat)), g = dw_hat."""

    @staticmethod
    def forward(ctx, w, eps):
        ctx.save_for_backward(w)
        ctx.eps = eps
        return _cast(_standardize_filters(w, eps)[0].view(w.shape), w.dtype)

    @staticmethod
    def backward(ctx, dout):
        (w,) = ctx.saved_tensors
        what, rstd = _standardize_filters(w, ctx.eps)
        g = dout.reshape(what.shape)
        dw = rstd * (g - g.mean(1, keepdim=True) - what * (g * what).mean(1, keepdim=True))
        return _cast(dw.view(w.shape), w.dtype), None


# --------------------------------------------------------------------------------------------
# Chapter 8: input checks and public wrappers (signatures of torch.nn.functional)
# --------------------------------------------------------------------------------------------
def check_group_norm_input(x, num_groups, weight, bias, layer="group_norm") -> None:
    """x: (N, C, *) floating, C divisible by num_groups, weight and bias (C,) when given."""
    check_floating(x, layer)
    check_rank(x, tuple(range(2, 9)), layer, "(N, C, *)")
    check_groups(x.shape[1], num_groups, layer)
    for count in _channel_counts(weight, bias):
        check_channels(x, count, layer)


def group_norm(x, num_groups: int, weight=None, bias=None, eps=1e-5):
    """Group norm like ``torch.nn.functional.group_norm``, through ``GroupNormFunction``.

    x: (N, C, *); weight, bias: (C,) or None. Statistics per example and group of C/G
    consecutive channels; the same computation in training and evaluation.
    """
    check_group_norm_input(x, num_groups, weight, bias)
    return GroupNormFunction.apply(x, num_groups, weight, bias, eps)


def group_norm_autograd(x, num_groups: int, weight=None, bias=None, eps=1e-5):
    """Same as ``group_norm``, but autograd differentiates the forward composition."""
    check_group_norm_input(x, num_groups, weight, bias)
    return _group_norm_forward(x, num_groups, weight, bias, eps)[0]


def check_instance_norm_input(x, running_mean, running_var, weight, bias, use_input_stats,
                              layer="instance_norm") -> None:
    """x: (N, C, *) floating with per-channel tensors of size C and, when normalizing with its
    own statistics, more than one spatial value per instance (as torch)."""
    check_running_pair(
        running_mean, running_var, ("running_mean", "running_var"), layer,
        None if use_input_stats else "when use_input_stats=False",
    )
    check_floating(x, layer)
    check_rank(x, tuple(range(3, 9)), layer, "(N, C, L), (N, C, H, W) or (N, C, *)")
    for count in _channel_counts(running_mean, running_var, weight, bias):
        check_channels(x, count, layer)
    if use_input_stats and math.prod(x.shape[2:]) <= 1:
        raise ValueError(
            "Expected more than 1 spatial element when training, got input size "
            f"{tuple(x.shape)} in {layer}: each instance is normalized over its own positions"
        )


def _instance_norm(function, x, running_mean, running_var, weight, bias, use_input_stats,
                   momentum, eps):
    """Shared by ``instance_norm`` and ``instance_norm_autograd``; ``function`` normalizes with
    the instance statistics (group norm with one channel per group)."""
    check_instance_norm_input(x, running_mean, running_var, weight, bias, use_input_stats)
    if not use_input_stats:
        # the running statistics are constants: an affine map, as batch norm in eval mode
        return _batch_norm_forward(x, running_mean, running_var, weight, bias, False, 0.0, eps)[0]
    if running_mean is not None and x.numel() > 0:  # an empty batch leaves them alone
        # torch's rule: the average over the batch of each instance's mean and unbiased variance
        _, mean, var = _centered_moments(x.detach(), tuple(range(2, x.ndim)))
        m = math.prod(x.shape[2:])
        update_batch_norm_running_stats(running_mean, running_var, mean.mean(0), var.mean(0),
                                        momentum, m)
    return function(x, x.shape[1], weight, bias, eps)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm like ``torch.nn.functional.instance_norm``. x: (N, C, *); the rest (C,).

    use_input_stats=True: each (example, channel) normalized over its positions (through
    ``GroupNormFunction`` with G = C); running statistics, when given, updated in place with the
    batch average of the instance means and unbiased variances. False: the running statistics.
    """
    return _instance_norm(GroupNormFunction.apply, x, running_mean, running_var, weight, bias,
                          use_input_stats, momentum, eps)


def instance_norm_autograd(x, running_mean=None, running_var=None, weight=None, bias=None,
                           use_input_stats=True, momentum=0.1, eps=1e-5):
    """Same as ``instance_norm``, but autograd differentiates the forward composition."""
    return _instance_norm(lambda *args: _group_norm_forward(*args)[0], x, running_mean,
                          running_var, weight, bias, use_input_stats, momentum, eps)


def _rms_norm_args(x, normalized_shape, weight, eps, layer="rms_norm"):
    normalized_shape = check_layer_norm_input(x, normalized_shape, layer)
    if weight is not None and tuple(weight.shape) != normalized_shape:
        raise ValueError(
            f"{layer} expects weight of shape {normalized_shape}, got {tuple(weight.shape)}"
        )
    return normalized_shape, torch.finfo(x.dtype).eps if eps is None else eps


def rms_norm(x, normalized_shape: int | Sequence[int], weight=None, eps=None):
    """RMSNorm like ``torch.nn.functional.rms_norm``, through ``RMSNormFunction``.

    x: (*, *normalized_shape); weight: normalized_shape or None. y = x / sqrt(mean(x^2) + eps)
    * weight over the trailing axes; eps=None means ``torch.finfo(x.dtype).eps``.
    """
    normalized_shape, eps = _rms_norm_args(x, normalized_shape, weight, eps)
    return RMSNormFunction.apply(x, normalized_shape, weight, eps)


def rms_norm_autograd(x, normalized_shape: int | Sequence[int], weight=None, eps=None):
    """Same as ``rms_norm``, but autograd differentiates the forward composition."""
    normalized_shape, eps = _rms_norm_args(x, normalized_shape, weight, eps)
    return _rms_norm_forward(x, normalized_shape, weight, eps)


def _check_conv_weight(w, layer="weight_standardization"):
    check_floating(w, layer)
    check_rank(w, (3, 4, 5), layer, "(C_out, C_in, *kernel), e.g. (C_out, C_in, kh, kw)")


def weight_standardization(w, eps=1e-5):
    """w: (C_out, C_in, kh, kw) -> w_hat, each output filter standardized over its fan-in:
    (w - mean) / sqrt(var + eps), biased variance (the paper's equation), through
    ``WeightStandardizationFunction``."""
    _check_conv_weight(w)
    return WeightStandardizationFunction.apply(w, eps)


def weight_standardization_autograd(w, eps=1e-5):
    """Same as ``weight_standardization``, but autograd differentiates the composition."""
    _check_conv_weight(w)
    return _cast(_standardize_filters(w, eps)[0].view(w.shape), w.dtype)
