"""Bad input to normcourse.functional and normcourse.nn raises a clear error naming the problem.

Errors come from normcourse.validation: TypeError for a non-floating dtype, ValueError for a wrong
rank, a wrong channel count, a wrong trailing shape or one value per channel in training mode.
Non-finite values are not errors in the torch code: they propagate like torch.nn
(tests/test_functional.py::test_nan_propagates_like_torch).
"""

import pytest
import torch

from normcourse import functional as nf
from normcourse import nn as ncnn

torch.set_num_threads(1)

C = 3


def stats():
    return torch.zeros(C), torch.ones(C)


BATCH_NORMS = [nf.batch_norm, nf.batch_norm_autograd]
BATCH_RENORMS = [nf.batch_renorm, nf.batch_renorm_autograd]
CHANNEL_FUNCTIONS = BATCH_NORMS + BATCH_RENORMS


# --------------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", CHANNEL_FUNCTIONS)
def test_functional_rejects_integer_input(fn):
    with pytest.raises(TypeError, match=r"expects a floating-point input, got dtype torch\.uint8"):
        fn(torch.zeros(4, C, dtype=torch.uint8), *stats(), training=True)


@pytest.mark.parametrize("fn", CHANNEL_FUNCTIONS)
@pytest.mark.parametrize("shape", [(5,), (2, C, 2, 2, 2)])
def test_functional_rejects_wrong_rank(fn, shape):
    with pytest.raises(ValueError, match=r"expects input of shape \(N, C\), \(N, C, L\) or \(N, C, H, W\), got shape"):
        fn(torch.randn(shape), *stats(), training=True)


@pytest.mark.parametrize("fn", CHANNEL_FUNCTIONS)
def test_functional_rejects_wrong_channel_count(fn):
    with pytest.raises(ValueError, match=r"\(num_features=3\) got 4 channels in axis 1"):
        fn(torch.randn(5, 4, 2), *stats(), training=True)


@pytest.mark.parametrize("fn", BATCH_NORMS)
def test_functional_batch_norm_checks_weight_size_without_running_stats(fn):
    with pytest.raises(ValueError, match=r"batch_norm\(num_features=2\) got 3 channels"):
        fn(torch.randn(5, C), None, None, weight=torch.ones(2), training=True)


@pytest.mark.parametrize("fn", CHANNEL_FUNCTIONS)
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_functional_rejects_one_value_per_channel_in_training(fn, shape):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fn(torch.randn(shape), *stats(), training=True)
    fn(torch.randn(shape), *stats(), training=False)  # eval mode uses the running statistics


def test_functional_batch_norm_needs_running_stats_in_eval():
    with pytest.raises(ValueError, match=r"batch_norm needs running_mean and running_var in eval mode"):
        nf.batch_norm(torch.randn(4, C), None, None, training=False)
    with pytest.raises(ValueError, match=r"needs both running_mean and running_var, or neither"):
        nf.batch_norm(torch.randn(4, C), torch.zeros(C), None, training=True)


@pytest.mark.parametrize("fn", BATCH_RENORMS)
@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_renorm_needs_running_stats(fn, training):
    with pytest.raises(ValueError, match=r"batch_renorm needs running_mean and running_std \(r and d"):
        fn(torch.randn(4, C), None, None, training=training)


@pytest.mark.parametrize("fn", [nf.layer_norm, nf.layer_norm_autograd])
def test_functional_layer_norm_rejects_bad_input(fn):
    with pytest.raises(TypeError, match="layer_norm expects a floating-point input"):
        fn(torch.ones(2, 4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"layer_norm\(normalized_shape=\(5,\)\) expects input whose last 1"):
        fn(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match=r"last 2 dimension\(s\) are \(3, 4\), got shape \(4,\)"):
        fn(torch.randn(4), (3, 4))


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
MODULES_1D = [ncnn.BatchNorm1d, ncnn.BatchRenorm1d]
MODULES_2D = [ncnn.BatchNorm2d, ncnn.BatchRenorm2d]


@pytest.mark.parametrize("cls", MODULES_1D)
@pytest.mark.parametrize("shape", [(C,), (2, C, 2, 2)])
def test_1d_modules_accept_only_2d_or_3d(cls, shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__} expects input of shape \(N, C\) or \(N, C, L\), got shape"):
        cls(C)(torch.randn(shape))


@pytest.mark.parametrize("cls", MODULES_2D)
@pytest.mark.parametrize("shape", [(2, C), (2, C, 2), (2, C, 2, 2, 2)])
def test_2d_modules_accept_only_4d(cls, shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__} expects input of shape \(N, C, H, W\), got shape"):
        cls(C)(torch.randn(shape))


@pytest.mark.parametrize("cls,shape", [(c, (4, 5)) for c in MODULES_1D] + [(c, (4, 5, 2, 2)) for c in MODULES_2D])
@pytest.mark.parametrize("affine", [True, False])
def test_modules_reject_wrong_channel_count(cls, shape, affine):
    """Also without affine parameters (nothing per-channel to compare with but num_features)."""
    module = cls(C, affine=affine)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(num_features=3\) got 5 channels in axis 1"):
        module(torch.randn(shape))


@pytest.mark.parametrize("cls", MODULES_1D + MODULES_2D)
def test_modules_reject_integer_input(cls):
    shape = (4, C) if cls in MODULES_1D else (4, C, 2, 2)
    with pytest.raises(TypeError, match=rf"{cls.__name__} expects a floating-point input, got dtype torch\.int64"):
        cls(C)(torch.ones(shape, dtype=torch.int64))


@pytest.mark.parametrize("cls", MODULES_1D + MODULES_2D)
def test_modules_reject_a_batch_of_one_in_training_only(cls):
    shape = (1, C) if cls in MODULES_1D else (1, C, 1, 1)
    module = cls(C)
    with pytest.raises(ValueError, match=rf"more than 1 value per channel when training, got input of shape .* in {cls.__name__}"):
        module(torch.randn(shape))
    assert int(module.num_batches_tracked) == 0  # the failed call changed nothing
    module.eval()
    assert module(torch.randn(shape)).shape == shape


def test_batch_norm2d_allows_one_image_with_several_pixels():
    """Like torch: N = 1 is fine when H * W > 1 (the statistics use N * H * W values)."""
    assert ncnn.BatchNorm2d(C)(torch.randn(1, C, 2, 2)).shape == (1, C, 2, 2)


def test_batch_norm_without_running_stats_rejects_a_batch_of_one_in_eval_too():
    """track_running_stats=False normalizes with batch statistics in eval as well."""
    module = ncnn.BatchNorm1d(C, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.randn(1, C))


def test_layer_norm_module_rejects_bad_input():
    module = ncnn.LayerNorm((2, 3))
    with pytest.raises(ValueError, match=r"LayerNorm\(normalized_shape=\(2, 3\)\) expects input whose last 2 dimension"):
        module(torch.randn(4, 3, 2))
    with pytest.raises(TypeError, match="LayerNorm expects a floating-point input"):
        module(torch.ones(4, 2, 3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# mixed dtypes: torch's CPU rule, with a message naming both dtypes


@pytest.mark.parametrize("make,shape", [
    (lambda dtype: ncnn.BatchNorm1d(C, dtype=dtype), (4, C)),
    (lambda dtype: ncnn.BatchNorm2d(C, dtype=dtype), (4, C, 2, 2)),
    (lambda dtype: ncnn.BatchRenorm1d(C, dtype=dtype), (4, C)),
    (lambda dtype: ncnn.LayerNorm(C, dtype=dtype), (4, C)),
])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_dtypes_raise_naming_both(make, shape, training):
    module = make(torch.float32).train(training)
    # a TypeError by the project's convention, and a RuntimeError as torch.nn's own error
    with pytest.raises(TypeError, match=r"input of dtype torch\.float64 but its \w+ has dtype torch\.float32"):
        module(torch.randn(shape, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"torch\.float32 but its \w+ has dtype torch\.float64"):
        make(torch.float64).train(training)(torch.randn(shape))
    # mixed precision is the one exception: half input, float32 module, half output
    assert module(torch.randn(shape, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_functional_mixed_dtypes_name_the_tensor():
    x = torch.randn(4, C, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"batch_norm got an input of dtype torch\.float64 but its running_mean"):
        nf.batch_norm(x, *stats(), training=True)
    with pytest.raises(TypeError, match=r"layer_norm got an input of dtype torch\.float64 but its weight"):
        nf.layer_norm(x, (C,), torch.ones(C))
