"""Building blocks for the known-wrong answers that the chapters' tasks diagnose.

A mistake such as "the unbiased variance", "eps outside the root" or "statistics over the wrong
axes" is the right normalization with one knob turned, so every chapter builds its wrong
variants from these two functions instead of writing the normalization out again. Messages of
mistakes that several chapters share are made here too (``rebinding_message``).
"""

from __future__ import annotations

import numpy as np


def normalized(x, axes, eps, ddof=0, eps_outside=False):
    """(x - mean) / std with the statistics over ``axes`` (kept as size-1 axes).

    ddof=1 is the unbiased-variance mistake; eps_outside=True divides by sqrt(var) + eps instead
    of sqrt(var + eps).
    """
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, ddof=ddof, keepdims=True)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    return (x - mu) / std


def per_channel_affine(xhat, gamma, beta):
    """gamma * xhat + beta with one gamma and beta per channel of an (N, C, H, W) array."""
    return gamma[None, :, None, None] * xhat + beta[None, :, None, None]


def rebinding_message(*buffers: str) -> str:
    """The message for running statistics that a training step rebinds instead of updating."""
    first = buffers[0]
    return (f"The running statistics did not change in training mode. Update them in place "
            f"({first}[...] = ..., or += and *=): `{first} = ...` only rebinds a local name, and "
            f"the caller's arrays ({', '.join(buffers)}) keep their old values.")
