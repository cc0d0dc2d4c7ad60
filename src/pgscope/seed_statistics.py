"""Statistics across seeds: comparing configurations (docs/design.md section 4).

A small functional API over NumPy/SciPy, after rliable (Agarwal et al., 2021). Scores are
arrays of shape ``(runs, tasks)`` (one column per env; a 1-D array is one task). Every
interval is reproducible for a given ``seed``.

Agreement with ``rliable`` and SciPy on identical inputs is tested in
``tests/test_stats_rliable.py`` and ``tests/test_stats.py``. The study summary
(:mod:`pgscope.study.analysis`) is built on these functions.

Failed runs: the rank-based functions (:func:`iqm`, :func:`median`, the probability of
improvement, :func:`mann_whitney`, the performance profiles) accept ``-inf`` scores, which
is how the study summary enters a run that diverged or failed: it ranks below every finite
score and ties with other such runs. Their bootstrap intervals stay well defined (:func:`quantile`).
The mean-based functions (:func:`mean`, :func:`welch_t_test`, :func:`seeds_needed`,
:func:`seed_lottery`) need finite scores; the caller leaves failed runs out and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats as sps

Aggregate = Callable[[np.ndarray], float]

#: The fewest samples (runs, episodes) a percentile bootstrap interval is reported without a
#: warning on. Below it the interval understates the uncertainty: it resamples only the
#: values seen (over 3 values the mean's interval lies within their min and max, and a
#: probability of improvement between two sets of 3 separated runs is [0, 0] or [1, 1]);
#: rliable's guidance (Agarwal et al., 2021) is to report such few-run intervals with care.
FEW_SAMPLES = 10


def few_samples_note(n: int, what: str = "samples") -> str | None:
    """A warning for an interval over ``n`` < :data:`FEW_SAMPLES` ``what``, else None."""
    if n >= FEW_SAMPLES:
        return None
    return (f"only {n} {what}: a bootstrap interval over fewer than {FEW_SAMPLES} understates "
            "the uncertainty (it resamples only the values seen)")


def _as_2d(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return scores[:, None] if scores.ndim == 1 else scores


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean over all runs and tasks: the mean of the middle 50% (-inf when a
    -inf score falls in the middle 50%)."""
    return float(sps.trim_mean(_as_2d(scores).reshape(-1), proportiontocut=0.25))


def median(scores: np.ndarray) -> float:
    """Median over all runs and tasks (NumPy's: the mean of the two middle values for an
    even count, so -inf when either of them is -inf)."""
    return float(np.median(_as_2d(scores)))


def mean(scores: np.ndarray) -> float:
    """Mean over all runs and tasks (for finite scores only)."""
    return float(np.mean(_as_2d(scores)))


def _batched_iqm(b: np.ndarray) -> np.ndarray:
    return sps.trim_mean(b.reshape(len(b), -1), proportiontocut=0.25, axis=1)


#: Vectorized forms of the aggregates over a batch of resamples (reps, runs, tasks); the
#: bootstrap uses them when it can (same numbers as the per-resample loop, ~100x faster).
_BATCHED: dict[Aggregate, Callable[[np.ndarray], np.ndarray]] = {
    iqm: _batched_iqm,
    median: lambda b: np.median(b.reshape(len(b), -1), axis=1),
    mean: lambda b: b.reshape(len(b), -1).mean(axis=1),
}


def quantile(values: np.ndarray, q: float, axis: int | None = None) -> Any:
    """``np.quantile`` (linear interpolation) that keeps infinite values infinite.

    A run that diverged enters the rank statistics as -inf, so bootstrap values of the IQM
    or median can be -inf. NumPy interpolates between neighbours as ``a + (b - a) t``, which
    is NaN when ``a = -inf``; the interpolated value there is -inf for every ``t < 1``, and
    symmetrically +inf when the upper neighbour is +inf and the lower one is finite."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        q_lin = np.quantile(v, q, axis=axis)
    if not np.isinf(v).any():
        return q_lin
    lower = np.quantile(v, q, axis=axis, method="lower")
    upper = np.quantile(v, q, axis=axis, method="higher")
    out = np.where(np.isneginf(lower), -np.inf, np.where(np.isposinf(upper), np.inf, q_lin))
    return out if axis is not None else out[()]


def percentile_interval(values: np.ndarray, level: float = 0.95, axis: int | None = None
                        ) -> tuple[Any, Any]:
    """The central ``level`` interval of bootstrap ``values`` (the percentile method): two
    floats, or two arrays when taken along ``axis``. Infinite values stay infinite (see
    :func:`quantile`), so an interval can be ``[-inf, x]`` but never NaN from them."""
    alpha = (1 - level) / 2
    low, high = quantile(values, alpha, axis=axis), quantile(values, 1 - alpha, axis=axis)
    return (float(low), float(high)) if axis is None else (low, high)


def stratified_bootstrap_ci(scores: np.ndarray, statistic: Aggregate, *, reps: int = 2000,
                            level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): percentile CI of ``statistic`` where each bootstrap sample
    resamples runs with replacement *within each task* (rliable's stratified bootstrap)."""
    x = _as_2d(scores)
    rng = np.random.default_rng(seed)
    n_runs, n_tasks = x.shape
    idx = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))
    samples = x[idx, np.arange(n_tasks)]  # (reps, runs, tasks)
    if statistic in _BATCHED:
        values = _BATCHED[statistic](samples)
    else:
        values = np.array([statistic(sample) for sample in samples])
    return (statistic(x), *percentile_interval(values, level))


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + 0.5 P(X = Y) for a random run of X against one of Y, averaged over tasks
    (rliable's definition; equals the Mann-Whitney U statistic / (n m) per task). Scores of
    -inf are allowed: such a run loses to every finite score and ties with another -inf."""
    return float(_poi_batched(_as_2d(x)[None], _as_2d(y)[None])[0])


def _poi_batched(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probability of improvement for batches x (B, n, tasks) and y (B, m, tasks)."""
    a, b = x[:, :, None, :], y[:, None, :, :]
    return ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2)).mean(axis=1)


def probability_of_improvement_ci(x: np.ndarray, y: np.ndarray, *, reps: int = 2000,
                                  level: float = 0.95, seed: int = 0
                                  ) -> tuple[float, float, float]:
    """Probability of improvement with a stratified bootstrap CI (both groups resampled
    independently within each task)."""
    x, y = _as_2d(x), _as_2d(y)
    rng = np.random.default_rng(seed)
    cols = np.arange(x.shape[1])
    ix = rng.integers(0, x.shape[0], size=(reps, *x.shape))
    iy = rng.integers(0, y.shape[0], size=(reps, *y.shape))
    values = _poi_batched(x[ix, cols], y[iy, cols])
    return (probability_of_improvement(x, y), *percentile_interval(values, level))


def welch_t_test(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test."""
    res = sps.ttest_ind(np.ravel(x), np.ravel(y), equal_var=False)
    return float(res.statistic), float(res.pvalue)


def mann_whitney(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(U of x, two-sided p) of the Mann-Whitney U test (SciPy's; -inf scores are ranked
    below every finite score, ties share their ranks)."""
    res = sps.mannwhitneyu(np.ravel(x), np.ravel(y), alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def failure_rate(scores: np.ndarray, threshold: float, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(rate, low, high): fraction of runs scoring below ``threshold`` with a Wilson CI.
    A NaN or -inf score (how a diverged run is entered) counts as a failure whatever the
    threshold, also when it is -inf (no threshold)."""
    s = np.ravel(np.asarray(scores, dtype=np.float64))
    failed = np.isnan(s) | np.isneginf(s) | (s < threshold)
    return proportion_ci(int(np.sum(failed)), len(s), level)


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(k / n, low, high) with the Wilson score interval (SciPy's ``binomtest``)."""
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def performance_profile(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of runs with score > tau, averaged over tasks, for each tau (a -inf score is
    below every tau but stays in the denominator)."""
    x = _as_2d(scores)
    return np.array([float(np.mean(np.mean(x > tau, axis=0))) for tau in np.ravel(taus)])


def seeds_needed(sd: float, difference: float, *, alpha: float = 0.05, power: float = 0.8,
                 max_seeds: int = 10_000) -> int:
    """Seeds per group for a two-sided two-sample t-test to detect ``difference`` with the
    given ``power`` when the per-seed standard deviation is ``sd`` (noncentral t)."""
    if sd <= 0 or difference == 0:
        raise ValueError("need sd > 0 and a non-zero difference")
    d = abs(difference) / sd
    for n in range(2, max_seeds + 1):
        df = 2 * n - 2
        t_crit = sps.t.ppf(1 - alpha / 2, df)
        nc = d * np.sqrt(n / 2)
        achieved = sps.nct.sf(t_crit, df, nc) + sps.nct.cdf(-t_crit, df, nc)
        if achieved >= power:
            return n
    return max_seeds


def curve_ci(curves: np.ndarray, *, reps: int = 2000, level: float = 0.95, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learning curve with a pointwise bootstrap CI: ``curves`` is (runs, points); returns
    (mean, low, high) per point, resampling whole runs (so a run's points stay together)."""
    x = np.asarray(curves, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(reps, x.shape[0]))
    boot = x[idx].mean(axis=1)  # (reps, points)
    return (x.mean(axis=0), *percentile_interval(boot, level, axis=0))


def seed_lottery(scores: np.ndarray, *, splits: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, Any]:
    """Split runs of *one* configuration into two equal halves at random and test them
    against each other with Welch's t-test (Henderson et al., 2018): how often does the
    seed alone give a 'significant' difference? All distinct splits are used when there
    are at most ``splits`` of them. Returns the fraction significant, the number of splits,
    and the most extreme split's t, p and first group (indices into ``scores``)."""
    from itertools import combinations
    from math import comb

    s = np.ravel(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < 4:
        raise ValueError("the seed lottery needs at least 4 runs")
    half = n // 2
    distinct = comb(n, half) // (2 if 2 * half == n else 1)
    if distinct <= splits:
        groups = [g for g in combinations(range(n), half) if 2 * half != n or 0 in g]
    else:
        rng = np.random.default_rng(seed)
        groups = [tuple(rng.permutation(n)[:half]) for _ in range(splits)]
    ts, ps = [], []
    for g in groups:
        mask = np.zeros(n, dtype=bool)
        mask[list(g)] = True
        res = sps.ttest_ind(s[mask], s[~mask], equal_var=False)
        ts.append(abs(float(res.statistic)))
        ps.append(float(res.pvalue))
    worst = int(np.argmax(ts))
    return {"fraction_significant": float(np.mean(np.array(ps) < alpha)),
            "splits": len(groups), "alpha": alpha, "max_abs_t": ts[worst],
            "min_p": ps[worst], "runs": n, "worst_split": sorted(int(i) for i in groups[worst])}


def performance_profile_ci(scores: np.ndarray, taus: np.ndarray, *, reps: int = 2000,
                           level: float = 0.95, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`performance_profile` with a stratified bootstrap CI per tau."""
    x = _as_2d(scores)
    t = np.ravel(taus)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(reps, *x.shape))
    boot = x[idx, np.arange(x.shape[1])]  # (reps, runs, tasks)
    prof = (boot[..., None] > t).mean(axis=1).mean(axis=1)  # (reps, taus)
    return (performance_profile(x, t), *percentile_interval(prof, level, axis=0))
