"""Chapter 10, batch norm across devices: the forward all-reduce, merging two workers' moments, and
the backward all-reduce of synchronized batch norm, simulated in NumPy.

The workers are simulated: ``x`` is the global batch (N, D) and ``sizes`` the number of rows each
worker holds, in order (worker i holds the next ``sizes[i]`` rows). An "all-reduce" is a sum over
the workers of what each computed on its own rows.
"""

from __future__ import annotations

import numpy as np

from normcourse import reference
from normcourse.exercises.diagnosis import Case, Mistake, OutputTask
from normcourse.exercises.tasks._inputs import affine, features, rng

EPS = 1e-5


def _slices(x, sizes):
    return np.split(x, np.cumsum(sizes)[:-1])


def _batch_case(description, seed, sizes, with_dy=False):
    def make():
        x = features(seed, n=int(sum(sizes)))
        if not with_dy:
            return {"x": x, "sizes": np.array(sizes)}
        gamma, _ = affine(seed + 1, x.shape[1])
        dy = rng(seed + 2).standard_normal(x.shape)
        return {"dy": dy, "x": x, "sizes": np.array(sizes), "gamma": gamma, "eps": EPS}

    return Case(description, make)


# ---- 10.allreduce_statistics ----------------------------------------------------------------
def _statistics_correct(x, sizes):
    return x.mean(0), x.var(0)


def _mean_of_means(x, sizes):
    parts = [p for p in _slices(x, sizes) if len(p)]
    return np.mean([p.mean(0) for p in parts], 0), np.mean([p.var(0) for p in parts], 0)


def _mean_of_variances(x, sizes):
    parts = [p for p in _slices(x, sizes) if len(p)]
    weights = np.array([len(p) for p in parts], dtype=float)
    var = sum(w * p.var(0) for w, p in zip(weights, parts)) / weights.sum()
    return x.mean(0), var


def _unbiased(x, sizes):
    return x.mean(0), x.var(0, ddof=1)


def _worker_zero(x, sizes):
    first = _slices(x, sizes)[0]
    return first.mean(0), first.var(0)


ALLREDUCE_STATISTICS = OutputTask(
    id="10.allreduce_statistics",
    title="the global mean and variance from all-reduced counts, sums and sums of squares",
    function="allreduce_statistics",
    points=2,
    correct=_statistics_correct,
    outputs=("mean", "var"),
    cases=(
        _batch_case("x of shape (8, 5) over 2 workers holding 3 and 5 rows", 200, (3, 5)),
        _batch_case("x of shape (8, 5) over 4 workers holding 2, 0, 4 and 2 rows (one empty)",
                    201, (2, 0, 4, 2)),
    ),
    mistakes=(
        Mistake("mean_of_means", "You averaged the workers' means and variances as if every "
                "worker held as many rows; all-reduce the counts, sums and sums of squares and "
                "divide by the global count.", _mean_of_means),
        Mistake("mean_of_variances", "Your variance is the average of the workers' variances: "
                "it misses the spread between the workers' means. Compute it from the global "
                "sums: sum(x^2) / n - mean^2.", _mean_of_variances),
        Mistake("unbiased_variance", "Batch norm normalizes with the biased variance (divide by "
                "n, not n - 1).", _unbiased),
        Mistake("worker_zero_statistics", "You returned worker 0's own statistics: the point is "
                "to combine every worker's sums before dividing.", _worker_zero),
    ),
)


# ---- 10.merge_moments -----------------------------------------------------------------------
def _merge_case(description, seed, n_a, n_b, shift):
    def make():
        g = rng(seed)
        a = g.standard_normal((n_a, 4)) * 2.0 + shift
        b = g.standard_normal((n_b, 4)) * 0.5 + shift + 3.0
        return {"n_a": n_a, "mean_a": a.mean(0), "m2_a": ((a - a.mean(0)) ** 2).sum(0),
                "n_b": n_b, "mean_b": b.mean(0), "m2_b": ((b - b.mean(0)) ** 2).sum(0)}

    return Case(description, make)


def _merge_correct(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta**2 * n_a * n_b / n


def _merge_no_delta(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n, mean, _ = _merge_correct(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    return n, mean, m2_a + m2_b


def _merge_unweighted_mean(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n, _, m2 = _merge_correct(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    return n, (mean_a + mean_b) / 2, m2


def _merge_delta_over_n(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n, mean, _ = _merge_correct(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    return n, mean, m2_a + m2_b + (mean_b - mean_a) ** 2 * n_a * n_b / n**2


def _merge_delta_times_n(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n, mean, _ = _merge_correct(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    return n, mean, m2_a + m2_b + (mean_b - mean_a) ** 2 * n


MERGE_MOMENTS = OutputTask(
    id="10.merge_moments",
    title="merge two workers' counts, means and M2 (Chan et al.)",
    function="merge_moments",
    points=2,
    correct=_merge_correct,
    outputs=("n", "mean", "m2"),
    cases=(
        _merge_case("6 and 10 values per column, means about 0 and 3", 210, 6, 10, 0.0),
        _merge_case("3 and 20 values per column, means about 1000 and 1003", 211, 3, 20, 1000.0),
    ),
    mistakes=(
        Mistake("forgot_delta_term", "M2 = M2_a + M2_b misses the spread between the two means: "
                "add delta^2 * n_a * n_b / n, delta = mean_b - mean_a.", _merge_no_delta),
        Mistake("unweighted_mean", "The merged mean weighs each part by its count: mean_a + "
                "delta * n_b / n, not (mean_a + mean_b) / 2.", _merge_unweighted_mean),
        Mistake("delta_over_n_squared", "The between-means term is delta^2 * n_a * n_b / n "
                "(one division by n, not two).", _merge_delta_over_n),
        Mistake("delta_times_n", "The between-means term is delta^2 * n_a * n_b / n, not "
                "delta^2 * n.", _merge_delta_times_n),
    ),
)


# ---- 10.sync_batchnorm_backward -------------------------------------------------------------
def _backward_correct(dy, x, sizes, gamma, eps):
    beta = np.zeros_like(gamma)
    _, cache = reference.batchnorm_forward(x, gamma, beta, training=True, eps=eps)
    return reference.batchnorm_backward_closed_form(dy, cache)


def _plain_per_worker(dy, x, sizes, gamma, eps):
    parts = [_backward_correct(d, p, None, gamma, eps)
             for d, p in zip(_slices(dy, sizes), _slices(x, sizes))]
    return (np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts),
            sum(p[2] for p in parts))


def _global_stats_local_sums(dy, x, sizes, gamma, eps, divide_by_global_n=False):
    mean, var = x.mean(0), x.var(0)
    invstd = 1.0 / np.sqrt(var + eps)
    dxs = []
    for d, p in zip(_slices(dy, sizes), _slices(x, sizes)):
        xhat = (p - mean) * invstd
        n = len(x) if divide_by_global_n else len(p)
        dxs.append(gamma * invstd * (d - d.sum(0) / n - xhat * (d * xhat).sum(0) / n))
    xhat = (x - mean) * invstd
    return np.concatenate(dxs), (dy * xhat).sum(0), dy.sum(0)


def _local_sums_global_n(dy, x, sizes, gamma, eps):
    return _global_stats_local_sums(dy, x, sizes, gamma, eps, divide_by_global_n=True)


def _forgot_xhat_term(dy, x, sizes, gamma, eps):
    dx, dgamma, dbeta = _backward_correct(dy, x, sizes, gamma, eps)
    invstd = 1.0 / np.sqrt(x.var(0) + eps)
    return gamma * invstd * (dy - dy.mean(0)), dgamma, dbeta


SYNC_BATCHNORM_BACKWARD = OutputTask(
    id="10.sync_batchnorm_backward",
    title="synchronized batch norm backward: all-reduce the two per-feature gradient sums",
    function="sync_batchnorm_backward",
    points=3,
    correct=_backward_correct,
    outputs=("dx", "dgamma", "dbeta"),
    cases=(
        _batch_case("x, dy of shape (8, 5) over 2 workers holding 3 and 5 rows", 220, (3, 5),
                    with_dy=True),
        _batch_case("x, dy of shape (8, 5) over 3 workers holding 2, 2 and 4 rows", 221,
                    (2, 2, 4), with_dy=True),
    ),
    mistakes=(
        Mistake("per_worker_batch_norm", "Each worker normalized and differentiated with its "
                "own statistics (plain batch norm per worker); use the global mean and "
                "variance, and all-reduce sum(dy) and sum(dy * xhat).", _plain_per_worker),
        Mistake("local_backward_sums", "The forward statistics are global, but the backward "
                "used each worker's own sum(dy) and sum(dy * xhat) and count: every example's "
                "statistics depend on the whole batch, so all-reduce the two sums and divide "
                "by the global n.", _global_stats_local_sums),
        Mistake("local_sums_global_n", "You divided each worker's own sums by the global n: "
                "the sums themselves must be all-reduced (summed over the workers) first.",
                _local_sums_global_n),
        Mistake("forgot_xhat_term", "dx misses the term - xhat * sum(dy * xhat) / n: the "
                "variance depends on x too.", _forgot_xhat_term),
    ),
)

TASKS = (ALLREDUCE_STATISTICS, MERGE_MOMENTS, SYNC_BATCHNORM_BACKWARD)
