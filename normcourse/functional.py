"""Batch norm, layer norm and batch renorm in PyTorch, with the backward pass written by hand.

Each layer comes twice:

- an ``autograd.Function`` (``BatchNormFunction``, ``LayerNormFunction``, ``BatchRenormFunction``)
  whose ``backward`` is the closed-form gradient derived in the book. It saves only the input and
  two numbers per channel (or per row), not every intermediate of the forward pass, so it needs
  less memory than letting autograd record the graph;
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

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from normcourse.validation import (
    check_batch_statistics,
    check_channels,
    check_floating,
    check_normalized_shape,
    check_rank,
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
    "batch_moments",
    "update_batch_norm_running_stats",
    "check_channel_input",
    "check_layer_norm_input",
]

CHANNEL_NDIMS = (2, 3, 4)
CHANNEL_LAYOUTS = "(N, C), (N, C, L) or (N, C, H, W)"


# --------------------------------------------------------------------------------------------
# Small helpers shared by the Functions and the compositions
# --------------------------------------------------------------------------------------------
def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (their sums would lose digits), else the input's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The axes batch norm averages over: every axis but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector ``(C,)`` as ``(1, C, 1, ...)`` so that it broadcasts against x."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _values_per_channel(x: torch.Tensor) -> int:
    """m: how many numbers one channel's statistics are computed from (N, N*L or N*H*W)."""
    return x.numel() // x.shape[1]


def _scale_shift(xhat: torch.Tensor, weight, bias, view) -> torch.Tensor:
    """gamma * xhat + beta, either of them optional; ``view`` shapes them for broadcasting."""
    out = xhat
    if weight is not None:
        out = out * view(weight.to(xhat.dtype))
    if bias is not None:
        out = out + view(bias.to(xhat.dtype))
    return out


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x: (N, C, *) -> (C,), (C,).

    ``torch.var_mean`` never forms E[x^2] - E[x]^2 (which cancels catastrophically when the mean is
    large); half-precision inputs are accumulated in float32.
    """
    var, mean = torch.var_mean(x.to(_stats_dtype(x)), dim=_reduce_dims(x), correction=0)
    return mean, var


def _update_running_average(running: torch.Tensor, batch_value: torch.Tensor, momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch_value, in place, outside autograd."""
    with torch.no_grad():
        running.mul_(1.0 - momentum).add_(batch_value.detach().to(running.dtype), alpha=momentum)


def update_batch_norm_running_stats(running_mean, running_var, mean, var, momentum, m) -> None:
    """PyTorch's update: the mean as is, the variance made unbiased with m / (m - 1) first."""
    _update_running_average(running_mean, mean, momentum)
    _update_running_average(running_var, var * (m / (m - 1)), momentum)


def renorm_correction(mean, sigma, running_mean, running_std, rmax, dmax):
    """Batch renorm's r = clip(sigma_B / sigma, 1/rmax, rmax), d = clip((mu_B - mu) / sigma, +-dmax).

    All arguments are per-channel vectors ``(C,)``. The result is detached: the paper treats r and d
    as constants for the gradient (stop_gradient).
    """
    with torch.no_grad():
        running_std = running_std.to(sigma.dtype)
        r = (sigma / running_std).clamp(1.0 / rmax, rmax)
        d = ((mean - running_mean.to(mean.dtype)) / running_std).clamp(-dmax, dmax)
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
def _batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """Returns (out, mean, invstd); mean and invstd ``(C,)`` in the statistics dtype."""
    if training:
        mean, var = batch_moments(x)
        if running_mean is not None:
            update_batch_norm_running_stats(
                running_mean, running_var, mean, var, momentum, _values_per_channel(x)
            )
    else:
        # a copy, so that a later in-place update of the buffer cannot alter what backward reads
        mean = running_mean.to(_stats_dtype(x), copy=True)
        var = running_var.to(_stats_dtype(x))
    invstd = torch.rsqrt(var + eps)
    view = lambda v: _per_channel(v, x)  # noqa: E731
    xhat = (x.to(mean.dtype) - view(mean)) * view(invstd)
    return _scale_shift(xhat, weight, bias, view).to(x.dtype), mean, invstd


def _batch_renorm_forward(x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps):
    """Returns (out, mean, invstd, r, d); r and d are None in eval mode.

    Order matters (a known mistake is to get it wrong): normalize with the batch statistics, then
    correct with r and d, then apply gamma and beta. r and d come from the running averages
    *before* this step's update.
    """
    view = lambda v: _per_channel(v, x)  # noqa: E731
    if training:
        mean, var = batch_moments(x)
        sigma = torch.sqrt(var + eps)
        r, d = renorm_correction(mean, sigma, running_mean, running_std, rmax, dmax)
        _update_running_average(running_mean, mean, momentum)
        _update_running_average(running_std, sigma, momentum)
        invstd = 1.0 / sigma
        xhat = (x.to(mean.dtype) - view(mean)) * view(invstd) * view(r) + view(d)
    else:
        # inference: y = gamma * (x - mu) / sigma + beta, no eps (sigma already includes it)
        mean = running_mean.to(_stats_dtype(x), copy=True)
        invstd = 1.0 / running_std.to(_stats_dtype(x))
        r = d = None
        xhat = (x.to(mean.dtype) - view(mean)) * view(invstd)
    return _scale_shift(xhat, weight, bias, view).to(x.dtype), mean, invstd, r, d


def _normalized_dims(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def _layer_norm_forward(x, normalized_shape, weight, bias, eps):
    """Returns (out, mean, rstd); mean and rstd have x's shape with the normalized axes kept as 1."""
    var, mean = torch.var_mean(
        x.to(_stats_dtype(x)), dim=_normalized_dims(x, normalized_shape), correction=0, keepdim=True
    )
    rstd = torch.rsqrt(var + eps)
    xhat = (x.to(mean.dtype) - mean) * rstd
    # weight and bias have shape normalized_shape: they broadcast against the trailing axes as is
    return _scale_shift(xhat, weight, bias, lambda v: v).to(x.dtype), mean, rstd


# --------------------------------------------------------------------------------------------
# Closed-form backward passes
# --------------------------------------------------------------------------------------------
def _per_channel_backward(needs, dy, x, weight, mean, invstd, batch_stats, r=None, d=None):
    """Gradients of y = gamma * (xhat * r + d) + beta, xhat = (x - mean) * invstd, per channel.

    Batch statistics (``batch_stats=True``), with N = values per channel and gamma' = gamma * r:
        dx = gamma' * invstd / N * (N * dy - sum(dy) - xhat * sum(dy * xhat))
    Fixed statistics (eval mode): dx = dy * gamma * invstd.
    dgamma = sum(dy * (xhat * r + d)), dbeta = sum(dy). Batch norm is r = 1, d = 0.
    """
    need_dx, need_dweight, need_dbias = needs
    view = lambda v: _per_channel(v, x)  # noqa: E731
    dims = _reduce_dims(x)
    dy = dy.to(mean.dtype)
    xhat = (x.to(mean.dtype) - view(mean)) * view(invstd)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)

    dx = dweight = dbias = None
    if need_dx:
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        if r is not None:
            scale = scale * r
        if batch_stats:
            n = _values_per_channel(x)
            dx = view(scale) * (dy - view(sum_dy / n) - xhat * view(sum_dy_xhat / n))
        else:
            dx = dy * view(scale)
        dx = dx.to(x.dtype)
    if need_dweight and weight is not None:
        dweight = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
        dweight = dweight.to(weight.dtype)
    if need_dbias:
        dbias = sum_dy
    return dx, dweight, dbias


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with the closed-form backward. x: (N, C, *); weight, bias, running stats: (C,).

    Saves x, the per-channel mean and invstd (and gamma): backward recomputes xhat from them.
    Running statistics are updated in place in the forward pass (training mode only).
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        out, mean, invstd = _batch_norm_forward(
            x, running_mean, running_var, weight, bias, training, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training = training
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dweight, dbias = _per_channel_backward(needs, dy, x, weight, mean, invstd, ctx.training)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        # no gradient for the running statistics, training, momentum, eps
        return dx, None, None, dweight, dbias, None, None, None


class BatchRenormFunction(torch.autograd.Function):
    """Batch renormalization with the closed-form backward. x: (N, C, *); the rest: (C,).

    r and d are constants for the gradient, so dx is batch norm's backward with gamma * r and
    dgamma = sum(dy * (r * xhat_B + d)). In eval mode it is an affine map of x.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps):
        out, mean, invstd, r, d = _batch_renorm_forward(
            x, running_mean, running_std, weight, bias, training, rmax, dmax, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd, r, d)
        ctx.training = training
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dweight, dbias = _per_channel_backward(
            needs, dy, x, weight, mean, invstd, ctx.training, r, d
        )
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, None, None, dweight, dbias, None, None, None, None, None


class LayerNormFunction(torch.autograd.Function):
    """Layer norm with the closed-form backward. x: (*, *normalized_shape); weight, bias:
    normalized_shape.

    Per row, with g = dy * gamma and H = prod(normalized_shape):
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        out, mean, rstd = _layer_norm_forward(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.normalized_shape = tuple(normalized_shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dims = _normalized_dims(x, ctx.normalized_shape)
        leading = tuple(range(x.ndim - len(ctx.normalized_shape)))
        dy32 = dy.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean) * rstd

        def sum_over_rows(t):  # sum(dim=()) would sum everything, hence the guard
            return t.sum(leading) if leading else t

        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            g = dy32 if weight is None else dy32 * weight.to(mean.dtype)
            dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[2]:
            dweight = sum_over_rows(dy32 * xhat).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            dbias = sum_over_rows(dy32).to(ctx.bias_dtype)
        return dx, None, dweight, dbias, None


# --------------------------------------------------------------------------------------------
# Input checks (through normcourse.validation) and the public wrappers
# --------------------------------------------------------------------------------------------
def check_channel_input(x, channel_counts, training, layer, ndims=CHANNEL_NDIMS, layouts=CHANNEL_LAYOUTS):
    """Validate a batch norm / renorm input x: (N, C, *).

    ``channel_counts``: the C each per-channel tensor (or the module) expects. Raises TypeError for
    a non-floating input, ValueError for a wrong rank, a channel count that differs, or one value
    per channel in training mode.
    """
    check_floating(x, layer)
    check_rank(x, ndims, layer, layouts)
    for count in channel_counts:
        check_channels(x, count, layer)
    if training:
        check_batch_statistics(x, layer)


def _channel_counts(*per_channel) -> list[int]:
    return [t.numel() for t in per_channel if t is not None]


def _check_running_pair(first, second, names, layer, required_because):
    """Both running statistics or neither; ``required_because`` (a phrase) when they must be given."""
    if (first is None) != (second is None):
        raise ValueError(f"{layer} needs both {names[0]} and {names[1]}, or neither")
    if required_because and first is None:
        raise ValueError(f"{layer} needs {names[0]} and {names[1]} {required_because}")


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, training):
    _check_running_pair(
        running_mean, running_var, ("running_mean", "running_var"), "batch_norm",
        None if training else "in eval mode (training=False)",
    )
    check_channel_input(x, _channel_counts(running_mean, running_var, weight, bias), training, "batch_norm")


def _check_batch_renorm_args(x, running_mean, running_std, weight, bias, training):
    _check_running_pair(
        running_mean, running_std, ("running_mean", "running_std"), "batch_renorm",
        "(r and d are computed from them)",
    )
    check_channel_input(x, _channel_counts(running_mean, running_std, weight, bias), training, "batch_renorm")


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


def check_layer_norm_input(x, normalized_shape, layer="layer_norm") -> tuple[int, ...]:
    """Validate and return normalized_shape as a tuple (an int means one trailing axis)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(n) for n in normalized_shape)
    check_floating(x, layer)
    check_normalized_shape(x, normalized_shape, layer)
    return normalized_shape


def layer_norm(x, normalized_shape: int | Sequence[int], weight=None, bias=None, eps=1e-5):
    """Layer norm like ``torch.nn.functional.layer_norm``, through ``LayerNormFunction``.

    x: (*, *normalized_shape); weight, bias: normalized_shape or None. Statistics per row over the
    trailing axes, biased variance; the same computation in training and evaluation.
    """
    normalized_shape = check_layer_norm_input(x, normalized_shape)
    return LayerNormFunction.apply(x, normalized_shape, weight, bias, eps)


def layer_norm_autograd(x, normalized_shape: int | Sequence[int], weight=None, bias=None, eps=1e-5):
    """Same as ``layer_norm``, but autograd differentiates the forward composition."""
    normalized_shape = check_layer_norm_input(x, normalized_shape)
    return _layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]

