"""Synchronized batch norm: one batch split over several processes, normalized as one batch.

With data parallelism each worker (process) holds a slice of the global batch. Plain batch norm
normalizes every slice with its own mean and variance; ``SyncBatchNorm`` normalizes it with the
statistics of the *whole* batch, so that k workers compute exactly what one process would compute
on the concatenated batch. That costs one collective in the forward pass (the per-channel
statistics) and one in the backward pass (two per-channel gradient sums).

It works with any ``torch.distributed`` backend: gloo on CPUs (torch's own ``SyncBatchNorm``
refuses CPU tensors in a multi-process group) or on CUDA tensors, and nccl on GPUs (one process
per GPU). Nothing here names a device: every tensor a collective sees is built from the input
(``torch.cat`` of its statistics, ``empty_like`` for the gathered parts), so it has the input's
device and dtype, and it has the same size (C or 2C + 1 numbers) on every worker whatever the
slice sizes, as nccl's all_gather requires. The counts travel with the statistics as
floating-point numbers: exact up to 2^24 values per channel in float32 (float16/bfloat16 input
is promoted to float32 first), beyond that off by float32 rounding, as the sums are anyway.

Two ways to combine the workers' statistics (``statistics=``):

- ``"sums"``: all-reduce (count, sum, sum of squares) per channel, then
  var = E[x^2] - E[x]^2. One all-reduce of 2C + 1 numbers, but the subtraction cancels
  catastrophically in float32 when the mean is large next to the spread;
- ``"chan"`` (default): every worker computes its count, mean and M2 = sum((x - mean)^2) in two
  passes; the workers all-gather them and merge them pairwise with Chan, Golub & LeVeque's
  (1979) update. World size x (2C + 1) numbers, numerically stable.

Conventions as ``torch.nn.SyncBatchNorm``: the parameter gradients returned are each worker's
*local* sums (DistributedDataParallel then averages them across workers, as it does for every
parameter); the running statistics are updated with the global mean and the unbiased global
variance (factor n / (n - 1), n the global count), identically on every worker. Without an
initialized process group, with a world size of 1, or in eval mode it is plain batch norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normcourse.functional import (BatchNormFunction, NotScriptable,
                                   update_batch_norm_running_stats)
from normcourse.validation import (
    check_channel_input,
    check_choice,
    check_collective_device,
    check_global_batch_statistics,
    check_same_dtype,
)

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "STATISTICS",
    "merge_moments",
    "local_moments",
    "global_moments",
    "world_size",
]

STATISTICS = ("chan", "sums")
SYNC_NDIMS = (2, 3, 4, 5)
SYNC_LAYOUTS = "(N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)"


def world_size(group=None) -> int:
    """Processes in ``group`` (None: the default group); 1 without an initialized group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis 1: the axes the statistics are taken over."""
    return (0,) + tuple(range(2, x.ndim))


def _count(x: torch.Tensor) -> torch.Tensor:
    """(1,) tensor: this worker's number of values per channel, in x's dtype and device."""
    return torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...): broadcasts against an input with ``ndim`` axes."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def _statistics_dtype(x: torch.Tensor) -> torch.Tensor:
    """x itself, or x in float32 if it is float16/bfloat16 (their sums would lose digits)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This worker's (count, mean, M2) per channel, M2 = sum of squared deviations.

    x: (N, C, *) -> count: (1,), mean: (C,), m2: (C,), in x's dtype. Two passes (the mean
    first), the stable way. A worker with no examples returns count 0, mean 0 and M2 0.
    """
    count, dims = _count(x), _reduce_dims(x)
    if x.numel() == 0:
        zeros = x.new_zeros(x.shape[1])
        return count, zeros, zeros.clone()
    mean = x.mean(dims)
    centered = x - _per_channel(mean, x.ndim)
    m2 = (centered * centered).sum(dims)
    return count, mean, m2


def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan, Golub & LeVeque (1979): the (count, mean, M2) of two parts taken together.

    With delta = mean_b - mean_a and n = n_a + n_b:
        mean = mean_a + delta * n_b / n,
        M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
    Only differences of means enter, never a difference of two large sums of squares.
    Either part may be empty (count 0).
    """
    count = count_a + count_b
    share_b = count_b / count.clamp(min=1)  # n_b / n, and 0 when both parts are empty
    delta = mean_b - mean_a
    mean = mean_a + delta * share_b
    m2 = m2_a + m2_b + delta * delta * count_a * share_b
    return count, mean, m2


def _gather_and_merge(x: torch.Tensor, group):
    """statistics="chan": all-gather every worker's (count, mean, M2) and merge in rank order."""
    c = x.shape[1]
    local = torch.cat(local_moments(x))  # (2C + 1,)
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=group)
    count, mean, m2 = parts[0][:1], parts[0][1 : c + 1], parts[0][c + 1 :]
    for part in parts[1:]:
        count, mean, m2 = merge_moments(count, mean, m2, part[:1], part[1 : c + 1], part[c + 1 :])
    return count, mean, m2 / count.clamp(min=1)


def _all_reduce_sums(x: torch.Tensor, group):
    """statistics="sums": all-reduce (count, sum, sum of squares); var = E[x^2] - E[x]^2."""
    dims = _reduce_dims(x)
    sums = torch.cat((_count(x), x.sum(dims), (x * x).sum(dims)))  # (2C + 1,)
    dist.all_reduce(sums, group=group)
    c = x.shape[1]
    count = sums[:1]
    mean = sums[1 : c + 1] / count.clamp(min=1)
    # cancellation can leave a tiny negative number where the true variance is ~0
    var = (sums[c + 1 :] / count.clamp(min=1) - mean * mean).clamp_(min=0)
    return count, mean, var


def global_moments(x: torch.Tensor, group=None, statistics: str = "chan"):
    """(count, mean, biased var) per channel over the slices of every worker in ``group``.

    x: this worker's slice (N_i, C, *); N_i may differ between workers and may be 0.
    Returns count: (1,), mean: (C,), var: (C,), identical on every worker, in x's dtype
    (float32 for float16/bfloat16 x: their sums would lose digits, their counts too above
    2048 or 256). One collective.
    """
    check_choice(statistics, STATISTICS, "statistics")
    x = _statistics_dtype(x)
    if statistics == "sums":
        return _all_reduce_sums(x, group)
    return _gather_and_merge(x, group)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with statistics over all workers, closed-form backward. x: (N_i, C, *)

    Forward: global mean and variance (one collective), then y = gamma * xhat + beta.
    Backward: with n the global count, the batch-norm gradient
        dx = gamma * invstd * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n)
    needs the two sums over the *whole* batch: one all-reduce of 2C numbers.
    dgamma, dbeta: this worker's sums (DistributedDataParallel averages them).
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, momentum, eps, group,
                statistics):
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype)
        x = _statistics_dtype(x)  # float16/bfloat16: statistics and output math in float32
        count, mean, var = global_moments(x, group, statistics)
        n = int(count.item())
        check_global_batch_statistics(n, tuple(x.shape), "SyncBatchNorm")
        if running_mean is not None:
            update_batch_norm_running_stats(
                running_mean, running_var, mean, var, momentum, n)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        out = x * _per_channel(scale, x.ndim) + _per_channel(shift, x.ndim)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = n, group
        return out.to(ctx.dtypes[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dims = _reduce_dims(x)
        centered = x - _per_channel(mean, x.ndim)
        sum_dy = dy.sum(dims)  # (C,) local
        sum_dy_xmu = (dy * centered).sum(dims)  # (C,) local: sum(dy * (x - mean))
        dweight = (sum_dy_xmu * invstd).to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None
        dbias = sum_dy.to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
        dx = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat((sum_dy, sum_dy_xmu))
            dist.all_reduce(sums, group=ctx.group)  # the two sums over the whole batch
            c, n = x.shape[1], ctx.count
            mean_dy, mean_dy_xmu = sums[:c] / n, sums[c:] / n
            k = invstd if weight is None else invstd * weight
            dx = dy - _per_channel(mean_dy, x.ndim)
            dx = dx - centered * _per_channel(invstd * invstd * mean_dy_xmu, x.ndim)
            dx = (dx * _per_channel(k, x.ndim)).to(ctx.dtypes[0])
        return dx, None, None, dweight, dbias, None, None, None, None


class SyncBatchNorm(NotScriptable, _TorchBatchNorm):
    """Batch norm whose training statistics span every process of ``process_group``.

    Same arguments, parameters, buffers and state_dict keys as ``torch.nn.SyncBatchNorm``
    (``tests/test_conformance.py`` compares the two wherever torch's runs on a CPU);
    ``statistics`` (keyword only: ``"chan"`` or ``"sums"``) picks how the workers' statistics
    are combined (see the module docstring). x: (N, C, *) with 1 to 3 trailing axes.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 *, bias=True, statistics="chan"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        check_choice(statistics, STATISTICS, "statistics")
        self.process_group = process_group
        self.statistics = statistics

    def _check_input_dim(self, x):
        check_channel_input(x, [], False, type(self).__name__, SYNC_NDIMS, SYNC_LAYOUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *) -> same shape; N may differ between workers (and be 0 on some)."""
        use_batch_stats = self.training or self.running_mean is None
        sync = self.training and world_size(self.process_group) > 1
        if sync:
            check_collective_device(x, dist.get_backend(self.process_group),
                                    type(self).__name__)
        # with synchronization the batch-of-one check is done on the global count instead
        check_channel_input(x, [self.num_features], use_batch_stats and not sync,
                            type(self).__name__, SYNC_NDIMS, SYNC_LAYOUTS)
        check_same_dtype(x, type(self).__name__, weight=self.weight, bias=self.bias,
                         running_mean=self.running_mean, running_var=self.running_var)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative average, the n-th batch gets weight 1/n (read only then:
            # reading the counter as a number is data-dependent for torch.export)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        updating = self.training and self.track_running_stats
        reads = updating or not self.training
        running = (self.running_mean, self.running_var) if reads else (None, None)
        if not sync:
            return BatchNormFunction.apply(x, *running, self.weight, self.bias,
                                           use_batch_stats, factor, self.eps)
        return SyncBatchNormFunction.apply(x, *running, self.weight, self.bias, factor,
                                           self.eps, self.process_group, self.statistics)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch-norm layer in ``module`` (normcourse's and torch's) by this one.

        The new layer takes over the old one's parameters (the same Parameter objects, so an
        optimizer built before still updates them), buffers and train/eval mode. Returns the
        converted module (``module`` itself changed in place, or the new layer if ``module``
        is a batch-norm layer).
        """
        if _is_batch_norm(module):
            return cls._from_batch_norm(module, process_group)
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                setattr(module, name, converted)
        return module

    @classmethod
    def _from_batch_norm(cls, old: nn.Module, process_group) -> SyncBatchNorm:
        reference = old.weight if old.weight is not None else old.running_mean
        factory = {} if reference is None else {"device": reference.device,
                                                 "dtype": reference.dtype}
        new = cls(old.num_features, old.eps, old.momentum, old.affine,
                  old.track_running_stats, process_group, bias=old.bias is not None,
                  statistics=getattr(old, "statistics", "chan"), **factory)
        if old.affine:
            new.weight = old.weight
            new.bias = old.bias
        if old.track_running_stats:
            new.running_mean = old.running_mean
            new.running_var = old.running_var
            new.num_batches_tracked = old.num_batches_tracked
        new.train(old.training)
        return new


def _is_batch_norm(module: nn.Module) -> bool:
    """Batch norm of any kind: torch's (_BatchNorm, SyncBatchNorm, ours) and normcourse.nn's.

    normcourse.nn re-exports this module, so it cannot be imported here (a cycle): its batch
    norms are recognized as the channel norms whose spread buffer is ``running_var`` (batch
    renorm keeps ``running_std`` and is left alone).
    """
    if isinstance(module, _TorchBatchNorm):
        return True
    return (type(module).__module__ == "normcourse.nn"
            and getattr(module, "_spread_name", None) == "running_var")
