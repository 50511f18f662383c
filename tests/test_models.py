"""Tests of normcourse.models: layer names, types, shapes, biases, norm position, init scale, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normcourse import nn as ncnn
from normcourse.models import NORMS, convnet, mlp
from normcourse.utils import seed_everything

torch.set_num_threads(1)

# The class each norm name must build, for (N, C) features and for (N, C, H, W) maps.
NORM_CLASSES_1D = {"batch": ncnn.BatchNorm1d, "layer": ncnn.LayerNorm, "renorm": ncnn.BatchRenorm1d,
                   "torch_batch": nn.BatchNorm1d, "torch_layer": nn.LayerNorm}
NORM_CLASSES_2D = {"batch": ncnn.BatchNorm2d, "layer": ncnn.LayerNorm, "renorm": ncnn.BatchRenorm2d,
                   "torch_batch": nn.BatchNorm2d, "torch_layer": nn.LayerNorm}
BATCH_TYPE = {"batch", "renorm", "torch_batch"}


def names(model: nn.Sequential) -> list[str]:
    return [name for name, _ in model.named_children()]


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_names_types_and_shapes(norm):
    model = mlp(sizes=(784, 100, 100, 100, 10), norm=norm)
    expected = ["flatten"]
    for i in (1, 2, 3):
        expected += [f"fc{i}"] + ([f"norm{i}"] if norm != "none" else []) + [f"act{i}"]
    assert names(model) == expected + ["out"]
    for i in (1, 2, 3):
        fc = getattr(model, f"fc{i}")
        assert isinstance(fc, nn.Linear) and fc.in_features == (784 if i == 1 else 100) and fc.out_features == 100
        assert isinstance(getattr(model, f"act{i}"), nn.Sigmoid)
        if norm != "none":
            layer = getattr(model, f"norm{i}")
            assert type(layer) is NORM_CLASSES_1D[norm]
            assert layer.weight.shape == (100,)
    assert isinstance(model.out, nn.Linear) and (model.out.in_features, model.out.out_features) == (100, 10)
    model.train()
    assert model(torch.rand(5, 784)).shape == (5, 10)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)  # images are flattened


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("norm", NORMS)
def test_bias_dropped_only_when_a_batch_norm_follows_the_linear_layer(norm, position):
    model = mlp(sizes=(8, 6, 5, 3), norm=norm, norm_position=position)
    redundant = norm in BATCH_TYPE and position == "before"
    for i in (1, 2):
        assert (getattr(model, f"fc{i}").bias is None) == redundant
    assert model.out.bias is not None  # the output layer is never normalized


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_norm_position_orders_norm_and_nonlinearity(norm):
    before = names(mlp(sizes=(8, 6, 3), norm=norm, norm_position="before"))
    after = names(mlp(sizes=(8, 6, 3), norm=norm, norm_position="after"))
    assert before == ["flatten", "fc1", "norm1", "act1", "out"]
    assert after == ["flatten", "fc1", "act1", "norm1", "out"]


def test_norm_position_after_normalizes_the_nonlinearity_output():
    seed_everything(0)
    model = mlp(sizes=(8, 6, 3), norm="torch_batch", norm_position="after").train()
    x = torch.randn(32, 8)
    seen = {}
    model.norm1.register_forward_hook(lambda m, inputs, out: seen.update(inp=inputs[0]))
    model(x)
    torch.testing.assert_close(seen["inp"], torch.sigmoid(model.fc1(x)))


@pytest.mark.parametrize("activation, cls", [("sigmoid", nn.Sigmoid), ("relu", nn.ReLU), ("tanh", nn.Tanh)])
def test_activation_choice(activation, cls):
    model = mlp(sizes=(4, 3, 3, 2), activation=activation)
    assert isinstance(model.act1, cls) and isinstance(model.act2, cls)


def test_init_scale_draws_gaussian_weights_and_zero_biases():
    seed_everything(0)
    scale = 0.05
    model = mlp(sizes=(784, 300, 100, 10), init_scale=scale)
    for layer in (model.fc1, model.fc2, model.out):
        w = layer.weight.detach().double().flatten()
        n = w.numel()
        # sampling errors: mean ~ scale/sqrt(n), std ~ scale/sqrt(2n); allow 4 of them
        assert abs(w.mean().item()) < 4 * scale / n**0.5
        assert abs(w.std().item() - scale) < 4 * scale / (2 * n) ** 0.5
        # Gaussian, not uniform: the fourth standardized moment is 3 (uniform: 1.8)
        kurtosis = (((w - w.mean()) / w.std()) ** 4).mean().item()
        assert abs(kurtosis - 3) < 0.3
        assert torch.count_nonzero(layer.bias) == 0


def test_init_scale_none_keeps_pytorch_default_init():
    seed_everything(3)
    model = mlp(sizes=(20, 7, 5))
    seed_everything(3)
    first, second = nn.Linear(20, 7), nn.Linear(7, 5)
    torch.testing.assert_close(model.fc1.weight, first.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.fc1.bias, first.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.out.weight, second.weight, rtol=0, atol=0)


def test_renorm_kwargs_reach_the_layers():
    model = mlp(sizes=(8, 6, 3), norm="renorm", renorm_kwargs={"rmax": 1.5, "dmax": 0.5, "warmup_steps": 0})
    assert (model.norm1.rmax, model.norm1.dmax, model.norm1.warmup_steps) == (1.5, 0.5, 0)
    net = convnet(norm="renorm", channels=(4,), renorm_kwargs={"momentum": 0.05})
    assert net.norm1.momentum == 0.05


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"norm": "batchnorm"}, ["'batchnorm'", "'none'", "'batch'", "'layer'", "'renorm'", "'torch_batch'", "'torch_layer'"]),
        ({"activation": "gelu"}, ["'gelu'", "'sigmoid'", "'relu'", "'tanh'"]),
        ({"norm_position": "middle"}, ["'middle'", "'before'", "'after'"]),
    ],
)
def test_mlp_rejects_unknown_names_listing_the_valid_ones(kwargs, words):
    with pytest.raises(ValueError) as info:
        mlp(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs", [{"norm": "ghost"}, {"activation": "softplus"}])
def test_convnet_rejects_unknown_names(kwargs):
    with pytest.raises(ValueError, match="choose one of"):
        convnet(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"sizes": (784,)}, {"sizes": (784, 0, 10)}, {"init_scale": 0.0}, {"init_scale": -1.0},
     {"norm": "batch", "renorm_kwargs": {"rmax": 2.0}}],
)
def test_mlp_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        mlp(**kwargs)


@pytest.mark.parametrize("norm", NORMS)
def test_convnet_names_types_and_shapes(norm):
    model = convnet(norm=norm, channels=(4, 6))
    expected = []
    for i in (1, 2):
        expected += [f"conv{i}"] + ([f"norm{i}"] if norm != "none" else []) + [f"act{i}", f"pool{i}"]
    assert names(model) == expected + ["flatten", "out"]
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 4 and model.conv2.out_channels == 6
    for i in (1, 2):
        assert (getattr(model, f"conv{i}").bias is None) == (norm in BATCH_TYPE)
        assert isinstance(getattr(model, f"act{i}"), nn.ReLU)
    if norm != "none":
        assert type(model.norm1) is NORM_CLASSES_2D[norm]
    if norm in ("layer", "torch_layer"):
        assert tuple(model.norm1.normalized_shape) == (4, 28, 28)
        assert tuple(model.norm2.normalized_shape) == (6, 14, 14)
    assert model.out.in_features == 6 * 7 * 7 and model.out.out_features == 10
    assert model.train()(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_convnet_layer_norm_normalizes_each_example_over_channels_and_positions():
    seed_everything(1)
    model = convnet(norm="layer", channels=(4,))
    x = torch.rand(3, 1, 28, 28) * torch.tensor([1.0, 5.0, 0.2]).view(3, 1, 1, 1)
    out = model.norm1(model.conv1(x)).double()  # gain 1, bias 0 at init
    per_example = out.flatten(1)
    torch.testing.assert_close(per_example.mean(1), torch.zeros(3, dtype=torch.double), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_example.var(1, unbiased=False), torch.ones(3, dtype=torch.double), atol=1e-3, rtol=0)
    # ... and not per channel: single channels are not standardized on their own
    per_channel_means = out.mean(dim=(2, 3))
    assert per_channel_means.abs().max() > 0.05


def test_convnet_other_sizes():
    model = convnet(channels=(3, 5, 7), num_classes=4, in_channels=2, image_size=16)
    assert model.out.in_features == 7 * 2 * 2
    assert model(torch.rand(2, 2, 16, 16)).shape == (2, 4)
