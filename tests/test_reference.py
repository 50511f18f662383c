"""The NumPy reference layers against PyTorch, against numerical gradients, and on bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normcourse import reference as ref
from normcourse.gradcheck import numerical_gradient, random_upstream, rel_error

torch.set_num_threads(1)

# Tolerances per dtype for forward comparisons with torch (values of order one).
TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]


def assert_close(actual, expected, dtype):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype])


def make_batch(shape, dtype=np.float64, seed=0, loc=0.5, scale=2.0):
    """Random input with a non-zero mean and non-unit spread (so that normalizing does work)."""
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def make_params(num_features, dtype=np.float64, seed=100):
    """gamma, beta, running_mean, running_var with non-trivial values, (num_features,) each."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, num_features).astype(dtype)
    beta = rng.standard_normal(num_features).astype(dtype)
    running_mean = rng.standard_normal(num_features).astype(dtype)
    running_var = rng.uniform(0.5, 3.0, num_features).astype(dtype)
    return gamma, beta, running_mean, running_var


def t(a):
    return torch.from_numpy(np.array(a))


# ---------------------------------------------------------------------------------------------
# Forward passes against PyTorch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_forward_matches_torch(dtype, training):
    x = make_batch((8, 5), dtype)
    gamma, beta, running_mean, running_var = make_params(5, dtype)
    torch_mean, torch_var = t(running_mean), t(running_var)

    out, _ = ref.batchnorm_forward(x, gamma, beta, running_mean, running_var, training=training,
                                   momentum=0.2, eps=1e-3)
    expected = F.batch_norm(t(x), torch_mean, torch_var, t(gamma), t(beta), training=training,
                            momentum=0.2, eps=1e-3)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert_close(running_mean, torch_mean, dtype)
    assert_close(running_var, torch_var, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_running_stats_after_several_steps_match_torch(dtype):
    module = torch.nn.BatchNorm1d(4, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    gamma, beta = np.ones(4, dtype), np.zeros(4, dtype)
    running_mean, running_var = np.zeros(4, dtype), np.ones(4, dtype)  # torch's initial values
    for step in range(6):
        x = make_batch((7, 4), dtype, seed=step, loc=step, scale=1.0 + step)
        out, _ = ref.batchnorm_forward(x, gamma, beta, running_mean, running_var)
        assert_close(out, module(t(x)), dtype)
    assert_close(running_mean, module.running_mean, dtype)
    assert_close(running_var, module.running_var, dtype)

    module.eval()
    x = make_batch((3, 4), dtype, seed=50)
    out, _ = ref.batchnorm_forward(x, gamma, beta, running_mean, running_var, training=False)
    assert_close(out, module(t(x)), dtype)


def test_batchnorm_momentum_weights_the_new_batch_and_stores_unbiased_variance():
    x = make_batch((5, 3))
    running_mean, running_var = np.zeros(3), np.ones(3)
    ref.batchnorm_forward(x, np.ones(3), np.zeros(3), running_mean, running_var, momentum=0.1)
    # PyTorch: running = 0.9 * running + 0.1 * batch, not Keras' 0.1 * running + 0.9 * batch.
    np.testing.assert_allclose(running_mean, 0.1 * x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-13)


def test_batchnorm_without_running_stats_uses_batch_stats_in_eval():
    x = make_batch((6, 4))
    gamma, beta, _, _ = make_params(4)
    module = torch.nn.BatchNorm1d(4, track_running_stats=False, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(t(gamma))
        module.bias.copy_(t(beta))
    module.eval()
    out, cache = ref.batchnorm_forward(x, gamma, beta, training=False)
    assert cache["uses_batch_stats"]
    assert_close(out, module(t(x)), np.float64)


def test_batchnorm_needs_both_running_arrays_or_neither():
    gamma, beta, running_mean, _ = make_params(3)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        ref.batchnorm_forward(make_batch((4, 3)), gamma, beta, running_mean, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_spatial_batchnorm_matches_torch_batchnorm2d(dtype, training):
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    module = torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch_dtype).train(training)
    gamma, beta, running_mean, running_var = make_params(3, dtype)
    with torch.no_grad():
        module.weight.copy_(t(gamma))
        module.bias.copy_(t(beta))
        module.running_mean.copy_(t(running_mean))
        module.running_var.copy_(t(running_var))
    for step in range(3):
        x = make_batch((2, 3, 4, 5), dtype, seed=step)
        out, _ = ref.spatial_batchnorm_forward(x, gamma, beta, running_mean, running_var,
                                               training=training, momentum=0.3)
        assert out.shape == x.shape
        assert_close(out, module(t(x)), dtype)
    # In training, running_var got the correction m / (m - 1) with m = N*H*W = 40.
    assert_close(running_mean, module.running_mean, dtype)
    assert_close(running_var, module.running_var, dtype)


def test_spatial_batchnorm_allows_one_image_with_many_pixels():
    """As torch: N = 1 is fine for BatchNorm2d when H*W > 1 (m = H*W values per channel)."""
    gamma, beta, _, _ = make_params(2)
    x = make_batch((1, 2, 3, 3))
    out, _ = ref.spatial_batchnorm_forward(x, gamma, beta)
    assert_close(out, F.batch_norm(t(x), None, None, t(gamma), t(beta), training=True),
                 np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, normalized_shape", [((6, 5), (5,)), ((2, 3, 4, 5), (4, 5))])
def test_layernorm_matches_torch(dtype, x_shape, normalized_shape):
    x = make_batch(x_shape, dtype)
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.5, 2.0, normalized_shape).astype(dtype)
    beta = rng.standard_normal(normalized_shape).astype(dtype)
    out, _ = ref.layernorm_forward(x, gamma, beta, eps=1e-5)
    assert_close(out, F.layer_norm(t(x), normalized_shape, t(gamma), t(beta), eps=1e-5), dtype)


def test_layernorm_works_on_a_single_example():
    x = make_batch((1, 7))
    out, _ = ref.layernorm_forward(x, np.ones(7), np.zeros(7))
    assert_close(out, F.layer_norm(t(x), (7,)), np.float64)


# ---------------------------------------------------------------------------------------------
# Backward passes against numerical gradients (float64, random upstream gradient)
# ---------------------------------------------------------------------------------------------
def _bn_case(training, with_running=True):
    x = make_batch((6, 4), seed=1)
    gamma, beta, running_mean, running_var = make_params(4)
    if not with_running:
        running_mean = running_var = None

    def forward(x, gamma, beta):
        # Copies: a training step updates the running arrays in place on every call.
        rm = None if running_mean is None else running_mean.copy()
        rv = None if running_var is None else running_var.copy()
        return ref.batchnorm_forward(x, gamma, beta, rm, rv, training=training, momentum=0.3)

    return forward, ref.batchnorm_backward, x, gamma, beta


def _bn_closed_form_case(training):
    forward, _, x, gamma, beta = _bn_case(training)
    return forward, ref.batchnorm_backward_closed_form, x, gamma, beta


def _spatial_case(training):
    x = make_batch((2, 3, 3, 2), seed=2)
    gamma, beta, running_mean, running_var = make_params(3)

    def forward(x, gamma, beta):
        return ref.spatial_batchnorm_forward(x, gamma, beta, running_mean.copy(),
                                             running_var.copy(), training=training)

    return forward, ref.spatial_batchnorm_backward, x, gamma, beta


def _layernorm_case(x_shape, normalized_shape):
    x = make_batch(x_shape, seed=3)
    rng = np.random.default_rng(4)
    gamma = rng.uniform(0.5, 2.0, normalized_shape)
    beta = rng.standard_normal(normalized_shape)
    return ref.layernorm_forward, ref.layernorm_backward, x, gamma, beta


def _renorm_saturated_case(training):
    """Running statistics far from the batch's: r and d sit at their clip limits, so they are
    constants even for the full derivative, and the numerical gradient is the paper's."""
    x = make_batch((6, 4), seed=5)
    gamma, beta, _, _ = make_params(4)
    running_mean = np.array([-1000.0, 1000.0, -1000.0, 1000.0])  # d = +5, -5, +5, -5
    running_std = np.array([100.0, 0.001, 0.001, 100.0])         # r = 1/3, 3, 3, 1/3

    def forward(x, gamma, beta):
        return ref.batch_renorm_forward(x, gamma, beta, running_mean.copy(), running_std.copy(),
                                        training=training)

    return forward, ref.batch_renorm_backward, x, gamma, beta


def _renorm_eval_case():
    x = make_batch((6, 4), seed=5)
    gamma, beta, running_mean, running_var = make_params(4)
    running_std = np.sqrt(running_var)

    def forward(x, gamma, beta):
        return ref.batch_renorm_forward(x, gamma, beta, running_mean, running_std,
                                        training=False)

    return forward, ref.batch_renorm_backward, x, gamma, beta


GRAD_CASES = {
    "batchnorm-train": lambda: _bn_case(training=True),
    "batchnorm-eval": lambda: _bn_case(training=False),
    "batchnorm-train-no-running-stats": lambda: _bn_case(True, with_running=False),
    "batchnorm-eval-no-running-stats": lambda: _bn_case(False, with_running=False),
    "batchnorm-closed-form-train": lambda: _bn_closed_form_case(training=True),
    "batchnorm-closed-form-eval": lambda: _bn_closed_form_case(training=False),
    "spatial-train": lambda: _spatial_case(training=True),
    "spatial-eval": lambda: _spatial_case(training=False),
    "layernorm-2d": lambda: _layernorm_case((5, 6), (6,)),
    "layernorm-4d": lambda: _layernorm_case((2, 3, 4, 3), (4, 3)),
    "renorm-train-clipped": lambda: _renorm_saturated_case(training=True),
    "renorm-eval": lambda: _renorm_eval_case(),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_backward_matches_numerical_gradient(case):
    forward, backward, x, gamma, beta = GRAD_CASES[case]()
    out, cache = forward(x, gamma, beta)
    dout = random_upstream(out.shape, seed=11)
    dx, dgamma, dbeta = backward(dout, cache)

    numeric_dx = numerical_gradient(lambda v: forward(v, gamma, beta)[0], x, dout)
    numeric_dgamma = numerical_gradient(lambda v: forward(x, v, beta)[0], gamma, dout)
    numeric_dbeta = numerical_gradient(lambda v: forward(x, gamma, v)[0], beta, dout)
    assert dx.shape == x.shape and dgamma.shape == gamma.shape and dbeta.shape == beta.shape
    assert rel_error(dx, numeric_dx) < 1e-7
    assert rel_error(dgamma, numeric_dgamma) < 1e-7
    assert rel_error(dbeta, numeric_dbeta) < 1e-7


@pytest.mark.parametrize("training", [True, False])
def test_staged_backward_equals_closed_form(training):
    forward, _, x, gamma, beta = _bn_case(training)
    out, cache = forward(x, gamma, beta)
    dout = random_upstream(out.shape, seed=12)
    for staged, closed in zip(ref.batchnorm_backward(dout, cache),
                              ref.batchnorm_backward_closed_form(dout, cache)):
        assert rel_error(staged, closed) < 1e-10


def test_batchnorm_eval_backward_is_dout_times_gamma_over_running_std():
    forward, _, x, gamma, beta = _bn_case(training=False)
    _, _, _, running_var = make_params(4)
    _, cache = forward(x, gamma, beta)
    dout = random_upstream(x.shape, seed=13)
    dx, _, _ = ref.batchnorm_backward(dout, cache)
    np.testing.assert_allclose(dx, dout * gamma / np.sqrt(running_var + 1e-5), rtol=1e-13)


def test_batchnorm_backward_matches_torch_autograd():
    x = make_batch((6, 4), seed=6)
    gamma, beta, _, _ = make_params(4)
    dout = random_upstream(x.shape, seed=14)
    out, cache = ref.batchnorm_forward(x, gamma, beta)
    tx, tg, tb = (t(a).requires_grad_() for a in (x, gamma, beta))
    F.batch_norm(tx, None, None, tg, tb, training=True).backward(t(dout))
    for ours, theirs in zip(ref.batchnorm_backward(dout, cache), (tx.grad, tg.grad, tb.grad)):
        assert_close(ours, theirs, np.float64)


def test_renorm_backward_treats_r_and_d_as_constants():
    """Unclipped r and d depend on x; the backward must differentiate with them frozen
    (stop_gradient in the paper). Compare with a numerical gradient of that frozen function."""
    x = make_batch((6, 4), seed=7)
    gamma, beta, _, _ = make_params(4)
    eps = 1e-5
    running_mean = x.mean(axis=0) + 0.3          # d = -0.3 / running_std, inside [-5, 5]
    running_std = 1.2 * np.sqrt(x.var(axis=0) + eps)  # r = 1 / 1.2, inside [1/3, 3]
    out, cache = ref.batch_renorm_forward(x, gamma, beta, running_mean, running_std, eps=eps)
    r, d = cache["r"], cache["d"]
    assert np.all((r > 1 / 3) & (r < 3)) and np.all(np.abs(d) < 5)

    def frozen_r_d(v):
        xhat_batch = (v - v.mean(axis=0)) / np.sqrt(v.var(axis=0) + eps)
        return gamma * (xhat_batch * r + d) + beta

    np.testing.assert_allclose(frozen_r_d(x), out, rtol=1e-12)
    dout = random_upstream(x.shape, seed=15)
    dx, _, _ = ref.batch_renorm_backward(dout, cache)
    assert rel_error(dx, numerical_gradient(frozen_r_d, x, dout)) < 1e-7


def test_standardize_backward_matches_numerical_gradient():
    x_train = make_batch((10, 3), seed=8)
    mean, std = ref.standardize_fit(x_train)
    x = make_batch((4, 3), seed=9)
    dout = random_upstream(x.shape, seed=16)
    _, cache = ref.standardize_forward(x, mean, std)
    numeric = numerical_gradient(lambda v: ref.standardize_forward(v, mean, std)[0], x, dout)
    assert rel_error(ref.standardize_backward(dout, cache), numeric) < 1e-7


# ---------------------------------------------------------------------------------------------
# Batch renormalization
# ---------------------------------------------------------------------------------------------
def test_renorm_with_rmax_1_dmax_0_is_batchnorm():
    x = make_batch((6, 4), seed=10)
    gamma, beta, _, _ = make_params(4)
    running_mean, running_std = np.full(4, 7.0), np.full(4, 0.01)  # far from the batch's
    out, cache = ref.batch_renorm_forward(x, gamma, beta, running_mean, running_std,
                                          rmax=1.0, dmax=0.0)
    bn_out, bn_cache = ref.batchnorm_forward(x, gamma, beta)
    np.testing.assert_array_equal(cache["r"], np.ones(4))
    np.testing.assert_array_equal(cache["d"], np.zeros(4))
    np.testing.assert_array_equal(out, bn_out)
    dout = random_upstream(x.shape, seed=17)
    for renorm_grad, bn_grad in zip(ref.batch_renorm_backward(dout, cache),
                                    ref.batchnorm_backward_closed_form(dout, bn_cache)):
        np.testing.assert_array_equal(renorm_grad, bn_grad)


def test_renorm_train_equals_eval_when_running_stats_equal_batch_stats():
    x = make_batch((6, 4), seed=11)
    gamma, beta, _, _ = make_params(4)
    eps = 1e-5
    mu_b, sigma_b = x.mean(axis=0), np.sqrt(x.var(axis=0) + eps)
    train_out, cache = ref.batch_renorm_forward(x, gamma, beta, mu_b.copy(), sigma_b.copy(),
                                                training=True, eps=eps)
    eval_out, _ = ref.batch_renorm_forward(x, gamma, beta, mu_b.copy(), sigma_b.copy(),
                                           training=False, eps=eps)
    np.testing.assert_allclose(cache["r"], 1.0, rtol=1e-14)
    np.testing.assert_allclose(cache["d"], 0.0, atol=1e-14)
    np.testing.assert_allclose(train_out, eval_out, rtol=1e-12, atol=1e-12)


def test_renorm_clips_r_and_d():
    # Features: r above rmax, r below 1/rmax, d above dmax, d below -dmax.
    x = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # mu_B = 1, sigma_B ~ 1
    running_mean = np.array([1.0, 1.0, -50.0, 50.0])
    running_std = np.array([0.01, 100.0, 1.0, 1.0])
    gamma, beta = np.ones(4), np.zeros(4)
    _, cache = ref.batch_renorm_forward(x, gamma, beta, running_mean, running_std,
                                        rmax=2.0, dmax=3.0)
    np.testing.assert_allclose(cache["r"][:2], [2.0, 0.5], rtol=1e-15)
    np.testing.assert_allclose(cache["d"][2:], [3.0, -3.0], rtol=1e-15)
    # Features 2 and 3 have sigma_B / running_std inside [1/2, 2]: not clipped.
    sigma_b = np.sqrt(1.0 + 1e-5)
    np.testing.assert_allclose(cache["r"][2:], sigma_b, rtol=1e-15)
    np.testing.assert_allclose(cache["d"][:2], 0.0, atol=1e-15)


def test_renorm_uses_pre_update_running_stats_then_updates_them_in_place():
    x = make_batch((8, 3), seed=12)
    gamma, beta, _, _ = make_params(3)
    old_mean, old_std = np.array([0.2, 0.4, 0.6]), np.array([1.5, 2.5, 3.0])
    running_mean, running_std = old_mean.copy(), old_std.copy()
    mean_buffer, std_buffer = running_mean, running_std
    _, cache = ref.batch_renorm_forward(x, gamma, beta, running_mean, running_std,
                                        momentum=0.5, eps=1e-5)
    mu_b, sigma_b = x.mean(axis=0), np.sqrt(x.var(axis=0) + 1e-5)
    np.testing.assert_allclose(cache["r"], np.clip(sigma_b / old_std, 1 / 3, 3), rtol=1e-13)
    np.testing.assert_allclose(cache["d"], np.clip((mu_b - old_mean) / old_std, -5, 5),
                               rtol=1e-13)
    assert running_mean is mean_buffer and running_std is std_buffer  # updated in place
    np.testing.assert_allclose(running_mean, old_mean + 0.5 * (mu_b - old_mean), rtol=1e-13)
    np.testing.assert_allclose(running_std, old_std + 0.5 * (sigma_b - old_std), rtol=1e-13)
    # r computed from the updated std would differ: the test can tell the two apart.
    assert rel_error(cache["r"], np.clip(sigma_b / running_std, 1 / 3, 3)) > 1e-3


def test_renorm_eval_uses_running_stats_and_does_not_update_them():
    x = make_batch((5, 3), seed=13)
    gamma, beta, _, _ = make_params(3)
    running_mean, running_std = np.array([0.1, -0.2, 0.3]), np.array([1.5, 0.7, 2.0])
    out, _ = ref.batch_renorm_forward(x, gamma, beta, running_mean, running_std, training=False)
    np.testing.assert_allclose(out, gamma * (x - running_mean) / running_std + beta, rtol=1e-13)
    np.testing.assert_array_equal(running_mean, [0.1, -0.2, 0.3])
    np.testing.assert_array_equal(running_std, [1.5, 0.7, 2.0])


# ---------------------------------------------------------------------------------------------
# Folding, standardization, numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_into_linear_matches_torch(with_bias):
    linear = torch.nn.Linear(5, 3, bias=with_bias, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(3, eps=1e-3, dtype=torch.float64).eval()
    gamma, beta, running_mean, running_var = make_params(3)
    with torch.no_grad():
        bn.weight.copy_(t(gamma))
        bn.bias.copy_(t(beta))
        bn.running_mean.copy_(t(running_mean))
        bn.running_var.copy_(t(running_var))
    W = linear.weight.detach().numpy()
    b = linear.bias.detach().numpy() if with_bias else None
    W2, b2 = ref.fold_batchnorm_into_linear(W, b, gamma, beta, running_mean, running_var,
                                            eps=1e-3)
    u = make_batch((7, 5), seed=14)
    with torch.no_grad():
        expected = bn(linear(t(u)))
    assert W2.shape == (3, 5) and b2.shape == (3,)
    assert_close(u @ W2.T + b2, expected, np.float64)


def test_standardize_uses_training_statistics_and_survives_constant_features():
    x_train = make_batch((20, 3), seed=15)
    x_train[:, 2] = 4.0  # a constant feature, like an MNIST corner pixel
    mean, std = ref.standardize_fit(x_train)
    assert np.all(np.isfinite(std)) and std[2] > 0
    train_out, _ = ref.standardize_forward(x_train, mean, std)
    np.testing.assert_allclose(train_out[:, :2].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(train_out[:, :2].std(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(train_out[:, 2], 0.0)

    x_test = make_batch((4, 3), seed=16, loc=3.0)
    test_out, _ = ref.standardize_forward(x_test, mean, std)
    np.testing.assert_allclose(test_out, (x_test - x_train.mean(0)) / std, rtol=1e-13)
    assert np.all(np.isfinite(test_out))


def test_variance_is_stable_for_a_large_mean_in_float32():
    """Two-pass variance: E[x^2] - E[x]^2 cancels catastrophically when the mean is large."""
    rng = np.random.default_rng(17)
    x = (1e4 + rng.standard_normal((256, 3))).astype(np.float32)
    true_var = x.astype(np.float64).var(axis=0)  # about 1
    naive_var = (x ** 2).mean(axis=0) - x.mean(axis=0) ** 2  # float32: garbage
    assert np.max(np.abs(naive_var - true_var) / true_var) > 0.1

    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    out, cache = ref.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(cache["var"], true_var, rtol=1e-3)
    np.testing.assert_allclose(out.std(axis=0), 1.0, rtol=1e-3)
    _, ln_cache = ref.layernorm_forward(x.T.copy(), np.ones(256, np.float32),
                                        np.zeros(256, np.float32))
    ln_var = 1.0 / ln_cache["rstd"][:, 0] ** 2 - 1e-5
    np.testing.assert_allclose(ln_var, true_var, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the problem
# ---------------------------------------------------------------------------------------------
def _call(layer, x, training=True, gamma=None):
    """Call one forward with well-formed parameters for 3 features (unless gamma is given)."""
    g = np.ones(3) if gamma is None else gamma
    b = np.zeros(3)
    if layer == "batchnorm":
        return ref.batchnorm_forward(x, g, b, np.zeros(3), np.ones(3), training=training)
    if layer == "spatial":
        return ref.spatial_batchnorm_forward(x, g, b, np.zeros(3), np.ones(3), training=training)
    if layer == "renorm":
        return ref.batch_renorm_forward(x, g, b, np.zeros(3), np.ones(3), training=training)
    if layer == "layernorm":
        return ref.layernorm_forward(x, g, b)
    if layer == "standardize":
        return ref.standardize_forward(x, np.zeros(3), g)
    raise AssertionError(layer)


GOOD_SHAPES = {"batchnorm": (4, 3), "spatial": (2, 3, 2, 2), "renorm": (4, 3),
               "layernorm": (4, 3), "standardize": (4, 3)}


@pytest.mark.parametrize("layer", ["batchnorm", "spatial", "renorm"])
def test_batch_of_one_in_training_raises(layer):
    shape = (1, 3, 1, 1) if layer == "spatial" else (1, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _call(layer, np.ones(shape))
    _call(layer, np.ones(shape), training=False)  # eval mode uses the running statistics


@pytest.mark.parametrize("layer, bad_shape", [("batchnorm", (4, 3, 2)), ("spatial", (4, 3)),
                                              ("renorm", (3,)), ("standardize", (2, 4, 3))])
def test_wrong_rank_raises(layer, bad_shape):
    with pytest.raises(ValueError, match="expects input of shape"):
        _call(layer, np.ones(bad_shape))


@pytest.mark.parametrize("layer, bad_shape", [("batchnorm", (4, 2)), ("spatial", (2, 4, 2, 2)),
                                              ("renorm", (4, 5)), ("standardize", (4, 2))])
def test_wrong_channel_count_raises(layer, bad_shape):
    with pytest.raises(ValueError, match="channels in axis 1"):
        _call(layer, np.ones(bad_shape))


def test_layernorm_wrong_trailing_shape_raises():
    with pytest.raises(ValueError, match=r"last 1 dimension\(s\) are \(3,\)"):
        _call("layernorm", np.ones((4, 5)))


@pytest.mark.parametrize("layer", GOOD_SHAPES)
def test_integer_input_raises(layer):
    with pytest.raises(TypeError, match="floating-point"):
        _call(layer, np.ones(GOOD_SHAPES[layer], dtype=np.int64))


@pytest.mark.parametrize("layer", GOOD_SHAPES)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_input_raises(layer, bad_value):
    x = np.ones(GOOD_SHAPES[layer])
    x.flat[1] = bad_value
    with pytest.raises(ValueError, match="non-finite"):
        _call(layer, x)


@pytest.mark.parametrize("layer", ["batchnorm", "spatial", "renorm"])
@pytest.mark.parametrize("bad_gamma", [np.ones((3, 1)), np.ones(()), np.ones((1, 3))])
def test_wrong_gamma_shape_raises(layer, bad_gamma):
    with pytest.raises(ValueError, match=r"gamma of shape \(D,\)"):
        _call(layer, np.ones(GOOD_SHAPES[layer]), gamma=bad_gamma)


def test_wrong_beta_and_running_shapes_raise():
    x, gamma = make_batch((4, 3)), np.ones(3)
    with pytest.raises(ValueError, match=r"beta of shape \(3,\)"):
        ref.batchnorm_forward(x, gamma, np.zeros(4))
    with pytest.raises(ValueError, match=r"running_var of shape \(3,\)"):
        ref.batchnorm_forward(x, gamma, np.zeros(3), np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match=r"beta of shape \(3,\)"):
        ref.layernorm_forward(x, gamma, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"running_std of shape \(3,\)"):
        ref.batch_renorm_forward(x, gamma, np.zeros(3), np.zeros(3), np.ones(5))


def test_renorm_rejects_bad_limits_and_missing_running_stats():
    x, gamma, beta = make_batch((4, 3)), np.ones(3), np.zeros(3)
    with pytest.raises(ValueError, match="rmax >= 1"):
        ref.batch_renorm_forward(x, gamma, beta, np.zeros(3), np.ones(3), rmax=0.5)
    with pytest.raises(ValueError, match="needs running_mean and running_std"):
        ref.batch_renorm_forward(x, gamma, beta, None, None)
