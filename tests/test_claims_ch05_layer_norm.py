"""The claims of chapter 5 (layer normalization), asserted by calling the same experiment
functions the chapter plots (``normcourse.experiments.ch05_layer_norm``).

The fast tests are exact facts. The ``slow`` tests train small models over three seeds and require
each claim on every seed plus a margin on the mean; they run once per data source (``claims_mnist``
in conftest.py: the embedded subset always, full MNIST when it is available, else a skip that says
why). Runs shared with the other chapters' claim tests come from ``claim_runs.py``. The measured
numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from claim_runs import STEPS_AT_128_CH5, report, runs_for
from normcourse.experiments import ch05_layer_norm as lnx

torch.set_num_threads(1)

SEEDS = (0, 1, 2)

# ---------------------------------------------------------------------------------------------
# Fast, exact claims
# ---------------------------------------------------------------------------------------------
def test_layer_norm_invariances_match_the_paper_table():
    for seed in SEEDS:
        table = lnx.invariance_table(seed=seed)
        measured = {name: {k: v < 1e-9 for k, v in row.items()} for name, row in table.items()}
        assert measured == lnx.PAPER_TABLE_1
        # and the non-invariances are large, not rounding
        assert all(v > 0.1 for row in table.values() for v in row.values() if v >= 1e-9)


def test_layer_norm_flips_sign_for_negative_scale():
    for seed in SEEDS:
        check = lnx.negative_scale_check(seed=seed, scale=-0.5)
        assert check["negated"] < 1e-9 and check["same"] > 1.0


# ---------------------------------------------------------------------------------------------
# Slow claims: trained models, three seeds, on each data source
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(claims_mnist):
    """The trained runs of chapters 4-6 on one data source (see claim_runs.py and conftest.py)."""
    return runs_for(claims_mnist)


@pytest.mark.slow
def test_ch5_layer_norm_is_robust_at_batch_4_and_batch_norm_is_not(runs):
    bn4 = [runs.iid("batch", 4, s) for s in SEEDS]
    ln4 = [runs.iid("layer", 4, s).eval_accuracy for s in SEEDS]
    bn128 = [runs.iid("batch", 128, s, STEPS_AT_128_CH5) for s in SEEDS]
    ln128 = [runs.iid("layer", 128, s, STEPS_AT_128_CH5).eval_accuracy for s in SEEDS]
    for name, values in (("BN@4", [r.eval_accuracy for r in bn4]), ("LN@4", ln4),
                         ("BN@128 (1000 steps)", [r.eval_accuracy for r in bn128]), ("LN@128 (1000 steps)", ln128),
                         ("BN gap@4", [r.batch_stats_gap for r in bn4]),
                         ("BN gap@128 (1000 steps)", [r.batch_stats_gap for r in bn128])):
        report(name, values)
    assert all(ln > bn.eval_accuracy for ln, bn in zip(ln4, bn4))
    assert np.mean(ln4) > np.mean([r.eval_accuracy for r in bn4]) + 0.01
    assert all(a.batch_stats_gap > b.batch_stats_gap for a, b in zip(bn4, bn128))
    # at batch 128 the two are close, and layer norm loses less from 128 to 4
    mean_bn128 = np.mean([r.eval_accuracy for r in bn128])
    assert abs(np.mean(ln128) - mean_bn128) < 0.02
    assert np.mean(ln128) - np.mean(ln4) < mean_bn128 - np.mean([r.eval_accuracy for r in bn4])


@pytest.mark.slow
def test_ch5_layer_norm_rnn_beats_the_plain_rnn(runs):
    data = runs.data
    results = [lnx.recurrent_comparison(data, steps=400, seed=s) for s in SEEDS]
    plain = [r["none"][1] for r in results]
    layer = [r["layer"][1] for r in results]
    report("row-MNIST RNN test accuracy, no norm", plain)
    report("row-MNIST RNN test accuracy, layer norm", layer)
    report("RNN final training loss, no norm", [r["none"][0].train_loss[-1] for r in results])
    report("RNN final training loss, layer norm", [r["layer"][0].train_loss[-1] for r in results])
    assert all(ln > p for ln, p in zip(layer, plain))
    assert np.mean(layer) > np.mean(plain) + 0.03
    # the training loss falls faster: lower at every recorded point after the first
    for r in results:
        assert all(a < b for a, b in zip(r["layer"][0].train_loss[1:], r["none"][0].train_loss[1:]))


@pytest.mark.slow
def test_ch5_convnet_batch_norm_reaches_a_lower_training_loss(runs):
    results = [lnx.convnet_comparison(runs.data, steps=200, eval_every=50, test_examples=1000, seed=s)
               for s in SEEDS]
    bn = [r["batch"].history.train_loss[-1] for r in results]
    ln = [r["layer"].history.train_loss[-1] for r in results]
    report("ConvNet final training loss, BN", bn)
    report("ConvNet final training loss, LN", ln)
    report("ConvNet test accuracy, BN", [r["batch"].eval_accuracy for r in results])
    report("ConvNet test accuracy, LN", [r["layer"].eval_accuracy for r in results])
    # the chapter claims the average only (test accuracies are too close to call)
    assert np.mean(bn) < np.mean(ln) - 0.01
