"""GroupNorm, InstanceNorm1d/2d (normcourse.functional and normcourse.nn) against torch.nn:
outputs, gradients, running statistics, state_dict, double backward, bad input."""

import warnings

import pytest
import torch
from torch import nn

from normcourse import functional as nf
from normcourse import nn as ncnn

torch.set_num_threads(1)


def randn(shape, seed, dtype=torch.float64, loc=0.5, scale=2.0):
    return loc + scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize_parameters(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))


def outputs_and_grads(module, x, seed):
    """Forward, then the gradients w.r.t. x and every parameter for a random upstream gradient."""
    g = randn(x.shape, seed, x.dtype, loc=0.0, scale=1.0)
    x = x.clone().requires_grad_()
    out = module(x)
    grads = torch.autograd.grad((out * g).sum(), [x, *module.parameters()])
    return out.detach(), grads


def assert_same(ours, theirs, x, seed, tol=1e-10):
    out, grads = outputs_and_grads(ours, x, seed)
    out_t, grads_t = outputs_and_grads(theirs, x, seed)
    torch.testing.assert_close(out, out_t, rtol=tol, atol=tol)
    assert len(grads) == len(grads_t)
    for a, b in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, channels, shape", [(2, 6, (4, 6, 5, 5)), (3, 6, (2, 6, 7)),
                                                    (1, 4, (3, 4, 2, 2)), (4, 4, (2, 4, 3, 3)),
                                                    (2, 4, (5, 4)), (2, 4, (1, 4, 3, 3))])
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"bias": False}, {"eps": 1e-2}])
def test_group_norm_module_matches_torch(groups, channels, shape, kwargs):
    theirs = nn.GroupNorm(groups, channels, dtype=torch.float64, **kwargs)
    randomize_parameters(theirs)
    ours = ncnn.GroupNorm(groups, channels, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        assert_same(ours, theirs, randn(shape, 3), seed=4)
    assert repr(ours).replace("normcourse", "") == repr(theirs)
    fresh = nn.GroupNorm(groups, channels, dtype=torch.float64, **kwargs)
    fresh.load_state_dict(ours.state_dict())  # and back
    assert_same_state(ours, fresh)


def test_group_norm_functional_and_composition_match_torch_in_float32():
    x, w, b = randn((3, 8, 4, 4), 5, torch.float32), randn((8,), 6, torch.float32), randn((8,), 7, torch.float32)
    expected = torch.nn.functional.group_norm(x, 4, w, b)
    torch.testing.assert_close(nf.group_norm(x, 4, w, b), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nf.group_norm_autograd(x, 4, w, b), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, groups", [((2, 6, 3, 2), 3), ((3, 4, 5), 1), ((2, 4, 3), 4)])
def test_group_norm_gradcheck_and_gradgradcheck(shape, groups, affine):
    x = randn(shape, 8).requires_grad_()
    c = shape[1]
    w = randn((c,), 9).requires_grad_() if affine else None
    b = randn((c,), 10).requires_grad_() if affine else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        return nf.group_norm(args[0], groups, *(args[1:] if affine else (None, None)))

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_group_norm_double_backward_equals_torch():
    """A gradient penalty: d/dx of ||d(sum(y * g))/dx||^2, ours against torch's."""
    x0, w, b = randn((2, 6, 3, 3), 11), randn((6,), 12), randn((6,), 13)
    g = randn((2, 6, 3, 3), 14, loc=0.0, scale=1.0)
    results = []
    for fn in (nf.group_norm, torch.nn.functional.group_norm):
        x = x0.clone().requires_grad_()
        (dx,) = torch.autograd.grad((fn(x, 3, w, b) * g).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), x)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)


def test_group_norm_is_independent_of_the_batch():
    """Each example's output depends on that example only (a batch of 1 equals a slice)."""
    module = ncnn.GroupNorm(2, 4, dtype=torch.float64)
    x = randn((5, 4, 3, 3), 15)
    torch.testing.assert_close(module(x)[2:3], module(x[2:3]), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# InstanceNorm1d / 2d
# ---------------------------------------------------------------------------------------------
INSTANCE_PAIRS = [(ncnn.InstanceNorm1d, nn.InstanceNorm1d, (4, 3, 6)),
                  (ncnn.InstanceNorm1d, nn.InstanceNorm1d, (3, 6)),
                  (ncnn.InstanceNorm2d, nn.InstanceNorm2d, (4, 3, 5, 4)),
                  (ncnn.InstanceNorm2d, nn.InstanceNorm2d, (3, 5, 4))]
INSTANCE_KWARGS = [{}, {"affine": True}, {"track_running_stats": True},
                   {"affine": True, "track_running_stats": True, "momentum": 0.3},
                   {"track_running_stats": True, "momentum": None},
                   {"affine": True, "bias": False}]


@pytest.mark.parametrize("ours_cls, torch_cls, shape", INSTANCE_PAIRS)
@pytest.mark.parametrize("kwargs", INSTANCE_KWARGS)
def test_instance_norm_module_matches_torch(ours_cls, torch_cls, shape, kwargs):
    theirs = torch_cls(3, dtype=torch.float64, **kwargs)
    randomize_parameters(theirs)
    ours = ours_cls(3, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs)
    assert repr(ours).replace("normcourse", "") == repr(theirs)
    for step in range(3):  # training: the running statistics follow torch's rule
        x = randn(shape, 20 + step, loc=step, scale=1.0 + step)
        assert_same(ours, theirs, x, seed=step)
        assert_same_state(ours, theirs)
    ours.eval(), theirs.eval()
    assert_same(ours, theirs, randn(shape, 30), seed=31)
    assert_same_state(ours, theirs)
    fresh = torch_cls(3, dtype=torch.float64, **kwargs)
    fresh.load_state_dict(ours.state_dict())
    assert_same_state(ours, fresh)


def test_instance_norm_defaults_have_no_buffers_and_no_parameters():
    ours, theirs = ncnn.InstanceNorm2d(4), nn.InstanceNorm2d(4)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []
    assert (ours.affine, ours.track_running_stats, ours.momentum, ours.eps) == (False, False, 0.1, 1e-5)


def test_instance_norm_running_var_is_the_average_unbiased_instance_variance():
    module = ncnn.InstanceNorm1d(2, track_running_stats=True, momentum=1.0, dtype=torch.float64)
    x = randn((3, 2, 5), 40)
    module(x)
    torch.testing.assert_close(module.running_mean, x.mean(dim=2).mean(dim=0))
    torch.testing.assert_close(module.running_var, x.var(dim=2, unbiased=True).mean(dim=0))
    assert int(module.num_batches_tracked) == 0  # as torch: registered, never incremented


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_functional_gradcheck_and_gradgradcheck(use_input_stats):
    x = randn((2, 3, 4), 41).requires_grad_()
    w, b = randn((3,), 42).requires_grad_(), randn((3,), 43).requires_grad_()
    rm, rv = randn((3,), 44), 0.5 + randn((3,), 45).abs()

    def f(x, w, b):  # copies: a training call updates the running statistics in place
        return nf.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    for fn in (nf.instance_norm, nf.instance_norm_autograd):
        torch.testing.assert_close(
            fn(x, rm.clone(), rv.clone(), w, b, use_input_stats),
            torch.nn.functional.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats),
            rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_group_norm_rejects_bad_input():
    with pytest.raises(ValueError, match=r"num_channels=6 must be divisible by num_groups=4"):
        ncnn.GroupNorm(4, 6)
    module = ncnn.GroupNorm(2, 4)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, C, \*\)"):
        module(torch.ones(4))
    with pytest.raises(ValueError, match="channels in axis 1"):
        module(torch.ones(2, 6, 3))
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by num_groups=4"):
        nf.group_norm(torch.ones(2, 6, 3), 4)


def test_instance_norm_rejects_bad_input_like_torch():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, C, L\) or \(C, L\)"):
        ncnn.InstanceNorm1d(3)(torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        ncnn.InstanceNorm2d(3)(torch.ones(2, 3, 1, 1))
    with pytest.raises(ValueError, match="channels in axis 1"):
        ncnn.InstanceNorm2d(3, affine=True)(torch.ones(2, 4, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        ncnn.InstanceNorm1d(3)(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        nf.instance_norm(torch.ones(2, 3, 4), use_input_stats=False)
    # without affine or running statistics num_features is unused: a warning, as in torch
    with pytest.warns(UserWarning, match="does not match num_features"):
        out = ncnn.InstanceNorm1d(3)(randn((2, 5, 4), 50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(out, nn.InstanceNorm1d(3)(randn((2, 5, 4), 50)))
