"""normcourse.nn.NoisyBatchNorm1d/2d (chapter 7's "noisy BN", Santurkar et al. 2018): batch norm
followed by per-channel noise that changes at every training step, seeded by a generator."""

import pytest
import torch

from normcourse import nn as ncnn

torch.set_num_threads(1)


def _pair(cls, c, seed=0, **kwargs):
    noisy = cls(c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, **kwargs)
    plain = (ncnn.BatchNorm1d if cls is ncnn.NoisyBatchNorm1d else ncnn.BatchNorm2d)(
        c, dtype=torch.float64)
    return noisy, plain


@pytest.mark.parametrize("cls, shape", [(ncnn.NoisyBatchNorm1d, (8, 5)),
                                        (ncnn.NoisyBatchNorm1d, (8, 5, 3)),
                                        (ncnn.NoisyBatchNorm2d, (4, 5, 3, 2))])
def test_training_output_is_batch_norm_scaled_and_shifted_per_channel(cls, shape):
    x = 2.0 + 3.0 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noisy, plain = _pair(cls, shape[1], shift_range=(-2.0, 3.0), scale_range=(0.25, 4.0))
    out, ref = noisy(x), plain(x)
    view = (1, -1) + (1,) * (x.dim() - 2)
    torch.testing.assert_close(out, ref * noisy.last_scale.view(view) + noisy.last_shift.view(view))
    assert ((noisy.last_scale >= 0.25) & (noisy.last_scale <= 4.0)).all()
    assert ((noisy.last_shift >= -2.0) & (noisy.last_shift <= 3.0)).all()
    # the running statistics are batch norm's (the noise comes after them)
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)
    torch.testing.assert_close(noisy.running_var, plain.running_var)
    assert list(noisy.state_dict()) == list(plain.state_dict())


def test_noise_changes_every_step_and_is_seeded_by_the_generator():
    x = torch.randn(16, 6, dtype=torch.float64)
    first, _ = _pair(ncnn.NoisyBatchNorm1d, 6, seed=3)
    again, _ = _pair(ncnn.NoisyBatchNorm1d, 6, seed=3)
    other, _ = _pair(ncnn.NoisyBatchNorm1d, 6, seed=4)
    a1, a2 = first(x), first(x)
    assert not torch.allclose(a1, a2)  # time-varying
    torch.testing.assert_close(again(x), a1)  # same seed, same noise
    torch.testing.assert_close(again(x), a2)
    assert not torch.allclose(other(x), a1)
    # non-zero mean, non-unit variance per unit after the layer
    means, stds = a1.mean(0), a1.std(0, unbiased=False)
    assert means.abs().max() > 0.05 and (stds - 1).abs().max() > 0.05


def test_eval_mode_is_plain_batch_norm_and_draws_nothing():
    noisy, plain = _pair(ncnn.NoisyBatchNorm1d, 4)
    for _ in range(3):
        x = torch.randn(10, 4, dtype=torch.float64) * 2 + 1
        noisy(x), plain(x)
    noisy.eval(), plain.eval()
    state = noisy.generator.get_state()
    torch.testing.assert_close(noisy(x), plain(x))
    assert torch.equal(noisy.generator.get_state(), state)


def test_gradient_flows_through_the_noise():
    noisy, _ = _pair(ncnn.NoisyBatchNorm1d, 3)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = noisy(x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and noisy.weight.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"shift_range": (1.0, -1.0)}, "shift_range"),
    ({"scale_range": (-1.0, 2.0)}, "scale_range"),
    ({"scale_range": "big"}, "scale_range"),
    ({"shift_range": (0.0, float("inf"))}, "shift_range"),
])
def test_bad_ranges_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ncnn.NoisyBatchNorm1d(3, **kwargs)


def test_bad_generator_and_bad_input_are_named():
    with pytest.raises(TypeError, match="torch.Generator"):
        ncnn.NoisyBatchNorm1d(3, generator=0)
    layer = ncnn.NoisyBatchNorm1d(3)
    with pytest.raises(ValueError, match="NoisyBatchNorm1d"):
        layer(torch.randn(4, 5))  # wrong channel count
    with pytest.raises(ValueError, match="NoisyBatchNorm1d"):
        layer(torch.randn(1, 3))  # a batch of one in training
    with pytest.raises(TypeError):
        layer(torch.ones(4, 3, dtype=torch.long))
