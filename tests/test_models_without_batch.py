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
