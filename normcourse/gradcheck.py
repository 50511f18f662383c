"""Numerical gradients, to check the hand-written backward passes of ``normcourse.reference``.

The check compares an analytic gradient with centered differences of the scalar
``L(x) = sum(f(x) * dout)``, whose gradient with respect to ``x`` is exactly what a backward pass
returns when it receives the upstream gradient ``dout``.

Two rules make the check able to fail (see the tests of this module):

- use float64: with float32, a step ``h = 1e-5`` is lost in rounding;
- use a *random* upstream gradient (``random_upstream``): with ``dout = 1`` the scalar is
  ``sum(BN(x))``, which does not depend on ``x`` at all (every column of BN's output sums to
  ``N * beta``), so a backward that returns ``dx = 0`` passes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["rel_error", "numerical_gradient", "random_upstream"]


def rel_error(x, y) -> float:
    """Largest elementwise relative error ``|x - y| / max(1e-8, |x| + |y|)``.

    x, y: arrays of the same shape. The floor 1e-8 keeps entries where both values are (nearly)
    zero from dividing by zero. In float64 a correct gradient typically gives 1e-10 or less.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"rel_error needs arrays of the same shape, got {x.shape} and {y.shape}")
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))


def numerical_gradient(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout: np.ndarray, h: float = 1e-5
) -> np.ndarray:
    """Centered-difference gradient of ``sum(f(x) * dout)`` with respect to ``x``.

    f: maps the array ``x`` (it must read ``x`` itself, not a copy made earlier) to an output of
       the shape of ``dout``.
    x: float64 array of any shape; each entry is perturbed *in place* by +-h and restored, so x
       is unchanged when the function returns (even if ``f`` raises).
    dout: the upstream gradient, same shape as ``f(x)``; use ``random_upstream``.
    Returns the gradient, an array of the shape of x.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise TypeError(
            f"numerical_gradient needs a float64 NumPy array, got {dtype}: in lower precision "
            f"the step h={h} is lost in rounding and the check means nothing"
        )
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        try:
            x[index] = original + h
            # np.array copies: f may return the same buffer on every call.
            plus = np.array(f(x), dtype=np.float64)
            x[index] = original - h
            minus = np.array(f(x), dtype=np.float64)
        finally:
            x[index] = original
        grad[index] = np.sum((plus - minus) * dout) / (2.0 * h)
    return grad


def random_upstream(shape, seed: int) -> np.ndarray:
    """A float64 N(0, 1) upstream gradient of the given shape, reproducible from ``seed``."""
    return np.random.default_rng(seed).standard_normal(shape)
