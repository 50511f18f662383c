"""The invariances of Table 1 of the layer norm paper (Ba, Kiros & Hinton 2016), checked numerically.

Setting: inputs x (N, D), weights W (D, H), pre-activations a = x @ W + b (N, H). Batch norm
normalizes each unit (column of a) over the batch; layer norm normalizes each case (row of a) over
its units. Both are run through normcourse.functional with eps = 0, where the invariances are exact
(with eps > 0 they hold only approximately, up to terms of order eps / variance).

Tolerance: everything is float64. The normalized outputs are of order 1 (|xhat| <= sqrt(N - 1)),
the data are standard normal with means of order 1 to 10 and the scale factors lie in
[0.05, 20], so each side carries a rounding error of a few hundred ulps at most (~1e-13). atol =
1e-9 leaves four orders of magnitude of margin for that, while a broken invariance changes the
output by order 1 (the "not invariant" tests below check that such changes are visible).
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normcourse import functional as nf

torch.set_num_threads(1)

N, D, H = 8, 5, 6
TOL = dict(rtol=0.0, atol=1e-9)
SETTINGS = settings(derandomize=True, max_examples=25, deadline=None)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
positive = st.floats(min_value=0.05, max_value=20.0)
negative = st.floats(min_value=-20.0, max_value=-0.05)
per_unit = st.lists(positive, min_size=H, max_size=H).map(lambda v: torch.tensor(v, dtype=torch.float64))
per_case = st.lists(positive, min_size=N, max_size=N).map(lambda v: torch.tensor(v, dtype=torch.float64))
shifts = st.lists(st.floats(min_value=-10.0, max_value=10.0), min_size=D, max_size=D).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)


def problem(seed):
    """x (N, D), W (D, H), b (H,): a random layer and a random mini-batch."""
    gen = torch.Generator().manual_seed(seed)
    x = 1.0 + torch.randn(N, D, generator=gen, dtype=torch.float64)
    w = torch.randn(D, H, generator=gen, dtype=torch.float64)
    b = torch.randn(H, generator=gen, dtype=torch.float64)
    return x, w, b


def bn(a):
    return nf.batch_norm(a, None, None, training=True, eps=0.0)


def ln(a):
    return nf.layer_norm(a, H, eps=0.0)


# --------------------------------------------------------------------------------------------
# batch norm: invariant to weight-matrix and weight-vector re-scaling, dataset re-scaling and
# re-centering
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(seeds, positive)
def test_bn_weight_matrix_rescaling(seed, scale):
    x, w, b = problem(seed)
    torch.testing.assert_close(bn(x @ (scale * w) + scale * b), bn(x @ w + b), **TOL)


@SETTINGS
@given(seeds, per_unit)
def test_bn_weight_vector_rescaling(seed, scales):
    """Each unit's incoming weight vector (a column of W) scaled by its own factor > 0."""
    x, w, b = problem(seed)
    torch.testing.assert_close(bn(x @ (w * scales) + b * scales), bn(x @ w + b), **TOL)


@SETTINGS
@given(seeds, positive, shifts)
def test_bn_dataset_rescaling_and_recentering(seed, scale, shift):
    """Every case scaled by the same factor, and the same vector added to every case."""
    x, w, b = problem(seed)
    torch.testing.assert_close(bn(scale * x @ w + b), bn(x @ w + b), **TOL)
    torch.testing.assert_close(bn((x + shift) @ w + b), bn(x @ w + b), **TOL)


# --------------------------------------------------------------------------------------------
# layer norm: invariant to weight-matrix re-scaling and re-centering, dataset re-scaling,
# single-case re-scaling (by a > 0)
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(seeds, positive)
def test_ln_weight_matrix_rescaling(seed, scale):
    x, w, b = problem(seed)
    torch.testing.assert_close(ln(x @ (scale * w) + scale * b), ln(x @ w + b), **TOL)


@SETTINGS
@given(seeds, shifts, st.floats(min_value=-10.0, max_value=10.0))
def test_ln_weight_matrix_recentering(seed, shift, bias_shift):
    """The same vector added to every unit's incoming weights (w_i -> w_i + shift for all i), and
    the same number added to every bias: both add one constant (shift . x_n + bias_shift) to all
    pre-activations of case n, which layer norm subtracts again."""
    x, w, b = problem(seed)
    torch.testing.assert_close(ln(x @ (w + shift[:, None]) + (b + bias_shift)), ln(x @ w + b), **TOL)


@SETTINGS
@given(seeds, positive)
def test_ln_dataset_rescaling(seed, scale):
    x, w, _ = problem(seed)
    # without a bias: dataset re-scaling scales the pre-activations only if b scales along
    torch.testing.assert_close(ln((scale * x) @ w), ln(x @ w), **TOL)


@SETTINGS
@given(seeds, per_case)
def test_ln_single_case_rescaling(seed, scales):
    """Each case scaled by its own factor > 0: layer norm sees each case on its own."""
    x, w, _ = problem(seed)
    torch.testing.assert_close(ln((x * scales[:, None]) @ w), ln(x @ w), **TOL)


@SETTINGS
@given(seeds, negative)
def test_ln_of_a_negative_multiple_is_minus_ln(seed, scale):
    """LN(a x) = LN(x) holds for a > 0 only: for a < 0 the sign flips (a common wrong claim)."""
    x, w, _ = problem(seed)
    a = x @ w
    torch.testing.assert_close(ln(scale * a), -ln(a), **TOL)
    assert (ln(scale * a) - ln(a)).abs().max() > 0.1


# --------------------------------------------------------------------------------------------
# the "no" entries of Table 1: these changes must be visible, or the checks above prove nothing
# --------------------------------------------------------------------------------------------
def test_bn_is_not_invariant_to_single_case_rescaling():
    x, w, b = problem(0)
    scales = torch.linspace(0.5, 2.0, N, dtype=torch.float64)[:, None]
    assert (bn((x * scales) @ w + b) - bn(x @ w + b)).abs().max() > 0.1


def test_ln_is_not_invariant_to_weight_vector_rescaling_or_dataset_recentering():
    x, w, b = problem(0)
    scales = torch.linspace(0.5, 2.0, H, dtype=torch.float64)
    assert (ln(x @ (w * scales) + b * scales) - ln(x @ w + b)).abs().max() > 0.1
    assert (ln((x + 3.0) @ w + b) - ln(x @ w + b)).abs().max() > 0.1
