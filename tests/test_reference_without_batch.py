"""Chapter 8's NumPy reference layers: group norm (and its extremes instance norm and layer norm),
RMSNorm and weight standardization, against PyTorch, numerical gradients and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normcourse import reference as ref
from normcourse.gradcheck import numerical_gradient, random_upstream, rel_error

torch.set_num_threads(1)


def make_batch(shape, seed=0, loc=0.5, scale=2.0, dtype=np.float64):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def make_affine(shape, seed=100):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, shape), rng.standard_normal(shape)


def t(a):
    return torch.from_numpy(np.array(a))


# ---------------------------------------------------------------------------------------------
# Forward passes against PyTorch, and group norm's two extremes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("shape, groups", [((3, 6, 4, 5), 3), ((2, 4, 7), 2), ((2, 6, 2, 3, 2), 6),
                                           ((1, 4, 3, 3), 1)])
def test_groupnorm_matches_torch(shape, groups, dtype, tol):
    x = make_batch(shape, dtype=dtype)
    gamma, beta = (a.astype(dtype) for a in make_affine(shape[1]))
    out, _ = ref.groupnorm_forward(x, gamma, beta, groups, eps=1e-3)
    expected = F.group_norm(t(x), groups, t(gamma), t(beta), eps=1e-3)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected.numpy(), rtol=tol, atol=tol)


def test_groupnorm_with_one_group_is_layernorm_over_c_h_w():
    """G = 1: the reference layer norm over (C, H, W), with gamma, beta repeated per channel."""
    x = make_batch((3, 4, 2, 5), seed=1)
    gamma, beta = make_affine(4)
    out, _ = ref.groupnorm_forward(x, gamma, beta, num_groups=1)
    per_unit = lambda v: np.broadcast_to(v[:, None, None], (4, 2, 5)).copy()  # noqa: E731
    expected, _ = ref.layernorm_forward(x, per_unit(gamma), per_unit(beta))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_groupnorm_with_one_channel_per_group_is_instance_norm():
    """G = C: every (example, channel) normalized with its own mean and biased variance."""
    x = make_batch((3, 4, 2, 5), seed=2)
    gamma, beta = make_affine(4)
    out, _ = ref.groupnorm_forward(x, gamma, beta, num_groups=4)
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    expected = gamma[:, None, None] * (x - mean) / np.sqrt(var + 1e-5) + beta[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.instancenorm_forward(x, gamma, beta)[0], out, rtol=0, atol=0)
    torch_in = F.instance_norm(t(x), weight=t(gamma), bias=t(beta))
    np.testing.assert_allclose(out, torch_in.numpy(), rtol=1e-12, atol=1e-12)


def test_groupnorm_groups_are_consecutive_channels():
    """Group g holds channels g*C/G ... (g+1)*C/G - 1: shifting channel 0 changes only group 0."""
    x = make_batch((2, 6, 3, 3), seed=3)
    gamma, beta = np.ones(6), np.zeros(6)
    before, _ = ref.groupnorm_forward(x, gamma, beta, num_groups=3)
    x2 = x.copy()
    x2[:, 0] *= 10.0
    after, _ = ref.groupnorm_forward(x2, gamma, beta, num_groups=3)
    changed = np.abs(after - before).max(axis=(0, 2, 3)) > 1e-9
    assert changed.tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("x_shape, normalized_shape", [((5, 6), (6,)), ((2, 3, 4, 5), (4, 5))])
def test_rmsnorm_matches_torch(x_shape, normalized_shape, eps):
    x = make_batch(x_shape, seed=4)
    gamma, _ = make_affine(normalized_shape)
    out, _ = ref.rmsnorm_forward(x, gamma, eps=eps)
    expected = F.rms_norm(t(x), normalized_shape, t(gamma), eps=eps)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)


def test_rmsnorm_eps_none_is_the_dtypes_machine_epsilon():
    x = 1e-4 * make_batch((3, 4), seed=5, dtype=np.float32)  # small: eps is visible
    out, _ = ref.rmsnorm_forward(x, np.ones(4, np.float32))
    expected, _ = ref.rmsnorm_forward(x, np.ones(4, np.float32), eps=float(np.finfo(np.float32).eps))
    np.testing.assert_array_equal(out, expected)
    assert not np.allclose(out, ref.rmsnorm_forward(x, np.ones(4, np.float32), eps=1e-5)[0])


def test_rmsnorm_of_zero_mean_rows_is_layernorm_without_beta():
    x = make_batch((4, 6), seed=6)
    x -= x.mean(axis=1, keepdims=True)
    gamma, _ = make_affine(6)
    out, _ = ref.rmsnorm_forward(x, gamma, eps=1e-5)
    expected, _ = ref.layernorm_forward(x, gamma, np.zeros(6), eps=1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_weight_standardization_has_zero_mean_unit_variance_per_filter_and_matches_torch():
    w = make_batch((5, 3, 3, 3), seed=7)
    what, _ = ref.weight_standardize_forward(w, eps=0.0)
    flat = what.reshape(5, -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-13)
    np.testing.assert_allclose(flat.var(axis=1), 1.0, rtol=1e-12)
    # a float64 torch composition: per output channel over (C_in, kh, kw)
    tw = t(w)
    mean = tw.mean(dim=(1, 2, 3), keepdim=True)
    var = tw.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    expected = (tw - mean) / torch.sqrt(var + 1e-5)
    np.testing.assert_allclose(ref.weight_standardize_forward(w)[0], expected.numpy(),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Backward passes: numerical gradients (float64, random upstream) and closed form == staged
# ---------------------------------------------------------------------------------------------
GN_CASES = {"group-4d": ((2, 6, 3, 2), 3), "group-3d": ((3, 4, 5), 2),
            "layer-extreme": ((2, 4, 2, 3), 1), "instance-extreme": ((2, 3, 2, 3), 3)}


@pytest.mark.parametrize("case", GN_CASES)
@pytest.mark.parametrize("backward", [ref.groupnorm_backward, ref.groupnorm_backward_closed_form])
def test_groupnorm_backward_matches_numerical_gradient(case, backward):
    shape, groups = GN_CASES[case]
    x = make_batch(shape, seed=8)
    gamma, beta = make_affine(shape[1])

    def forward(x, gamma, beta):
        return ref.groupnorm_forward(x, gamma, beta, groups)[0]

    out, cache = ref.groupnorm_forward(x, gamma, beta, groups)
    dout = random_upstream(out.shape, seed=11)
    dx, dgamma, dbeta = backward(dout, cache)
    assert dx.shape == x.shape and dgamma.shape == gamma.shape and dbeta.shape == beta.shape
    assert rel_error(dx, numerical_gradient(lambda v: forward(v, gamma, beta), x, dout)) < 1e-7
    assert rel_error(dgamma, numerical_gradient(lambda v: forward(x, v, beta), gamma, dout)) < 1e-7
    assert rel_error(dbeta, numerical_gradient(lambda v: forward(x, gamma, v), beta, dout)) < 1e-7


@pytest.mark.parametrize("x_shape, normalized_shape", [((5, 6), (6,)), ((2, 3, 4, 3), (4, 3))])
@pytest.mark.parametrize("backward", [ref.rmsnorm_backward, ref.rmsnorm_backward_closed_form])
def test_rmsnorm_backward_matches_numerical_gradient(x_shape, normalized_shape, backward):
    x = make_batch(x_shape, seed=9)
    gamma, _ = make_affine(normalized_shape)
    out, cache = ref.rmsnorm_forward(x, gamma, eps=1e-6)
    dout = random_upstream(out.shape, seed=12)
    dx, dgamma = backward(dout, cache)
    numeric_dx = numerical_gradient(lambda v: ref.rmsnorm_forward(v, gamma, eps=1e-6)[0], x, dout)
    numeric_dgamma = numerical_gradient(lambda v: ref.rmsnorm_forward(x, v, eps=1e-6)[0], gamma,
                                        dout)
    assert dx.shape == x.shape and dgamma.shape == gamma.shape
    assert rel_error(dx, numeric_dx) < 1e-7
    assert rel_error(dgamma, numeric_dgamma) < 1e-7


@pytest.mark.parametrize("backward", [ref.weight_standardize_backward,
                                      ref.weight_standardize_backward_closed_form])
def test_weight_standardize_backward_matches_numerical_gradient(backward):
    w = make_batch((4, 2, 3, 3), seed=10, scale=0.3)
    out, cache = ref.weight_standardize_forward(w)
    dout = random_upstream(out.shape, seed=13)
    dw = backward(dout, cache)
    numeric = numerical_gradient(lambda v: ref.weight_standardize_forward(v)[0], w, dout)
    assert dw.shape == w.shape
    assert rel_error(dw, numeric) < 1e-7


def test_closed_forms_equal_the_staged_backward_passes():
    x = make_batch((3, 6, 4, 4), seed=14)
    gamma, beta = make_affine(6)
    dout = random_upstream(x.shape, seed=15)
    _, cache = ref.groupnorm_forward(x, gamma, beta, 2)
    for staged, closed in zip(ref.groupnorm_backward(dout, cache),
                              ref.groupnorm_backward_closed_form(dout, cache), strict=True):
        assert rel_error(staged, closed) < 1e-10
    _, cache = ref.rmsnorm_forward(x, np.ones((4, 4)) * 1.5)
    for staged, closed in zip(ref.rmsnorm_backward(dout, cache),
                              ref.rmsnorm_backward_closed_form(dout, cache), strict=True):
        assert rel_error(staged, closed) < 1e-10
    _, cache = ref.weight_standardize_forward(x)
    assert rel_error(ref.weight_standardize_backward(dout, cache),
                     ref.weight_standardize_backward_closed_form(dout, cache)) < 1e-10


def test_groupnorm_backward_matches_torch_autograd():
    x = make_batch((2, 4, 3, 3), seed=16)
    gamma, beta = make_affine(4)
    out, cache = ref.groupnorm_forward(x, gamma, beta, 2)
    dout = random_upstream(out.shape, seed=17)
    tx, tg, tb = (t(a).requires_grad_() for a in (x, gamma, beta))
    F.group_norm(tx, 2, tg, tb).backward(t(dout))
    for ours, theirs in zip(ref.groupnorm_backward(dout, cache), (tx, tg, tb), strict=True):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear sentence
# ---------------------------------------------------------------------------------------------
def test_groupnorm_rejects_bad_input():
    gamma, beta = np.ones(6), np.zeros(6)
    with pytest.raises(ValueError, match="divisible by num_groups=4"):
        ref.groupnorm_forward(make_batch((2, 6, 3, 3)), gamma, beta, 4)
    with pytest.raises(ValueError, match="positive integer"):
        ref.groupnorm_forward(make_batch((2, 6, 3, 3)), gamma, beta, 0)
    with pytest.raises(ValueError, match="expects input of shape"):
        ref.groupnorm_forward(make_batch((2, 6)), gamma, beta, 2)
    with pytest.raises(ValueError, match="channels in axis 1"):
        ref.groupnorm_forward(make_batch((2, 4, 3)), gamma, beta, 2)
    with pytest.raises(TypeError, match="floating-point"):
        ref.groupnorm_forward(np.ones((2, 6, 3), dtype=np.int64), gamma, beta, 2)
    with pytest.raises(ValueError, match="non-finite"):
        ref.groupnorm_forward(np.full((2, 6, 3), np.nan), gamma, beta, 2)
    with pytest.raises(ValueError, match=r"beta of shape \(6,\)"):
        ref.groupnorm_forward(make_batch((2, 6, 3)), gamma, np.zeros(3), 2)


def test_groupnorm_accepts_a_batch_of_one():
    x = make_batch((1, 4, 3, 3), seed=18)
    out, _ = ref.groupnorm_forward(x, np.ones(4), np.zeros(4), 2)
    np.testing.assert_allclose(out, F.group_norm(t(x), 2).numpy(), rtol=1e-12, atol=1e-12)


def test_rmsnorm_and_weight_standardization_reject_bad_input():
    with pytest.raises(ValueError, match=r"last 1 dimension\(s\) are \(3,\)"):
        ref.rmsnorm_forward(make_batch((4, 5)), np.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        ref.rmsnorm_forward(np.ones((4, 3), dtype=np.int32), np.ones(3))
    with pytest.raises(ValueError, match=r"\(C_out, C_in, kh, kw\)"):
        ref.weight_standardize_forward(make_batch((4, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        ref.weight_standardize_forward(np.ones((2, 1, 3, 3), dtype=np.int64))
