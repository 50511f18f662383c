"""convnet with chapter 8's norms: group, instance, and weight-standardized convolutions."""

import pytest
import torch

from normcourse import models
from normcourse import nn as ncnn

torch.set_num_threads(1)


@pytest.mark.parametrize("norm, layer", [("group", ncnn.GroupNorm), ("instance", ncnn.InstanceNorm2d)])
def test_convnet_with_group_or_instance_norm(norm, layer):
    model = models.convnet(norm=norm, num_groups=4)
    assert isinstance(model.norm1, layer) and isinstance(model.norm2, layer)
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)  # a batch of one is fine
    if norm == "group":
        assert (model.norm1.num_groups, model.norm1.num_channels) == (4, 16)
        assert model.conv1.bias is not None
    else:
        assert model.norm1.affine and model.conv1.bias is None  # the channel mean removes a bias


@pytest.mark.parametrize("norm", ["none", "batch", "group"])
def test_convnet_weight_standardization_swaps_the_conv_layers(norm):
    model = models.convnet(norm=norm, weight_standardization=True)
    assert isinstance(model.conv1, ncnn.WSConv2d) and isinstance(model.conv2, ncnn.WSConv2d)
    assert not isinstance(models.convnet(norm=norm).conv1, ncnn.WSConv2d)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_bad_group_count_and_instance_norm_in_an_mlp_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_groups=5"):
        models.convnet(norm="group", num_groups=5)
    with pytest.raises(ValueError, match="unknown norm 'instance'"):
        models.mlp(norm="instance")  # a vector has no positions to normalize a channel over


def test_rms_norm_in_both_builders_normalizes_like_layer_norm_over_the_same_axes():
    model = models.mlp(sizes=(8, 6, 3), norm="rms")
    assert isinstance(model.norm1, ncnn.RMSNorm) and model.norm1.normalized_shape == (6,)
    assert model.fc1.bias is not None  # RMSNorm subtracts no mean: the bias is not redundant
    conv = models.convnet(norm="rms", channels=(4,))
    assert conv.norm1.normalized_shape == (4, 28, 28)
    assert conv(torch.rand(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("norm, layer", [("batch", ncnn.BatchNorm2d), ("group", ncnn.GroupNorm),
                                         ("layer", ncnn.LayerNorm)])
def test_pointwise_convnet_is_a_convnet_on_1x1_maps(norm, layer):
    model = models.pointwise_convnet(norm=norm, sizes=(784, 8, 12, 10), num_groups=4)
    assert type(model.conv1) is type(model.conv2) is torch.nn.Conv2d
    assert model.conv1.kernel_size == (1, 1) and model.conv2.in_channels == 8
    assert isinstance(model.norm1, layer) and isinstance(model.norm2, layer)
    assert (model.conv1.bias is None) == (norm == "batch")  # BN's beta subsumes the bias
    seen = {}
    model.norm2.register_forward_hook(lambda m, i, o: seen.update(shape=i[0].shape))
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert seen["shape"] == (3, 12, 1, 1)  # the norm sees 1x1 maps: BN's m is the batch size
    assert model(torch.rand(3, 784)).shape == (3, 10)  # vectors too


def test_pointwise_convnet_batch_norm_sees_only_the_batch():
    """At batch 2 each channel's two values d apart normalize to -+ d / sqrt(d^2 + 4 eps):
    -1 and +1 unless they (nearly) coincide; only the sign of their difference passes."""
    model = models.pointwise_convnet(norm="batch", sizes=(784, 6, 10)).train()
    seen = {}
    model.norm1.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    model(torch.rand(2, 1, 28, 28))
    diff = seen["x"][1] - seen["x"][0]
    expected = diff / torch.sqrt(diff ** 2 + 4 * model.norm1.eps)
    assert torch.allclose(seen["out"], torch.stack([-expected, expected]), atol=1e-5)


def test_pointwise_convnet_weight_standardization_and_bad_arguments():
    model = models.pointwise_convnet(norm="group", num_groups=2, weight_standardization=True)
    assert isinstance(model.conv1, ncnn.WSConv2d) and isinstance(model.conv2, ncnn.WSConv2d)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown norm 'instance'"):
        models.pointwise_convnet(norm="instance")  # one value per (example, channel)
    with pytest.raises(ValueError, match="sizes must be at least two"):
        models.pointwise_convnet(sizes=(784,))
    with pytest.raises(ValueError, match="divisible by num_groups=5"):
        models.pointwise_convnet(norm="group", num_groups=5)
