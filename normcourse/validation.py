"""Input checks shared by the NumPy reference, the autograd Functions and the modules.

Every normalization layer in the package validates its input here, so that a student who passes a
wrong shape, an integer array or a batch of one gets one clear sentence naming the problem instead
of a broadcasting error ten frames deep. The functions accept NumPy arrays and torch tensors alike.

The exceptions are Python's natural ones (``TypeError`` for a dtype, ``ValueError`` for a shape),
as ``ShapeError`` and ``DtypeError``, which are also the exception type torch.nn raises for the
same input (``RuntimeError``, ``NotImplementedError``): an ``except`` clause written for
torch.nn catches ours too, so the modules stay drop-in replacements.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ShapeError",
    "DtypeError",
    "check_floating",
    "check_same_dtype",
    "check_finite",
    "check_rank",
    "check_channels",
    "check_batch_statistics",
    "check_global_batch_statistics",
    "check_normalized_shape",
    "check_choice",
    "check_backend",
    "check_collective_device",
    "BACKENDS",
    "check_interval",
    "check_running_pair",
    "check_channel_input",
    "check_layer_norm_input",
    "check_groups",
]

CHANNEL_NDIMS = (2, 3, 4)
CHANNEL_LAYOUTS = "(N, C), (N, C, L) or (N, C, H, W)"


class ShapeError(ValueError, RuntimeError):
    """A wrong rank, channel count or trailing shape (torch.nn raises RuntimeError for some)."""


class DtypeError(TypeError, NotImplementedError):
    """A non-floating input or mixed dtypes (torch.nn: NotImplementedError or RuntimeError)."""


def _is_floating(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return np.issubdtype(np.asarray(x).dtype, np.floating)


def check_floating(x, layer: str) -> None:
    """Raise TypeError unless ``x`` holds floating-point numbers.

    Integer images (uint8 MNIST pixels, say) must be converted first: normalizing them in integer
    arithmetic would silently truncate every value.
    """
    if not _is_floating(x):
        dtype = getattr(x, "dtype", type(x).__name__)
        raise DtypeError(
            f"{layer} expects a floating-point input, got dtype {dtype}; "
            "convert it first (x.float() in PyTorch, x.astype(np.float64) in NumPy)"
        )


def check_finite(x, layer: str) -> None:
    """Raise ValueError if ``x`` holds NaN or infinity (used by the NumPy reference only).

    The PyTorch Functions and modules let NaN propagate, as torch.nn does: checking every batch
    would cost a full reduction and a device synchronisation per call.
    """
    finite = torch.isfinite(x).all().item() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not finite:
        raise ValueError(f"{layer} got non-finite values (NaN or inf) in its input")


def check_rank(x, allowed_ndims: tuple[int, ...], layer: str, expected: str) -> None:
    """Raise ValueError unless ``x.ndim`` is one of ``allowed_ndims``.

    ``expected`` describes the accepted layouts for the message, e.g. ``"(N, C) or (N, C, L)"``.
    """
    if x.ndim not in allowed_ndims:
        raise ShapeError(f"{layer} expects input of shape {expected}, got shape {tuple(x.shape)}")


def check_channels(x, num_features: int, layer: str) -> None:
    """Raise ValueError unless axis 1 of ``x`` has ``num_features`` channels."""
    if x.shape[1] != num_features:
        raise ShapeError(
            f"{layer}(num_features={num_features}) got {x.shape[1]} channels in axis 1 "
            f"of an input of shape {tuple(x.shape)}"
        )


def check_batch_statistics(x, layer: str) -> None:
    """Raise ValueError when training-mode statistics would be computed from one value per channel.

    With a single value the batch variance is 0 and every output equals beta: the layer would train
    on garbage. The message begins like PyTorch's so that users can search for either. An empty
    batch passes: the layer returns an empty output and leaves its statistics alone, as in torch.
    """
    values_per_channel = math.prod(x.shape) // x.shape[1]
    if values_per_channel == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)} in {layer}: use a batch of at least 2 examples, or call .eval() "
            "to normalize with the running statistics"
        )


def check_global_batch_statistics(count: int, local_shape: tuple, layer: str) -> None:
    """Like ``check_batch_statistics`` for a batch split over workers: ``count`` is the number of
    values per channel over *all* workers (one worker may hold none, the whole batch may not)."""
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} over all workers "
            f"(this worker's input has shape {local_shape}) in {layer}: use a larger global batch, "
            "or call .eval() to normalize with the running statistics"
        )


def check_normalized_shape(x, normalized_shape: tuple[int, ...], layer: str) -> None:
    """Raise ValueError unless the trailing dimensions of ``x`` equal ``normalized_shape``."""
    k = len(normalized_shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != tuple(normalized_shape):
        raise ShapeError(
            f"{layer}(normalized_shape={tuple(normalized_shape)}) expects input whose last {k} "
            f"dimension(s) are {tuple(normalized_shape)}, got shape {tuple(x.shape)}"
        )


def check_choice(value, choices, what: str) -> None:
    """Raise ValueError naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {what} {value!r}; choose one of {valid}")


BACKENDS = ("gloo", "nccl")  # the torch.distributed backends the package starts workers with


def check_backend(backend: str, processes: int, where: str) -> None:
    """Raise unless ``backend`` can join ``processes`` processes on this machine.

    "gloo" always can (CPU tensors; CUDA tensors too, copied through host memory). "nccl" needs
    a torch built with nccl and one CUDA device per process (nccl refuses two ranks of a group on
    one GPU). An unknown name raises ValueError; nccl unusable here raises RuntimeError (the type
    torch raises when it finds out later, in every worker, with a longer traceback).
    """
    check_choice(backend, BACKENDS, "backend")
    if backend != "nccl":
        return
    if not (dist.is_available() and dist.is_nccl_available()):
        raise RuntimeError(
            f"{where}: backend 'nccl' is not available in this torch build ({torch.__version__}); "
            "use backend='gloo', which runs on CPUs (and on CUDA tensors), or a CUDA build of torch"
        )
    devices = torch.cuda.device_count()
    if devices < processes:
        fewer = f"start at most {devices} per machine, or " if devices else ""
        raise RuntimeError(
            f"{where}: backend 'nccl' needs one CUDA device per process, but {processes} "
            f"processes were asked for and {devices} CUDA device(s) are visible; {fewer}use "
            "backend='gloo'"
        )


def check_collective_device(x, backend: str, layer: str) -> None:
    """Raise ValueError if ``x`` cannot take part in a collective of a ``backend`` group.

    nccl moves CUDA tensors only; gloo takes CPU and CUDA tensors. torch.nn.SyncBatchNorm also
    raises ValueError for an input off the GPU.
    """
    if backend == "nccl" and x.device.type != "cuda":
        raise ValueError(
            f"{layer}: the process group uses nccl, which moves CUDA tensors only, but the input "
            f"is on {x.device}; move the model and the data to this worker's GPU "
            "(torch.device('cuda', LOCAL_RANK)), or use a gloo group"
        )


def check_same_dtype(x, layer: str, **tensors) -> None:
    """Raise DtypeError unless every given tensor (None: absent) has the input's dtype.

    torch.nn's rule on a CPU, the one exception included: a float16 or bfloat16 input may meet
    float32 parameters and statistics (mixed precision), which the layer accumulates in float32.
    Anything else, a float32 module fed float64 input say, would silently compute in one dtype
    and keep its running statistics in another.
    """
    half = x.dtype in (torch.float16, torch.bfloat16)
    for name, t in tensors.items():
        if t is None or t.dtype == x.dtype or (half and t.dtype == torch.float32):
            continue
        raise DtypeError(
            f"{layer} got an input of dtype {x.dtype} but its {name} has dtype {t.dtype}; "
            f"convert one of them (module.to({x.dtype}) or x.to({t.dtype}))"
        )


def check_running_pair(first, second, names: tuple[str, str], layer: str,
                       required_because: str | None = None) -> None:
    """Running statistics come both or neither; both when ``required_because`` (a phrase) is
    given, which the message then quotes as the reason."""
    if (first is None) != (second is None):
        raise ValueError(f"{layer} needs both {names[0]} and {names[1]}, or neither")
    if required_because and first is None:
        raise ValueError(f"{layer} needs {names[0]} and {names[1]} {required_because}")


def check_channel_input(x, channel_counts, training: bool, layer: str,
                        ndims=CHANNEL_NDIMS, layouts: str = CHANNEL_LAYOUTS) -> None:
    """Validate a batch norm / renorm input x: (N, C, *).

    ``channel_counts``: the C each per-channel tensor (or the module) expects. Raises DtypeError
    for a non-floating input, ShapeError for a wrong rank or a channel count that differs, and
    ValueError for one value per channel in training mode.
    """
    check_floating(x, layer)
    check_rank(x, ndims, layer, layouts)
    for count in channel_counts:
        check_channels(x, count, layer)
    if training:
        check_batch_statistics(x, layer)


def check_layer_norm_input(x, normalized_shape, layer: str = "layer_norm") -> tuple[int, ...]:
    """Validate x: (*, *normalized_shape); return normalized_shape as a tuple (an int means one
    trailing axis)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(n) for n in normalized_shape)
    check_floating(x, layer)
    check_normalized_shape(x, normalized_shape, layer)
    return normalized_shape


def check_groups(num_channels: int, num_groups: int, layer: str) -> None:
    """Raise ValueError unless ``num_groups`` is a positive integer that divides ``num_channels``.

    Group norm splits the C channels into groups of C / G consecutive channels: they must come
    out whole.
    """
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"{layer} expects num_groups to be a positive integer, got {num_groups!r}")
    if num_channels % num_groups:
        raise ValueError(
            f"{layer}: num_channels={num_channels} must be divisible by num_groups={num_groups} "
            "(each group takes C / G consecutive channels)"
        )


def check_interval(interval, what: str, layer: str, minimum: float | None = None) -> tuple[float, float]:
    """Return ``interval`` as a pair of floats (low, high) with low <= high, both finite and at
    least ``minimum`` when given; raise ValueError naming ``what`` otherwise."""
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{layer} expects {what} to be a pair (low, high) of numbers, "
                         f"got {interval!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{layer} expects {what} = (low, high) with finite low <= high, "
                         f"got {interval!r}")
    if minimum is not None and low < minimum:
        raise ValueError(f"{layer} expects {what} to lie at or above {minimum}, got {interval!r}")
    return low, high
