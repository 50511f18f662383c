"""Normalization layers in NumPy, written by hand: forward and backward passes.

Every layer follows the CS231n contract::

    out, cache = layer_forward(x, ...)       # cache: a dict of named intermediates
    grads = layer_backward(dout, cache)      # dout: gradient of the loss w.r.t. out

Batch norm is written twice on the way back: ``batchnorm_backward`` walks the forward's lines in
reverse, one line each (every line is commented with the forward line it inverts), and
``batchnorm_backward_closed_form`` is the simplified formula derived from it. Conventions are
PyTorch's (see CONTRIBUTING.md): ``momentum`` weights the new batch, the batch is normalized with
the biased variance while ``running_var`` stores the unbiased one, ``eps`` sits inside the root.
Variances are computed in two passes (subtract the mean first): ``E[x^2] - E[x]^2`` loses every
digit when the mean is large compared with the spread.
"""

from __future__ import annotations

import numpy as np

from normcourse.validation import (
    check_batch_statistics,
    check_channels,
    check_finite,
    check_floating,
    check_groups,
    check_normalized_shape,
    check_rank,
    check_running_pair,
)

__all__ = [
    "standardize_fit",
    "standardize_forward",
    "standardize_backward",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_closed_form",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "layernorm_forward",
    "layernorm_backward",
    "batch_renorm_forward",
    "batch_renorm_backward",
    "fold_batchnorm_into_linear",
    "groupnorm_forward",
    "groupnorm_backward",
    "groupnorm_backward_closed_form",
    "instancenorm_forward",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "rmsnorm_backward_closed_form",
    "weight_standardize_forward",
    "weight_standardize_backward",
    "weight_standardize_backward_closed_form",
]


# --------------------------------------------------------------------------------------------
# Parameter checks (the input checks live in normcourse.validation)
# --------------------------------------------------------------------------------------------
def _check_parameter_shape(value, name: str, shape: tuple[int, ...], layer: str) -> None:
    """Raise ValueError unless the parameter or buffer ``value`` has exactly ``shape``."""
    if np.shape(value) != tuple(shape):
        raise ValueError(
            f"{layer} expects {name} of shape {tuple(shape)}, got shape {np.shape(value)}"
        )


def _check_feature_vector(value, name: str, layer: str) -> int:
    """Raise ValueError unless ``value`` holds one number per feature, shape (D,); return D."""
    if np.ndim(value) != 1:
        raise ValueError(
            f"{layer} expects {name} of shape (D,), one value per feature, "
            f"got shape {np.shape(value)}"
        )
    return np.shape(value)[0]


def _check_running_arrays(arrays, names: tuple[str, str], num_features: int, layer: str) -> None:
    """Running statistics, when given, are (D,) floating-point NumPy arrays: updated in place."""
    for value, name in zip(arrays, names):
        if value is None:
            continue
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            raise TypeError(
                f"{layer} updates {name} in place: pass a floating-point NumPy array, "
                f"got {type(value).__name__} of dtype {getattr(value, 'dtype', None)}"
            )
        _check_parameter_shape(value, name, (num_features,), layer)


def _validate_batchnorm(x, gamma, beta, running_mean, running_var, uses_batch_stats: bool,
                        layer: str, ranks: tuple[int, ...], expected: str) -> None:
    """All the checks a batch-norm style forward needs, with messages naming ``layer``."""
    check_floating(x, layer)
    check_rank(x, ranks, layer, expected)
    num_features = _check_feature_vector(gamma, "gamma", layer)
    check_channels(x, num_features, layer)
    _check_parameter_shape(beta, "beta", (num_features,), layer)
    names = ("running_mean", "running_var")
    check_running_pair(running_mean, running_var, names, layer)
    _check_running_arrays((running_mean, running_var), names, num_features, layer)
    check_finite(x, layer)
    if uses_batch_stats:
        check_batch_statistics(x, layer)


# --------------------------------------------------------------------------------------------
# Input standardization (chapter 1): statistics from the training set only
# --------------------------------------------------------------------------------------------
def standardize_fit(x_train, eps: float = 1e-8):
    """Per-feature mean and standard deviation of the training set.

    x_train: (N, D). Returns mean (D,) and std (D,). The std is floored at ``eps`` so that a
    constant feature (every MNIST corner pixel, say) is shifted to 0 instead of dividing by 0.
    Fit once on the training set and reuse the same numbers for validation and test data.
    """
    layer = "standardize_fit"
    check_floating(x_train, layer)
    check_rank(x_train, (2,), layer, "(N, D)")
    check_finite(x_train, layer)
    mean = x_train.mean(axis=0)                    # (D,)
    var = ((x_train - mean) ** 2).mean(axis=0)     # (D,)  two-pass: subtract the mean first
    std = np.maximum(np.sqrt(var), eps)            # (D,)  floor: constant features stay finite
    return mean, std


def standardize_forward(x, mean, std):
    """out = (x - mean) / std with statistics from ``standardize_fit``.

    x: (N, D); mean, std: (D,). Returns out (N, D) and the cache for ``standardize_backward``.
    """
    layer = "standardize_forward"
    check_floating(x, layer)
    check_rank(x, (2,), layer, "(N, D)")
    num_features = _check_feature_vector(mean, "mean", layer)
    check_channels(x, num_features, layer)
    _check_parameter_shape(std, "std", (num_features,), layer)
    check_finite(x, layer)
    xmu = x - mean                                 # (N, D)
    out = xmu / std                                # (N, D)
    cache = {"std": std}
    return out, cache


def standardize_backward(dout, cache):
    """dout: (N, D) -> dx: (N, D). mean and std are constants fitted beforehand."""
    dxmu = dout / cache["std"]                     # out = xmu / std
    dx = dxmu                                      # xmu = x - mean
    return dx


# --------------------------------------------------------------------------------------------
# Batch normalization, (N, D)
# --------------------------------------------------------------------------------------------
def batchnorm_forward(x, gamma, beta, running_mean=None, running_var=None, training=True,
                      momentum=0.1, eps=1e-5):
    """Batch normalization of x: (N, D), statistics per feature over the batch axis.

    gamma, beta: (D,). running_mean, running_var: (D,) float arrays or both None.
    training=True: normalize with the batch mean and *biased* batch variance, and (when given)
    update the running arrays in place, PyTorch's way::

        running_mean = (1 - momentum) * running_mean + momentum * mu
        running_var  = (1 - momentum) * running_var  + momentum * var * N / (N - 1)   # unbiased

    training=False: normalize with the running statistics (no update); if they are None, use the
    batch statistics, as torch does with ``track_running_stats=False``.
    Returns out: (N, D) and a cache (dict) for the backward passes.
    """
    uses_batch_stats = training or running_mean is None
    _validate_batchnorm(x, gamma, beta, running_mean, running_var, uses_batch_stats,
                        "batchnorm_forward", (2,), "(N, D)")
    n = x.shape[0]

    if uses_batch_stats:
        mu = x.mean(axis=0)                        # (D,)   batch mean
        xmu = x - mu                               # (N, D) centered input
        sq = xmu ** 2                              # (N, D)
        var = sq.mean(axis=0)                      # (D,)   biased batch variance (1/N)
    else:
        mu = running_mean                          # (D,)   constants learned in training
        xmu = x - mu                               # (N, D)
        var = running_var                          # (D,)
    std = np.sqrt(var + eps)                       # (D,)   eps inside the root
    invstd = 1.0 / std                             # (D,)
    xhat = xmu * invstd                            # (N, D) zero mean, unit variance
    scaled = gamma * xhat                          # (N, D)
    out = scaled + beta                            # (N, D)

    if training and running_mean is not None:
        unbiased_var = var * n / (n - 1)           # the running variance is the unbiased one
        running_mean[...] = (1 - momentum) * running_mean + momentum * mu
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased_var

    cache = {
        "uses_batch_stats": uses_batch_stats,      # False: mu and var are constants
        "gamma": gamma,
        "mu": mu,
        "xmu": xmu,
        "var": var,
        "std": std,
        "invstd": invstd,
        "xhat": xhat,
    }
    return out, cache


def batchnorm_backward(dout, cache):
    """Staged backward: the forward's lines in reverse, one at a time.

    dout: (N, D). Returns dx: (N, D), dgamma: (D,), dbeta: (D,). Each line is commented with the
    forward line it differentiates; a variable used twice in the forward (xmu) collects the
    gradient of both uses.
    """
    gamma, xmu, std, invstd, xhat = (cache[k] for k in ("gamma", "xmu", "std", "invstd", "xhat"))
    n = dout.shape[0]

    dbeta = dout.sum(axis=0)                       # out = scaled + beta      (beta is broadcast)
    dscaled = dout                                 # out = scaled + beta
    dgamma = (dscaled * xhat).sum(axis=0)          # scaled = gamma * xhat
    dxhat = dscaled * gamma                        # scaled = gamma * xhat
    dinvstd = (dxhat * xmu).sum(axis=0)            # xhat = xmu * invstd      (invstd is broadcast)
    dxmu = dxhat * invstd                          # xhat = xmu * invstd      (first use of xmu)
    if not cache["uses_batch_stats"]:
        dx = dxmu                                  # xmu = x - mu             (mu is a constant)
        return dx, dgamma, dbeta
    dstd = -dinvstd / std ** 2                     # invstd = 1.0 / std
    dvar = 0.5 * dstd / std                        # std = np.sqrt(var + eps)
    dsq = np.ones_like(xmu) * dvar / n             # var = sq.mean(axis=0)
    dxmu = dxmu + 2.0 * xmu * dsq                  # sq = xmu ** 2            (second use of xmu)
    dx = dxmu.copy()                               # xmu = x - mu
    dmu = -dxmu.sum(axis=0)                        # xmu = x - mu             (mu is broadcast)
    dx = dx + np.ones_like(dx) * dmu / n           # mu = x.mean(axis=0)
    return dx, dgamma, dbeta


def _batchnorm_dx(dout, scale, invstd, xhat):
    """Closed-form dx of ``scale * xhat`` where xhat uses the batch statistics (N, D).

    dx = scale * invstd / N * (N * dout - sum(dout) - xhat * sum(dout * xhat)), sums over the
    batch. Shared by batch norm (scale = gamma) and batch renorm (scale = gamma * r).
    """
    n = dout.shape[0]
    return (scale * invstd / n) * (
        n * dout - dout.sum(axis=0) - xhat * (dout * xhat).sum(axis=0)
    )


def batchnorm_backward_closed_form(dout, cache):
    """The staged backward simplified by hand.

    dout: (N, D). Returns dx: (N, D), dgamma: (D,), dbeta: (D,).
    Training: dx = gamma * invstd / N * (N * dout - sum(dout) - xhat * sum(dout * xhat)).
    Eval (running statistics, constants): dx = dout * gamma * invstd.
    """
    gamma, invstd, xhat = cache["gamma"], cache["invstd"], cache["xhat"]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    if cache["uses_batch_stats"]:
        dx = _batchnorm_dx(dout, gamma, invstd, xhat)
    else:
        dx = dout * gamma * invstd
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Spatial batch normalization, (N, C, H, W): one set of statistics per channel over N, H, W
# --------------------------------------------------------------------------------------------
def _channels_last_2d(x):
    """(N, C, H, W) -> (N*H*W, C): every pixel of every image becomes one row."""
    n, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n * h * w, c)


def _channels_first_4d(rows, shape):
    """(N*H*W, C) -> (N, C, H, W), the inverse of ``_channels_last_2d``."""
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def spatial_batchnorm_forward(x, gamma, beta, running_mean=None, running_var=None,
                              training=True, momentum=0.1, eps=1e-5):
    """Batch norm for images, x: (N, C, H, W); gamma, beta, running_*: (C,).

    Each channel is normalized over its m = N*H*W values (so running_var gets the correction
    m / (m - 1)) by reshaping to (N*H*W, C) and calling ``batchnorm_forward``.
    Returns out: (N, C, H, W) and the cache.
    """
    uses_batch_stats = training or running_mean is None
    # Validate the 4-D input here so that messages show the caller's shape, not the reshaped one.
    _validate_batchnorm(x, gamma, beta, running_mean, running_var, uses_batch_stats,
                        "spatial_batchnorm_forward", (4,), "(N, C, H, W)")
    rows_out, rows_cache = batchnorm_forward(_channels_last_2d(x), gamma, beta, running_mean,
                                             running_var, training, momentum, eps)
    cache = {"shape": x.shape, "rows": rows_cache}
    return _channels_first_4d(rows_out, x.shape), cache


def spatial_batchnorm_backward(dout, cache):
    """dout: (N, C, H, W) -> dx: (N, C, H, W), dgamma: (C,), dbeta: (C,)."""
    drows, dgamma, dbeta = batchnorm_backward_closed_form(_channels_last_2d(dout), cache["rows"])
    return _channels_first_4d(drows, cache["shape"]), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Layer normalization: statistics per example over the trailing gamma.ndim dimensions
# --------------------------------------------------------------------------------------------
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Layer normalization, x: (..., *gamma.shape); gamma, beta: the normalized shape, e.g. (D,).

    Each example (each position of the leading dims) is normalized over the trailing dims with
    its own mean and biased variance; the same computation at training and test time, and a
    batch of one is fine. Returns out (shape of x) and the cache.
    """
    layer = "layernorm_forward"
    check_floating(x, layer)
    normalized_shape = np.shape(gamma)
    check_normalized_shape(x, normalized_shape, layer)
    _check_parameter_shape(beta, "beta", normalized_shape, layer)
    check_finite(x, layer)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))

    mu = x.mean(axis=axes, keepdims=True)          # (..., 1, ...) per-example mean
    xmu = x - mu                                   # like x
    sq = xmu ** 2                                  # like x
    var = sq.mean(axis=axes, keepdims=True)        # per-example biased variance
    std = np.sqrt(var + eps)
    rstd = 1.0 / std
    xhat = xmu * rstd                              # like x
    scaled = gamma * xhat                          # like x
    out = scaled + beta                            # like x

    cache = {"gamma": gamma, "axes": axes, "rstd": rstd, "xhat": xhat}
    return out, cache


def layernorm_backward(dout, cache):
    """Closed form per example, with g = dout * gamma (means over the normalized dims):

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))

    dout: like x. Returns dx (like x), dgamma and dbeta (shape of gamma; summed over the
    leading, per-example dims).
    """
    gamma, axes, rstd, xhat = cache["gamma"], cache["axes"], cache["rstd"], cache["xhat"]
    example_axes = tuple(range(dout.ndim - len(axes)))
    dbeta = dout.sum(axis=example_axes)
    dgamma = (dout * xhat).sum(axis=example_axes)
    g = dout * gamma
    dx = rstd * (
        g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)
    )
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Batch renormalization (Ioffe 2017), (N, D)
# --------------------------------------------------------------------------------------------
def batch_renorm_forward(x, gamma, beta, running_mean, running_std, training=True, rmax=3.0,
                         dmax=5.0, momentum=0.01, eps=1e-5):
    """Batch renormalization of x: (N, D); gamma, beta, running_mean, running_std: (D,).

    Training: batch-normalize (sigma_B = sqrt(biased var + eps)), then correct towards the
    running statistics with r and d, computed from the running values *before* this step's
    update and treated as constants by the backward::

        r = clip(sigma_B / running_std, 1/rmax, rmax)
        d = clip((mu_B - running_mean) / running_std, -dmax, dmax)
        xhat = (x - mu_B) / sigma_B * r + d ;  out = gamma * xhat + beta
        running_mean += momentum * (mu_B - running_mean)      # in place
        running_std  += momentum * (sigma_B - running_std)    # in place

    With rmax=1, dmax=0 this is batch norm. Eval: out = gamma * (x - running_mean) / running_std
    + beta, no update. Returns out: (N, D) and the cache (which holds r and d).
    """
    layer = "batch_renorm_forward"
    names = ("running_mean", "running_std")
    check_running_pair(running_mean, running_std, names, layer, "(r and d are built from them)")
    _validate_batchnorm(x, gamma, beta, None, None, training, layer, (2,), "(N, D)")
    _check_running_arrays((running_mean, running_std), names, np.shape(gamma)[0], layer)
    if rmax < 1 or dmax < 0:
        raise ValueError(f"{layer} needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")

    if not training:
        xmu = x - running_mean                     # (N, D)
        xhat = xmu / running_std                   # (N, D)
        out = gamma * xhat + beta                  # (N, D)
        cache = {"training": False, "gamma": gamma, "running_std": running_std.copy(),
                 "xhat": xhat}
        return out, cache

    # Plain batch norm without the affine part: xhat_batch, and mu_B, sigma_B in its cache.
    ones, zeros = np.ones_like(gamma), np.zeros_like(beta)
    xhat_batch, bn_cache = batchnorm_forward(x, ones, zeros, training=True, eps=eps)
    mu_b = bn_cache["mu"]                          # (D,)   batch mean
    sigma_b = bn_cache["std"]                      # (D,)   sqrt(biased var + eps)
    r = np.clip(sigma_b / running_std, 1.0 / rmax, rmax)                  # (D,) constant
    d = np.clip((mu_b - running_mean) / running_std, -dmax, dmax)         # (D,) constant
    xhat = xhat_batch * r + d                      # (N, D)
    out = gamma * xhat + beta                      # (N, D)

    running_mean += momentum * (mu_b - running_mean)   # after r and d: they used the old values
    running_std += momentum * (sigma_b - running_std)

    cache = {"training": True, "gamma": gamma, "mu_b": mu_b, "sigma_b": sigma_b, "r": r, "d": d,
             "xhat": xhat, "batchnorm": bn_cache}
    return out, cache


def batch_renorm_backward(dout, cache):
    """dout: (N, D) -> dx: (N, D), dgamma: (D,), dbeta: (D,).

    r and d are constants, so dx is batch norm's backward with gamma replaced by gamma * r, and
    dgamma = sum(dout * xhat) with the corrected xhat = xhat_batch * r + d.
    Eval: dx = dout * gamma / running_std.
    """
    gamma, xhat = cache["gamma"], cache["xhat"]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    if not cache["training"]:
        return dout * gamma / cache["running_std"], dgamma, dbeta
    bn = cache["batchnorm"]
    dx = _batchnorm_dx(dout, gamma * cache["r"], bn["invstd"], bn["xhat"])
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Folding an eval-mode batch norm into the linear layer before it
# --------------------------------------------------------------------------------------------
def fold_batchnorm_into_linear(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    """Merge ``BN_eval(Linear(W, b)(u))`` into one linear layer ``Linear(W2, b2)``.

    W: (D_out, D_in), torch.nn.Linear's layout (y = u @ W.T + b); b: (D_out,) or None (a linear
    layer feeding a batch norm usually has none, but the mean shift still lands in b2).
    gamma, beta, running_mean, running_var: (D_out,). Returns W2: (D_out, D_in), b2: (D_out,)::

        scale = gamma / sqrt(running_var + eps)
        W2 = scale[:, None] * W ;  b2 = scale * (b - running_mean) + beta
    """
    layer = "fold_batchnorm_into_linear"
    check_floating(W, layer)
    check_rank(W, (2,), layer, "(D_out, D_in)")
    d_out = W.shape[0]
    for value, name in ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"),
                        (running_var, "running_var")):
        _check_parameter_shape(value, name, (d_out,), layer)
    if b is None:
        b = np.zeros(d_out, dtype=W.dtype)
    _check_parameter_shape(b, "b", (d_out,), layer)
    scale = gamma / np.sqrt(running_var + eps)     # (D_out,) one factor per output unit
    W2 = scale[:, None] * W                        # scales row j of W, i.e. output unit j
    b2 = scale * (b - running_mean) + beta
    return W2, b2


# --------------------------------------------------------------------------------------------
# Normalization without the batch (chapter 8): group norm (instance norm and layer norm as its
# extremes), RMSNorm and weight standardization. Statistics per example, never over the batch.
# --------------------------------------------------------------------------------------------
def _validate_groupnorm(x, gamma, beta, num_groups, layer: str) -> None:
    check_floating(x, layer)
    check_rank(x, (3, 4, 5), layer, "(N, C, L), (N, C, H, W) or (N, C, D, H, W)")
    num_features = _check_feature_vector(gamma, "gamma", layer)
    check_channels(x, num_features, layer)
    _check_parameter_shape(beta, "beta", (num_features,), layer)
    check_groups(num_features, num_groups, layer)
    check_finite(x, layer)


def groupnorm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """Group normalization (Wu & He 2018) of x: (N, C, *spatial); gamma, beta: (C,).

    The C channels are split into ``num_groups`` groups of C/G consecutive channels; each example
    normalizes each group over its M = C/G * prod(spatial) values (mean, biased variance), then
    every channel gets its own gamma and beta. G = 1 is layer norm over (C, *spatial) with
    per-channel affine; G = C is instance norm. No batch axis in any statistic: the same
    computation in training and evaluation, and a batch of one is fine.
    Returns out (shape of x) and the cache.
    """
    _validate_groupnorm(x, gamma, beta, num_groups, "groupnorm_forward")
    n = x.shape[0]
    channel = (1, -1) + (1,) * (x.ndim - 2)        # gamma, beta broadcast as (1, C, 1, ...)

    xg = x.reshape(n, num_groups, -1)              # (N, G, M)  one row per (example, group)
    mu = xg.mean(axis=2, keepdims=True)            # (N, G, 1)
    xmu = xg - mu                                  # (N, G, M)
    sq = xmu ** 2                                  # (N, G, M)
    var = sq.mean(axis=2, keepdims=True)           # (N, G, 1)  biased variance of the group
    std = np.sqrt(var + eps)                       # (N, G, 1)
    invstd = 1.0 / std                             # (N, G, 1)
    xhatg = xmu * invstd                           # (N, G, M)
    xhat = xhatg.reshape(x.shape)                  # (N, C, *spatial)  back to channels
    scaled = gamma.reshape(channel) * xhat         # (N, C, *spatial)  one gamma per channel
    out = scaled + beta.reshape(channel)           # (N, C, *spatial)

    cache = {"gamma": gamma, "channel": channel, "xmu": xmu, "std": std, "invstd": invstd,
             "xhat": xhat, "xhatg": xhatg}
    return out, cache


def groupnorm_backward(dout, cache):
    """Staged backward of ``groupnorm_forward``, its lines in reverse.

    dout: (N, C, *spatial). Returns dx (like dout), dgamma: (C,), dbeta: (C,).
    """
    gamma, channel, xmu, std, invstd, xhat = (
        cache[k] for k in ("gamma", "channel", "xmu", "std", "invstd", "xhat"))
    not_channel = (0,) + tuple(range(2, dout.ndim))
    m = xmu.shape[2]

    dbeta = dout.sum(axis=not_channel)             # out = scaled + beta
    dscaled = dout                                 # out = scaled + beta
    dgamma = (dscaled * xhat).sum(axis=not_channel)  # scaled = gamma * xhat
    dxhat = dscaled * gamma.reshape(channel)       # scaled = gamma * xhat
    dxhatg = dxhat.reshape(xmu.shape)              # xhat = xhatg.reshape(x.shape)
    dinvstd = (dxhatg * xmu).sum(axis=2, keepdims=True)  # xhatg = xmu * invstd
    dxmu = dxhatg * invstd                         # xhatg = xmu * invstd   (first use of xmu)
    dstd = -dinvstd / std ** 2                     # invstd = 1.0 / std
    dvar = 0.5 * dstd / std                        # std = np.sqrt(var + eps)
    dsq = np.ones_like(xmu) * dvar / m             # var = sq.mean(axis=2)
    dxmu = dxmu + 2.0 * xmu * dsq                  # sq = xmu ** 2          (second use of xmu)
    dxg = dxmu.copy()                              # xmu = xg - mu
    dmu = -dxmu.sum(axis=2, keepdims=True)         # xmu = xg - mu          (mu is broadcast)
    dxg = dxg + np.ones_like(dxg) * dmu / m        # mu = xg.mean(axis=2)
    dx = dxg.reshape(dout.shape)                   # xg = x.reshape(n, num_groups, -1)
    return dx, dgamma, dbeta


def groupnorm_backward_closed_form(dout, cache):
    """Per (example, group), with g = dout * gamma and means over the group's M values:

        dx = invstd * (g - mean(g) - xhat * mean(g * xhat))

    the layer-norm formula applied to each group. Returns dx, dgamma: (C,), dbeta: (C,).
    """
    gamma, channel, invstd, xhat, xhatg = (
        cache[k] for k in ("gamma", "channel", "invstd", "xhat", "xhatg"))
    not_channel = (0,) + tuple(range(2, dout.ndim))
    dbeta = dout.sum(axis=not_channel)
    dgamma = (dout * xhat).sum(axis=not_channel)
    g = (dout * gamma.reshape(channel)).reshape(xhatg.shape)       # (N, G, M)
    dxg = invstd * (g - g.mean(axis=2, keepdims=True)
                    - xhatg * (g * xhatg).mean(axis=2, keepdims=True))
    return dxg.reshape(dout.shape), dgamma, dbeta


def instancenorm_forward(x, gamma, beta, eps=1e-5):
    """Instance normalization (Ulyanov et al. 2016): group norm with one channel per group.

    x: (N, C, *spatial); gamma, beta: (C,). Each channel of each example is normalized over its
    spatial positions. Returns out and the cache (use ``groupnorm_backward``).
    """
    return groupnorm_forward(x, gamma, beta, num_groups=np.shape(gamma)[0], eps=eps)


def rmsnorm_forward(x, gamma, eps=None):
    """RMSNorm (Zhang & Sennrich 2019), x: (..., *gamma.shape); gamma: the normalized shape.

    out = gamma * x / sqrt(mean(x^2) + eps), the mean over the trailing gamma.ndim dims of each
    example: layer norm without the re-centring (no mean subtracted, no beta). eps=None means
    the machine epsilon of x's dtype, as in torch.nn.RMSNorm. Returns out and the cache.
    """
    layer = "rmsnorm_forward"
    check_floating(x, layer)
    normalized_shape = np.shape(gamma)
    check_normalized_shape(x, normalized_shape, layer)
    check_finite(x, layer)
    if eps is None:
        eps = np.finfo(x.dtype).eps
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))

    sq = x ** 2                                    # like x
    ms = sq.mean(axis=axes, keepdims=True)         # (..., 1, ...) mean square per example
    rms = np.sqrt(ms + eps)                        # eps inside the root
    invrms = 1.0 / rms
    xhat = x * invrms                              # like x, unit root mean square
    out = gamma * xhat                             # like x

    cache = {"x": x.copy(), "gamma": gamma, "axes": axes, "rms": rms, "invrms": invrms,
             "xhat": xhat}
    return out, cache


def rmsnorm_backward(dout, cache):
    """Staged backward of ``rmsnorm_forward``. Returns dx (like x), dgamma (shape of gamma)."""
    x, gamma, axes, rms, invrms, xhat = (
        cache[k] for k in ("x", "gamma", "axes", "rms", "invrms", "xhat"))
    example_axes = tuple(range(dout.ndim - len(axes)))
    m = np.prod([x.shape[a] for a in axes])

    dgamma = (dout * xhat).sum(axis=example_axes)  # out = gamma * xhat
    dxhat = dout * gamma                           # out = gamma * xhat
    dinvrms = (dxhat * x).sum(axis=axes, keepdims=True)  # xhat = x * invrms
    dx = dxhat * invrms                            # xhat = x * invrms      (first use of x)
    drms = -dinvrms / rms ** 2                     # invrms = 1.0 / rms
    dms = 0.5 * drms / rms                         # rms = np.sqrt(ms + eps)
    dsq = np.ones_like(x) * dms / m                # ms = sq.mean(axis=axes)
    dx = dx + 2.0 * x * dsq                        # sq = x ** 2            (second use of x)
    return dx, dgamma


def rmsnorm_backward_closed_form(dout, cache):
    """With g = dout * gamma and the mean over the normalized dims of each example:

        dx = invrms * (g - xhat * mean(g * xhat))

    layer norm's formula without the mean(g) term (nothing was subtracted in the forward).
    """
    gamma, axes, invrms, xhat = (cache[k] for k in ("gamma", "axes", "invrms", "xhat"))
    example_axes = tuple(range(dout.ndim - len(axes)))
    dgamma = (dout * xhat).sum(axis=example_axes)
    g = dout * gamma
    dx = invrms * (g - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, dgamma


def weight_standardize_forward(w, eps=1e-5):
    """Weight standardization (Qiao et al. 2019) of a conv weight w: (C_out, C_in, kh, kw).

    Each output filter is standardized over its fan-in (C_in * kh * kw values):
    w_hat = (w - mean) / sqrt(var + eps), biased variance, eps inside the root as in the paper's
    equation. (The authors' code divides by the unbiased std + eps instead; a different layer
    by a factor close to 1.) The convolution then uses w_hat. Returns w_hat and the cache.
    """
    layer = "weight_standardize_forward"
    check_floating(w, layer)
    check_rank(w, (4,), layer, "(C_out, C_in, kh, kw)")
    check_finite(w, layer)
    c_out = w.shape[0]

    wf = w.reshape(c_out, -1)                      # (C_out, K)  one row per output filter
    mu = wf.mean(axis=1, keepdims=True)            # (C_out, 1)
    wmu = wf - mu                                  # (C_out, K)
    sq = wmu ** 2                                  # (C_out, K)
    var = sq.mean(axis=1, keepdims=True)           # (C_out, 1)  biased
    std = np.sqrt(var + eps)                       # (C_out, 1)
    invstd = 1.0 / std                             # (C_out, 1)
    what = wmu * invstd                            # (C_out, K)
    out = what.reshape(w.shape)                    # (C_out, C_in, kh, kw)

    cache = {"wmu": wmu, "std": std, "invstd": invstd, "what": what}
    return out, cache


def weight_standardize_backward(dout, cache):
    """Staged backward of ``weight_standardize_forward``: dout, dw: (C_out, C_in, kh, kw)."""
    wmu, std, invstd = cache["wmu"], cache["std"], cache["invstd"]
    k = wmu.shape[1]

    dwhat = dout.reshape(wmu.shape)                # out = what.reshape(w.shape)
    dinvstd = (dwhat * wmu).sum(axis=1, keepdims=True)  # what = wmu * invstd
    dwmu = dwhat * invstd                          # what = wmu * invstd    (first use of wmu)
    dstd = -dinvstd / std ** 2                     # invstd = 1.0 / std
    dvar = 0.5 * dstd / std                        # std = np.sqrt(var + eps)
    dsq = np.ones_like(wmu) * dvar / k             # var = sq.mean(axis=1)
    dwmu = dwmu + 2.0 * wmu * dsq                  # sq = wmu ** 2          (second use of wmu)
    dwf = dwmu.copy()                              # wmu = wf - mu
    dmu = -dwmu.sum(axis=1, keepdims=True)         # wmu = wf - mu          (mu is broadcast)
    dwf = dwf + np.ones_like(dwf) * dmu / k        # mu = wf.mean(axis=1)
    return dwf.reshape(dout.shape)                 # wf = w.reshape(c_out, -1)


def weight_standardize_backward_closed_form(dout, cache):
    """Per output filter, with g = dout and the means over its fan-in:

        dw = invstd * (g - mean(g) - w_hat * mean(g * w_hat))

    layer norm's formula without gamma. dout, dw: (C_out, C_in, kh, kw).
    """
    invstd, what = cache["invstd"], cache["what"]
    g = dout.reshape(what.shape)
    dw = invstd * (g - g.mean(axis=1, keepdims=True)
                   - what * (g * what).mean(axis=1, keepdims=True))
    return dw.reshape(dout.shape)
