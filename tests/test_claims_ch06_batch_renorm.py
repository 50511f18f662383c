"""The claims of chapter 6 (batch renormalization), asserted by calling the same experiment
functions the chapter plots (``normcourse.experiments.ch06_batch_renorm``).

The fast tests are exact facts. The ``slow`` tests train small models over three seeds and require
each claim on every seed plus a margin on the mean (at batch 4, on a majority of the seeds: see
that test); they run once per data source (``claims_mnist`` in conftest.py: the embedded subset
always, full MNIST when it is available, else a skip that says why). Runs shared with the other
chapters' claim tests come from ``claim_runs.py``. The measured numbers are printed
(``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normcourse.nn as ncnn
from claim_runs import STEPS, report, runs_for
from normcourse.experiments import ch06_batch_renorm as brx
from normcourse.utils import seed_everything

torch.set_num_threads(1)

SEEDS = (0, 1, 2)

# ---------------------------------------------------------------------------------------------
# Fast, exact claims
# ---------------------------------------------------------------------------------------------
def test_batch_renorm_training_output_equals_inference_output():
    seed_everything(0)
    layer = ncnn.BatchRenorm1d(4, warmup_steps=0, rmax_steps=1, dmax_steps=1, rmax=1e3, dmax=1e3,
                               dtype=torch.float64)
    for _ in range(10):
        layer.train()(torch.randn(4, 4, dtype=torch.float64) * 3 + 2)
    x = torch.randn(4, 4, dtype=torch.float64) * 3 + 2
    with torch.no_grad():
        inference = layer.eval()(x)
        training = layer.train()(x)
    assert torch.allclose(training, inference, atol=1e-12)


def test_renorm_schedule_is_the_paper_schedule_scaled():
    assert brx.renorm_schedule(50000) == {"rmax": 3.0, "dmax": 5.0, **brx.PAPER_SCHEDULE}
    assert brx.renorm_schedule(2000) == {"rmax": 3.0, "dmax": 5.0, "warmup_steps": 200,
                                         "dmax_steps": 1000, "rmax_steps": 1600}


# ---------------------------------------------------------------------------------------------
# Slow claims: trained models, three seeds, on each data source
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(claims_mnist):
    """The trained runs of chapters 4-6 on one data source (see claim_runs.py and conftest.py)."""
    return runs_for(claims_mnist)


@pytest.mark.slow
def test_ch6_batch_renorm_beats_batch_norm_at_batch_4(runs):
    bn = [runs.iid("batch", 4, s).eval_accuracy for s in SEEDS]
    renorm = [runs.iid("renorm", 4, s).eval_accuracy for s in SEEDS]
    layer = [runs.iid("layer", 4, s).eval_accuracy for s in SEEDS]
    report("BN@4 eval", bn)
    report("renorm@4 eval", renorm)
    report("LN@4 eval", layer)
    # Above batch norm on average by more than a point. Seed by seed the margin can vanish: the
    # runs' floating-point sums differ between processors, and on full MNIST seed 0 gave renorm
    # 0.912 vs 0.885 on one (AVX-512) and 0.8944 vs 0.8948 on another (AVX2). So the claim is the
    # mean, plus a majority of the seeds, which held on both.
    assert np.mean(renorm) > np.mean(bn) + 0.01
    assert sum(r > b for r, b in zip(renorm, bn)) >= 2
    # batch renorm and layer norm end up close
    assert abs(np.mean(renorm) - np.mean(layer)) < 0.015


@pytest.mark.slow
def test_ch6_noniid_batches_break_batch_norm_not_batch_renorm(runs):
    bn = [runs.noniid("batch", s) for s in SEEDS]
    renorm = [runs.noniid("renorm", s).eval_accuracy for s in SEEDS]
    layer = [runs.noniid("layer", s).eval_accuracy for s in SEEDS]
    report("non-iid BN eval", [r.eval_accuracy for r in bn])
    report("non-iid BN batch statistics", [r.batch_stats_accuracy for r in bn])
    report("non-iid renorm eval", renorm)
    report("non-iid LN eval", layer)
    best_bn = [max(b.eval_accuracy, b.batch_stats_accuracy) for b in bn]  # either way of evaluating
    assert all(r > b + 0.1 for r, b in zip(renorm, best_bn))
    assert min(renorm) > 0.9
    # layer norm never looks at the batch: far above batch norm on average, above it on every seed
    # (it varies more from seed to seed: 2-class batches make the gradient steps noisy)
    assert all(ln > b + 0.05 for ln, b in zip(layer, best_bn))
    assert np.mean(layer) > np.mean(best_bn) + 0.1


@pytest.mark.slow
def test_ch6_noniid_test_control_batch_norm_uses_the_batch_composition(runs):
    # the paper's control: test batches built like the training batches (2 classes each)
    control = {norm: [brx.noniid_test_control(runs.noniid(norm, s), runs.data, seed=s)
                      for s in SEEDS] for norm in ("batch", "renorm")}
    report("control BN, own statistics", [c["batch_stats"] for c in control["batch"]])
    report("control BN, population", [c["population"] for c in control["batch"]])
    report("control renorm, population", [c["population"] for c in control["renorm"]])
    for bn, renorm in zip(control["batch"], control["renorm"]):
        assert bn["batch_stats"] > bn["population"]
        assert renorm["population"] > bn["batch_stats"] + 0.05


@pytest.mark.slow
def test_ch6_renorm_clipping_is_active_in_warmup_and_fades_after(runs):
    warmup = brx.renorm_schedule(STEPS)["warmup_steps"]
    rmax_reached = brx.renorm_schedule(STEPS)["rmax_steps"]
    for seed in SEEDS:
        trace = runs.renorm_trace(4, seed)
        assert len(trace["step"]) == STEPS and trace["step"][0] == 0
        # warm-up: rmax = 1, dmax = 0, so every channel is clipped (plain batch norm)
        assert trace["r_clipped"][:warmup].mean() > 0.99 and trace["d_clipped"][:warmup].mean() > 0.99
        relaxing = trace["r_clipped"][warmup:rmax_reached].mean()
        late = trace["r_clipped"][rmax_reached:].mean()
        d_after = trace["d_clipped"][warmup + 100:].mean()
        print(f"seed {seed}: r clipped {relaxing:.3f} while relaxing, {late:.3f} at the end; "
              f"d clipped after warm-up + 100 steps {d_after:.3f}")
        assert late < 0.5 * relaxing, (seed, relaxing, late)
        assert d_after < 0.05, (seed, d_after)


@pytest.mark.slow
def test_ch6_same_label_pairs_do_not_hurt_batch_norm_here(runs):
    # the paper's setup at MNIST scale: batches of 16 = 2 images of each of 8 random labels
    pairs = [runs.pairs(s) for s in SEEDS]
    control = [brx.noniid_test_control(p["batch"], runs.data, classes_per_batch=8, seed=s)
               for p, s in zip(pairs, SEEDS)]
    bn = [p["batch"].eval_accuracy for p in pairs]
    halves = [p[brx.HALVES].eval_accuracy for p in pairs]
    renorm = [p["renorm"].eval_accuracy for p in pairs]
    report("pairs BN eval", bn)
    report("pairs BN on halves eval", halves)
    report("pairs renorm eval", renorm)
    report("pairs control BN own statistics", [c["batch_stats"] for c in control])
    report("pairs control BN population", [c["population"] for c in control])
    assert min(bn) > 0.9
    # batch norm is not behind batch renorm (the paper's large gap does not appear here)
    assert all(b > r - 0.01 for b, r in zip(bn, renorm))
    # and it gains nothing from the pairs' batch statistics: own statistics score below eval mode
    assert all(c["batch_stats"] < c["population"] for c in control)
    # normalizing halves of 8 costs accuracy against the whole batch of 16
    assert all(h < b for h, b in zip(halves, bn))
