"""The transformer encoder of normcourse.models (chapter 9): shapes, where each placement puts the
norm, equality with a model built from torch.nn's LayerNorm / RMSNorm, padding, determinism and
bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normcourse import nn as ncnn
from normcourse.models import SequenceBatchNorm, TransformerBlock, TransformerClassifier
from normcourse.utils import seed_everything
from normcourse.validation import DtypeError, ShapeError

torch.set_num_threads(1)

SMALL = dict(num_layers=3, d_model=16, num_heads=2, d_ff=24)


def model_for(seed=0, **kwargs):
    seed_everything(seed)
    return TransformerClassifier(**{**SMALL, **kwargs})


@pytest.mark.parametrize("placement", ["post", "pre"])
@pytest.mark.parametrize("norm", ["layer", "rms", "batch", "none"])
def test_shapes_for_images_and_tokens(placement, norm):
    model = model_for(placement=placement, norm=norm)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert model(torch.rand(5, 11, 28)).shape == (5, 10)  # shorter sequences are fine
    stream = model.residual_stream(torch.rand(5, 1, 28, 28))
    assert len(stream) == SMALL["num_layers"] + 1 and all(h.shape == (5, 28, 16) for h in stream)


@pytest.mark.parametrize("norm, cls", [("layer", ncnn.LayerNorm), ("rms", ncnn.RMSNorm),
                                       ("torch_layer", nn.LayerNorm), ("torch_rms", nn.RMSNorm),
                                       ("batch", SequenceBatchNorm), ("none", nn.Identity)])
def test_each_block_has_two_norms_of_the_chosen_kind(norm, cls):
    model = model_for(norm=norm)
    for block in model.blocks:
        assert type(block.norm1) is cls and type(block.norm2) is cls


def test_final_norm_default_pre_has_one_post_has_none_and_it_can_be_chosen():
    assert isinstance(model_for(placement="pre").final_norm, ncnn.LayerNorm)
    assert isinstance(model_for(placement="post").final_norm, nn.Identity)
    assert isinstance(model_for(placement="pre", final_norm=False).final_norm, nn.Identity)
    assert isinstance(model_for(placement="post", final_norm=True, norm="rms").final_norm, ncnn.RMSNorm)


def _manual_block(block, x, placement):
    attn, mlp, n1, n2 = block.attn, block.mlp, block.norm1, block.norm2
    if placement == "pre":
        h = x + attn(n1(x))
        return h + mlp(n2(h))
    h = n1(x + attn(x))
    return n2(h + mlp(h))


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_block_forward_is_the_placements_formula(placement):
    seed_everything(1)
    block = TransformerBlock(16, 2, 24, "layer", placement)
    with torch.no_grad():  # non-trivial gains and biases
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    x = torch.randn(3, 7, 16)
    assert torch.allclose(block(x), _manual_block(block, x, placement), atol=1e-6)


def test_post_ln_normalizes_the_stream_pre_ln_does_not():
    """Post-LN: every token of the stream after a block has mean 0, variance 1 over its features
    (gain 1, bias 0 at init); pre-LN's stream is the raw sum of the branches."""
    x = torch.rand(4, 1, 28, 28)
    post = model_for(placement="post").residual_stream(x)[1:]
    pre = model_for(placement="pre").residual_stream(x)[1:]
    for h in post:
        assert torch.allclose(h.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(h.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert max((h.var(-1, unbiased=False) - 1).abs().max().item() for h in pre) > 0.5


@pytest.mark.parametrize("ours, theirs", [("layer", "torch_layer"), ("rms", "torch_rms")])
@pytest.mark.parametrize("placement", ["post", "pre"])
def test_our_norms_give_the_model_torch_norms_give(ours, theirs, placement):
    a = model_for(norm=ours, placement=placement).double()
    b = model_for(seed=5, norm=theirs, placement=placement).double()
    with torch.no_grad():  # non-trivial gains (and biases) in our model, then copy them over
        for name, p in a.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(a(x), b(x), atol=1e-10)
    ga = torch.autograd.grad(a(x).square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(b(x).square().sum(), list(b.parameters()))
    assert all(torch.allclose(g, h, atol=1e-9) for g, h in zip(ga, gb))


def test_xavier_initialization_and_zero_biases():
    model = model_for()
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(torch.all(m.bias == 0) for m in linear)
    for m in linear:
        fan_out, fan_in = m.weight.shape
        assert m.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_padding_mask_hides_padded_positions(placement):
    model = model_for(placement=placement).eval()
    x = torch.rand(2, 9, 28)
    padded = torch.cat([x, 100 * torch.randn(2, 5, 28)], dim=1)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[:, 9:] = True
    assert torch.allclose(model(padded, mask), model(x), atol=1e-5)


def test_batch_norm_model_depends_on_the_batch_and_cannot_train_on_one_token():
    model = model_for(norm="batch").train()
    x = torch.rand(4, 6, 28)
    other = torch.cat([x[:1], torch.rand(3, 6, 28)])
    assert (model(x)[0] - model(other)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.rand(1, 1, 28))
    layer = model_for(norm="layer").train()
    assert torch.allclose(layer(x)[0], layer(other)[0], atol=1e-6)


def test_same_seed_same_model_and_output():
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model_for(seed=3)(x), model_for(seed=3)(x))
    assert not torch.equal(model_for(seed=3)(x), model_for(seed=4)(x))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"norm": "group"}, ValueError, "unknown norm 'group'"),
    ({"placement": "middle"}, ValueError, "unknown placement 'middle'"),
    ({"d_model": 10, "num_heads": 4}, ValueError, "divisible by num_heads"),
    ({"num_layers": 0}, ValueError, "num_layers must be a positive integer"),
])
def test_bad_settings_raise_clear_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        model_for(**kwargs)


def test_bad_input_raises_clear_errors():
    model = model_for()
    with pytest.raises(DtypeError, match="floating-point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ShapeError, match="tokens of shape"):
        model(torch.rand(2, 7, 20))
    with pytest.raises(ShapeError, match="tokens of shape"):
        model(torch.rand(2, 40, 28))  # longer than the position table
    with pytest.raises(ShapeError, match="expects input of shape"):
        model(torch.rand(2, 28 * 28))


def test_training_a_variant_twice_gives_identical_weights():
    from normcourse.data import load_mnist
    from normcourse.experiments import ch09_normalization_in_transformers as ch9

    data = ch9.mnist_tensors(load_mnist("embedded"), test_examples=100)
    a, b = (ch9.train_variant(data, "post-LN + warm-up", 3e-3, seed=4, steps=6, eval_every=3,
                              num_layers=2) for _ in range(2))
    assert a.accuracy == b.accuracy and a.history.train_loss == b.history.train_loss
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
