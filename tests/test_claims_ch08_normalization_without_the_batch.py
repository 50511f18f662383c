"""The claims of chapter 8 (normalization without the batch), asserted by calling the experiment
functions the chapter plots, over three seeds.

Exact facts (the normalization sets, the invariance table) are fast. The ``slow`` tests train the
chapter's runs (the same settings: ``SWEEP``) on the embedded MNIST subset, which every user has,
and again on full MNIST when it is there (``claims_mnist``; else a visible skip).
Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse.experiments import ch08_normalization_without_the_batch as ch8

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
# the chapter's settings: the ConvNet on 1x1 maps, and the 28x28 ConvNet for the contrast
SWEEP = dict(examples=3200, lr=0.1, test_examples=1000)
CONVNET = dict(architecture="convnet", widths=(8, 16), examples=1600, lr=0.05, test_examples=1000)
FALL_AT_4 = 0.02


# ---------------------------------------------------------------------------------------------
# Exact claims
# ---------------------------------------------------------------------------------------------
def test_normalization_sets_are_those_of_the_table():
    n, c, h, w = 3, 8, 2, 5
    assert ch8.what_each_normalizes((n, c, h, w), num_groups=4) == {
        "batch": n * h * w, "layer": c * h * w, "instance": h * w, "group": c // 4 * h * w}


def test_invariance_table():
    invariant = {t: {k: v < 1e-9 for k, v in row.items()} for t, row in ch8.invariance_table(seed=3).items()}
    assert all(invariant["weight re-scaling"].values())
    assert [k for k, v in invariant["one filter re-scaling"].items() if v] == ["batch", "instance", "ws"]
    assert [k for k, v in invariant["weight re-centering (per filter)"].items() if v] == ["ws"]
    assert [k for k, v in invariant["dataset re-scaling"].items() if not v] == ["ws"]
    assert [k for k, v in invariant["single example re-scaling"].items() if not v] == ["batch", "ws"]
    # and "not invariant" means a visible change, not rounding
    assert ch8.invariance_table(seed=3)["one filter re-scaling"]["group"] > 1e-2


# ---------------------------------------------------------------------------------------------
# Trained claims, three seeds, on each data set the tests use
# ---------------------------------------------------------------------------------------------
_TENSORS: dict[str, tuple] = {}
_SWEEPS: dict[tuple, dict] = {}


def _tensors(mnist) -> tuple:
    """The chapter's tensors of one data source (``claims_mnist``: embedded, or full MNIST)."""
    if mnist.source not in _TENSORS:
        _TENSORS[mnist.source] = ch8.mnist_tensors(mnist)
    return _TENSORS[mnist.source]


def _sweep(mnist, config: str, batch_sizes=ch8.BATCH_SIZES, settings=None) -> dict:
    """``{batch size: [accuracy per seed]}`` of one configuration (the chapter's ``SWEEP``
    unless ``settings`` are given), trained once per data source."""
    settings = SWEEP if settings is None else settings
    key = (mnist.source, config, tuple(batch_sizes), tuple(sorted(settings.items())))
    if key not in _SWEEPS:
        result = ch8.batch_size_sweep(_tensors(mnist), (config,), batch_sizes, SEEDS, **settings)
        _SWEEPS[key] = {b: [result[config, b, s] for s in SEEDS] for b in batch_sizes}
        print(config, settings.get("architecture", "pointwise"),
              {b: [round(a, 3) for a in accs] for b, accs in _SWEEPS[key].items()})
    return _SWEEPS[key]


def _means(by_batch: dict) -> dict:
    return {b: float(np.mean(accs)) for b, accs in by_batch.items()}


@pytest.mark.slow
def test_batch_norm_falls_as_the_batch_shrinks(claims_mnist):
    """On 1x1 maps batch norm's statistics are the batch's: its eval accuracy falls from batch 8
    to 4 to 2, and at batch 2 (two values per channel) it is more than 30 points below batch 32."""
    bn = _means(_sweep(claims_mnist, "BN"))
    assert bn[8] > bn[4] > bn[2]
    assert bn[4] < bn[32] - FALL_AT_4
    assert bn[2] < bn[32] - 0.3


@pytest.mark.slow
@pytest.mark.parametrize("config", ["GN", "LN", "GN+WS"])
def test_per_example_norms_stay_flat(claims_mnist, config):
    """GN, LN and GN+WS: the mean accuracy at every batch size is within 5 points of batch 32's,
    and at batch 2 more than 30 points above batch norm's."""
    acc = _means(_sweep(claims_mnist, config))
    assert all(abs(acc[b] - acc[32]) < 0.05 for b in ch8.BATCH_SIZES), acc
    assert acc[2] > _means(_sweep(claims_mnist, "BN"))[2] + 0.3
    assert min(acc.values()) > 0.75  # and it learned


@pytest.mark.slow
def test_weight_standardization_with_batch_norm_falls_like_batch_norm(claims_mnist):
    ws_bn = _means(_sweep(claims_mnist, "WS+BN"))
    assert ws_bn[2] < ws_bn[32] - 0.3
    assert ws_bn[32] > 0.8


@pytest.mark.slow
def test_weight_standardization_alone_does_not_train(claims_mnist):
    """WS without an activation normalization: standardized filters have unit variance per
    weight, so each layer multiplies the scale by about sqrt(fan-in); after the first steps'
    huge loss it stays at chance level, and every run ends under 20 %."""
    ws = _sweep(claims_mnist, "WS")
    assert max(max(accs) for accs in ws.values()) < 0.2


@pytest.mark.slow
def test_weight_standardization_does_not_hurt_group_norm(claims_mnist):
    """Qiao et al. report that WS closes part of GN's gap to BN at large batch. Here GN+WS is,
    on the mean of three seeds, at least as accurate as GN (within 2 points) at every batch
    size; a gain is not shown beyond the spread over seeds (the differences are printed)."""
    gn, gn_ws = _sweep(claims_mnist, "GN"), _sweep(claims_mnist, "GN+WS")
    diffs = {b: [round(w - g, 3) for w, g in zip(gn_ws[b], gn[b])] for b in ch8.BATCH_SIZES}
    print("GN+WS minus GN, per seed:", diffs)
    assert all(np.mean(d) > -0.02 for d in diffs.values())


@pytest.mark.slow
def test_batch_norm_does_not_fall_in_the_28x28_convnet(claims_mnist):
    """The contrast: in the small ConvNet on 28x28 images batch norm's m = N*H*W is at least
    392 even at batch 2, and BN at batch 2 is about as accurate as at batch 32 (within 3 points
    on the mean, and not worse than GN by more than 3 points at batch 2)."""
    bn = _means(_sweep(claims_mnist, "BN", (32, 2), CONVNET))
    gn = _means(_sweep(claims_mnist, "GN", (32, 2), CONVNET))
    assert bn[2] > bn[32] - 0.03
    assert bn[2] > gn[2] - 0.03
    assert min(gn.values()) > 0.8  # and it learned


@pytest.mark.slow
def test_rms_norm_is_as_accurate_as_layer_norm(claims_mnist):
    data = _tensors(claims_mnist)
    acc = ch8.rms_versus_layer_norm(data, SEEDS, steps=300)
    print("RMS vs LN", acc)
    rms = np.mean([acc["rms", s] for s in SEEDS])
    layer = np.mean([acc["layer", s] for s in SEEDS])
    assert abs(rms - layer) < 0.02
    assert min(acc.values()) > 0.8
