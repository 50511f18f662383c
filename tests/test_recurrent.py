"""normcourse.recurrent: the layer-norm RNN cell of chapter 5."""

from __future__ import annotations

import pytest
import torch

from normcourse.recurrent import RecurrentClassifier, RNNCell
from normcourse.utils import seed_everything

torch.set_num_threads(1)


def _captured_norm_calls(model, x):
    calls = []
    hook = model.cell.norm.register_forward_hook(lambda m, inp, out: calls.append((inp[0], out)))
    states = model.hidden_states(x)
    hook.remove()
    return states, calls


def test_layer_norm_statistics_are_per_time_step_and_per_example():
    seed_everything(0)
    model = RecurrentClassifier(3, 16, 4, norm="layer").double()
    x = torch.randn(5, 7, 3, dtype=torch.float64) * 3 + 1
    states, calls = _captured_norm_calls(model, x)
    assert states.shape == (5, 7, 16) and len(calls) == 7
    for summed, out in calls:
        var = summed.var(dim=1, unbiased=False)
        assert torch.allclose(out.mean(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(out.var(dim=1, unbiased=False), var / (var + 1e-5), rtol=1e-10)


def test_gain_and_bias_are_shared_across_time_steps():
    model = RecurrentClassifier(3, 8, 2, norm="layer")
    names = {name for name, _ in model.cell.named_parameters()}
    assert names == {"input_to_hidden.weight", "hidden_to_hidden.weight", "norm.weight", "norm.bias"}
    assert model.cell.norm.weight.shape == (8,)
    assert torch.equal(model.cell.norm.weight.detach(), torch.ones(8))
    assert torch.equal(model.cell.norm.bias.detach(), torch.zeros(8))


def test_outputs_do_not_depend_on_the_rest_of_the_batch():
    seed_everything(1)
    model = RecurrentClassifier(4, 12, 3, norm="layer").double().train()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-13)


def test_cell_matches_the_formula():
    seed_everything(2)
    cell = RNNCell(3, 6, norm="layer").double()
    with torch.no_grad():
        cell.norm.weight.uniform_(0.5, 1.5)
        cell.norm.bias.uniform_(-0.5, 0.5)
    x, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    a = x @ cell.input_to_hidden.weight.T + h @ cell.hidden_to_hidden.weight.T
    expected = torch.tanh(torch.nn.functional.layer_norm(a, (6,), cell.norm.weight, cell.norm.bias))
    assert torch.allclose(cell(x, h), expected, atol=1e-13)


def test_plain_cell_has_a_bias_and_no_norm():
    seed_everything(3)
    cell = RNNCell(3, 6, norm="none").double()
    x, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    expected = torch.tanh(cell.input_to_hidden(x) + h @ cell.hidden_to_hidden.weight.T)
    assert cell.input_to_hidden.bias is not None
    assert torch.allclose(cell(x, h), expected, atol=1e-13)


def test_gradients_pass_gradcheck():
    seed_everything(4)
    model = RecurrentClassifier(2, 5, 3, norm="layer").double()
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: model(v), (x,))


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 3), ValueError, "shape"),
        (torch.randn(2, 3, 5), ValueError, "last"),
        (torch.zeros(2, 3, 4, dtype=torch.long), TypeError, "floating"),
    ],
)
def test_bad_input_raises_a_clear_error(x, error, match):
    model = RecurrentClassifier(4, 8, 2)
    with pytest.raises(error, match=match):
        model(x)


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="norm"):
        RNNCell(3, 4, norm="batch")
