"""Tests of the gradient checker itself: a check that cannot fail checks nothing."""

import numpy as np
import pytest
import torch

from normcourse.gradcheck import numerical_gradient, random_upstream, rel_error
from normcourse.reference import batchnorm_backward_closed_form, batchnorm_forward

torch.set_num_threads(1)


def test_rel_error_values():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    # |1 - 3| / (1 + 3) = 0.5 is the largest of the two entries.
    assert rel_error(np.array([1.0, 2.0]), np.array([3.0, 2.0])) == pytest.approx(0.5)
    # Both zero: the floor 1e-8 avoids 0/0.
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0


def test_rel_error_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        rel_error(np.zeros(3), np.zeros(4))


def test_numerical_gradient_matches_a_known_gradient():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 4))
    x = rng.standard_normal((4, 2))
    dout = random_upstream((3, 2), seed=1)
    # f(x) = A @ x has gradient A.T @ dout.
    numeric = numerical_gradient(lambda v: A @ v, x, dout)
    assert rel_error(numeric, A.T @ dout) < 1e-9


def test_numerical_gradient_detects_a_wrong_gradient():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3))
    dout = random_upstream(x.shape, seed=2)
    numeric = numerical_gradient(lambda v: np.sin(v), x, dout)
    correct = np.cos(x) * dout
    wrong = -np.sin(x) * dout  # the derivative of cos instead of sin
    assert rel_error(numeric, correct) < 1e-8
    assert rel_error(numeric, wrong) > 1e-2


def test_numerical_gradient_restores_x():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3))
    before = x.copy()
    numerical_gradient(lambda v: v ** 3, x, random_upstream(x.shape, seed=3))
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_restores_x_when_f_raises():
    x = np.arange(4.0)
    before = x.copy()

    def explodes(v):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        numerical_gradient(explodes, x, np.ones(4))
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_perturbs_in_place():
    """f sees the perturbed x itself (so closures over x work)."""
    x = np.zeros(2)
    seen = []
    numerical_gradient(lambda v: (seen.append(v is x), v)[1], x, np.ones(2))
    assert all(seen)


def test_numerical_gradient_requires_float64():
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(lambda v: v, np.zeros(3, dtype=np.float32), np.ones(3))


def test_random_upstream_is_reproducible_float64_normal():
    a = random_upstream((200, 50), seed=7)
    assert a.dtype == np.float64 and a.shape == (200, 50)
    np.testing.assert_array_equal(a, random_upstream((200, 50), seed=7))
    assert not np.array_equal(a, random_upstream((200, 50), seed=8))
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1.0) < 0.05


def test_all_ones_upstream_cannot_catch_a_wrong_batchnorm_backward():
    """The known mistake: with dout = 1 the loss is sum(BN(x)) = N * sum(beta), which does not
    depend on x, so the numerical dx is 0 and a broken backward returning dx = 0 passes.
    A random upstream gradient exposes it."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4))
    gamma = rng.standard_normal(4)
    beta = rng.standard_normal(4)

    def bn(v):
        return batchnorm_forward(v, gamma, beta)[0]

    def broken_backward_dx(dout):
        return np.zeros_like(dout)

    # With dout = 1 the numerical gradient is zero up to rounding (about 1e-11), so a check
    # such as np.allclose accepts the broken dx = 0. (rel_error is meaningless here: it divides
    # rounding noise by its 1e-8 floor, for the correct backward as much as for the broken one.)
    ones = np.ones_like(x)
    numeric_ones = numerical_gradient(bn, x, ones)
    assert np.abs(numeric_ones).max() < 1e-9
    assert np.allclose(numeric_ones, broken_backward_dx(ones))  # wrongly "passes"

    dout = random_upstream(x.shape, seed=4)
    numeric = numerical_gradient(bn, x, dout)
    assert np.abs(numeric).max() > 0.1  # a real, order-one gradient
    assert not np.allclose(numeric, broken_backward_dx(dout))  # caught
    assert rel_error(numeric, broken_backward_dx(dout)) > 0.5
    _, cache = batchnorm_forward(x, gamma, beta)
    assert rel_error(numeric, batchnorm_backward_closed_form(dout, cache)[0]) < 1e-7
