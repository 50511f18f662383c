"""Seeded float64 test inputs shared by the chapters' tasks.

Features are deliberately unequal: different means and scales, and one feature with a tiny spread,
so that mistakes that only matter for small variances (``eps`` outside the root, no ``eps``) are
visible. Shapes use N != D so that reducing over the wrong axis gives a different shape.
"""

from __future__ import annotations

import numpy as np

SCALES = np.array([1.0, 10.0, 1e-3, 3.0, 0.5])
MEANS = np.array([0.5, -20.0, 3.0, 1.0, 100.0])


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def features(seed: int, n: int = 8, scales=SCALES, means=MEANS) -> np.ndarray:
    """(n, D) float64 batch, column j with mean about means[j] and spread about scales[j]."""
    scales, means = np.asarray(scales), np.asarray(means)
    return means + scales * rng(seed).standard_normal((n, scales.size))


def affine(seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """gamma (d,) away from 1 and beta (d,) away from 0, so that forgetting them shows."""
    g = rng(seed)
    return 1.0 + 0.5 * g.standard_normal(d), g.standard_normal(d)
