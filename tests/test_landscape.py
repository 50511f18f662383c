"""normcourse.landscape: the gradient-change probe, the loss along the gradient, the effective
learning rate and the angle updates, on small models where the answers are known."""

import math

import pytest
import torch
from torch import nn

from normcourse import landscape
from normcourse import nn as ncnn

torch.set_num_threads(1)


def _quadratic(a: torch.Tensor):
    """A one-parameter 'model' w with loss 0.5 * w^T diag(a) w: gradient a * w."""
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(len(a), dtype=torch.float64))
    return model, lambda m: 0.5 * (a * m.w ** 2).sum()


def test_loss_along_gradient_on_a_quadratic_is_exact():
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    model, loss_fn = _quadratic(a)
    etas = (0.1, 0.2)
    result = landscape.loss_along_gradient(model, loss_fn, etas)
    g = a * 1.0
    for eta, loss, dist in zip(etas, result.losses, result.gradient_distances):
        w = 1.0 - eta * g
        assert loss == pytest.approx(float(0.5 * (a * w ** 2).sum()))
        assert dist == pytest.approx(float((a * eta * g).norm()))  # grad(w') - g = -eta a g
    assert result.gradient_norm == pytest.approx(float(g.norm()))
    # beta along g: ||A g|| / ||g||, between the smallest and largest curvature
    assert result.effective_beta == pytest.approx(float((a * g).norm() / g.norm()))
    assert 1.0 < result.effective_beta <= 4.0
    assert result.loss_variation == pytest.approx(max(result.losses) - min(result.losses))
    assert result.gradient_predictiveness == max(result.gradient_distances)
    assert torch.equal(model.w, torch.ones(2, dtype=torch.float64))  # the model did not move


def test_loss_along_gradient_rejects_non_positive_steps():
    model, loss_fn = _quadratic(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        landscape.loss_along_gradient(model, loss_fn, (0.0, 1.0))


def _two_layer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return model, lambda m: nn.functional.cross_entropy(m(x), y)


def test_gradient_change_against_a_hand_computation():
    model, loss_fn = _two_layer()
    lr = 0.5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = landscape.gradient_change(model, loss_fn, "2.weight", lr)
    # by hand: G, then step the first layer (0.weight, 0.bias) only, then G'
    loss_fn(model).backward()
    g = model[2].weight.grad.clone()
    with torch.no_grad():
        model[0].weight -= lr * model[0].weight.grad
        model[0].bias -= lr * model[0].bias.grad
    model.zero_grad()
    loss_fn(model).backward()
    g2 = model[2].weight.grad
    assert result.distance == pytest.approx(float((g - g2).norm()))
    assert result.cosine == pytest.approx(float((g * g2).sum() / (g.norm() * g2.norm())))
    assert result.relative == pytest.approx(float((g - g2).norm() / g.norm()))
    assert result.distance > 0
    model.load_state_dict(state)


def test_gradient_change_of_the_first_layer_is_zero_and_the_model_is_untouched():
    model, loss_fn = _two_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = landscape.gradient_change(model, loss_fn, "0.weight", 0.5)
    assert result.distance == 0.0 and result.cosine == pytest.approx(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_change_leaves_running_statistics_alone_and_names_bad_parameters():
    model = nn.Sequential(nn.Linear(5, 4, bias=False), ncnn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    landscape.gradient_change(model, lambda m: nn.functional.cross_entropy(m(x), y), "3.weight", 0.1)
    assert int(model[1].num_batches_tracked) == 0
    with pytest.raises(ValueError, match="no parameter 'fc9.weight'"):
        landscape.gradient_change(model, lambda m: m(x).sum(), "fc9.weight", 0.1)


def test_effective_learning_rate_and_angle_update():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    torch.testing.assert_close(landscape.effective_learning_rate(w, 0.1), torch.tensor([0.1 / 25, 0.4]))
    conv = torch.ones(2, 3, 3, 3)  # per output filter: ||w||^2 = 27
    torch.testing.assert_close(landscape.effective_learning_rate(conv, 2.7), torch.full((2,), 0.1))
    rotated = torch.tensor([[-4.0, 3.0], [0.0, 2.0]])  # a right angle, then no turn (only a scale)
    torch.testing.assert_close(landscape.angle_update(w, rotated), torch.tensor([math.pi / 2, 0.0]))


def test_scale_invariance_behind_the_effective_learning_rate():
    """With batch norm after the layer, the gradient of w_i is orthogonal to w_i and scales as
    1 / ||w_i||: the reason why lr / ||w_i||^2 is the step the direction takes."""
    torch.manual_seed(0)
    fc, bn = nn.Linear(6, 4, bias=False).double(), ncnn.BatchNorm1d(4, eps=1e-12, dtype=torch.float64)
    x = torch.randn(32, 6, dtype=torch.float64)
    up = torch.randn(32, 4, dtype=torch.float64)  # eps tiny: exact invariance

    def grad(scale):
        w = (fc.weight.detach() * scale).requires_grad_()
        (bn(x @ w.T) * up).sum().backward()
        return w.grad

    g1, g3 = grad(1.0), grad(3.0)
    assert (g1 * fc.weight).sum(dim=1).abs().max() < 1e-10
    torch.testing.assert_close(g3, g1 / 3.0)
