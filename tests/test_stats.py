"""pgscope.stats against SciPy and direct computations on identical inputs."""

import numpy as np
import pytest
from scipy import stats as sps

from pgscope import seed_statistics as stats

RNG = np.random.default_rng(0)
A = RNG.normal(100, 15, size=(10, 3))
B = RNG.normal(90, 15, size=(8, 3))


def test_point_aggregates():
    flat = np.sort(A.ravel())
    assert stats.iqm(A) == pytest.approx(flat[7:23].mean())  # middle 50% of 30 values
    assert stats.median(A) == pytest.approx(np.median(A))
    assert stats.mean(A) == pytest.approx(A.mean())


def test_stratified_bootstrap_is_reproducible_and_stratified():
    a = stats.stratified_bootstrap_ci(A, stats.mean, seed=1)
    assert a == stats.stratified_bootstrap_ci(A, stats.mean, seed=1)
    assert a != stats.stratified_bootstrap_ci(A, stats.mean, seed=2)
    assert a[1] <= a[0] <= a[2]
    # the mean's bootstrap CI width matches the normal-theory width
    se = A.std(ddof=0, axis=0).mean() / np.sqrt(10) / np.sqrt(3)
    width = (a[2] - a[1]) / (2 * 1.96 * se)
    assert 0.7 < width < 1.3
    # stratification: a task whose runs are all equal never varies in a resample
    const = np.column_stack([np.full(10, 5.0), np.arange(10.0)])
    first_col = stats.stratified_bootstrap_ci(const, lambda x: float(x[:, 0].mean()), seed=0)
    assert first_col == (5.0, 5.0, 5.0)


def test_probability_of_improvement_equals_mann_whitney_u():
    for t in range(3):
        u = sps.mannwhitneyu(A[:, t], B[:, t]).statistic
        assert stats.probability_of_improvement(A[:, t], B[:, t]) == pytest.approx(u / 80)
    expected = np.mean([sps.mannwhitneyu(A[:, t], B[:, t]).statistic / 80 for t in range(3)])
    assert stats.probability_of_improvement(A, B) == pytest.approx(expected)
    assert stats.probability_of_improvement([1, 2], [1, 2]) == 0.5
    p, lo, hi = stats.probability_of_improvement_ci(A, B, seed=0, reps=500)
    assert lo <= p <= hi


def test_tests_match_scipy():
    t, p = stats.welch_t_test(A, B)
    ref = sps.ttest_ind(A.ravel(), B.ravel(), equal_var=False)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue))
    u, p = stats.mann_whitney(A, B)
    ref = sps.mannwhitneyu(A.ravel(), B.ravel(), alternative="two-sided")
    assert (u, p) == pytest.approx((ref.statistic, ref.pvalue))


def test_failure_rate_wilson_interval():
    rate, lo, hi = stats.failure_rate(np.array([0, 0, 0, 5, 5, 5, 5, 5, 5, 5]), threshold=1)
    assert rate == 0.3
    # Wilson interval for 3/10 at 95%, by its formula
    z, n, ph = 1.959963984540054, 10, 0.3
    centre = (ph + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(ph * (1 - ph) / n + z**2 / (4 * n**2))
    assert (lo, hi) == pytest.approx((centre - half, centre + half))


def test_performance_profile():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    np.testing.assert_allclose(stats.performance_profile(x, np.array([0, 2, 25])),
                               [1.0, (1 / 3 + 1) / 2, (0 + 1 / 3) / 2])


def test_seeds_needed_matches_a_textbook_value_and_simulation():
    # d = 1 at alpha 0.05 and power 0.8 needs 17 per group (standard t-test tables)
    assert stats.seeds_needed(sd=1.0, difference=1.0) == 17
    assert stats.seeds_needed(sd=1.0, difference=0.5) == 64
    # simulation: with the returned n, Welch's test rejects about 80% of the time
    n = stats.seeds_needed(sd=10.0, difference=8.0)
    rng = np.random.default_rng(3)
    rejections = np.mean([sps.ttest_ind(rng.normal(8, 10, n), rng.normal(0, 10, n)).pvalue < 0.05
                          for _ in range(2000)])
    assert 0.77 < rejections < 0.86
    with pytest.raises(ValueError):
        stats.seeds_needed(sd=0.0, difference=1.0)


@pytest.mark.parametrize("fn", [stats.iqm, stats.median, stats.mean])
def test_vectorized_bootstrap_equals_the_per_resample_loop(fn):
    x = np.random.default_rng(3).normal(size=(7, 2))
    fast = stats.stratified_bootstrap_ci(x, fn, reps=300, seed=9)
    slow = stats.stratified_bootstrap_ci(x, lambda s: fn(s), reps=300, seed=9)
    assert fast == pytest.approx(slow, rel=1e-12)
