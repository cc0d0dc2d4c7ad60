"""The probes' small statistics against direct computations."""

import numpy as np

from pgscope.probes.bootstrap import (
    bootstrap_ci,
    cosine_matrix,
    covariance_trace,
    half_sq_distances,
    mean_pairwise,
    pairwise_summary,
)


def test_covariance_trace_equals_numpy_and_the_pairwise_u_statistic():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 5)) * [1, 2, 3, 4, 5]
    assert np.isclose(covariance_trace(v), np.trace(np.cov(v.T)))
    assert np.isclose(mean_pairwise(half_sq_distances(v)), covariance_trace(v))


def test_mean_pairwise_cosine_and_self_pairs_excluded():
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = cosine_matrix(v)
    assert np.isclose(mean_pairwise(c), (0 + 2**-0.5 + 2**-0.5) / 3)
    # a resample [0, 0, 1]: the (0, 0) pair is a self-pair and is left out
    assert np.isclose(mean_pairwise(c, np.array([0, 0, 1])), 0.0)


def test_bootstrap_ci_is_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(10, 50)) + 0.5
    a = pairwise_summary(v, seed=3)
    b = pairwise_summary(v, seed=3)
    assert a == b
    for stat in a.values():
        assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
    x = rng.normal(size=200)
    lo, hi = bootstrap_ci(lambda i: float(x[i].mean()), 200, seed=0)
    se = x.std(ddof=1) / np.sqrt(200)
    assert abs((hi - lo) / (2 * 1.96 * se) - 1) < 0.15  # matches the normal-theory width
