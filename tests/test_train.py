"""Tests of normcourse.train: determinism, evaluation modes, the activation probe, divergence,
samplers and that a batch-normalized network learns. Small synthetic problems keep them fast."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from normcourse.data import class_subset_batches, iid_batches, load_mnist
from normcourse.models import convnet, mlp
from normcourse.train import (
    ActivationProbe,
    EvalOptions,
    History,
    evaluate,
    evaluate_with_batch_statistics,
    train,
    warmup_factor,
)
from normcourse.utils import seed_everything

torch.set_num_threads(1)

DIM, CLASSES = 12, 4


def blobs(seed: int = 0, n_train: int = 400, n_test: int = 200) -> tuple[torch.Tensor, ...]:
    """Four Gaussian clusters in 12 dimensions, shifted far from the origin (so that the inputs
    are not centred), as (x_train, y_train, x_test, y_test)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(CLASSES, DIM, generator=g) + 5

    def draw(n):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        return centres[y] + torch.randn(n, DIM, generator=g), y

    return (*draw(n_train), *draw(n_test))


def small_mlp(norm: str = "none", seed: int = 0, **kwargs) -> nn.Sequential:
    seed_everything(seed)
    return mlp(sizes=(DIM, 16, 16, CLASSES), norm=norm, **kwargs)


def run(model, data, **overrides):
    settings = dict(steps=60, batch_size=20, lr=0.1, seed=0, eval_every=20, progress=False)
    return train(model, data, **{**settings, **overrides})


def history_without_timings(history: History) -> dict:
    record = dataclasses.asdict(history)
    del record["wall_time"], record["train_time"]
    return record


# ---------------------------------------------------------------------------------------------
# Determinism and the History record
# ---------------------------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_histories_and_weights():
    data = blobs()
    runs = []
    for _ in range(2):
        model = small_mlp("batch")
        probe = ActivationProbe(model.act2, unit=1)
        history = run(model, data, steps=50, eval_every=10, probes=[probe], evaluation=EvalOptions(batch_stats=True))
        runs.append((history_without_timings(history), model.state_dict()))
    (first, weights1), (second, weights2) = runs
    assert first == second
    assert weights1.keys() == weights2.keys()
    for key in weights1:
        assert torch.equal(weights1[key], weights2[key]), key
    # the seed drives the batch order: another seed gives another run
    other = run(small_mlp("batch"), data, steps=50, eval_every=10, seed=1)
    assert other.train_loss != first["train_loss"]


def test_training_and_evaluation_run_on_one_thread_whatever_the_caller_set():
    # With two threads the same seed trains a different model (PyTorch splits sums differently),
    # so train() and the evaluations pin one thread, and give the caller's setting back.
    data = blobs()
    model = small_mlp("batch")
    seen = []
    model.fc1.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(model, data, steps=5, eval_every=5, evaluation=EvalOptions(batch_stats=True))
        evaluate(model, data[2], data[3])
        evaluate_with_batch_statistics(model, data[2], data[3], batch_size=20)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_history_records_every_eval_step_and_the_last_step():
    model = small_mlp("batch")
    history = run(model, blobs(), steps=45, eval_every=20, evaluation=EvalOptions(batch_stats=True))
    assert history.steps == [20, 40, 45]
    for record in (history.train_loss, history.train_accuracy, history.test_accuracy,
                   history.test_accuracy_batch_stats, history.wall_time):
        assert len(record) == 3
    assert history.steps_done == 45 and not history.diverged and history.diverged_at_step is None
    assert history.train_time > 0 and history.steps_per_second > 0
    assert history.wall_time == sorted(history.wall_time)
    assert model.training  # back in training mode after the evaluations


def test_recorded_accuracies_are_eval_mode_accuracies_of_the_final_model():
    data = blobs()
    model = small_mlp("batch")
    history = run(model, data, evaluation=EvalOptions(batch_stats=True, train_examples=100))
    x_train, y_train, x_test, y_test = data
    assert history.test_accuracy[-1] == evaluate(model, x_test, y_test)
    assert history.train_accuracy[-1] == evaluate(model, x_train[:100], y_train[:100])
    assert history.test_accuracy_batch_stats[-1] == evaluate_with_batch_statistics(model, x_test, y_test, 20)


def test_train_loss_is_the_mean_minibatch_loss_since_the_previous_record():
    data = blobs()
    model = small_mlp()
    reference = copy.deepcopy(model)
    history = run(model, data, steps=6, eval_every=3, lr=0.05)
    # replay the same batches by hand: iid_batches(seed=0) drives the default order
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    losses = []
    for indices in iid_batches(len(data[0]), 20, seed=0, steps=6):
        loss = nn.functional.cross_entropy(reference(data[0][indices]), data[1][indices])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(history.train_loss, [np.mean(losses[:3]), np.mean(losses[3:])], rtol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_first_step_reaching():
    history = History(steps=[10, 20, 30], test_accuracy=[0.5, 0.8, 0.79], train_accuracy=[0.6, 0.7, 0.9])
    assert history.first_step_reaching(0.8) == 20
    assert history.first_step_reaching(0.5) == 10
    assert history.first_step_reaching(0.95) is None
    assert history.first_step_reaching(0.85, which="train") == 30
    with pytest.raises(ValueError, match="'test'"):
        history.first_step_reaching(0.5, which="validation")


# ---------------------------------------------------------------------------------------------
# Learning, divergence, samplers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["batch", "layer", "renorm"])
def test_a_normalized_mlp_learns_the_synthetic_task(norm):
    history = run(small_mlp(norm), blobs(), steps=150, eval_every=50, lr=0.2)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.test_accuracy[-1] > 0.9


def test_divergence_is_recorded_and_stops_the_run():
    model = small_mlp(activation="relu")
    history = run(model, blobs(), steps=200, eval_every=10, lr=1e12)
    assert history.diverged
    assert 1 <= history.diverged_at_step < 200
    assert history.steps_done == history.diverged_at_step - 1
    assert len(history.steps) == history.steps_done // 10
    assert not run(small_mlp(activation="relu"), blobs(), lr=0.01).diverged


def test_class_subset_sampler_gives_the_batches():
    data = blobs()
    x_train, y_train = data[0], data[1]
    seen = []
    model = small_mlp("batch")
    model.fc1.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()) if m.training else None)
    sampler = class_subset_batches(y_train.numpy(), 2, 20, seed=5)
    run(model, data, steps=5, eval_every=5, sampler=sampler)
    expected = class_subset_batches(y_train.numpy(), 2, 20, seed=5, steps=5)
    for batch, indices in zip(seen, expected):
        assert torch.equal(batch, x_train[indices])
        assert len(torch.unique(y_train[indices])) == 2


def test_sampler_errors():
    data = blobs()
    with pytest.raises(ValueError, match="ran out of batches at step 3"):
        run(small_mlp(), data, steps=5, sampler=iter([np.arange(20)] * 2))
    with pytest.raises(ValueError, match="batch of 10"):
        run(small_mlp(), data, steps=5, sampler=iter([np.arange(10)] * 5))


def test_bad_arguments_raise_clear_errors():
    data = blobs()
    with pytest.raises(ValueError, match="'sgd', 'adam'"):
        run(small_mlp(), data, optimizer="rmsprop")
    with pytest.raises(ValueError, match="sgd_momentum is an SGD setting"):
        run(small_mlp(), data, optimizer="adam", sgd_momentum=0.9)
    with pytest.raises(ValueError, match="steps"):
        run(small_mlp(), data, steps=0)
    with pytest.raises(ValueError, match="lr"):
        run(small_mlp(), data, lr=0.0)
    with pytest.raises(TypeError, match="tuple of four tensors"):
        run(small_mlp(), data[:2])
    with pytest.raises(TypeError, match="floating-point"):
        run(small_mlp(), (data[0].to(torch.uint8), *data[1:]))


def test_adam_and_momentum_are_used():
    data = blobs()
    plain = run(small_mlp(), data, steps=20, eval_every=20)
    with_momentum = run(small_mlp(), data, steps=20, eval_every=20, sgd_momentum=0.9)
    adam = run(small_mlp(), data, steps=20, eval_every=20, optimizer="adam", lr=1e-3)
    assert len({plain.train_loss[0], with_momentum.train_loss[0], adam.train_loss[0]}) == 3


def test_warmup_factor_is_linear_then_one():
    assert [warmup_factor(t, 4) for t in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_factor(1, -1)


def test_warmup_scales_each_update_and_then_uses_the_full_rate():
    """Plain SGD: each update is -lr * factor * gradient, so with the same first batch the first
    update of a warmed-up run is a quarter of the full-rate run's; after the warm-up, lr."""
    data = blobs()
    weights = {}
    for warmup in (0, 4):
        model = small_mlp()
        before = model.out.weight.detach().clone()
        run(model, data, steps=1, eval_every=1, warmup_steps=warmup)
        weights[warmup] = model.out.weight.detach() - before
    assert torch.allclose(weights[4], 0.25 * weights[0], rtol=1e-5, atol=1e-8)
    seen = []
    model = small_mlp()
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = spy
    try:
        run(model, data, steps=6, eval_every=6, warmup_steps=4)
    finally:
        torch.optim.SGD.step = original
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="warmup_steps"):
        run(small_mlp(), data, warmup_steps=-2)


def test_trains_on_an_mnist_object_with_mlp_and_convnet():
    mnist = load_mnist("embedded")
    history = run(mlp(norm="batch"), mnist, steps=40, batch_size=32, lr=0.5, eval_every=40,
                  evaluation=EvalOptions(batch_size=500))
    assert history.test_accuracy[-1] > 0.3  # chance is 0.1
    history = run(convnet(norm="batch", channels=(4, 8)), mnist, steps=3, batch_size=16, eval_every=3,
                  evaluation=EvalOptions(batch_size=1000, train_examples=100))
    assert len(history.test_accuracy) == 1


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def trained_bn_model() -> nn.Sequential:
    model = small_mlp("batch")
    run(model, blobs(), steps=30)
    return model


def test_evaluate_uses_eval_mode_and_restores_every_modules_flag():
    _, _, x_test, y_test = blobs()
    model = trained_bn_model()
    model.norm1.eval()  # a frozen layer must stay frozen
    with torch.no_grad():
        expected = (copy.deepcopy(model).eval()(x_test).argmax(1) == y_test).sum().item() / len(y_test)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    assert evaluate(model, x_test, y_test) == pytest.approx(expected, abs=1e-12)
    assert evaluate(model, x_test, y_test, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert model.training and not model.norm1.training and model.norm2.training
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])


@pytest.mark.parametrize("norm", ["batch", "torch_batch", "renorm"])
def test_evaluate_with_batch_statistics_normalizes_each_batch_and_leaves_buffers_untouched(norm):
    _, _, x_test, y_test = blobs(n_test=203)
    model = small_mlp(norm)
    run(model, blobs(), steps=30)
    # spoil the running statistics: eval mode breaks, batch statistics do not care
    with torch.no_grad():
        model.norm1.running_mean += 3.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()

    # expected: a copy in training mode, fed batches of 25 (the last one topped up from before)
    replica = copy.deepcopy(model).train()
    correct = 0
    with torch.no_grad():
        for start in range(0, 203, 25):
            stop = min(start + 25, 203)
            logits = replica(x_test[stop - 25 : stop])[start - (stop - 25):]
            correct += (logits.argmax(1) == y_test[start:stop]).sum().item()
    accuracy = evaluate_with_batch_statistics(model, x_test, y_test, batch_size=25)
    assert accuracy == pytest.approx(correct / 203, abs=1e-12)
    assert accuracy > evaluate(model, x_test, y_test) + 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in model.modules())


def test_evaluate_with_batch_statistics_keeps_dropout_off():
    _, _, x_test, y_test = blobs()
    seed_everything(0)
    model = nn.Sequential(nn.Linear(DIM, 16, bias=False), nn.BatchNorm1d(16), nn.Dropout(0.9), nn.Linear(16, CLASSES))
    results = {evaluate_with_batch_statistics(model, x_test, y_test, 20) for _ in range(3)}
    assert len(results) == 1


def test_evaluate_chunks_do_not_change_eval_mode_results():
    _, _, x_test, y_test = blobs()
    model = trained_bn_model()
    whole = evaluate(model, x_test, y_test)
    assert {evaluate(model, x_test, y_test, b) for b in (1, 3, 64, 1000)} == {whole}
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, x_test, y_test, batch_size=0)


# ---------------------------------------------------------------------------------------------
# The activation probe
# ---------------------------------------------------------------------------------------------
def test_probe_records_the_percentiles_of_one_units_input():
    model = small_mlp("batch").eval()
    x1, x2 = torch.randn(37, DIM) + 5, torch.randn(23, DIM)
    with ActivationProbe(model.act2, unit=3, percentiles=(15, 50, 85)) as probe:
        probe.start()
        with torch.no_grad():
            model(x1)
            model(x2)
        values = probe.stop(step=7)
    with torch.no_grad():
        sigmoid_input = model.norm2(model.fc2(model.act1(model.norm1(model.fc1(torch.cat([x1, x2]))))))
    expected = torch.quantile(sigmoid_input[:, 3], torch.tensor([0.15, 0.50, 0.85]))
    torch.testing.assert_close(torch.tensor(values), expected, rtol=0, atol=1e-6)
    assert probe.steps == [7] and probe.values == [values]
    assert probe.as_array().shape == (1, 3)
    # detached: further passes are not seen
    probe.start()
    model(x1)
    with pytest.raises(RuntimeError, match="no forward pass"):
        probe.stop(step=8)


def test_probe_where_output_and_conv_channels():
    model = convnet(norm="batch", channels=(3,)).eval()
    x = torch.rand(4, 1, 28, 28)
    probe = ActivationProbe(model.conv1, unit=2, percentiles=(50,), where="output")
    probe.start()
    with torch.no_grad():
        model(x)
        expected = torch.quantile(model.conv1(x)[:, 2].flatten(), 0.5)
    assert probe.stop(0) == pytest.approx([expected.item()], abs=1e-6)
    probe.remove()


def test_probe_inside_train_records_test_set_percentiles_at_each_evaluation():
    data = blobs()
    model = small_mlp("batch")
    probe = ActivationProbe(model.act2, unit=0)
    history = run(model, data, steps=40, eval_every=20, probes=[probe])
    probe.remove()
    assert len(history.probe_values[0]) == len(history.steps) == 2 and probe.steps == [20, 40]
    with torch.no_grad():
        model.eval()
        sigmoid_input = model.norm2(model.fc2(model.act1(model.norm1(model.fc1(data[2])))))
    expected = torch.quantile(sigmoid_input[:, 0], torch.tensor([0.15, 0.5, 0.85]))
    torch.testing.assert_close(torch.tensor(history.probe_values[0][-1]), expected, rtol=0, atol=1e-6)


def test_probe_rejects_bad_settings():
    model = small_mlp()
    with pytest.raises(ValueError, match="percentiles"):
        ActivationProbe(model.act1, percentiles=(50, 120))
    with pytest.raises(ValueError, match="'input', 'output'"):
        ActivationProbe(model.act1, where="inside")
    probe = ActivationProbe(model.act1, unit=16)
    probe.start()
    with pytest.raises(ValueError, match="unit 16"):
        model(torch.randn(3, DIM))
    probe.remove()
