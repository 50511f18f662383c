"""normcourse.functional against PyTorch: forward, gradients, running statistics, gradcheck.

Every gradient comparison uses a random upstream gradient: with an all-ones upstream gradient
sum(BN(x)) does not depend on x and a wrong backward would pass.
"""

import pytest
import torch
import torch.nn.functional as F

from normcourse import functional as nf

torch.set_num_threads(1)

SHAPES = [(8, 3), (5, 3, 7), (4, 3, 5, 6)]
DTYPES = [torch.float32, torch.float64]
# float32: a few ulps of values of order 1 accumulated over up to 120 values per channel
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make_inputs(shape, dtype, seed=0, mean=0.5, scale=2.0):
    """x (requires grad), gamma, beta (require grad), running mean/var (C,), upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (mean + scale * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    weight = (0.5 + torch.rand(c, generator=gen, dtype=dtype)).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=dtype).requires_grad_()
    running_mean = torch.randn(c, generator=gen, dtype=dtype)
    running_var = 0.5 + torch.rand(c, generator=gen, dtype=dtype)
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    return x, weight, bias, running_mean, running_var, upstream


def forward_and_grads(fn, x, weight, bias, upstream, *args, **kwargs):
    out = fn(x, *args, weight=weight, bias=bias, **kwargs)
    grads = torch.autograd.grad((out * upstream).sum(), [t for t in (x, weight, bias) if t is not None])
    return out.detach(), grads


def assert_all_close(actual, expected, dtype):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# batch norm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch(shape, dtype, training):
    x, w, b, rm, rv, g = make_inputs(shape, dtype)
    rm_t, rv_t = rm.clone(), rv.clone()
    out, grads = forward_and_grads(nf.batch_norm, x, w, b, g, rm, rv, training=training, momentum=0.2)
    out_t, grads_t = forward_and_grads(F.batch_norm, x, w, b, g, rm_t, rv_t, training=training, momentum=0.2)
    assert_all_close((out, *grads, rm, rv), (out_t, *grads_t, rm_t, rv_t), dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_without_affine_or_running_stats_matches_torch(shape):
    x, _, _, _, _, g = make_inputs(shape, torch.float64)
    out, (dx,) = forward_and_grads(nf.batch_norm, x, None, None, g, None, None, training=True)
    out_t, (dx_t,) = forward_and_grads(F.batch_norm, x, None, None, g, None, None, training=True)
    assert_all_close((out, dx), (out_t, dx_t), torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_running_stats_after_several_steps_equal_torch(shape):
    """Unbiased running_var (m / (m - 1)) and momentum as the weight of the new batch."""
    _, w, b, rm, rv, _ = make_inputs(shape, torch.float64)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(5):
        x = make_inputs(shape, torch.float64, seed=step + 1, mean=step, scale=1 + step)[0]
        nf.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
        F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.3)
    torch.testing.assert_close(rm, rm_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv_t, rtol=1e-12, atol=1e-12)
    # and the stored variance really is the unbiased one, not the biased one we normalize with
    x = make_inputs(shape, torch.float64, seed=9)[0].detach()
    rm1, rv1 = torch.zeros(shape[1], dtype=torch.float64), torch.zeros(shape[1], dtype=torch.float64)
    nf.batch_norm(x, rm1, rv1, training=True, momentum=1.0)
    dims = (0,) + tuple(range(2, x.ndim))
    torch.testing.assert_close(rv1, x.var(dim=dims, correction=1))


def test_eval_mode_does_not_touch_running_stats():
    x, w, b, rm, rv, _ = make_inputs((6, 3, 4), torch.float64)
    before = (rm.clone(), rv.clone())
    nf.batch_norm(x, rm, rv, w, b, training=False)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


# ---------------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,normalized_shape", [((6, 10), (10,)), ((3, 4, 5, 6), (5, 6)), ((7,), (7,))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, normalized_shape, dtype, affine):
    gen = torch.Generator().manual_seed(1)
    x = (3 + 2 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    w = (0.5 + torch.rand(normalized_shape, generator=gen, dtype=dtype)).requires_grad_() if affine else None
    b = torch.randn(normalized_shape, generator=gen, dtype=dtype).requires_grad_() if affine else None
    g = torch.randn(shape, generator=gen, dtype=dtype)
    out, grads = forward_and_grads(nf.layer_norm, x, w, b, g, normalized_shape)
    out_t, grads_t = forward_and_grads(F.layer_norm, x, w, b, g, normalized_shape)
    assert_all_close((out, *grads), (out_t, *grads_t), dtype)


def test_layer_norm_accepts_an_int_shape():
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(nf.layer_norm(x, 9), F.layer_norm(x, (9,)))


# ---------------------------------------------------------------------------------------------
# batch renorm
# ---------------------------------------------------------------------------------------------
def renorm_reference(x, running_mean, running_std, weight, bias, rmax, dmax, eps):
    """The paper's training forward, with r and d computed here as explicit constants."""
    dims = (0,) + tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    sigma = torch.sqrt(var + eps)
    r = (sigma / running_std).clamp(1 / rmax, rmax).detach()
    d = ((mean - running_mean) / running_std).clamp(-dmax, dmax).detach()
    xhat = (x - mean.view(view)) / sigma.view(view) * r.view(view) + d.view(view)
    return weight.view(view) * xhat + bias.view(view), r, d


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_renorm_training_matches_the_paper_and_keras_folding(shape, dtype):
    """Forward equals the paper's formula; gradients equal torch's BN with the affine map folded
    like Keras does (scale = r * gamma, offset = d * gamma + beta), since r, d are constants."""
    x, w, b, _, _, g = make_inputs(shape, dtype)
    c = shape[1]
    # running statistics far enough from the batch ones that some r, d are clipped and some not
    running_mean = torch.linspace(-1.5, 3.0, c, dtype=dtype)
    running_std = torch.linspace(0.5, 4.0, c, dtype=dtype)
    rm, rs = running_mean.clone(), running_std.clone()
    out, grads = forward_and_grads(
        nf.batch_renorm, x, w, b, g, rm, rs, training=True, rmax=1.5, dmax=0.5, momentum=0.1
    )
    ref, r, d = renorm_reference(x, running_mean, running_std, w, b, 1.5, 0.5, 1e-5)
    assert not torch.allclose(r, torch.ones_like(r)) and not torch.allclose(d, torch.zeros_like(d))
    torch.testing.assert_close(out, ref.detach(), **TOL[dtype])
    folded_w, folded_b = (w * r), (w * d + b)
    out_k, grads_k = forward_and_grads(F.batch_norm, x, folded_w, folded_b, g, None, None, training=True)
    torch.testing.assert_close(out, out_k, **TOL[dtype])
    torch.testing.assert_close(grads[0], grads_k[0], **TOL[dtype])  # dx: BN backward with gamma*r
    # running averages moved towards the batch statistics, after r and d were computed
    var, mean = torch.var_mean(x.detach(), dim=(0,) + tuple(range(2, x.ndim)), correction=0)
    torch.testing.assert_close(rm, running_mean + 0.1 * (mean - running_mean))
    torch.testing.assert_close(rs, running_std + 0.1 * (torch.sqrt(var + 1e-5) - running_std))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_renorm_eval_is_the_affine_map_of_the_running_stats(dtype):
    x, w, b, rm, _, g = make_inputs((5, 3, 4), dtype)
    rs = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    before = (rm.clone(), rs.clone())
    out, grads = forward_and_grads(nf.batch_renorm, x, w, b, g, rm, rs, training=False)
    view = (1, -1, 1)
    expected = w.view(view) * (x - rm.view(view)) / rs.view(view) + b.view(view)
    expected_grads = torch.autograd.grad((expected * g).sum(), (x, w, b))
    assert_all_close((out, *grads), (expected.detach(), *expected_grads), dtype)
    assert torch.equal(rm, before[0]) and torch.equal(rs, before[1])


# ---------------------------------------------------------------------------------------------
# the composition equals the Function
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_composition_equals_function_batch_norm(shape, training):
    x, w, b, rm, rv, g = make_inputs(shape, torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    out, grads = forward_and_grads(nf.batch_norm, x, w, b, g, rm, rv, training=training)
    out_a, grads_a = forward_and_grads(nf.batch_norm_autograd, x, w, b, g, rm2, rv2, training=training)
    assert_all_close((out, *grads, rm, rv), (out_a, *grads_a, rm2, rv2), torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_composition_equals_function_batch_renorm(shape, training):
    x, w, b, rm, rv, g = make_inputs(shape, torch.float64)
    rs, rm2, rs2 = rv.sqrt(), rm.clone(), rv.sqrt()
    kwargs = dict(training=training, rmax=1.2, dmax=0.3, momentum=0.05)
    out, grads = forward_and_grads(nf.batch_renorm, x, w, b, g, rm, rs, **kwargs)
    out_a, grads_a = forward_and_grads(nf.batch_renorm_autograd, x, w, b, g, rm2, rs2, **kwargs)
    assert_all_close((out, *grads, rm, rs), (out_a, *grads_a, rm2, rs2), torch.float64)


def test_composition_equals_function_layer_norm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    out, grads = forward_and_grads(nf.layer_norm, x, w, b, g, (4, 5))
    out_a, grads_a = forward_and_grads(nf.layer_norm_autograd, x, w, b, g, (4, 5))
    assert_all_close((out, *grads), (out_a, *grads_a), torch.float64)


@pytest.mark.parametrize("layer", ["layer_norm", "group_norm", "instance_norm"])
def test_float32_rows_with_a_large_mean_are_as_accurate_as_torch(layer):
    """Rows (groups) with a mean 1000 times their spread, in float32: the forward and every
    gradient stay as close to the float64 truth (computed from the same float32 numbers) as
    torch's own float32 kernels, up to the error that rounding the mean alone causes (one ulp of
    1000 is 1000 * eps of the spread). The backward forms sum(dy * (x - mean)), not
    sum(dy * x) - mean * sum(dy), whose cancellation would lose three digits more."""
    gen = torch.Generator().manual_seed(11)
    shape = (4, 8, 6, 5)
    x32 = 1000.0 + torch.randn(shape, generator=gen)
    w32, b32 = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    g32 = torch.randn(shape, generator=gen)
    if layer == "layer_norm":
        w32, b32 = torch.rand(8, 6, 5, generator=gen) + 0.5, torch.randn(8, 6, 5, generator=gen)
        ours, native = nf.layer_norm, F.layer_norm
        args = ((8, 6, 5),)
    elif layer == "group_norm":
        ours, native, args = nf.group_norm, F.group_norm, (2,)
    else:
        ours = lambda x, w, b: nf.instance_norm(x, weight=w, bias=b)  # noqa: E731
        native = lambda x, w, b: F.instance_norm(x, weight=w, bias=b)  # noqa: E731
        args = ()

    def run(fn, dtype):
        x, w, b = (t.to(dtype).requires_grad_() for t in (x32, w32, b32))
        out = fn(x, *args, w, b) if args else fn(x, w, b)
        return (out.detach(), *torch.autograd.grad((out * g32.to(dtype)).sum(), (x, w, b)))

    truth = run(native, torch.float64)
    mean_rounding = torch.finfo(torch.float32).eps * 1000.0  # relative to the values' scale
    for name, a, t, e in zip(("out", "dx", "dgamma", "dbeta"), run(ours, torch.float32),
                             run(native, torch.float32), truth):
        ours_error = (a.double() - e).abs().max().item()
        torch_error = (t.double() - e).abs().max().item()
        bound = 4 * max(torch_error, mean_rounding * e.abs().max().item())
        assert ours_error <= bound, (name, ours_error, torch_error)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, finite differences against the closed-form backward)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 2), (3, 2, 4), (2, 2, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_batch_norm_function(shape, training, affine):
    x, w, b, rm, rv, _ = make_inputs(shape, torch.float64)
    w, b = (w, b) if affine else (None, None)
    # in training the running stats are updated at each call but never read: the function is pure
    fn = lambda x, w, b: nf.BatchNormFunction.apply(x, rm, rv, w, b, training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("shape,normalized_shape", [((3, 5), (5,)), ((2, 3, 2, 3), (2, 3))])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_layer_norm_function(shape, normalized_shape, affine):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = b = None
    if affine:
        w = torch.rand(normalized_shape, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.rand(normalized_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: nf.LayerNormFunction.apply(x, normalized_shape, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("shape", [(6, 2), (3, 2, 4), (2, 2, 2, 3)])
def test_gradcheck_batch_renorm_training_with_active_r_and_d(shape):
    """r and d are stop-gradient constants; finite differences see them as constants only where
    they are clipped (there they do not move with x). So the running statistics here sit far from
    the batch statistics: r = rmax or 1/rmax and d = +-dmax, i.e. r != 1 and d != 0 are active.
    (Unclipped r, d are checked against the Keras-folded torch BN above.) momentum=0 keeps the
    running statistics, hence r and d, the same across gradcheck's many calls."""
    x, w, b, _, _, _ = make_inputs(shape, torch.float64)
    running_mean = torch.tensor([-20.0, 60.0], dtype=torch.float64)
    running_std = torch.tensor([0.05, 50.0], dtype=torch.float64)
    fn = lambda x, w, b: nf.BatchRenormFunction.apply(  # noqa: E731
        x, running_mean, running_std, w, b, True, 2.0, 0.5, 0.0, 1e-5
    )
    _, r, d = renorm_reference(x, running_mean, running_std, w, b, 2.0, 0.5, 1e-5)
    torch.testing.assert_close(r, torch.tensor([2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_batch_renorm_eval():
    x, w, b, rm, rv, _ = make_inputs((4, 3, 2), torch.float64)
    fn = lambda x, w, b: nf.BatchRenormFunction.apply(x, rm, rv.sqrt(), w, b, False, 3.0, 5.0, 0.01, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


# ---------------------------------------------------------------------------------------------
# schedule, half precision, NaN, devices
# ---------------------------------------------------------------------------------------------
def test_renorm_limits_follow_the_paper_schedule():
    assert nf.renorm_limits(0) == (1.0, 0.0)
    assert nf.renorm_limits(4999) == (1.0, 0.0)
    assert nf.renorm_limits(5000) == (1.0, 0.0)
    rmax, dmax = nf.renorm_limits(15000)
    assert rmax == pytest.approx(1 + 2 * 10000 / 35000) and dmax == pytest.approx(5 * 10000 / 20000)
    assert nf.renorm_limits(25000) == (pytest.approx(1 + 2 * 20000 / 35000), 5.0)
    assert nf.renorm_limits(40000) == (3.0, 5.0)
    assert nf.renorm_limits(10**6) == (3.0, 5.0)
    assert nf.renorm_limits(torch.tensor(40000)) == (3.0, 5.0)
    assert nf.renorm_limits(30, rmax=2.0, dmax=1.0, warmup_steps=10, rmax_steps=20, dmax_steps=50) == (
        2.0,
        pytest.approx(0.5),
    )


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(half):
    """A large mean: summing 4096 values near 100 in bfloat16 would be off by whole units.

    The float64 reference is computed from the *rounded* half inputs, so the only error left is
    rounding the output to the half dtype: half an ulp, 2**-9 (bf16) or 2**-12 (fp16) relative,
    plus a small absolute slack for values near 0, where the relative error of xhat is amplified
    by the input's own rounding (|x| ~ 100).
    """
    gen = torch.Generator().manual_seed(5)
    x = (100 + torch.randn(512, 2, 8, generator=gen)).to(half).requires_grad_()
    w = torch.rand(2, generator=gen).to(half).requires_grad_()
    b = torch.randn(2, generator=gen).to(half).requires_grad_()
    rm, rv = torch.zeros(2), torch.ones(2)
    out = nf.batch_norm(x, rm, rv, w, b, training=True)
    assert out.dtype == half
    expected = F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
    ulp = 2.0**-8 if half == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(out.double(), expected, rtol=ulp, atol=ulp)
    x_d = x.detach().double()
    torch.testing.assert_close(rm.double(), 0.1 * x_d.mean(dim=(0, 2)), rtol=1e-6, atol=1e-6)
    # gradients come back in the half dtype and agree with float64 within the same tolerance
    g = torch.randn(512, 2, 8, generator=gen).to(half)
    dx, dw, db = torch.autograd.grad((out * g).sum(), (x, w, b))
    assert dx.dtype == dw.dtype == db.dtype == half
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.batch_norm(xd, None, None, wd, bd, training=True)
    dx_ref, dw_ref, db_ref = torch.autograd.grad((ref * g.double()).sum(), (xd, wd, bd))
    torch.testing.assert_close(dx.double(), dx_ref, rtol=ulp, atol=ulp * dx_ref.abs().max().item())
    torch.testing.assert_close(dw.double(), dw_ref, rtol=ulp, atol=ulp * dw_ref.abs().max().item())
    # layer norm too
    out_ln = nf.layer_norm(x.transpose(1, 2), 2)
    torch.testing.assert_close(out_ln.double(), F.layer_norm(x_d.transpose(1, 2), (2,)), rtol=ulp, atol=ulp)


def test_bfloat16_matches_torch_bfloat16():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 4, 5, 5, generator=gen).to(torch.bfloat16)
    w = torch.rand(4, generator=gen).to(torch.bfloat16)
    b = torch.randn(4, generator=gen).to(torch.bfloat16)
    ours = nf.batch_norm(x, None, None, w, b, training=True)
    theirs = F.batch_norm(x, None, None, w, b, training=True)
    # both round an almost exact result to bfloat16: at most one bf16 ulp apart (2**-7 relative)
    torch.testing.assert_close(ours, theirs, rtol=2.0**-7, atol=2.0**-7)


def test_nan_propagates_like_torch():
    """Documented behaviour: no finiteness check; a NaN poisons its channel's statistics."""
    x, w, b, rm, rv, _ = make_inputs((6, 3, 4), torch.float64)
    x = x.detach().clone()
    x[2, 1, 3] = float("nan")
    for training in (True, False):
        rm_t, rv_t = rm.clone(), rv.clone()
        ours = nf.batch_norm(x, rm, rv, w, b, training=training)
        theirs = F.batch_norm(x, rm_t, rv_t, w, b, training=training)
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert ours.isnan().any()
    assert rm[1].isnan() and not rm[0].isnan()
    ln = nf.layer_norm(x, 4)
    assert torch.equal(ln.isnan(), F.layer_norm(x, (4,)).isnan())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, w, b, rm, rv, g = make_inputs((8, 3, 4, 4), torch.float32)
    out, grads = forward_and_grads(nf.batch_norm, x, w, b, g, rm, rv, training=True)
    to = lambda t: t.detach().cuda().requires_grad_(t.requires_grad)  # noqa: E731
    xc, wc, bc, rmc, rvc = (to(t) for t in (x, w, b, rm.clone(), rv.clone()))
    out_c, grads_c = forward_and_grads(nf.batch_norm, xc, wc, bc, g.cuda(), rmc, rvc, training=True)
    for a, e in zip((out_c, *grads_c), (out, *grads)):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)
