"""The claims of chapter 7 (why batch norm works), asserted by calling the experiment functions
the chapter plots, with the chapter's settings, over three seeds.

Each experiment is trained once per data source (``claims_mnist``: the embedded subset always,
full MNIST when it is there, else a visible skip) and shared by the tests that read it. Measured
numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse.experiments import ch07_why_batch_norm_works as ch7

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
_CACHE: dict[tuple[str, str], object] = {}


def _experiment(mnist, name: str):
    """The chapter's experiment ``name`` on this data source, three seeds, trained once."""
    key = (mnist.source, name)
    if key not in _CACHE:
        if name == "shift":
            _CACHE[key] = ch7.covariate_shift(mnist, seeds=SEEDS, steps=300, conv_steps=150,
                                              probe_every=25)
        elif name == "noisy":
            _CACHE[key] = ch7.noisy_batch_norm(mnist, seeds=SEEDS, steps=300)
        elif name == "decay":
            _CACHE[key] = ch7.weight_decay(mnist, decays=(0.0, 5e-3), seeds=SEEDS, steps=300)
        elif name == "stats":
            _CACHE[key] = ch7.batch_statistics_noise(mnist, stats_batches=(None, 300),
                                                     seeds=SEEDS, steps=400)
        elif name == "dropout":
            _CACHE[key] = ch7.dropout_variance_shift(mnist, seeds=SEEDS, steps=400)
    return _CACHE[key]


def _mean(values) -> float:
    return float(np.mean(list(values)))


def _per_seed(shift, arch, norm, measure):
    """``measure(run)`` for each seed's run of (arch, norm)."""
    return [measure(shift[arch, norm, s]) for s in SEEDS]


def _gradient_change(run):
    return _mean(g.relative for g in run.gradient_change[1:])


def _landscape(name):
    return lambda run: _mean(getattr(a, name) for a in run.along_gradient[1:])


@pytest.mark.slow
@pytest.mark.parametrize("arch, margin", [("mlp", 1.0), ("convnet", 0.15)])
def test_batch_norm_reduces_the_papers_moment_drift(claims_mnist, arch, margin):
    shift = _experiment(claims_mnist, "shift")
    plain = _per_seed(shift, arch, "none", lambda r: r.moment_drift())
    bn = _per_seed(shift, arch, "batch", lambda r: r.moment_drift())
    print(arch, "moment drift, plain", np.round(plain, 3), "BN", np.round(bn, 3))
    assert _mean(bn) < _mean(plain) - margin


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_batch_norm_does_not_reduce_santurkars_gradient_change(claims_mnist, arch):
    """Santurkar et al.'s ICS: the relative change of a layer's gradient when the layers below
    step is larger with batch norm (by 0.05 on the mean of three seeds), not smaller."""
    shift = _experiment(claims_mnist, "shift")
    plain = _per_seed(shift, arch, "none", _gradient_change)
    bn = _per_seed(shift, arch, "batch", _gradient_change)
    print(arch, "||G - G'|| / ||G||, plain", np.round(plain, 3), "BN", np.round(bn, 3))
    assert _mean(bn) > _mean(plain) + 0.05
    assert min(r.test_accuracy for r in shift.values()) > 0.7  # every run learned


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
@pytest.mark.parametrize("measure", ["loss_variation", "gradient_predictiveness"])
def test_batch_norm_smooths_the_loss_along_the_gradient(claims_mnist, arch, measure):
    """Both measures at least 20 % lower with batch norm, on the mean of three seeds."""
    shift = _experiment(claims_mnist, "shift")
    plain = _per_seed(shift, arch, "none", _landscape(measure))
    bn = _per_seed(shift, arch, "batch", _landscape(measure))
    print(arch, measure, "plain", np.round(plain, 3), "BN", np.round(bn, 3))
    assert _mean(bn) < 0.8 * _mean(plain)


@pytest.mark.slow
def test_effective_beta_does_not_follow(claims_mnist):
    """The chapter's negative statement: the effective beta is higher with BN on the MLP and
    lower on the ConvNet (means of three seeds), so no direction is claimed for it."""
    shift = _experiment(claims_mnist, "shift")
    beta = {(a, n): _mean(_per_seed(shift, a, n, _landscape("effective_beta")))
            for a in ("mlp", "convnet") for n in ("none", "batch")}
    print("effective beta", {k: round(v, 2) for k, v in beta.items()})
    assert beta["mlp", "batch"] > beta["mlp", "none"]
    assert beta["convnet", "batch"] < beta["convnet", "none"]


@pytest.mark.slow
def test_noisy_batch_norm_trains_far_faster_than_the_plain_network(claims_mnist):
    """Training loss (last 50 steps, mean of three seeds): BN < noisy BN < plain - 0.1; and
    noisy BN's test accuracy is above the plain network's on average."""
    runs = _experiment(claims_mnist, "noisy")
    loss = {n: [np.mean(runs[n, s].train_loss[-50:]) for s in SEEDS] for n in ch7.NORMS}
    acc = {n: [runs[n, s].test_accuracy for s in SEEDS] for n in ch7.NORMS}
    print("loss", {n: np.round(v, 3) for n, v in loss.items()})
    print("test accuracy", {n: np.round(v, 3) for n, v in acc.items()})
    assert _mean(loss["batch"]) < _mean(loss["noisy"]) < _mean(loss["none"]) - 0.1
    assert _mean(acc["noisy"]) > _mean(acc["none"])


@pytest.mark.slow
def test_weight_norm_grows_without_weight_decay_and_decay_raises_the_effective_lr(claims_mnist):
    runs = _experiment(claims_mnist, "decay")
    for s in SEEDS:
        plain, wd = runs[0.0, s], runs[5e-3, s]
        print(f"seed {s}: ||w|| {plain.weight_norm[-1]:.3f} vs {wd.weight_norm[-1]:.3f}, "
              f"effective lr {plain.effective_lr[-1]:.3f} vs {wd.effective_lr[-1]:.3f}, angle "
              f"{np.mean(plain.angle[-50:]):.4f} vs {np.mean(wd.angle[-50:]):.4f}, accuracy "
              f"{plain.test_accuracy:.3f} vs {wd.test_accuracy:.3f}")
        # ||w_{t+1}||^2 = ||w_t||^2 + lr^2 ||g||^2 up to BN's eps: never shrinks
        assert np.all(np.diff(plain.weight_norm) > -1e-4)
        assert plain.weight_norm[-1] > plain.weight_norm[0]
        assert wd.weight_norm[-1] < plain.weight_norm[-1] - 0.3
        assert wd.effective_lr[-1] > 1.2 * plain.effective_lr[-1]
        assert np.mean(wd.angle[-50:]) > np.mean(plain.angle[-50:])
    # and the accuracy: not changed beyond 2 points on the mean
    assert abs(_mean(runs[0.0, s].test_accuracy for s in SEEDS)
               - _mean(runs[5e-3, s].test_accuracy for s in SEEDS)) < 0.02


@pytest.mark.slow
def test_noise_of_the_statistics_shows_no_regularization_here(claims_mnist):
    """The chapter's null result: statistics over 60 or over 300 examples change the mean test
    accuracy and the mean generalization gap by less than 3 points."""
    runs = _experiment(claims_mnist, "stats")
    for key in ("test_accuracy", "generalization_gap"):
        values = {b: [getattr(runs[b, s], key) for s in SEEDS] for b in (None, 300)}
        print(key, {b: np.round(v, 3) for b, v in values.items()})
        assert abs(_mean(values[None]) - _mean(values[300])) < 0.03
    assert min(runs[b, s].train_accuracy for b in (None, 300) for s in SEEDS) > 0.97  # overfit


@pytest.mark.slow
def test_dropout_before_batch_norm_shifts_its_variance(claims_mnist):
    """Li et al.'s variance shift: with dropout before them, BN 2 and 3 have running variances
    well above their test-time input's (BN 3 > 1.3x), and 0.2 above the same layers' with
    dropout after the last BN (means of three seeds)."""
    runs = _experiment(claims_mnist, "dropout")
    shift = {p: np.mean([runs[p, s]["shift"] for s in SEEDS], axis=0)
             for p in ("before_bn", "after_bn")}
    print("variance shift", {p: np.round(v, 3) for p, v in shift.items()})
    print("accuracy", {k: (round(r["accuracy"], 3), round(r["recalibrated"], 3))
                       for k, r in runs.items()})
    assert shift["before_bn"][2] > 1.3
    assert shift["before_bn"][1] > shift["after_bn"][1] + 0.2
    assert shift["before_bn"][2] > shift["after_bn"][2] + 0.2


@pytest.mark.slow
def test_the_variance_shift_is_not_what_costs_accuracy_here(claims_mnist):
    """Dropout before BN ends below dropout after the last BN (mean of three seeds), and
    re-estimating the statistics with dropout off changes its accuracy by less than a point."""
    runs = _experiment(claims_mnist, "dropout")
    accuracy = {p: _mean(runs[p, s]["accuracy"] for s in SEEDS) for p in ("before_bn", "after_bn")}
    recovered = _mean(runs["before_bn", s]["recalibrated"] - runs["before_bn", s]["accuracy"]
                      for s in SEEDS)
    print("accuracy", accuracy, "recalibration gain", round(recovered, 4))
    assert accuracy["after_bn"] > accuracy["before_bn"]
    assert abs(recovered) < 0.01


# ---------------------------------------------------------------------------------------------
# The experiment module's pieces (fast)
# ---------------------------------------------------------------------------------------------
def _tiny_data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, x[:60], y[:60]


def test_build_places_noise_and_dropout_where_the_chapter_says():
    from normcourse import nn as ncnn

    noisy = ch7.build("noisy", seed=0)
    assert [type(m) for m in noisy if "Norm" in type(m).__name__] == [ncnn.NoisyBatchNorm1d] * 3
    conv = ch7.build("noisy", "convnet", seed=0)
    assert sum(isinstance(m, ncnn.NoisyBatchNorm2d) for m in conv) == 2
    before = [n for n, _ in ch7.build("batch", dropout="before_bn").named_children()]
    assert before.index("drop1") == before.index("act1") + 1 < before.index("norm2")
    assert "drop2" in before and "drop3" not in before
    after = [n for n, _ in ch7.build("batch", dropout="after_bn").named_children()]
    assert [n for n in after if n.startswith("drop")] == ["drop3"]
    assert after.index("drop3") == after.index("out") - 1
    with pytest.raises(ValueError, match="norm"):
        ch7.build("layer")


def test_probes_do_not_change_the_run_and_runs_are_deterministic():
    data = _tiny_data()
    plain = ch7.train_run(data, norm="batch", steps=6)
    probed = ch7.train_run(data, norm="batch", steps=6, probe_every=2)
    again = ch7.train_run(data, norm="batch", steps=6, probe_every=2)
    assert plain.train_loss == probed.train_loss == again.train_loss
    assert probed.probe_steps == [0, 2, 4, 5]
    assert [g.distance for g in probed.gradient_change] == [g.distance for g in again.gradient_change]
    assert len(probed.along_gradient) == 4 and len(probed.input_mean[0]) == 100


def test_weight_decay_and_variance_shift_helpers():
    data = _tiny_data()
    run = ch7.train_run(data, norm="batch", steps=5, weight_decay=0.0)
    assert len(run.weight_norm) == len(run.effective_lr) == len(run.angle) == 5
    # plain SGD on a scale-invariant layer: the norm never shrinks
    assert np.all(np.diff(run.weight_norm) > -1e-4)
    model = ch7.build("batch", dropout="before_bn")
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(data[0][:120])
    shift = ch7.variance_shift(model, data[0])
    assert len(shift) == 3 and shift[2] > 1.1  # dropout (p=0.5) inflated the training variance
