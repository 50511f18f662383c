"""The claims of chapter 9 (normalization in transformers), asserted by calling the experiment
functions the chapter plots, over three seeds.

The gradients at initialization are deterministic given the seed (and the first 512 training
images, the same in the embedded subset and in full MNIST), so their claims are exact statements
per seed. The ``slow`` tests train the chapter's runs (``MODEL``, ``TRAINING``: 6 blocks, Adam,
200 steps) on the embedded MNIST subset, which every user has, and again on full MNIST when it is
there (``claims_mnist``; else a visible skip). Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normcourse.experiments import ch09_normalization_in_transformers as ch9

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
DEPTHS = (2, 16)  # the chapter's shallowest and deepest model for the gradients at init


# ---------------------------------------------------------------------------------------------
# Gradients at initialization: exact per seed
# ---------------------------------------------------------------------------------------------
_GRADIENTS: dict[str, dict] = {}


def _gradients(mnist) -> dict:
    if mnist.source not in _GRADIENTS:
        result = ch9.depth_sweep(ch9.mnist_tensors(mnist), DEPTHS, SEEDS)
        print({k: [round(v, 2) for v in (norms[0], norms[-1])] for k, norms in result.items()})
        _GRADIENTS[mnist.source] = result
    return _GRADIENTS[mnist.source]


def _quarters(norms):
    """Mean gradient norm of the lowest and of the highest quarter of the blocks."""
    q = len(norms) // 4
    return float(np.mean(norms[:q])), float(np.mean(norms[-q:]))


def test_pre_ln_gradients_shrink_with_depth_post_ln_gradients_do_not(claims_mnist):
    """Xiong et al.: pre-LN's gradient at the last block scales like 1/sqrt(L); post-LN's does
    not shrink. From 2 to 16 blocks (sqrt(8) = 2.8), pre-LN's falls by more than 2x for every
    seed, and at 16 blocks post-LN's is more than twice pre-LN's."""
    g = _gradients(claims_mnist)
    for s in SEEDS:
        assert g["pre", 16, s][-1] < 0.5 * g["pre", 2, s][-1], s
        assert g["post", 16, s][-1] > 2 * g["pre", 16, s][-1], s


def test_at_16_blocks_post_ln_gradients_grow_toward_the_output_pre_ln_decay(claims_mnist):
    """Within one 16-block model: post-LN's top quarter of blocks has a larger mean gradient
    norm than its bottom quarter (by 20 %), pre-LN's a smaller one (by 20 %), for every seed."""
    g = _gradients(claims_mnist)
    for s in SEEDS:
        bottom, top = _quarters(g["post", 16, s])
        assert top > 1.2 * bottom, (s, bottom, top)
        bottom, top = _quarters(g["pre", 16, s])
        assert top < 0.8 * bottom, (s, bottom, top)


def test_final_norm_keeps_the_logit_scale_of_a_deep_pre_ln_model():
    """Without the final norm, a pre-LN model's logits grow with depth (its residual stream is a
    sum of 2L branches); with it they stay near 1."""
    for s in SEEDS:
        scale = ch9.logit_scale_at_init(ch9.mnist_tensors(_embedded()), (2, 16), seed=s)
        assert scale[False, 16] > 2 * scale[False, 2], scale
        assert all(0.5 < scale[True, d] < 1.5 for d in (2, 16)), scale


def _embedded():
    from normcourse.data import load_mnist

    return load_mnist("embedded")


def test_batch_norm_in_a_transformer_depends_on_the_batch_and_the_padding():
    for s in SEEDS:
        result = ch9.batch_norm_in_a_transformer(seed=s)
        assert result["layer"]["other sequences"] < 1e-6 and result["layer"]["padding"] < 1e-5
        assert result["batch"]["other sequences"] > 0.05 and result["batch"]["padding"] > 0.05
        assert "more than 1 value per channel" in result["one_token"]


# ---------------------------------------------------------------------------------------------
# Training: warm-up, the learning rates that train, RMSNorm (three seeds, both data sources)
# ---------------------------------------------------------------------------------------------
_RUNS: dict[tuple[str, str, float], dict] = {}


def _runs(mnist, variant: str, lr: float) -> dict[int, float]:
    """{seed: test accuracy} of one variant at one learning rate, trained once per source."""
    key = (mnist.source, variant, lr)
    if key not in _RUNS:
        runs = ch9.lr_sweep(ch9.mnist_tensors(mnist), (variant,), (lr,), SEEDS)
        _RUNS[key] = {s: runs[variant, lr, s].accuracy for s in SEEDS}
        print(variant, lr, {s: round(a, 3) for s, a in _RUNS[key].items()})
    return _RUNS[key]


@pytest.mark.slow
def test_post_ln_without_warm_up_fails_where_warm_up_and_pre_ln_train(claims_mnist):
    """At lr 3e-3 (Adam, 200 steps): post-LN without warm-up stays below 50 % for every seed;
    with a 50-step warm-up it reaches more than 70 %, as does pre-LN without one; each beats
    post-LN without warm-up by more than 30 points, seed by seed."""
    lr = ch9.HEADLINE_LR
    cold = _runs(claims_mnist, "post-LN", lr)
    warm = _runs(claims_mnist, "post-LN + warm-up", lr)
    pre = _runs(claims_mnist, "pre-LN", lr)
    for s in SEEDS:
        assert cold[s] < 0.5 and warm[s] > 0.7 and pre[s] > 0.7, (s, cold, warm, pre)
        assert min(warm[s], pre[s]) > cold[s] + 0.3


@pytest.mark.slow
def test_pre_ln_trains_at_a_learning_rate_where_post_ln_does_not_even_with_warm_up(claims_mnist):
    """At lr 1e-2: pre-LN above 60 % for every seed; post-LN with warm-up below 50 %."""
    pre = _runs(claims_mnist, "pre-LN", 1e-2)
    warm = _runs(claims_mnist, "post-LN + warm-up", 1e-2)
    for s in SEEDS:
        assert pre[s] > 0.6 and warm[s] < 0.5, (s, pre, warm)


@pytest.mark.slow
def test_rms_norm_trains_as_well_as_layer_norm(claims_mnist):
    """Pre-LN with RMSNorm in place of LayerNorm, at lr 3e-3: mean accuracy within 5 points."""
    lr = ch9.HEADLINE_LR
    rms, layer = _runs(claims_mnist, "pre-RMSNorm", lr), _runs(claims_mnist, "pre-LN", lr)
    assert abs(np.mean(list(rms.values())) - np.mean(list(layer.values()))) < 0.05
    assert min(rms.values()) > 0.7
