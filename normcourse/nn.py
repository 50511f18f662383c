"""Drop-in normalization modules built on ``normcourse.functional``.

``BatchNorm1d``, ``BatchNorm2d`` and ``LayerNorm`` take the same arguments, hold the same parameters
and buffers and produce the same ``state_dict`` keys as their torch.nn namesakes, so a state_dict
moves between the two in both directions. ``BatchRenorm1d`` and ``BatchRenorm2d`` have no torch.nn
counterpart; they follow the batch renormalization paper (Ioffe 2017).

Train or eval comes from ``module.training`` (``model.train()`` / ``model.eval()``), never from
grad mode: ``torch.no_grad()`` in training mode still updates the running statistics, and
``torch.enable_grad()`` in eval mode still normalizes with them.

TorchScript cannot compile an ``autograd.Function``, and torch deprecates it: ``torch.jit.script``
of these modules (or of a model holding one) raises an error that points to ``torch.compile`` and
``torch.export``, which handle them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from normcourse.functional import (
    BatchNormFunction,
    BatchRenormFunction,
    GroupNormFunction,
    LayerNormFunction,
    NotScriptable,
    RMSNormFunction,
    WeightStandardizationFunction,
    check_group_norm_input,
    instance_norm,
    renorm_limits,
)
from normcourse.validation import (
    check_channel_input,
    check_channels,
    check_floating,
    check_groups,
    check_layer_norm_input,
    check_rank,
    check_interval,
    check_same_dtype,
    ShapeError,
)
from normcourse.sync_batch_norm import SyncBatchNorm  # chapter 10; re-exported

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "NoisyBatchNorm1d", "NoisyBatchNorm2d", "LayerNorm", "BatchRenorm1d", "BatchRenorm2d",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "RMSNorm", "WSConv2d", "SyncBatchNorm",
    "PAPER_SCHEDULE", "REFERENCE_RUN_STEPS", "renorm_schedule",
]


class _ChannelNorm(NotScriptable, nn.Module):
    """What batch norm and batch renorm share: gamma/beta, the buffers, the resets, the input check.

    Subclasses set ``_input_ndims`` and ``_input_layouts``: the only difference between a 1d and a
    2d layer.
    """

    _input_ndims: tuple[int, ...] = ()
    _input_layouts: str = ""
    _spread_name: str = ""  # running_var (batch norm) or running_std (batch renorm)
    _version = 2  # the state_dict version of torch's _NormBase (with num_batches_tracked)

    def __init__(self, num_features: int, eps: float, momentum, affine: bool, bias: bool, device, dtype):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _register_running_stats(self, device, dtype):
        """running_mean (zeros), running_var or running_std (ones) and the step count.

        Buffers, not parameters: saved in the state_dict and moved by .to(), never trained.
        """
        self.register_buffer("running_mean", torch.zeros(self.num_features, device=device, dtype=dtype))
        self.register_buffer(self._spread_name, torch.ones(self.num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Back to mean 0, variance (or sigma) 1 and step 0, as torch does."""
        if self.track_running_stats:
            self.running_mean.zero_()
            getattr(self, self._spread_name).fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, gamma to 1 and beta to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor, training: bool) -> None:
        layer = type(self).__name__
        check_channel_input(x, [self.num_features], training, layer, self._input_ndims, self._input_layouts)
        spread = {self._spread_name: getattr(self, self._spread_name)}
        check_same_dtype(x, layer, weight=self.weight, bias=self.bias,
                         running_mean=self.running_mean, **spread)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept state_dicts saved before num_batches_tracked existed, as torch does.

        Version 2 of torch's batch norm added the buffer; a state_dict without it and with
        version metadata below 2, or none (a plain dict), keeps the module's current count.
        """
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            tracked = self.num_batches_tracked
            keep = tracked is not None and tracked.device != torch.device("meta")
            state_dict[key] = tracked if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _BatchNorm(_ChannelNorm):
    """Batch norm (Ioffe & Szegedy 2015) with PyTorch's conventions.

    Args:
        num_features: C, the number of channels (axis 1 of the input).
        eps: added to the variance inside the square root.
        momentum: weight of the new batch in the running averages; None: cumulative average
            (factor 1 / num_batches_tracked).
        affine: learn gamma (``weight``, init 1) and beta (``bias``, init 0).
        bias (keyword only, as in torch >= 2.6): False keeps gamma but drops beta.
        track_running_stats: keep ``running_mean``, ``running_var`` (unbiased) and
            ``num_batches_tracked`` buffers; if False they are None and the batch statistics are
            used in eval mode too.
    """

    _spread_name = "running_var"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, bias, device, dtype)
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self._register_running_stats(device, dtype)
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) or (N, C, L) for BatchNorm1d, (N, C, H, W) for BatchNorm2d; same shape out."""
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        self._check_input(x, use_batch_stats)
        factor = 0.0
        if update:
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative average, the n-th batch gets weight 1/n
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # running statistics are passed only where they are read (eval) or written (update)
        running = (self.running_mean, self.running_var) if (update or not self.training) else (None, None)
        return BatchNormFunction.apply(
            x, *running, self.weight, self.bias, use_batch_stats, factor, self.eps
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs, statistics per channel over N (and L)."""

    _input_ndims = (2, 3)
    _input_layouts = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs, statistics per channel over N, H and W."""

    _input_ndims = (4,)
    _input_layouts = "(N, C, H, W)"


class _NoisyBatchNorm(_BatchNorm):
    """Batch norm followed by per-unit noise that changes at every training step:
    Santurkar et al.'s "noisy BN" (2018, Sec. 2), which *adds* covariate shift.

    In training mode each forward pass draws, for every channel j, a scale
    a_j ~ U(scale_range) and a shift b_j ~ U(shift_range) and returns
    a_j * BN(x)_j + b_j: the next layer sees each unit with a non-zero mean and a
    non-unit variance that jump at every step. Eval mode is plain batch norm. The draws
    come from ``generator`` (a ``torch.Generator``, seeded apart from the global RNG;
    None: the global one) and are kept as ``last_scale`` and ``last_shift`` (C,).
    Other arguments, buffers and the state_dict are batch norm's.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 shift_range=(-1.0, 1.0),
                 scale_range=(0.5, 2.0), generator=None):
        layer = type(self).__name__
        self.shift_range = check_interval(shift_range, "shift_range", layer)
        self.scale_range = check_interval(scale_range, "scale_range", layer, minimum=0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{layer} expects generator to be a torch.Generator or "
                            f"None, got {type(generator).__name__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        self.generator = generator
        self.last_scale = self.last_shift = None

    def extra_repr(self) -> str:
        ranges = f"shift_range={self.shift_range}, scale_range={self.scale_range}"
        return f"{super().extra_repr()}, {ranges}"

    def _uniform(self, interval, x):
        """(C,) values uniform on ``interval``, on the generator's device, x's dtype."""
        device = self.generator.device if self.generator is not None else x.device
        u = torch.rand(self.num_features, generator=self.generator, device=device)
        low, high = interval
        return (low + (high - low) * u).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *) as batch norm's; same shape out, noisy in training mode only."""
        out = super().forward(x)
        if not self.training:
            return out
        self.last_scale = self._uniform(self.scale_range, x)
        self.last_shift = self._uniform(self.shift_range, x)
        shape = (1, -1) + (1,) * (x.dim() - 2)  # one value per channel
        return out * self.last_scale.view(shape) + self.last_shift.view(shape)


class NoisyBatchNorm1d(_NoisyBatchNorm):
    """Noisy batch norm over (N, C) or (N, C, L) inputs (see ``_NoisyBatchNorm``)."""

    _input_ndims = (2, 3)
    _input_layouts = "(N, C) or (N, C, L)"


class NoisyBatchNorm2d(_NoisyBatchNorm):
    """Noisy batch norm over (N, C, H, W) inputs (see ``_NoisyBatchNorm``)."""

    _input_ndims = (4,)
    _input_layouts = "(N, C, H, W)"


class _BatchRenorm(_ChannelNorm):
    """Batch renormalization (Ioffe 2017).

    Training: y = gamma * ((x - mu_B) / sigma_B * r + d) + beta with sigma_B = sqrt(var_B + eps),
    r = clip(sigma_B / running_std, 1/rmax, rmax), d = clip((mu_B - running_mean) / running_std,
    -dmax, dmax), both constants for the gradient and computed from the buffers before this step's
    update; then running_mean += momentum * (mu_B - running_mean) and likewise running_std with
    sigma_B. Eval: y = gamma * (x - running_mean) / running_std + beta; buffers never change.

    The limits follow ``renorm_limits(num_batches_tracked, rmax, dmax, warmup_steps, rmax_steps,
    dmax_steps)`` evaluated at *every* training step (step = batches seen before this one):
    plain batch norm during warm-up, then relaxed linearly. Fixing them once at construction is a
    known mistake. Reading ``num_batches_tracked`` costs one device synchronisation per step.

    How implementations differ:
      - the paper tracks sigma (``running_std``), not the variance, and so do we;
      - Keras (``renorm=True``) tracks a renorm mean and stddev next to its usual moving mean and
        variance, floors the stddev at sqrt(eps) and folds r, d into the affine map
        (scale = r * gamma, offset = d * gamma + beta): the same function, computed in another
        order;
      - we normalize first, then apply r and d, then gamma and beta, as the paper writes it.
        Applying gamma/beta before the r/d correction is a different (wrong) layer.
    """

    _spread_name = "running_std"
    track_running_stats = True  # always: r and d need the running averages

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, rmax=3.0, dmax=5.0,
                 warmup_steps=5000, rmax_steps=40000, dmax_steps=25000, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.rmax, self.dmax = rmax, dmax
        self.warmup_steps, self.rmax_steps, self.dmax_steps = warmup_steps, rmax_steps, dmax_steps
        self._register_running_stats(device, dtype)
        self.reset_parameters()

    def current_limits(self) -> tuple[float, float]:
        """(rmax, dmax) for the next training step, from the schedule and num_batches_tracked."""
        return renorm_limits(
            self.num_batches_tracked, self.rmax, self.dmax,
            self.warmup_steps, self.rmax_steps, self.dmax_steps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
            f"rmax_steps={self.rmax_steps}, dmax_steps={self.dmax_steps}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) or (N, C, L) for BatchRenorm1d, (N, C, H, W) for BatchRenorm2d."""
        self._check_input(x, self.training)
        rmax, dmax = self.current_limits() if self.training else (self.rmax, self.dmax)
        out = BatchRenormFunction.apply(
            x, self.running_mean, self.running_std, self.weight, self.bias,
            self.training, rmax, dmax, self.momentum, self.eps,
        )
        if self.training:
            self.num_batches_tracked.add_(1)
        return out


# The batch renorm paper's schedule (warm-up, dmax reached, rmax reached: BatchRenorm's defaults)
# and the run length we map it onto (our choice, not the paper's: rmax then reaches its final
# value at 80% of a run). Chapter 6's experiments and the exercises both scale it with
# ``renorm_schedule``.
PAPER_SCHEDULE = {"warmup_steps": 5000, "dmax_steps": 25000, "rmax_steps": 40000}
REFERENCE_RUN_STEPS = 50000


def renorm_schedule(steps: int, rmax: float = 3.0, dmax: float = 5.0) -> dict:
    """``BatchRenorm1d``/``BatchRenorm2d`` keyword arguments: the paper's schedule scaled to
    a run of ``steps`` training steps.

    Each step count becomes ``round(count * steps / REFERENCE_RUN_STEPS)`` (at least 1): for
    2,000 steps, warm-up 200, dmax at 1,000, rmax at 1,600.
    """
    scale = steps / REFERENCE_RUN_STEPS
    scaled = {name: max(1, round(count * scale)) for name, count in PAPER_SCHEDULE.items()}
    return {"rmax": rmax, "dmax": dmax, **scaled}


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) inputs."""

    _input_ndims = (2, 3)
    _input_layouts = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over (N, C, H, W) inputs."""

    _input_ndims = (4,)
    _input_layouts = "(N, C, H, W)"


class LayerNorm(NotScriptable, nn.Module):
    """Layer norm (Ba, Kiros & Hinton 2016), arguments and state_dict as torch.nn.LayerNorm.

    x: (*, *normalized_shape); statistics per row over the trailing ``normalized_shape`` axes with
    the biased variance; the same computation in training and evaluation (no buffers).
    ``weight`` (init 1) and ``bias`` (init 0) have shape ``normalized_shape``; ``bias=False`` keeps
    only the gain.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (*, *normalized_shape) -> same shape."""
        layer = type(self).__name__
        normalized_shape = check_layer_norm_input(x, self.normalized_shape, layer)
        check_same_dtype(x, layer, weight=self.weight, bias=self.bias)
        return LayerNormFunction.apply(x, normalized_shape, self.weight, self.bias, self.eps)



# --------------------------------------------------------------------------------------------
# Normalization without the batch (chapter 8)
# --------------------------------------------------------------------------------------------
class GroupNorm(NotScriptable, nn.Module):
    """Group norm (Wu & He 2018), arguments and state_dict as torch.nn.GroupNorm.

    x: (N, C, *). The C channels form ``num_groups`` groups of C/G consecutive channels; each
    example normalizes each group with its own mean and biased variance, then every channel gets
    its own ``weight`` (gamma, init 1) and ``bias`` (beta, init 0). No buffers: the same
    computation in training and evaluation, any batch size. G = 1: layer norm over (C, *) with
    per-channel affine; G = C: instance norm. Unlike torch with ``affine=False``, an input whose
    channel count differs from ``num_channels`` is an error here.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None,
                 *, bias=True):
        super().__init__()
        check_groups(num_channels, num_groups, type(self).__name__)
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_channels, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_channels, **factory)) if affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *) -> same shape."""
        layer = type(self).__name__
        check_group_norm_input(x, self.num_groups, self.weight, self.bias, layer)
        check_channels(x, self.num_channels, layer)
        check_same_dtype(x, layer, weight=self.weight, bias=self.bias)
        return GroupNormFunction.apply(x, self.num_groups, self.weight, self.bias, self.eps)


class _InstanceNorm(_ChannelNorm):
    """Instance norm (Ulyanov et al. 2016) with torch.nn.InstanceNorm's arguments and semantics.

    Each channel of each example is normalized over its own positions. The defaults differ from
    batch norm's: ``affine=False`` and ``track_running_stats=False`` (then there are no buffers
    and evaluation uses the instance statistics too). With ``track_running_stats=True``,
    training updates ``running_mean`` / ``running_var`` with the batch average of the instance
    means and unbiased variances (momentum as in batch norm; ``momentum=None`` means 0 here, no
    update, as in torch) and evaluation normalizes with them. ``num_batches_tracked`` is
    registered for state_dict compatibility but, as in torch, never incremented. An input
    without the batch axis, (C, L) or (C, H, W), is normalized as a batch of one.
    """

    _version = 2
    _spread_name = "running_var"
    _no_batch_ndim = 0

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, bias, device, dtype)
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self._register_running_stats(device, dtype)
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    extra_repr = _BatchNorm.extra_repr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *spatial) or (C, *spatial) -> same shape."""
        layer = type(self).__name__
        check_floating(x, layer)
        check_rank(x, self._input_ndims, layer, self._input_layouts)
        channel_axis = x.ndim - self._no_batch_ndim
        if x.shape[channel_axis] != self.num_features:
            if self.affine or self.track_running_stats:
                raise ShapeError(
                    f"{layer}(num_features={self.num_features}) got {x.shape[channel_axis]} "
                    f"channels in axis {channel_axis} of an input of shape {tuple(x.shape)}"
                )
            warnings.warn(  # torch's behaviour: num_features is unused without affine or stats
                f"input's size at dim={channel_axis} does not match num_features. You can "
                "silence this warning by not passing in num_features, which is not used "
                "because affine=False", stacklevel=2)
        # torch's instance norm silently mixes dtypes with its running statistics; ours
        # refuses, as our batch norm does (tests/test_conformance.py: DELIBERATE)
        check_same_dtype(x, layer, weight=self.weight, bias=self.bias,
                         running_mean=self.running_mean, running_var=self.running_var)
        unbatched = x.ndim == self._no_batch_ndim
        out = instance_norm(
            x.unsqueeze(0) if unbatched else x, self.running_mean, self.running_var,
            self.weight, self.bias, self.training or not self.track_running_stats,
            0.0 if self.momentum is None else self.momentum, self.eps,
        )
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(_InstanceNorm):
    """Instance norm over (N, C, L) inputs (or (C, L) without the batch axis)."""

    _input_ndims = (2, 3)
    _input_layouts = "(N, C, L) or (C, L)"
    _no_batch_ndim = 2


class InstanceNorm2d(_InstanceNorm):
    """Instance norm over (N, C, H, W) inputs (or (C, H, W) without the batch axis)."""

    _input_ndims = (3, 4)
    _input_layouts = "(N, C, H, W) or (C, H, W)"
    _no_batch_ndim = 3


class RMSNorm(NotScriptable, nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), arguments and state_dict as torch.nn.RMSNorm.

    x: (*, *normalized_shape); y = x / sqrt(mean(x^2) + eps) * weight over the trailing axes:
    layer norm without the re-centring and without a bias. ``eps=None`` (the default) means
    ``torch.finfo(x.dtype).eps``, decided at each call from the input's dtype.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (*, *normalized_shape) -> same shape."""
        shape = check_layer_norm_input(x, self.normalized_shape, type(self).__name__)
        check_same_dtype(x, type(self).__name__, weight=self.weight)  # torch mixes; see DELIBERATE
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return RMSNormFunction.apply(x, shape, self.weight, eps)


class WSConv2d(NotScriptable, nn.Conv2d):
    """A Conv2d whose weights are standardized per output filter (Qiao et al. 2019).

    Same arguments, parameters and state_dict as torch.nn.Conv2d, plus ``ws_eps`` (keyword
    only). The stored ``weight`` is the free parameter; each forward convolves with
    w_hat = (w - mean) / sqrt(var + ws_eps), mean and biased variance over each filter's
    C_in/groups * kh * kw weights (``WeightStandardizationFunction``). Meant to be followed by
    a normalization layer (group norm, batch norm): w_hat fixes the scale of the output only
    up to the input's.
    """

    def __init__(self, *args, ws_eps=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.ws_eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W) or (C_in, H, W) -> (N, C_out, H', W')."""
        layer = type(self).__name__
        check_floating(x, layer)
        check_rank(x, (3, 4), layer, "(N, C_in, H, W) or (C_in, H, W)")
        if x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{layer}(in_channels={self.in_channels}) got {x.shape[-3]} channels in axis "
                f"{x.ndim - 3} of an input of shape {tuple(x.shape)}"
            )
        check_same_dtype(x, layer, weight=self.weight, bias=self.bias)
        weight = WeightStandardizationFunction.apply(self.weight, self.ws_eps)
        return self._conv_forward(x, weight, self.bias)
