"""RMSNorm (normcourse.functional and normcourse.nn) against torch.nn.RMSNorm, and the
weight-standardized convolution WSConv2d against a float64 autograd composition."""

import pytest
import torch
from torch import nn

from normcourse import functional as nf
from normcourse import nn as ncnn

from test_group_norm import assert_same, assert_same_state, randn, randomize_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize("normalized_shape, shape", [(6, (4, 6)), ((6,), (2, 3, 6)),
                                                     ((3, 4), (2, 5, 3, 4)), ((5,), (5,))])
@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}])
def test_rms_norm_module_matches_torch(normalized_shape, shape, kwargs):
    theirs = nn.RMSNorm(normalized_shape, dtype=torch.float64, **kwargs)
    randomize_parameters(theirs)
    ours = ncnn.RMSNorm(normalized_shape, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs)
    assert repr(ours).replace("normcourse", "") == repr(theirs)
    assert_same(ours, theirs, randn(shape, 1, scale=1e-4 if not kwargs else 2.0), seed=2)
    fresh = nn.RMSNorm(normalized_shape, dtype=torch.float64, **kwargs)
    fresh.load_state_dict(ours.state_dict())
    assert_same_state(ours, fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_eps_none_is_the_inputs_machine_epsilon(dtype):
    """Rows of tiny numbers, where eps is not negligible next to mean(x^2)."""
    x = randn((3, 8), 3, dtype, loc=0.0, scale=1e-4 if dtype == torch.float32 else 1e-8)
    ours, theirs = ncnn.RMSNorm(8, dtype=dtype), nn.RMSNorm(8, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours(x), x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps))
    assert not torch.allclose(ours(x), nf.rms_norm(x, (8,), eps=1e-5))


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_gradcheck_and_gradgradcheck(weight):
    x = randn((3, 2, 5), 4).requires_grad_()
    w = randn((2, 5), 5).requires_grad_() if weight else None

    def f(x, *w):
        return nf.rms_norm(x, (2, 5), *w, eps=1e-6)

    inputs = (x, w) if weight else (x,)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    torch.testing.assert_close(nf.rms_norm_autograd(x, (2, 5), w, eps=1e-6), f(*inputs))


def test_rms_norm_rejects_bad_input():
    with pytest.raises(ValueError, match=r"last 1 dimension\(s\) are \(4,\)"):
        ncnn.RMSNorm(4)(torch.ones(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        ncnn.RMSNorm(4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight of shape \(4,\)"):
        nf.rms_norm(torch.ones(2, 4), 4, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# WSConv2d
# ---------------------------------------------------------------------------------------------
def standardized_conv(conv, x, eps=1e-5):
    """The float64 autograd composition WSConv2d must equal: torch ops only."""
    w = conv.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return torch.nn.functional.conv2d(x, (w - mean) / torch.sqrt(var + eps), conv.bias,
                                      conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"stride": 2, "padding": 1},
                                    {"groups": 2}])
def test_ws_conv2d_equals_the_autograd_composition(kwargs):
    torch.manual_seed(0)
    ours = ncnn.WSConv2d(4, 6, 3, dtype=torch.float64, **kwargs)
    plain = nn.Conv2d(4, 6, 3, dtype=torch.float64, **kwargs)
    plain.load_state_dict(ours.state_dict())  # the same parameters and keys as Conv2d
    x = randn((2, 4, 7, 7), 6)
    g = randn(ours(x).shape, 7, loc=0.0, scale=1.0)
    results = []
    for forward in (ours, lambda v: standardized_conv(plain, v)):
        xi = x.clone().requires_grad_()
        out = forward(xi)
        params = list((ours if forward is ours else plain).parameters())
        results.append((out, torch.autograd.grad((out * g).sum(), [xi, *params])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_weight_standardization_gradcheck_and_gradgradcheck():
    w = randn((3, 2, 3, 3), 8, scale=0.3).requires_grad_()
    assert torch.autograd.gradcheck(nf.weight_standardization, (w,))
    assert torch.autograd.gradgradcheck(nf.weight_standardization, (w,))
    torch.testing.assert_close(nf.weight_standardization(w), nf.weight_standardization_autograd(w))
    x = randn((2, 2, 5, 5), 9).requires_grad_()
    conv = ncnn.WSConv2d(2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: torch.nn.functional.conv2d(
        x, nf.weight_standardization(w)), (x, conv.weight))


def test_ws_conv2d_output_does_not_change_when_a_filter_is_scaled_or_shifted():
    conv = ncnn.WSConv2d(2, 3, 3, bias=False, ws_eps=0.0, dtype=torch.float64)
    x = randn((1, 2, 5, 5), 10)
    before = conv(x)
    with torch.no_grad():
        conv.weight[1].mul_(7.0).add_(3.0)
    torch.testing.assert_close(conv(x), before, rtol=1e-10, atol=1e-10)


def test_ws_conv2d_rejects_bad_input():
    conv = ncnn.WSConv2d(2, 3, 3)
    with pytest.raises(ValueError, match="channels in axis 1"):
        conv(torch.ones(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(N, C_in, H, W\)"):
        conv(torch.ones(5, 5))
    with pytest.raises(TypeError, match="floating-point"):
        conv(torch.ones(1, 2, 5, 5, dtype=torch.uint8))
