"""The reliability metrics of Chan et al. (ICLR 2020), src/pgscope/reliability.py: known
answers on hand-made curves, agreement with the paper's library where it can be imported,
the statistics (bootstrap, permutation tests, mean ranks) and the study summary and report.

The paper's library (google-research/rl-reliability-metrics; numpy, scipy, gin-config, six)
is not a dependency: ``test_agrees_with_the_papers_library`` runs when
``rl_reliability_metrics`` is importable, e.g. from a checkout named by
``RL_RELIABILITY_METRICS_PATH`` (``os.pathsep``-separated directories put on ``sys.path``
for that test only), and is skipped otherwise; the hand-computed values below always run.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pgscope import reliability as rel
from pgscope import seed_statistics as stats
from pgscope.run import RunDir
from pgscope.study import parse_spec
from pgscope.study.analysis import summarize, write_summary
from pgscope.study.runner import prepare_study_dir

#: 2 * Phi^-1(0.75): the IQR of a standard normal.
IQR_NORMAL = 2 * sps.norm.ppf(0.75)


# --- estimators on hand-made data ---------------------------------------------------------
def test_iqr_and_cvar_by_hand():
    assert rel.iqr([1, 2, 3, 4, 5]) == 2.0  # Q(.75) = 4, Q(.25) = 2
    assert rel.iqr([0, 10]) == 5.0  # 7.5 - 2.5
    x = [5.0, 1.0, 4.0, 2.0, 3.0]
    # fewer than 1 / alpha values: the worst one
    assert rel.cvar(x, 0.05) == 1.0 and rel.cvar(x, 0.05, "upper") == 5.0
    # alpha = 0.3: Q(0.3) = 2.2, so the paper's tail is {1, 2}; expected shortfall takes
    # 1.5 values: (1 + 0.5 * 2) / 1.5
    assert rel.cvar(x, 0.3) == pytest.approx(1.5)
    assert rel.cvar(x, 0.3, method="expected-shortfall") == pytest.approx(2 / 1.5)
    assert rel.cvar(x, 0.3, "upper") == pytest.approx(4.5)
    assert rel.cvar(x, 0.3, "upper", method="expected-shortfall") == pytest.approx(
        (5 + 0.5 * 4) / 1.5)
    # 0..99: Q(0.05) = 4.95, the tail is 0..4 for both estimators
    assert rel.cvar(np.arange(100.0)) == 2.0
    assert rel.cvar(np.arange(100.0), method="expected-shortfall") == 2.0
    # along an axis, the same as row by row
    m = np.random.default_rng(0).normal(size=(7, 33))
    for method in rel.CVAR_METHODS:
        for tail in ("lower", "upper"):
            np.testing.assert_allclose(rel.cvar(m, 0.1, tail, axis=1, method=method),
                                       [rel.cvar(r, 0.1, tail, method=method) for r in m])
    with pytest.raises(ValueError):
        rel.cvar(x, 0.0)
    with pytest.raises(ValueError):
        rel.cvar(x, tail="middle")


def test_differences_and_drawdown():
    np.testing.assert_array_equal(rel.differences([1, 4, 2]), [3, -2])
    # per 256 env steps, with iterations of 512 steps: half the change per iteration
    np.testing.assert_array_equal(rel.differences([1, 4, 2], [512, 1024, 1536], 256),
                                  [1.5, -1.0])
    np.testing.assert_array_equal(rel.drawdown([1, 3, 2, 5, 1, 6]), [0, 0, 1, 0, 4, 0])
    with pytest.raises(ValueError):
        rel.differences([1, 2, 3], [0, 0, 1])


def test_a_constant_curve_has_no_dispersion_and_no_risk():
    c = np.full(60, 7.0)
    assert rel.dispersion_across_time(c, window=20) == 0.0
    assert rel.short_term_risk(c) == 0.0 and rel.long_term_risk(c) == 0.0
    runs = np.full((5, 60), 7.0)
    np.testing.assert_allclose(rel.dispersion_across_runs(runs, cutoff=0.1), 0.0, atol=1e-9)
    assert rel.risk_across_runs(runs, cutoff=0.1) == pytest.approx(7.0)
    assert rel.dispersion_across_rollouts([3.0] * 8) == 0.0
    assert rel.risk_across_rollouts([3.0] * 8) == 3.0


def test_a_single_step_drop_of_size_d():
    d = 3.0
    # 100 points, dropping by d after 90: the last 10 points are d below the best so far,
    # more than alpha = 5% of the curve, so the deepest 5% of the drawdown are all d
    curve = np.r_[np.full(90, 10.0), np.full(10, 10.0 - d)]
    assert rel.long_term_risk(curve) == d
    assert rel.long_term_risk(curve, method="expected-shortfall") == d
    # a drop lasting only 2 of 100 points: expected shortfall averages the deepest 5 points
    # (2 d + 3 * 0) / 5; the paper's estimator takes every value at or above Q(0.95) = 0,
    # i.e. the mean drawdown 2 d / 100
    short = np.r_[np.full(98, 10.0), np.full(2, 10.0 - d)]
    assert rel.long_term_risk(short, method="expected-shortfall") == pytest.approx(0.4 * d)
    assert rel.long_term_risk(short) == pytest.approx(0.02 * d)
    # SRT: the 99 differences are one -d and 98 zeros; 5% of 99 is 4.95 values
    assert rel.short_term_risk(curve, method="expected-shortfall") == pytest.approx(-d / 4.95)
    assert rel.short_term_risk(curve) == pytest.approx(-d / 99)
    # DT: a window holds at most one non-zero difference, so its IQR is 0
    assert rel.dispersion_across_time(curve, window=20) == 0.0
    # a recovery ends the drawdown: drop by d for 10 points, then back to the peak
    dip = np.r_[np.full(45, 10.0), np.full(10, 10.0 - d), np.full(45, 10.0)]
    assert rel.long_term_risk(dip) == d and rel.drawdown(dip)[-1] == 0


def test_dt_slides_a_window_along_the_differences():
    # 70 flat differences, then 30 alternating +2, -2: of the 91 windows of 10 differences,
    # those starting at 0..60 are flat (IQR 0) and those at 70..90 alternate (IQR 4)
    diffs = np.r_[np.zeros(70), np.tile([2.0, -2.0], 15)]
    curve = np.r_[0.0, np.cumsum(diffs)]
    w = rel.windowed_dispersion(curve, 10)
    assert len(w) == 91
    np.testing.assert_array_equal(w[:61], 0.0)
    np.testing.assert_array_equal(w[70:], 4.0)
    assert rel.dispersion_across_time(curve, 10) == 0.0  # the median window is flat
    assert rel.dispersion_across_time(curve[60:], 10) == 4.0  # now most windows alternate
    assert rel.windowed_dispersion(curve[:3], 10).tolist() == [0.0]  # cut to the run
    assert math.isnan(rel.dispersion_across_time(curve[:2], 10))


def test_gaussian_noise_gives_the_normal_iqr_of_differences():
    """Differences of iid N(0, sigma^2) are N(0, 2 sigma^2), so their IQR is
    2 Phi^-1(0.75) sqrt(2) sigma = 1.349 sqrt(2) sigma. The standard error of a sample IQR
    of m independent normal values is 1.573 sd / sqrt(m) (asymptotic quantile variances
    and their covariance); consecutive differences share a point (lag-1 correlation -0.5),
    which a simulation of 400 curves here put at 1.11 times that, so the tolerance is 5
    standard errors with a 1.25 inflation: 4.6% at m = 20000."""
    sigma, n = 3.0, 20_001
    noise = np.random.default_rng(7).normal(50.0, sigma, n)
    expected = IQR_NORMAL * math.sqrt(2) * sigma
    se = 1.25 * 1.573 * math.sqrt(2) * sigma / math.sqrt(n - 1)
    got = rel.dispersion_across_time(noise, window=n)  # one window: the whole run
    assert abs(got - expected) < 5 * se, (got, expected, se)
    # windows of 200 differences: the median window IQR estimates the same (a sample IQR
    # of 200 values has a small downward bias of order 1/m; 5% covers it and the noise)
    assert rel.dispersion_across_time(noise, window=200) == pytest.approx(expected, rel=0.05)
    # the same curve sampled every 512 env steps, differences per 512 steps: the same DT
    steps = 512 * np.arange(1, 1001)
    assert rel.dispersion_across_time(noise[:1000], 50, steps, per_steps=512) == \
        rel.dispersion_across_time(noise[:1000], 50)


def test_fixed_policy_rollouts_of_known_distribution():
    """Episode returns N(mu, sigma^2): DF -> 1.349 sigma and RF (CVaR_0.05, lower) ->
    mu - sigma phi(z_0.05) / 0.05 = mu - 2.063 sigma. With 200,000 episodes their
    standard errors are below 0.5% of sigma; the tolerance is 2% of sigma."""
    mu, sigma = 100.0, 10.0
    x = np.random.default_rng(3).normal(mu, sigma, 200_000)
    assert rel.dispersion_across_rollouts(x) == pytest.approx(IQR_NORMAL * sigma,
                                                              abs=0.02 * sigma)
    es = mu - sigma * sps.norm.pdf(sps.norm.ppf(0.05)) / 0.05
    for method in rel.CVAR_METHODS:
        assert rel.risk_across_rollouts(x, method=method) == pytest.approx(es, abs=0.02 * sigma)


def test_fixed_policy_reliability_of_a_list_of_returns():
    returns = [10.0, 12.0, 9.0, 30.0, 11.0, 10.5]
    r = rel.fixed_policy_reliability(returns, reps=500, seed=1)
    assert r["DF"] == rel.iqr(returns) and r["RF"] == 9.0 and r["episodes"] == 6
    assert r["DF_low"] <= r["DF"] <= r["DF_high"] and r["RF_low"] <= r["RF"] <= r["RF_high"]
    assert r["few_samples_note"] and "6 episodes" in r["few_samples_note"]
    many = rel.fixed_policy_reliability(np.arange(20.0), reps=200)
    assert many["few_samples_note"] is None and many["RF"] == 0.0


def test_lowpass_keeps_slow_variation_and_removes_fast():
    t = np.arange(400)
    slow, fast = np.sin(2 * np.pi * t / 200), np.sin(2 * np.pi * t / 5)
    cutoff = 2 / 20  # keeps periods longer than 20 points
    inside = slice(60, -60)  # the ends ring: odd extension pins them (below)
    np.testing.assert_allclose(rel.lowpass(slow + fast, cutoff)[inside], slow[inside],
                               atol=0.02)
    # odd extension pins the end points: there the raw value, fast component and all
    assert rel.lowpass(slow + fast, cutoff)[-1] == pytest.approx((slow + fast)[-1])
    np.testing.assert_allclose(rel.lowpass(np.full(50, 4.0), cutoff), 4.0)
    ramp = np.linspace(0, 100, 100)  # a trend passes, also at the ends
    np.testing.assert_allclose(rel.lowpass(ramp, cutoff), ramp, atol=0.01)
    short = np.array([1.0, 5.0, 2.0, 8.0])  # under two periods of the cutoff: unfiltered
    np.testing.assert_array_equal(rel.lowpass(short, cutoff), short)
    np.testing.assert_array_equal(rel.lowpass(short, None), short)


def test_across_runs_by_hand():
    curves = np.array([[0, k, 2 * k] for k in range(1, 6)], dtype=float)  # 5 runs
    # per point: IQR of {0}, {1..5} and {2, 4, .., 10}
    np.testing.assert_array_equal(rel.dispersion_across_runs(curves), [0, 2, 4])
    assert rel.risk_across_runs(curves) == 2.0  # the worst final value
    assert rel.risk_across_runs(curves, alpha=0.3) == 3.0  # Q(0.3) = 4.4: {2, 4}
    assert rel.risk_across_runs(curves, 0.3, method="expected-shortfall") == \
        pytest.approx((2 + 0.5 * 4) / 1.5)


# --- the paper's library ------------------------------------------------------------------
def _reference(monkeypatch):
    for path in filter(None, os.environ.get("RL_RELIABILITY_METRICS_PATH", "").split(
            os.pathsep)):
        monkeypatch.syspath_prepend(path)
    online = pytest.importorskip("rl_reliability_metrics.metrics.metrics_online")
    offline = pytest.importorskip("rl_reliability_metrics.metrics.metrics_offline")
    return online, offline


def test_agrees_with_the_papers_library(monkeypatch):
    """Same inputs, same numbers: each metric against the library's class for it (DT:
    IqrWithinRuns, whose per-window values' median is DT; SRT: LowerCVaROnDiffs; LRT:
    UpperCVaROnDrawdown; DR: IqrAcrossRuns; RR: LowerCVaROnAcross at the last point; DF,
    RF: IqrAcrossRollouts, LowerCVaRAcrossRollouts), with the paper's CVaR estimator and,
    for DR and RR, the library's filter padding (pgscope pads more by default)."""
    online, offline = _reference(monkeypatch)
    rng = np.random.default_rng(11)
    t = np.arange(300.0)
    runs = [np.cumsum(rng.normal(0.3, 2.0, 300)) + 5 * np.sin(t / 15) for _ in range(6)]
    plateau = np.r_[np.linspace(0, 500, 100), np.full(150, 500.0), np.full(4, 200.0),
                    np.full(46, 500.0)]  # ties in the differences and in the drawdown
    curves = [np.array([t, y]) for y in [*runs, plateau]]
    for w in (10, 25):
        ref = online.IqrWithinRuns(window_size=w)(curves)
        mine = [rel.windowed_dispersion(c[1], w) for c in curves]
        np.testing.assert_allclose(np.array(mine), ref, rtol=1e-12)
        assert [rel.dispersion_across_time(c[1], w) for c in curves] == pytest.approx(
            np.median(ref, axis=1), rel=1e-12)
    for alpha in (0.05, 0.1, 0.25):
        assert [rel.short_term_risk(c[1], alpha) for c in curves] == pytest.approx(
            online.LowerCVaROnDiffs(alpha=alpha)(curves), rel=1e-12)
        assert [rel.long_term_risk(c[1], alpha) for c in curves] == pytest.approx(
            online.UpperCVaROnDrawdown(alpha=alpha)(curves), rel=1e-12)
    # DR, RR: the library's IqrAcrossRuns and LowerCVaROnAcross read the filtered curves
    # at the evaluation points through its apply_window_fn, which under NumPy 2 stores a
    # 1-element array into a float slot and raises; so the library's own filter and CVaR
    # are called here, and the reading at every point (its eval_points=None) done by hand
    utils = pytest.importorskip("rl_reliability_metrics.metrics.metric_utils")
    matrix = np.array(runs)
    aligned = [np.array([t, y]) for y in runs]
    library_padding = dict(padlen=3 * (rel.FILTER_ORDER + 1), min_periods=0)
    for cutoff in (0.05, 0.2):
        filtered = np.array([c[1] for c in utils.lowpass_filter(aligned, cutoff)])
        np.testing.assert_allclose(
            rel.dispersion_across_runs(matrix, cutoff, **library_padding),
            sps.iqr(filtered, axis=0), rtol=1e-6, atol=1e-6)
        assert rel.risk_across_runs(matrix, 0.2, cutoff, **library_padding) == \
            pytest.approx(utils.compute_cvar(filtered[:, -1], "lower", 0.2), rel=1e-6)
    rollouts = rng.gamma(2.0, 50.0, size=(3, 40))
    sets = [np.array([np.arange(40.0), r]) for r in rollouts]
    assert [rel.dispersion_across_rollouts(r) for r in rollouts] == pytest.approx(
        offline.IqrAcrossRollouts()(sets), rel=1e-12)
    assert [rel.risk_across_rollouts(r, 0.1) for r in rollouts] == pytest.approx(
        offline.LowerCVaRAcrossRollouts(alpha=0.1)(sets), rel=1e-12)


# --- statistics ---------------------------------------------------------------------------
def test_bootstrap_of_a_per_run_metric_is_the_stratified_bootstrap_of_its_mean():
    x = np.random.default_rng(2).normal(3, 1, 8)
    got = rel.bootstrap_ci(x, rel.group_statistic("DT"), reps=700, seed=5)
    assert got == pytest.approx(stats.stratified_bootstrap_ci(x, stats.mean, reps=700, seed=5))


def test_bootstrap_recomputes_the_across_run_metrics_on_resampled_runs():
    runs = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 9.0]])  # 3 runs, 2 evaluation points
    stat = rel.group_statistic("DR")
    point, low, high = rel.bootstrap_ci(runs, stat, reps=4000, seed=0)
    assert point == pytest.approx(np.median([0.0, rel.iqr([1, 2, 9])]))
    # every resample's DR is median(0, IQR of 3 draws from {1, 2, 9}) in [0, 4]
    assert 0.0 <= low < point <= high <= 4.0
    finals = np.array([5.0, 1.0, 3.0])
    point, low, high = rel.bootstrap_ci(finals, rel.group_statistic("RR"), reps=4000, seed=0)
    # the worst of 3 draws: 1 with probability 1 - (2/3)^3 = 0.70, 3 with 0.26, 5 with
    # (1/3)^3 = 0.037 > 2.5%
    assert (point, low, high) == (1.0, 1.0, 5.0)


def test_permutation_test_exact_and_random():
    a, b = np.arange(5.0), np.arange(5.0) + 10  # completely separated
    res = rel.permutation_test(a, b, rel.group_statistic("DT"))
    # 252 splits; only the observed one and its mirror are as extreme
    assert res == dict(difference=-10.0, p_value=2 / 252, permutations=252, exact=True)
    same = rel.permutation_test(a, a.copy(), rel.group_statistic("DT"))
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    big_a, big_b = np.arange(12.0), np.arange(12.0) + 100
    res = rel.permutation_test(big_a, big_b, rel.group_statistic("DT"), permutations=999)
    assert not res["exact"] and res["permutations"] == 999
    assert res["p_value"] == pytest.approx(1 / 1000)  # (1 + 0) / (1 + 999)
    # across-run metrics are recomputed on each split: a spread group vs a tight one
    spread = np.array([[0.0, k] for k in (0.0, 10.0, 20.0, 30.0, 40.0)])
    tight = np.array([[0.0, 20.0 + k] for k in (0.0, 0.1, 0.2, 0.3, 0.4)])
    res = rel.permutation_test(spread, tight, rel.group_statistic("DR"))
    assert res["difference"] == pytest.approx(np.median([0, 20]) - np.median([0, 0.2]))
    assert res["exact"] and res["p_value"] < 0.1


def test_mean_ranks_over_envs_follow_each_metrics_direction():
    one = lambda v: np.array([float(v)])  # noqa: E731 - one run per config
    groups = {"A": {"x": one(1), "y": one(2), "z": one(3)},
              "B": {"x": one(5), "y": one(4), "z": one(6)}}
    lower = rel.mean_ranks(groups, rel.group_statistic("DT"), False, reps=50)
    assert dict(zip(lower["label"], lower["mean_rank"], strict=True)) == {
        "x": 1.5, "y": 1.5, "z": 3.0}
    assert set(lower["n_envs"]) == {2} and set(lower["n_configs"]) == {3}
    higher = rel.mean_ranks(groups, rel.group_statistic("SRT"), True, reps=50)
    assert dict(zip(higher["label"], higher["mean_rank"], strict=True)) == {
        "x": 2.5, "y": 2.5, "z": 1.0}
    ties = rel.mean_ranks({"A": {"x": one(1), "y": one(1)}}, rel.group_statistic("DT"),
                          False, reps=50)
    assert list(ties["mean_rank"]) == [1.5, 1.5]


def test_rank_permutation_test_across_envs():
    """With three configs, a split of good's and bad's runs keeps good first and bad last
    in an env with probability about (C(6,4) C(6,2) + C(6,5) C(6,1) + 1) / C(12,6) = 0.28
    (either way round), so over 6 envs |rank difference| = 2 has probability about
    2 * 0.28^6 = 1e-3: p is (1 + k) / 501 with k of that order."""
    rng = np.random.default_rng(4)
    groups = {env: {"good": rng.normal(0, 0.1, 6), "bad": rng.normal(5, 0.1, 6),
                    "mid": rng.normal(2, 0.1, 6)} for env in "ABCDEF"}
    res = rel.rank_permutation_test(groups, "good", "bad", rel.group_statistic("DT"), False,
                                    permutations=500)
    assert res["rank_difference"] == -2.0 and res["n_envs"] == 6
    assert res["p_value"] < 0.02
    three = {env: groups[env] for env in "ABC"}  # 2 * 0.28^3 = 0.045: not below 0.02
    res3 = rel.rank_permutation_test(three, "good", "bad", rel.group_statistic("DT"), False,
                                     permutations=500)
    assert 0.02 < res3["p_value"] < 0.1
    res = rel.rank_permutation_test(groups, "bad", "good", rel.group_statistic("SRT"), True,
                                    permutations=500)
    assert res["rank_difference"] == -2.0  # higher is better: "bad" has the larger values


# --- the study summary and report ---------------------------------------------------------
ITERS = 60


def _study(tmp_path, curves, states=None):
    """A study whose runs' metrics are written by hand: curves[label][seed] = per-iteration
    mean returns (ITERS iterations of 256 env steps)."""
    spec = parse_spec(dict(
        name="rel", envs=["CartPole-v1"], seeds=len(curves["ppo"]), total_steps=256 * ITERS,
        set=dict(steps_per_iter=256, minibatches=4, epochs=2),
        configs=[dict(label="ppo", preset="ppo"), dict(label="small", preset="ppo",
                                                      hidden=[16])],
        statistics=dict(reps=300, seed=1)))
    out = tmp_path / "study"
    prepare_study_dir(out, spec)
    for r in spec.runs():
        run, _lock = RunDir.create(out / r.rel_path, r.config)
        for i, ret in enumerate(curves[r.label][r.seed]):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1),
                                    return_mean=float(ret)))
        run.write_status((states or {}).get((r.label, r.seed), "complete"))
    return spec, out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    rng = np.random.default_rng(0)
    trend = np.linspace(0, 200, ITERS)
    curves = {"ppo": [trend + rng.normal(0, 2, ITERS) for _ in range(4)],
              "small": [trend + rng.normal(0, 30, ITERS) for _ in range(4)]}
    curves["small"][3] = trend[:20]  # diverged after 20 iterations
    spec, out = _study(tmp_path_factory.mktemp("rel"), curves, {("small", 3): "diverged"})
    return curves, write_summary(out, plots=False), out


def test_study_summary_has_the_metrics_of_the_complete_runs(study):
    curves, result, _ = study
    t = result["tables"]["reliability"].set_index(["label", "metric"])
    # DT, SRT, LRT: the mean over runs of each run's value, differences per iteration
    # (every iteration is 256 env steps, the study's median, so per_steps = 256)
    for label, runs in (("ppo", curves["ppo"]), ("small", curves["small"][:3])):
        assert t.loc[(label, "DT"), "value"] == pytest.approx(
            np.mean([rel.dispersion_across_time(c, 20) for c in runs]))
        assert t.loc[(label, "SRT"), "value"] == pytest.approx(
            np.mean([rel.short_term_risk(c) for c in runs]))
        assert t.loc[(label, "LRT"), "value"] == pytest.approx(
            np.mean([rel.long_term_risk(c) for c in runs]))
        # DR and RR: filtered with a cutoff of 2 / 20 (the DT window), read at the centres
        # of round(59 / 20) = 3 segments of the common span, iterations 1..60
        grid = 256 + (np.arange(3) + 0.5) * 256 * 59 / 3
        steps = 256 * np.arange(1, ITERS + 1)
        smooth = np.array([np.interp(grid, steps, rel.lowpass(c, 0.1)) for c in runs])
        assert t.loc[(label, "DR"), "value"] == pytest.approx(
            np.median(rel.iqr(smooth, axis=0)))
        assert t.loc[(label, "RR"), "value"] == pytest.approx(rel.cvar(smooth[:, -1]))
    assert t.loc[("small", "DT"), "n_runs"] == 3  # the diverged run is left out ...
    assert t.loc[("small", "DT"), "n_diverged"] == 1  # ... and counted
    assert t.loc[("ppo", "DT"), "value"] < t.loc[("small", "DT"), "value"]
    assert t["few_samples"].all()  # 4 and 3 runs
    assert (t["value_low"] <= t["value"] + 1e-12).all()
    assert (t["value"] <= t["value_high"] + 1e-12).all()
    comp = result["tables"]["reliability_comparisons"].set_index("metric")
    assert (comp["a"] == "small").all() and (comp["b"] == "ppo").all()
    assert comp.loc["DT", "difference"] == pytest.approx(
        t.loc[("small", "DT"), "value"] - t.loc[("ppo", "DT"), "value"])
    assert comp.loc["DT", "exact"] and comp.loc["DT", "permutations"] == 35  # C(7, 3)
    ranks = result["tables"]["reliability_ranks"].set_index(["metric", "label"])
    assert ranks.loc[("DT", "ppo"), "mean_rank"] == 1.0
    assert ranks.loc[("DT", "small"), "mean_rank"] == 2.0
    assert result["meta"]["reliability"]["per_steps"] == 256
    assert result["meta"]["reliability"]["evaluation_points"]["CartPole-v1"] == \
        pytest.approx(list(256 + (np.arange(3) + 0.5) * 256 * 59 / 3))


def test_summary_files_have_the_reliability_section(study):
    _, _, out = study
    summary = out / "summary"
    csv = pd.read_csv(summary / "reliability.csv")
    assert set(csv["metric"]) == set(rel.CURVE_METRICS)
    assert {"value", "value_low", "value_high", "n_runs", "few_samples"} <= set(csv.columns)
    assert (summary / "reliability_comparisons.csv").exists()
    assert (summary / "reliability_ranks.csv").exists()
    data = json.loads((summary / "summary.json").read_text())
    section = data["reliability"]
    assert section["parameters"]["alpha"] == 0.05 and section["parameters"]["window"] == 20
    dt = section["values"]["ppo"]["CartPole-v1"]["DT"]
    row = csv[(csv["label"] == "ppo") & (csv["metric"] == "DT")].iloc[0]
    assert dt["value"] == pytest.approx(row["value"])
    assert dt["value_low"] == pytest.approx(row["value_low"])
    assert dt["few_samples"] is True and dt["n_runs"] == 4
    assert section["ranks"]["DT"]["ppo"]["mean_rank"] == 1.0
    assert "Chan" in section["citation"] and set(section["metrics"]) == set(rel.METRICS)
    assert len(data["tables"]["reliability"]) == len(csv)


def test_summary_text_lists_the_metrics(study):
    from pgscope.study.analysis import format_summary

    text = format_summary(study[1])
    assert "reliability (Chan et al., 2020" in text and "DT (lower better)" in text
    assert "ppo!" in text.split("reliability (Chan")[1]


def test_study_report_has_a_panel_per_metric(study, tmp_path):
    from pgscope.report import write_report

    _, result, out = study
    html = write_report(out, tmp_path / "study.html").read_text()
    assert 'id="reliability"' in html
    for m in rel.CURVE_METRICS:
        assert f'id="study-reliability-{m.lower()}"' in html
    dt = result["tables"]["reliability"].query("label == 'ppo' and metric == 'DT'").iloc[0]
    assert f"{dt['value']:.4g} [{dt['value_low']:.4g}, {dt['value_high']:.4g}]" in html
    assert "Mean rank over envs" in html and "Permutation tests" in html


def test_several_envs_give_an_all_row_and_mean_ranks():
    rng = np.random.default_rng(5)
    frames = []
    for label, noise in (("calm", 1.0), ("wild", 20.0), ("mid", 5.0)):
        for env in ("E1", "E2", "E3"):
            for seed in range(4):
                y = np.linspace(0, 100, 50) + rng.normal(0, noise, 50)
                frames.append(pd.DataFrame(dict(
                    label=label, env=env, seed=seed, state="complete",
                    iteration=np.arange(1, 51), env_steps=1000 * np.arange(1, 51),
                    return_mean=y)))
    data = pd.concat(frames, ignore_index=True)
    tables, section = rel.study_reliability(data, pairs=[("wild", "calm")], reps=200)
    ranks = tables["reliability_ranks"].set_index(["metric", "label"])
    assert ranks.loc[("DT", "calm"), "mean_rank"] == 1.0
    assert ranks.loc[("DT", "wild"), "mean_rank"] == 3.0
    assert ranks.loc[("DT", "calm"), "n_envs"] == 3
    comp = tables["reliability_comparisons"]
    row = comp[(comp["env"] == "all") & (comp["metric"] == "DT")].iloc[0]
    assert row["rank_difference"] == 2.0 and row["n_envs"] == 3 and row["few_samples"]
    assert len(comp[comp["env"] != "all"]) == 3 * len(rel.CURVE_METRICS)
    assert section["per_steps"] == 1000
    assert section["ranks"]["SRT"]["calm"]["mean_rank"] == 1.0  # higher is better


def test_a_study_with_no_complete_run_has_empty_reliability_tables(tmp_path):
    spec = parse_spec(dict(name="none", envs=["CartPole-v1"], seeds=2, total_steps=512,
                           set=dict(steps_per_iter=256),
                           configs=[dict(label="ppo", preset="ppo")]))
    prepare_study_dir(tmp_path / "s", spec)
    res = summarize(tmp_path / "s")
    assert res["tables"]["reliability"].empty and res["meta"]["reliability"]["values"] == {}


def test_params_are_checked():
    with pytest.raises(ValueError):
        rel.ReliabilityParams(alpha=0)
    with pytest.raises(ValueError):
        rel.ReliabilityParams(window=1)
    with pytest.raises(ValueError):
        rel.ReliabilityParams(cvar="mean")
