"""normcourse.nn modules as drop-in replacements for torch.nn, and BatchRenorm's behaviour."""

import pytest
import torch
from torch import nn

from normcourse import functional as nf
from normcourse import nn as ncnn

torch.set_num_threads(1)

PAIRS = [
    (ncnn.BatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (ncnn.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
    (ncnn.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 5)),
]


def batches(shape, count, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(1.0 + i + (1 + i) * torch.randn(shape, generator=gen, dtype=dtype)) for i in range(count)]


def randomize(module, seed=1):
    """Non-trivial gamma, beta and running statistics, so that a swapped buffer would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [module.running_mean]:
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen, dtype=torch.float64))


def step_both(ours, theirs, x, seed):
    """One forward/backward with the same random upstream gradient; returns outputs and grads."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = module(xi)
        params = [p for p in module.parameters()]
        grads = torch.autograd.grad((out * g).sum(), [xi] + params)
        results.append((out.detach(), grads))
    return results


def assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_state_dict_round_trip_and_training_match_torch(ours_cls, torch_cls, shape, momentum):
    theirs = torch_cls(4, momentum=momentum, dtype=torch.float64)
    randomize(theirs)
    ours = ours_cls(4, momentum=momentum, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    for step, x in enumerate(batches(shape, 4)):
        (out, grads), (out_t, grads_t) = step_both(ours, theirs, x, seed=step)
        torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
        for g, g_t in zip(grads, grads_t, strict=True):
            torch.testing.assert_close(g, g_t, rtol=1e-10, atol=1e-10)
        assert_same_state(ours, theirs)
    assert int(ours.num_batches_tracked) == 4
    ours.eval()
    theirs.eval()
    x = batches(shape, 1, seed=7)[0]
    (out, grads), (out_t, grads_t) = step_both(ours, theirs, x, seed=9)
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], grads_t[0], rtol=1e-10, atol=1e-10)
    assert_same_state(ours, theirs)
    # and back: torch loads ours
    fresh = torch_cls(4, momentum=momentum, dtype=torch.float64)
    fresh.load_state_dict(ours.state_dict())
    assert_same_state(ours, fresh)


def test_momentum_none_is_the_cumulative_average():
    bn = ncnn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    xs = batches((10, 3), 3)
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_track_running_stats_false_uses_batch_stats_in_eval(ours_cls, torch_cls, shape):
    ours = ours_cls(4, track_running_stats=False, dtype=torch.float64)
    theirs = torch_cls(4, track_running_stats=False, dtype=torch.float64)
    assert ours.running_mean is None and ours.running_var is None and ours.num_batches_tracked is None
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    x = batches(shape, 1)[0]
    ours.eval()
    theirs.eval()
    out = ours(x)
    torch.testing.assert_close(out, theirs(x))
    ours.train()
    torch.testing.assert_close(out, ours(x))  # the same batch statistics in both modes


def test_switching_off_tracking_after_construction_freezes_the_buffers_like_torch():
    """Setting track_running_stats = False on a trained layer (a way to freeze BN for
    fine-tuning): training mode then uses batch statistics without touching the buffers, and eval
    mode still uses the buffers, as in torch."""
    ours, theirs = ncnn.BatchNorm1d(4, dtype=torch.float64), nn.BatchNorm1d(4, dtype=torch.float64)
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    ours.track_running_stats = theirs.track_running_stats = False
    frozen = {k: v.clone() for k, v in ours.state_dict().items()}
    for step, x in enumerate(batches((8, 4), 2)):
        (out, _), (out_t, _) = step_both(ours, theirs, x, seed=step)
        torch.testing.assert_close(out, out_t)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    ours.eval()
    theirs.eval()
    x = batches((8, 4), 1, seed=3)[0]
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_affine_false_matches_torch(ours_cls, torch_cls, shape):
    ours = ours_cls(4, affine=False, dtype=torch.float64)
    theirs = torch_cls(4, affine=False, dtype=torch.float64)
    assert ours.weight is None and ours.bias is None and list(ours.parameters()) == []
    for step, x in enumerate(batches(shape, 3)):
        (out, (dx,)), (out_t, (dx_t,)) = step_both(ours, theirs, x, seed=step)
        torch.testing.assert_close(out, out_t)
        torch.testing.assert_close(dx, dx_t)
    assert_same_state(ours, theirs)


def test_bias_false_keeps_only_gamma_like_torch():
    ours = ncnn.BatchNorm2d(4, bias=False, dtype=torch.float64)
    theirs = nn.BatchNorm2d(4, bias=False, dtype=torch.float64)
    assert ours.bias is None and ours.extra_repr() == theirs.extra_repr()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    (out, grads), (out_t, grads_t) = step_both(ours, theirs, batches((3, 4, 2, 2), 1)[0], seed=0)
    torch.testing.assert_close(out, out_t)
    for g, g_t in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(g, g_t)


def test_buffers_are_buffers_not_parameters():
    bn = ncnn.BatchNorm2d(3)
    assert [name for name, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    assert bn.num_batches_tracked.dtype == torch.long
    rn = ncnn.BatchRenorm2d(3)
    assert [name for name, _ in rn.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in rn.named_buffers()] == ["running_mean", "running_std", "num_batches_tracked"]
    torch.testing.assert_close(rn.running_std, torch.ones(3))
    torch.testing.assert_close(rn.running_mean, torch.zeros(3))


def test_mode_comes_from_module_training_not_grad_mode():
    bn = ncnn.BatchNorm1d(3, dtype=torch.float64)
    x = batches((8, 3), 1)[0]
    with torch.no_grad():  # training mode under no_grad still updates the running statistics
        bn(x)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    before = bn.running_mean.clone()
    with torch.enable_grad():  # eval mode with grad enabled still normalizes with running stats
        out = bn(x.clone().requires_grad_())
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(out.detach(), expected)
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1


def test_constructor_defaults_repr_and_reset_match_torch():
    for ours_cls, torch_cls in [(ncnn.BatchNorm1d, nn.BatchNorm1d), (ncnn.BatchNorm2d, nn.BatchNorm2d)]:
        ours, theirs = ours_cls(5), torch_cls(5)
        assert ours.extra_repr() == theirs.extra_repr()
        assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (1e-5, 0.1, True, True)
        assert_same_state(ours, theirs)
        ours.train()
        ours(torch.randn(4, 5, 3, 3) if ours_cls is ncnn.BatchNorm2d else torch.randn(4, 5))
        ours.reset_running_stats()
        assert_same_state(ours, theirs)
    half = ncnn.BatchNorm2d(2, dtype=torch.bfloat16)
    assert half.weight.dtype == half.running_var.dtype == torch.bfloat16
    assert half.num_batches_tracked.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-3}])
@pytest.mark.parametrize("normalized_shape,shape", [(6, (4, 6)), ((3, 4), (2, 5, 3, 4))])
def test_layer_norm_module_matches_torch(kwargs, normalized_shape, shape):
    theirs = nn.LayerNorm(normalized_shape, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    ours = ncnn.LayerNorm(normalized_shape, dtype=torch.float64, **kwargs)
    assert ours.extra_repr() == theirs.extra_repr()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = batches(shape, 1)[0]
    (out, grads), (out_t, grads_t) = step_both(ours, theirs, x, seed=0)
    torch.testing.assert_close(out, out_t)
    for g, g_t in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(g, g_t)
    ours.eval()
    torch.testing.assert_close(ours(x), out)  # the same computation in both modes
    torch.testing.assert_close(ours(x[:1]), out[:1])  # and independent of the batch


# ---------------------------------------------------------------------------------------------
# BatchRenorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours_cls,torch_cls,shape", [
    (ncnn.BatchRenorm1d, nn.BatchNorm1d, (8, 4)),
    (ncnn.BatchRenorm2d, nn.BatchNorm2d, (3, 4, 5, 5)),
])
def test_batch_renorm_with_rmax_1_dmax_0_is_batch_norm(ours_cls, torch_cls, shape):
    """Training outputs and gradients equal torch's BN. The running statistics differ by design
    (renorm tracks sigma = sqrt(biased var + eps); BN tracks the unbiased variance)."""
    ours = ours_cls(4, rmax=1.0, dmax=0.0, warmup_steps=0, rmax_steps=0, dmax_steps=0, dtype=torch.float64)
    theirs = torch_cls(4, dtype=torch.float64)
    with torch.no_grad():
        ours.running_mean.fill_(3.0)  # far from the batch statistics: r and d would be large
        ours.running_std.fill_(0.1)
    for step, x in enumerate(batches(shape, 3)):
        (out, grads), (out_t, grads_t) = step_both(ours, theirs, x, seed=step)
        torch.testing.assert_close(out, out_t)
        for g, g_t in zip(grads, grads_t, strict=True):
            torch.testing.assert_close(g, g_t)
    assert not torch.allclose(ours.running_std ** 2, theirs.running_var)


def test_batch_renorm_train_equals_eval_when_running_stats_equal_batch_stats():
    x = batches((16, 3, 4), 1)[0]
    rn = ncnn.BatchRenorm1d(3, dtype=torch.float64, warmup_steps=0, rmax_steps=1, dmax_steps=1)
    randomize_affine(rn)
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
    with torch.no_grad():
        rn.running_mean.copy_(mean)
        rn.running_std.copy_(torch.sqrt(var + rn.eps))
    rn.num_batches_tracked.fill_(10)  # schedule fully relaxed: rmax = 3, dmax = 5
    train_out = rn(x)
    rn.eval()
    torch.testing.assert_close(rn(x), train_out)


def randomize_affine(module):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def measured_r(module, x):
    """With running_mean = batch mean (d = 0) and gamma = 1, beta = 0: out = xhat_B * r."""
    var, mean = torch.var_mean(x, dim=0, correction=0)
    with torch.no_grad():
        module.running_mean.copy_(mean)
        module.running_std.fill_(0.01)  # sigma_B / running_std ~ 100: r sits at the upper limit
    xhat = (x - mean) / torch.sqrt(var + module.eps)
    return (module(x) / xhat).mean(0)


def test_batch_renorm_limits_follow_the_schedule_as_training_goes_on():
    """The limits are re-evaluated from num_batches_tracked at each step (not fixed at
    construction), and num_batches_tracked counts training steps only."""
    rn = ncnn.BatchRenorm1d(2, dtype=torch.float64, warmup_steps=2, rmax_steps=6, dmax_steps=4)
    x = batches((32, 2), 1)[0]
    for step in range(8):
        assert int(rn.num_batches_tracked) == step
        expected_rmax, _ = nf.renorm_limits(step, 3.0, 5.0, 2, 6, 4)
        torch.testing.assert_close(measured_r(rn, x), torch.full((2,), expected_rmax, dtype=torch.float64))
    assert expected_rmax == 3.0
    rn.eval()
    rn(x)
    assert int(rn.num_batches_tracked) == 8
    rn.num_batches_tracked.fill_(3)
    rn.train()
    torch.testing.assert_close(measured_r(rn, x), torch.full((2,), 1.5, dtype=torch.float64))


def test_batch_renorm_eval_never_updates_buffers_and_uses_them():
    rn = ncnn.BatchRenorm2d(3, dtype=torch.float64)
    randomize_affine(rn)
    with torch.no_grad():
        rn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        rn.running_std.copy_(torch.tensor([2.0, 0.5, 1.5]))
    state = {k: v.clone() for k, v in rn.state_dict().items()}
    rn.eval()
    x = batches((2, 3, 4, 4), 1)[0]
    with torch.enable_grad():
        out = rn(x)
    view = (1, -1, 1, 1)
    expected = rn.weight.view(view) * (x - rn.running_mean.view(view)) / rn.running_std.view(view) + rn.bias.view(view)
    torch.testing.assert_close(out, expected)
    for key, value in rn.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_batch_renorm_gradients_flow_only_through_the_batch_statistics():
    """dx equals autograd through mu_B and sigma_B with r, d held constant; letting the gradient
    flow through r and d as well gives a different dx (so this test can tell them apart)."""
    rn = ncnn.BatchRenorm1d(3, dtype=torch.float64, rmax=1.5, dmax=0.5, warmup_steps=0, rmax_steps=1, dmax_steps=1)
    randomize_affine(rn)
    rn.num_batches_tracked.fill_(5)
    x = batches((12, 3), 1)[0].requires_grad_()
    var, mean = torch.var_mean(x.detach(), dim=0, correction=0)
    with torch.no_grad():  # near the batch statistics, so that r and d are not clipped
        rn.running_mean.copy_(mean + var.sqrt() * torch.tensor([0.2, -0.3, 0.1]))
        rn.running_std.copy_(var.sqrt() * torch.tensor([1.2, 0.8, 1.1]))
    running_mean, running_std = rn.running_mean.clone(), rn.running_std.clone()
    g = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (dx,) = torch.autograd.grad((rn(x) * g).sum(), [x])
    assert rn.running_mean.grad is None and rn.running_std.grad is None

    def manual(detach):
        var, mean = torch.var_mean(x, dim=0, correction=0)
        sigma = torch.sqrt(var + rn.eps)
        r = (sigma / running_std).clamp(1 / 1.5, 1.5)
        d = ((mean - running_mean) / running_std).clamp(-0.5, 0.5)
        if detach:
            r, d = r.detach(), d.detach()
        assert ((r > 1 / 1.5) & (r < 1.5)).all() and ((d > -0.5) & (d < 0.5)).all()  # unclipped
        out = rn.weight * ((x - mean) / sigma * r + d) + rn.bias
        return torch.autograd.grad((out * g).sum(), [x])[0]

    torch.testing.assert_close(dx, manual(detach=True))
    assert not torch.allclose(dx, manual(detach=False), rtol=1e-3, atol=1e-3)


def test_batch_renorm_defaults_and_state_dict_round_trip():
    a = ncnn.BatchRenorm2d(4)
    assert (a.eps, a.momentum, a.rmax, a.dmax) == (1e-5, 0.01, 3.0, 5.0)
    assert (a.warmup_steps, a.rmax_steps, a.dmax_steps) == (5000, 40000, 25000)
    a(torch.randn(3, 4, 2, 2))
    b = ncnn.BatchRenorm2d(4)
    b.load_state_dict(a.state_dict())
    assert_same_state(a, b)
    a.reset_parameters()
    assert int(a.num_batches_tracked) == 0 and torch.equal(a.running_std, torch.ones(4))


@pytest.mark.parametrize("cls,shape", [(ncnn.BatchRenorm1d, (0, 3)), (ncnn.BatchRenorm2d, (2, 3, 0, 4))])
def test_batch_renorm_empty_batch_leaves_the_averages_and_counts_the_step(cls, shape):
    """As torch's batch norm does with an empty batch (tests/test_conformance.py)."""
    layer = cls(3)
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        layer.running_std.fill_(2.0)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == shape and x.grad.shape == shape
    assert torch.equal(layer.weight.grad, torch.zeros(3)) and torch.equal(layer.bias.grad, torch.zeros(3))
    assert torch.equal(layer.running_mean, torch.full((3,), 0.5))
    assert torch.equal(layer.running_std, torch.full((3,), 2.0))
    assert int(layer.num_batches_tracked) == 1
