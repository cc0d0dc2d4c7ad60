"""pgscope.stats against the rliable package (Agarwal et al., 2021) and SciPy on identical
inputs. Point estimates must agree exactly; bootstrap intervals use different random
streams, so they must agree within Monte Carlo error (checked with many resamples)."""

import numpy as np
import pytest
from scipy import stats as sps

from pgscope import seed_statistics as stats

rly = pytest.importorskip("rliable.library", reason="rliable is a test dependency")
rmetrics = pytest.importorskip("rliable.metrics")

RNG = np.random.default_rng(7)
# two configs, 10 runs x 3 tasks, with the skew and outliers typical of RL returns
A = np.concatenate([RNG.normal(1.0, 0.3, (8, 3)), RNG.normal(-1.0, 0.5, (2, 3))])
B = RNG.normal(0.8, 0.4, (10, 3))
REPS = 20_000


def _close_ci(ours, theirs, spread):
    """Interval endpoints agree to 5% of the scores' spread (Monte Carlo error at 20k
    resamples is well below that)."""
    assert abs(ours[0] - theirs[0]) < 0.05 * spread and abs(ours[1] - theirs[1]) < 0.05 * spread


def test_point_aggregates_match_rliable():
    assert stats.iqm(A) == pytest.approx(rmetrics.aggregate_iqm(A), rel=1e-12)
    assert stats.mean(A) == pytest.approx(rmetrics.aggregate_mean(A), rel=1e-12)
    # rliable's 'median' is the median over tasks of per-task means; pgscope's median is
    # the median over runs (one env at a time), which is numpy's
    x = A[:, 0]
    assert stats.median(x) == np.median(x)
    assert stats.iqm(x) == pytest.approx(sps.trim_mean(x, 0.25))


def test_stratified_bootstrap_cis_match_rliable():
    fn = lambda s: np.array([rmetrics.aggregate_iqm(s), rmetrics.aggregate_mean(s)])  # noqa: E731
    _, theirs = rly.get_interval_estimates({"a": A}, fn, reps=REPS)
    spread = float(np.ptp(A))
    for i, ours_fn in enumerate((stats.iqm, stats.mean)):
        _, lo, hi = stats.stratified_bootstrap_ci(A, ours_fn, reps=REPS, seed=1)
        _close_ci((lo, hi), theirs["a"][:, i], spread)


def test_probability_of_improvement_matches_rliable():
    theirs_pt, theirs_ci = rly.get_interval_estimates(
        {"a,b": (A, B)}, rmetrics.probability_of_improvement, reps=2000)
    pt, lo, hi = stats.probability_of_improvement_ci(A, B, reps=2000, seed=3)
    assert pt == pytest.approx(float(theirs_pt["a,b"]), abs=1e-12)
    _close_ci((lo, hi), theirs_ci["a,b"][:, 0], 1.0)


def test_performance_profile_and_ci_match_rliable():
    taus = np.linspace(-2, 2, 9)
    theirs, theirs_ci = rly.create_performance_profile({"a": A}, taus, reps=5000)
    ours, lo, hi = stats.performance_profile_ci(A, taus, reps=5000, seed=2)
    np.testing.assert_allclose(ours, theirs["a"], atol=1e-12)
    np.testing.assert_allclose(lo, theirs_ci["a"][0], atol=0.05)
    np.testing.assert_allclose(hi, theirs_ci["a"][1], atol=0.05)


def test_learning_curve_ci_matches_rliable_pointwise():
    curves = np.cumsum(RNG.normal(1, 1, (6, 20)), axis=1)  # 6 runs x 20 points
    mean, lo, hi = stats.curve_ci(curves, reps=REPS, seed=0)
    np.testing.assert_allclose(mean, curves.mean(0))
    for j in (0, 9, 19):
        _, ci = rly.get_interval_estimates({"c": curves[:, j:j + 1]},
                                           lambda s: np.array([rmetrics.aggregate_mean(s)]),
                                           reps=REPS)
        _close_ci((lo[j], hi[j]), ci["c"][:, 0], float(np.ptp(curves[:, j])))


def test_curve_ci_resamples_whole_runs():
    """Perfectly correlated points (each run a constant offset) keep a constant-width band."""
    offsets = np.array([0.0, 1.0, 2.0, 5.0])
    curves = offsets[:, None] + np.arange(10)[None, :]
    _, lo, hi = stats.curve_ci(curves, reps=500, seed=0)
    np.testing.assert_allclose(hi - lo, (hi - lo)[0])
    assert stats.curve_ci(curves, reps=500, seed=0)[1].tolist() == lo.tolist()  # seeded


def test_seed_lottery_enumerates_all_splits_and_finds_the_extreme_one():
    x = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 10.0, 10.1, 10.2, 10.3, 10.4])
    res = stats.seed_lottery(x, splits=1000)
    assert res["splits"] == 126  # C(10, 5) / 2 distinct halvings
    expected = sps.ttest_ind(x[:5], x[5:], equal_var=False)
    assert res["max_abs_t"] == pytest.approx(abs(expected.statistic))
    assert res["min_p"] == pytest.approx(expected.pvalue)
    assert res["worst_split"] == [0, 1, 2, 3, 4]
    # brute force of the fraction with SciPy
    from itertools import combinations
    ps = [sps.ttest_ind(x[list(g)], np.delete(x, list(g)), equal_var=False).pvalue
          for g in combinations(range(10), 5) if 0 in g]
    assert res["fraction_significant"] == pytest.approx(np.mean(np.array(ps) < 0.05))


def test_seed_lottery_samples_when_there_are_many_splits_and_is_reproducible():
    x = RNG.normal(size=20)
    a = stats.seed_lottery(x, splits=300, seed=5)
    assert a["splits"] == 300 and a == stats.seed_lottery(x, splits=300, seed=5)
    with pytest.raises(ValueError):
        stats.seed_lottery(x[:3])


def test_proportion_ci_is_wilson():
    rate, lo, hi = stats.proportion_ci(3, 10)
    # Wilson interval by its formula
    z = sps.norm.ppf(0.975)
    p, n = 0.3, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (rate, lo, hi) == pytest.approx((0.3, centre - half, centre + half))
