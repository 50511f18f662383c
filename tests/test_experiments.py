"""Tests of the experiment runner (normcourse.experiments.runner) and of chapter helpers that
change a model's state (recalibration). The chapters' claims are in tests/test_claims_*.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normcourse.data import load_mnist
from normcourse.experiments import ch03_training_with_batch_norm as bt
from normcourse.experiments import ch04_test_time_statistics as tt
from normcourse.experiments import runner
from normcourse.models import mlp
from normcourse.nn import REFERENCE_RUN_STEPS, BatchRenorm1d, BatchRenorm2d, renorm_schedule
from normcourse.utils import restoring_modes, seed_everything

torch.set_num_threads(1)


def bn_mlp() -> nn.Sequential:
    seed_everything(0)
    model = mlp(sizes=(8, 6, 6, 3), norm="batch", activation="relu")
    model.norm1.momentum, model.norm2.momentum = 0.1, 0.3
    return model


# ---------------------------------------------------------------------------------------------
# utils.restoring_modes and recalibrate_batchnorm
# ---------------------------------------------------------------------------------------------
def test_restoring_modes_puts_every_flag_back_even_on_error():
    model = bn_mlp().train()
    model.norm1.eval()  # a layer frozen on its own
    with pytest.raises(RuntimeError, match="boom"):
        with restoring_modes(model):
            model.eval()
            assert not model.norm2.training
            raise RuntimeError("boom")
    assert model.training and not model.norm1.training and model.norm2.training


def test_recalibrate_batchnorm_uses_cumulative_averages_and_restores_momenta_and_modes():
    model = bn_mlp().eval()
    model.norm2.train()
    seen = []
    model.norm1.register_forward_hook(lambda m, *_: seen.append((m.momentum, m.training)))
    tt.recalibrate_batchnorm(model, torch.randn(40, 8), batch_size=10)
    assert seen == [(None, True)] * 4  # four full batches, cumulative average, training mode
    assert model.norm1.num_batches_tracked.item() == 4
    assert (model.norm1.momentum, model.norm2.momentum) == (0.1, 0.3)
    assert not model.training and not model.norm1.training and model.norm2.training


def test_an_error_mid_recalibration_restores_momenta_and_modes():
    model = bn_mlp().eval()
    model.norm2.train()
    calls = []

    def fail_on_second_batch(module, inputs, output):
        calls.append(module.momentum)
        if len(calls) == 2:
            raise RuntimeError("a batch failed")

    handle = model.norm2.register_forward_hook(fail_on_second_batch)
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="a batch failed"):
        tt.recalibrate_batchnorm(model, torch.randn(40, 8), batch_size=10)
    handle.remove()
    assert calls == [None, None]  # it did fail in the middle, with the momenta switched off
    assert (model.norm1.momentum, model.norm2.momentum) == (0.1, 0.3)
    assert not model.training and not model.norm1.training and model.norm2.training
    assert [m.training for m in model.modules()] == modes


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------
def test_mnist_tensors_has_one_shape_contract_and_passes_tuples_through():
    x_train, y_train, x_test, y_test = runner.mnist_tensors(load_mnist(source="embedded"))
    assert x_train.shape == (8000, 1, 28, 28) and x_test.shape == (2000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and 0 <= x_train.min() and x_train.max() <= 1
    assert y_train.dtype == torch.long and y_train.shape == (8000,)
    cut = runner.mnist_tensors((x_train, y_train, x_test, y_test), test_examples=100)
    assert cut[0] is x_train and cut[1] is y_train
    assert torch.equal(cut[2], x_test[:100]) and torch.equal(cut[3], y_test[:100])


def test_build_model_is_seeded_and_checks_the_architecture():
    first = runner.build_model("batch", seed=3)
    second = runner.build_model("batch", seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    other = runner.build_model("batch", seed=4)
    assert not torch.equal(first.fc1.weight, other.fc1.weight)
    assert isinstance(runner.build_model("layer", architecture="convnet", seed=0)[0], nn.Conv2d)
    with pytest.raises(ValueError, match="'mlp', 'convnet'"):
        runner.build_model("batch", architecture="resnet")


def test_sweep_runs_the_settings_in_order_and_keys_the_results():
    calls = []

    def run(a, b=0):
        calls.append((a, b))
        return a * 10 + b

    assert runner.sweep(run, [("x", {"a": 1}), ("y", {"a": 2, "b": 5})]) == {"x": 10, "y": 25}
    assert runner.sweep(run, {("z", 1): {"a": 3}}) == {("z", 1): 30}
    assert calls == [(1, 0), (2, 5), (3, 0)]


def test_the_renorm_layers_default_to_the_paper_schedule_that_renorm_schedule_scales():
    # the paper's numbers are written twice in normcourse/nn.py: as the layers' defaults and as
    # PAPER_SCHEDULE; unscaled, the schedule must be exactly those defaults
    schedule = renorm_schedule(REFERENCE_RUN_STEPS)
    for layer in (BatchRenorm1d(4), BatchRenorm2d(4)):
        assert {name: getattr(layer, name) for name in schedule} == schedule


def test_train_norms_wires_the_scaled_renorm_schedule_and_fresh_samplers():
    data = runner.mnist_tensors(load_mnist(source="embedded"), test_examples=50)
    made = []

    def sampler_for():
        made.append(1)
        return iter([torch.arange(8).numpy()] * 3)

    results = runner.train_norms(data, ("renorm", "layer"), steps=3, batch_size=8, lr=1e-3,
                                 seed=0, sampler_for=sampler_for)
    assert list(results) == ["renorm", "layer"] and len(made) == 2
    renorm = [m for m in results["renorm"].model.modules() if isinstance(m, BatchRenorm1d)]
    schedule = renorm_schedule(3)
    assert renorm and all((m.warmup_steps, m.rmax_steps, m.dmax_steps) ==
                          (schedule["warmup_steps"], schedule["rmax_steps"], schedule["dmax_steps"])
                          for m in renorm)
    assert results["renorm"].batch_stats_accuracy is None  # renorm is not batch norm
    assert results["layer"].history.steps_done == 3


def test_init_preactivation_variance_shows_where_eps_takes_over():
    """Layer 1's input is linear in the weights, so its variance scales exactly as s^2; the
    normalized variance is var / (var + eps), near 1 at s = 1 and far below it at s = 0.001."""
    torch.manual_seed(0)
    images = torch.rand(60, 1, 28, 28)
    tensors = (images, torch.zeros(60, dtype=torch.long), images, torch.zeros(60, dtype=torch.long))
    result = bt.init_preactivation_variance(tensors, (0.001, 0.1, 1.0), seed=0)
    pre_small, pre_mid = result[0.001]["pre"], result[0.1]["pre"]
    assert pre_small.shape == (3,) and result[1.0]["post"].shape == (3,)
    assert pre_mid[0] / pre_small[0] == pytest.approx(1e4, rel=1e-6)
    # post is what batch norm's output really has (gamma = 1, beta = 0 at initialization)
    model = runner.build_model("batch", seed=0, sizes=bt.PAPER_SIZES, activation="sigmoid",
                               init_scale=0.001)
    outputs = []
    for layer in runner.batchnorm_layers(model):
        layer.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double()))
    with torch.no_grad():
        model.train()(images)
    measured = [float(o.var(dim=0, unbiased=False).mean()) for o in outputs]
    assert result[0.001]["post"] == pytest.approx(measured, rel=1e-4)
    assert result[1.0]["post"].min() > 0.999
    assert result[0.001]["post"][1:].max() < 0.5  # deeper layers: variance below eps


class _LabelReader(nn.Module):
    """Reads the label off column 0 of x; records, in training mode, the labels of each batch."""

    def __init__(self, with_running_stats: bool):
        super().__init__()
        if with_running_stats:
            self.register_buffer("running_mean", torch.zeros(1))
        self.batches: list[torch.Tensor] = []

    def forward(self, x):
        labels = x[:, 0].long()
        if self.training:
            self.batches.append(labels)
        return nn.functional.one_hot(labels, 10).float()


def test_noniid_test_control_builds_test_batches_of_two_classes():
    from normcourse.experiments import ch06_batch_renorm as brx
    from normcourse.train import History

    labels = torch.arange(10).repeat(40)  # 400 test examples, 40 per class
    tensors = (labels[:, None].float(), labels, labels[:, None].float(), labels)
    reader = _LabelReader(with_running_stats=True)
    result = runner.ClassifierResult("batch", 32, 0, 1.0, 1.0, History(), reader)
    control = brx.noniid_test_control(result, tensors, classes_per_batch=2, seed=0)
    assert control == {"batch_stats": 1.0, "population": 1.0}
    assert len(reader.batches) == 400 // 32
    for batch in reader.batches:
        counts = sorted(torch.bincount(batch, minlength=10).tolist())
        assert len(batch) == 32 and counts[-3:] == [0, 16, 16]
    no_stats = runner.ClassifierResult("layer", 32, 0, 1.0, None, History(), _LabelReader(False))
    assert brx.noniid_test_control(no_stats, tensors, seed=0)["batch_stats"] is None

