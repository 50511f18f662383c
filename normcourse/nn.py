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

import torch
from torch import nn

from normcourse.functional import (
    BatchNormFunction,
    BatchRenormFunction,
    LayerNormFunction,
    renorm_limits,
)
from normcourse.validation import check_channel_input, check_layer_norm_input, check_same_dtype

__all__ = ["BatchNorm1d", "BatchNorm2d", "LayerNorm", "BatchRenorm1d", "BatchRenorm2d"]


class _NotScriptable:
    """Mixin: a clear error from ``torch.jit.script`` instead of a TorchScript parse error."""

    def __prepare_scriptable__(self):  # called by torch.jit.script on every submodule
        raise RuntimeError(
            f"normcourse.nn.{type(self).__name__} cannot be compiled by torch.jit.script: it runs "
            "a torch.autograd.Function, which TorchScript does not support (and TorchScript is "
            "deprecated). Use torch.compile(model) or torch.export.export(model, args) instead."
        )


class _ChannelNorm(_NotScriptable, nn.Module):
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


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) inputs."""

    _input_ndims = (2, 3)
    _input_layouts = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over (N, C, H, W) inputs."""

    _input_ndims = (4,)
    _input_layouts = "(N, C, H, W)"


class LayerNorm(_NotScriptable, nn.Module):
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

