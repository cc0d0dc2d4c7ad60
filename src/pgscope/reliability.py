"""Reliability metrics of Chan et al., "Measuring the Reliability of Reinforcement Learning
Algorithms" (ICLR 2020): dispersion and risk of learning curves and of a trained policy.

Seven metrics, on three axes (time within a run, runs, rollouts of a fixed policy), each a
*dispersion* (the interquartile range, IQR) or a *risk* (the conditional value at risk,
CVaR: the mean of the worst ``alpha`` fraction):

========  ==============================================================  ================
metric    definition                                                      better
========  ==============================================================  ================
``DT``    dispersion across time: IQR of the detrended curve (first       lower
          differences) in each sliding window of ``window`` differences,
          the median over the windows
``SRT``   short-term risk across time: CVaR (lower tail) of the           higher
          differences, the mean of the worst ``alpha`` drops
``LRT``   long-term risk across time: CVaR (upper tail) of the drawdown   lower
          ``max(R_1..R_t) - R_t``, the mean of the deepest ``alpha``
``DR``    dispersion across runs: IQR across runs at each evaluation      lower
          point of the low-pass filtered curves, the median over points
``RR``    risk across runs: CVaR (lower tail) across runs of the final    higher
          performance, the low-pass filtered curves at the last
          evaluation point
``DF``    dispersion across fixed-policy rollouts: IQR of the episode     lower
          returns
``RF``    risk across fixed-policy rollouts: CVaR (lower tail) of the     higher
          episode returns
========  ==============================================================  ================

Estimators. ``IQR = Q(0.75) - Q(0.25)`` and ``CVaR_alpha(x) = mean{x_i : x_i <= Q(alpha)}``
(the upper tail: ``x_i >= Q(1 - alpha)``), with ``Q`` the linearly interpolated sample
quantile (NumPy's default). With fewer than ``1 / alpha`` values the lower-tail CVaR is
the minimum. Differences are ``(R_t - R_{t-1}) / (s_t - s_{t-1}) * per_steps`` when the
env steps ``s`` are given (the change per ``per_steps`` env steps, so curves sampled at
different intervals compare), else plain first differences. The low-pass filter is a
zero-phase (forward and backward) Butterworth filter of order 8 whose -3 dB cutoff is given
as a fraction of the Nyquist frequency, padded by odd extension at each end (see
:func:`lowpass`; a curve shorter than two periods of the cutoff is left unfiltered). These
follow the paper's definitions and its library's conventions
(google-research/rl-reliability-metrics) except where :func:`lowpass` and :func:`cvar`
say; the study defaults are stated in :class:`ReliabilityParams`. The drawdown is the
non-negative depth below the best value so far, so LRT takes its upper tail, the deepest
drops (what long-term risk is to capture; the paper's library names it
``UpperCVaROnDrawdown``, while its example configuration uses the lower tail, which
averages the shallowest points, mostly zeros).

Statistics. :func:`bootstrap_ci` resamples runs (the across-run metrics are recomputed on
each resample, as the paper does); :func:`permutation_test` exchanges runs between two
configs (every split when there are at most ``permutations`` of them, else random ones);
:func:`mean_ranks` ranks configs per env (1 = best) and averages the ranks over envs, with a
bootstrap interval and a permutation test of the difference in mean rank (the paper's
summary across tasks).

:func:`study_reliability` computes all of it from :func:`pgscope.study.analysis.load_study`'s
rows (the study summary's ``reliability*`` tables); :func:`fixed_policy_reliability` gives
DF and RF of a list of episode returns (``pgscope evaluate``'s ``returns``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import signal as sps_signal
from scipy import stats as sps

from pgscope import seed_statistics as stats

#: Default CVaR level: the mean of the worst 5% (the paper's).
ALPHA = 0.05
#: Order of the Butterworth low-pass filter (the paper's library uses 8).
FILTER_ORDER = 8


@dataclass(frozen=True)
class Metric:
    """One reliability metric: its short name, long name, axis, kind and direction."""

    key: str
    name: str
    axis: str  # "time", "runs" or "rollouts"
    kind: str  # "dispersion" or "risk"
    higher_is_better: bool
    definition: str


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("DT", "dispersion across time", "time", "dispersion", False,
           "IQR of the first differences of a run's curve in each sliding window of "
           "`window` differences; the median over windows; the mean over runs"),
    Metric("SRT", "short-term risk across time", "time", "risk", True,
           "CVaR (lower tail, alpha) of a run's first differences: the mean of its worst "
           "alpha fraction of changes; the mean over runs"),
    Metric("LRT", "long-term risk across time", "time", "risk", False,
           "CVaR (upper tail, alpha) of a run's drawdown max(R_1..R_t) - R_t: the mean of "
           "its deepest alpha fraction of drops below the best so far; the mean over runs"),
    Metric("DR", "dispersion across runs", "runs", "dispersion", False,
           "IQR across runs of the low-pass filtered curves at each evaluation point; the "
           "median over the evaluation points"),
    Metric("RR", "risk across runs", "runs", "risk", True,
           "CVaR (lower tail, alpha) across runs of the final performance: the low-pass "
           "filtered curves at the last evaluation point (the centre of the last segment)"),
    Metric("DF", "dispersion across fixed-policy rollouts", "rollouts", "dispersion", False,
           "IQR of a trained policy's episode returns"),
    Metric("RF", "risk across fixed-policy rollouts", "rollouts", "risk", True,
           "CVaR (lower tail, alpha) of a trained policy's episode returns"),
)}
#: The metrics of learning curves (a study's), in report order.
CURVE_METRICS = ("DT", "SRT", "LRT", "DR", "RR")
#: The metrics computed per run and then averaged over runs.
PER_RUN_METRICS = ("DT", "SRT", "LRT")

CITATION = ("Chan, Fishman, Canny, Korattikara, Guadarrama. Measuring the Reliability of "
            "Reinforcement Learning Algorithms. ICLR 2020 (arXiv:1912.05663)")


# --- estimators -------------------------------------------------------------------------
def iqr(x: Any, axis: int | None = None) -> Any:
    """Interquartile range ``Q(0.75) - Q(0.25)`` (linear interpolation); a float, or an
    array when taken along ``axis``."""
    a = np.asarray(x, dtype=np.float64)
    q75, q25 = np.quantile(a, [0.75, 0.25], axis=axis)
    out = q75 - q25
    return float(out) if axis is None else out


#: CVaR estimators: "paper", the paper's definition E[X | X <= VaR_alpha] on the sample
#: (every value at or beyond the quantile, ties included; what its library computes), and
#: "expected-shortfall", the mean of the worst alpha fraction of the values (fractional
#: weight on the boundary value; Acerbi and Tasche, 2002). They agree on tie-free data
#: whenever n * alpha is a whole number or below 1; they differ when many values tie at the
#: quantile: a curve at a plateau whose drawdown is 0 at more than 1 - alpha of its points
#: has a "paper" LRT of its *mean* drawdown, an "expected-shortfall" LRT of the mean of
#: its deepest alpha fraction.
CVAR_METHODS = ("paper", "expected-shortfall")


def cvar(x: Any, alpha: float = ALPHA, tail: str = "lower", axis: int | None = None,
         method: str = "paper") -> Any:
    """Conditional value at risk of ``x`` (a float, or an array when taken along
    ``axis``). ``method="paper"``: the mean of the values at or below the ``alpha``
    quantile (``tail="lower"``), or at or above the ``1 - alpha`` quantile (``"upper"``),
    the quantile linearly interpolated; the tail always holds the extreme value, so with
    fewer than ``1 / alpha`` values the lower-tail CVaR is the minimum.
    ``method="expected-shortfall"``: the mean of the lowest (highest) ``n alpha`` values,
    the last one weighted by the fractional part (the extreme value when ``n alpha < 1``).
    See :data:`CVAR_METHODS`."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if tail not in ("lower", "upper"):
        raise ValueError(f"tail must be 'lower' or 'upper', got {tail!r}")
    if method not in CVAR_METHODS:
        raise ValueError(f"method must be one of {CVAR_METHODS}, got {method!r}")
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError("CVaR of no values")
    ax = -1 if axis is None else axis
    v = a.reshape(-1) if axis is None else a
    if method == "expected-shortfall":
        s = np.moveaxis(np.sort(v if tail == "lower" else -v, axis=ax), ax, -1)
        k = s.shape[-1] * alpha
        weights = np.clip(k - np.arange(s.shape[-1]), 0.0, 1.0)
        out = (s * weights).sum(axis=-1) / weights.sum()
        out = out if tail == "lower" else -out
    else:
        if tail == "lower":
            var = np.quantile(v, alpha, axis=ax, keepdims=True)
            mask = (v <= var) | (v == v.min(axis=ax, keepdims=True))
        else:
            var = np.quantile(v, 1 - alpha, axis=ax, keepdims=True)
            mask = (v >= var) | (v == v.max(axis=ax, keepdims=True))
        out = np.where(mask, v, 0.0).sum(axis=ax) / mask.sum(axis=ax)
    return float(out) if axis is None else out


def differences(values: Any, steps: Any = None, per_steps: float = 1.0) -> np.ndarray:
    """The detrended curve: first differences ``R_t - R_{t-1}``, or, with the env ``steps``
    of each point, ``(R_t - R_{t-1}) / (s_t - s_{t-1}) * per_steps`` (the change per
    ``per_steps`` env steps)."""
    y = np.asarray(values, dtype=np.float64)
    dy = np.diff(y)
    if steps is None:
        return dy
    s = np.asarray(steps, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError("steps and values differ in length")
    ds = np.diff(s)
    if np.any(ds <= 0):
        raise ValueError("steps must increase strictly")
    return dy / ds * per_steps


def drawdown(values: Any) -> np.ndarray:
    """The drawdown at each point: how far the curve is below its best value so far,
    ``max(R_1..R_t) - R_t`` (non-negative)."""
    y = np.asarray(values, dtype=np.float64)
    return np.maximum.accumulate(y) - y


def lowpass(values: Any, cutoff: float | None, order: int = FILTER_ORDER,
            padlen: int | None = None, min_periods: float = 2.0) -> np.ndarray:
    """Zero-phase Butterworth low-pass filter of ``values`` (second-order sections run
    forward and backward, so no lag; the ends padded by odd extension). ``cutoff`` is the
    -3 dB frequency as a fraction of the Nyquist frequency: variations with a period of
    more than ``2 / cutoff`` points pass, faster ones are removed.

    ``padlen``: the points of odd extension at each end, default ``n - 1``, the most there
    is (the paper's library uses ``min(n - 1, 3 (order + 1))``, whose edge transient is
    0.3% of a 0..100 ramp's range at its end for 100 points and a cutoff of 0.1, against
    0.004% here; the end is where RR reads the curve). A curve shorter than
    ``min_periods`` periods of the cutoff (``n < min_periods * 2 / cutoff``) is returned
    unfiltered: too short for the filter (its edge transients would dominate) and for
    any variation slower than the cutoff to show. None, or a cutoff >= 1, returns a copy
    unfiltered. Odd extension keeps a trend undistorted up to the ends but pins the end
    points: the filtered first and last values are the raw ones, and the filter rings
    back to the smooth curve over the next periods (white noise of sd 1 and a cutoff of
    0.1: the filtered value's sd is 0.94 at the end, 0.34 ten points inside, 0.30 in the
    middle); read "final" values inside, not at the end."""
    y = np.asarray(values, dtype=np.float64)
    if cutoff is None or cutoff >= 1 or len(y) < 2:
        return y.copy()
    if cutoff <= 0:
        raise ValueError(f"cutoff must be > 0, got {cutoff}")
    if len(y) < min_periods * 2 / cutoff:
        return y.copy()
    sos = sps_signal.butter(order, cutoff, output="sos")
    pad = len(y) - 1 if padlen is None else min(padlen, len(y) - 1)
    return np.asarray(sps_signal.sosfiltfilt(sos, y, padlen=pad))


# --- the metrics ------------------------------------------------------------------------
def windowed_dispersion(values: Any, window: int, steps: Any = None,
                        per_steps: float = 1.0) -> np.ndarray:
    """IQR of the differences in every window of ``window`` consecutive differences
    (stride 1); a window longer than the run is cut to the whole run."""
    d = differences(values, steps, per_steps)
    if window < 2:
        raise ValueError(f"window must be >= 2 differences, got {window}")
    if len(d) < 2:
        return np.array([])
    w = min(window, len(d))
    return np.asarray(iqr(np.lib.stride_tricks.sliding_window_view(d, w), axis=1))


def dispersion_across_time(values: Any, window: int, steps: Any = None,
                           per_steps: float = 1.0) -> float:
    """DT of one run: the median over sliding windows of the IQR of the differences
    (:func:`windowed_dispersion`); NaN for fewer than 3 points."""
    w = windowed_dispersion(values, window, steps, per_steps)
    return float(np.median(w)) if len(w) else math.nan


def short_term_risk(values: Any, alpha: float = ALPHA, steps: Any = None,
                    per_steps: float = 1.0, method: str = "paper") -> float:
    """SRT of one run: CVaR (lower tail) of its differences; NaN for fewer than 2 points."""
    d = differences(values, steps, per_steps)
    return cvar(d, alpha, "lower", method=method) if len(d) else math.nan


def long_term_risk(values: Any, alpha: float = ALPHA, method: str = "paper") -> float:
    """LRT of one run: CVaR (upper tail) of its drawdown; NaN for no points."""
    dd = drawdown(values)
    return cvar(dd, alpha, "upper", method=method) if len(dd) else math.nan


def dispersion_across_runs(curves: Any, cutoff: float | None = None,
                           order: int = FILTER_ORDER, **filter_args: Any) -> np.ndarray:
    """DR at each evaluation point: ``curves`` is (runs, points), aligned on the same
    points; each run is low-pass filtered (:func:`lowpass`, which ``filter_args`` go to),
    then the IQR across runs is taken per point. The study's DR is the median of this over
    the points."""
    c = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    filtered = np.stack([lowpass(row, cutoff, order, **filter_args) for row in c])
    return np.asarray(iqr(filtered, axis=0))


def risk_across_runs(curves: Any, alpha: float = ALPHA, cutoff: float | None = None,
                     order: int = FILTER_ORDER, method: str = "paper",
                     **filter_args: Any) -> float:
    """RR: CVaR (lower tail) across runs of each low-pass filtered curve's final value
    (``curves``: (runs, points); ``filter_args`` go to :func:`lowpass`)."""
    c = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    finals = np.array([lowpass(row, cutoff, order, **filter_args)[-1] for row in c])
    return cvar(finals, alpha, "lower", method=method)


def dispersion_across_rollouts(returns: Sequence[float] | np.ndarray) -> float:
    """DF: IQR of a fixed policy's episode returns."""
    return iqr(np.asarray(returns, dtype=np.float64))


def risk_across_rollouts(returns: Sequence[float] | np.ndarray, alpha: float = ALPHA,
                         method: str = "paper") -> float:
    """RF: CVaR (lower tail) of a fixed policy's episode returns."""
    return cvar(np.asarray(returns, dtype=np.float64), alpha, "lower", method=method)


def fixed_policy_reliability(returns: Sequence[float] | np.ndarray, *, alpha: float = ALPHA,
                             level: float = 0.95, reps: int = 2000, seed: int = 0,
                             method: str = "paper") -> dict[str, Any]:
    """DF and RF of a trained policy's episode returns (e.g. ``pgscope evaluate``'s
    ``returns``) with percentile-bootstrap intervals over episodes: keys ``DF``,
    ``DF_low``, ``DF_high``, ``RF``, ``RF_low``, ``RF_high``, ``alpha``, ``episodes``,
    ``level`` and ``few_samples_note`` (None from
    :data:`pgscope.seed_statistics.FEW_SAMPLES` episodes on)."""
    x = np.asarray(returns, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("need a non-empty list of episode returns")
    out: dict[str, Any] = dict(episodes=len(x), alpha=alpha, level=level)
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, len(x), size=(reps, len(x)))]
    for key, point, values in (
            ("DF", dispersion_across_rollouts(x), iqr(boot, axis=1)),
            ("RF", risk_across_rollouts(x, alpha, method),
             cvar(boot, alpha, "lower", axis=1, method=method))):
        low, high = stats.percentile_interval(values, level)
        out.update({key: point, f"{key}_low": low, f"{key}_high": high})
    out["few_samples_note"] = stats.few_samples_note(len(x), "episodes")
    return out


# --- statistics over runs ---------------------------------------------------------------
GroupStatistic = Callable[[np.ndarray], np.ndarray]


def group_statistic(metric: str, alpha: float = ALPHA, method: str = "paper"
                    ) -> GroupStatistic:
    """The statistic of a group of runs for ``metric``, over a batch: it maps runs' data of
    shape (batch, runs, ...) to (batch,). For DT, SRT and LRT a run's datum is its metric
    value and the statistic is the mean over runs; for DR it is the run's filtered curve at
    the evaluation points (the statistic: the median over points of the IQR across runs);
    for RR its filtered final value (the statistic: the CVaR across runs)."""
    if metric in PER_RUN_METRICS:
        return lambda b: np.asarray(b, dtype=np.float64).mean(axis=1)
    if metric == "DR":
        return lambda b: np.median(iqr(b, axis=1), axis=-1)
    if metric == "RR":
        return lambda b: np.asarray(cvar(b, alpha, "lower", axis=1, method=method))
    raise ValueError(f"no group statistic for {metric!r}")


def bootstrap_ci(runs: np.ndarray, statistic: GroupStatistic, *, reps: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): ``statistic`` of the runs (rows of ``runs``) with a percentile
    bootstrap interval, resampling whole runs with replacement."""
    x = np.asarray(runs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    point = float(statistic(x[None])[0])
    values = statistic(x[rng.integers(0, len(x), size=(reps, len(x)))])
    return (point, *stats.percentile_interval(values, level))


def _splits(n_a: int, n_b: int, permutations: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Index arrays (S, n_a) and (S, n_b) into the pooled runs: every split when there are
    at most ``permutations`` (exact), else ``permutations`` random ones."""
    n = n_a + n_b
    if math.comb(n, n_a) <= permutations:
        a = np.array(list(itertools.combinations(range(n), n_a)), dtype=np.int64)
        member = np.zeros((len(a), n), dtype=bool)
        np.put_along_axis(member, a, True, axis=1)
        b = np.nonzero(~member)[1].reshape(len(a), n_b)
        return a, b, True
    perm = rng.permuted(np.tile(np.arange(n), (permutations, 1)), axis=1)
    return perm[:, :n_a], perm[:, n_a:], False


def _p_value(null: np.ndarray, observed: float, exact: bool) -> float:
    """Two-sided: the fraction of the null at least as extreme as ``observed`` (an exact
    enumeration includes the observed split itself; random permutations count it once
    more, (1 + k) / (1 + S), so p is never 0)."""
    tol = 1e-12 * (1.0 + abs(observed))
    k = int(np.sum(np.abs(null) >= abs(observed) - tol))
    return k / len(null) if exact else (1 + k) / (1 + len(null))


def permutation_test(runs_a: np.ndarray, runs_b: np.ndarray, statistic: GroupStatistic, *,
                     permutations: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Two-sided permutation test of ``statistic(a) - statistic(b)``: runs are exchanged
    between the two groups (sizes kept). Returns ``difference``, ``p_value``,
    ``permutations`` (splits used) and ``exact`` (True when every split was used)."""
    a, b = np.asarray(runs_a, dtype=np.float64), np.asarray(runs_b, dtype=np.float64)
    pooled = np.concatenate([a, b])
    observed = float(statistic(a[None])[0] - statistic(b[None])[0])
    ia, ib, exact = _splits(len(a), len(b), permutations, np.random.default_rng(seed))
    null = statistic(pooled[ia]) - statistic(pooled[ib])
    return dict(difference=observed, p_value=_p_value(null, observed, exact),
                permutations=len(ia), exact=exact)


def _rank(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks along the last axis, 1 = best, ties averaged."""
    return np.asarray(sps.rankdata(-values if higher_is_better else values, axis=-1))


def mean_ranks(groups: dict[str, dict[str, np.ndarray]], statistic: GroupStatistic,
               higher_is_better: bool, *, reps: int = 2000, level: float = 0.95,
               seed: int = 0) -> pd.DataFrame:
    """The paper's summary across tasks: in each env the configs are ranked by the
    statistic of their runs (1 = best, ties averaged), and each config's ranks are
    averaged over the envs it has runs in. ``groups[env][label]`` are the runs' data.
    Columns ``label, mean_rank, mean_rank_low, mean_rank_high, n_envs, n_configs``; the
    interval resamples every config's runs within each env (a percentile bootstrap)."""
    rng = np.random.default_rng(seed)
    labels = list(dict.fromkeys(lab for per in groups.values() for lab in per))
    points: dict[str, list[float]] = {lab: [] for lab in labels}
    boots: dict[str, list[np.ndarray]] = {lab: [] for lab in labels}
    n_configs = 0
    for per in groups.values():
        names = list(per)
        n_configs = max(n_configs, len(names))
        point = np.array([statistic(per[n][None])[0] for n in names])
        boot = np.stack([statistic(per[n][rng.integers(0, len(per[n]),
                                                       size=(reps, len(per[n])))])
                         for n in names], axis=1)  # (reps, configs)
        for j, name in enumerate(names):
            points[name].append(float(_rank(point, higher_is_better)[j]))
            boots[name].append(_rank(boot, higher_is_better)[:, j])
    rows = []
    for lab in labels:
        if not points[lab]:
            continue
        low, high = stats.percentile_interval(np.mean(boots[lab], axis=0), level)
        rows.append(dict(label=lab, mean_rank=float(np.mean(points[lab])), mean_rank_low=low,
                         mean_rank_high=high, n_envs=len(points[lab]), n_configs=n_configs))
    return pd.DataFrame(rows)


def rank_permutation_test(groups: dict[str, dict[str, np.ndarray]], a: str, b: str,
                          statistic: GroupStatistic, higher_is_better: bool, *,
                          permutations: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Permutation test of the difference in mean rank over envs, ``rank(a) - rank(b)``
    (:func:`mean_ranks`; negative: a ranks better): in each env the runs of a and b are
    exchanged at random, the other configs' runs kept, and every config re-ranked.
    Uses the envs where both have runs; p is (1 + k) / (1 + permutations)."""
    rng = np.random.default_rng(seed)
    observed, null = [], []
    for per in groups.values():
        if a not in per or b not in per:
            continue
        names = list(per)
        ja, jb = names.index(a), names.index(b)
        point = np.array([statistic(per[n][None])[0] for n in names])
        r = _rank(point, higher_is_better)
        observed.append(r[ja] - r[jb])
        pooled = np.concatenate([per[a], per[b]])
        perm = rng.permuted(np.tile(np.arange(len(pooled)), (permutations, 1)), axis=1)
        values = np.tile(point, (permutations, 1))
        values[:, ja] = statistic(pooled[perm[:, :len(per[a])]])
        values[:, jb] = statistic(pooled[perm[:, len(per[a]):]])
        ranks = _rank(values, higher_is_better)
        null.append(ranks[:, ja] - ranks[:, jb])
    if not observed:
        return dict(rank_difference=math.nan, p_value=math.nan, permutations=0, n_envs=0)
    obs = float(np.mean(observed))
    return dict(rank_difference=obs, p_value=_p_value(np.mean(null, axis=0), obs, False),
                permutations=permutations, n_envs=len(observed))


# --- a study ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReliabilityParams:
    """The parameters of a study's reliability metrics.

    ``window``: DT's sliding window, in iterations of the study's typical size (the median
    env steps per iteration over its runs, ``per_steps``; a run with other iterations gets
    the same span of env steps, at least 2 differences). ``lowpass_period``: the shortest
    period, in the same iterations, that the low-pass filter of DR and RR keeps (its -3 dB
    cutoff); default ``window``, so DR and RR see the variation slower than a DT window
    and DT the faster (0: no filter). ``eval_points``: the number of evaluation points of
    DR and RR; the span of env steps that all complete runs of the env reach is cut into
    that many equal segments and each is evaluated at its centre (the paper's layout:
    windows of 100k steps evaluated at 50k, 150k, ...); default None, one segment per
    ``window`` iterations (at least one). RR's "final performance" is the filtered curve at
    the last centre, half a segment before the end: at the very end a zero-phase filter
    padded by odd extension (the paper library's and SciPy's) returns the raw last value,
    noise and all. ``alpha``: the CVaR level. ``permutations``: the most splits of a
    permutation test (all of them when there are at most this many). ``curve``: the
    per-iteration metric that is the learning curve. ``cvar``: the CVaR estimator
    (:data:`CVAR_METHODS`; default the paper's)."""

    alpha: float = ALPHA
    window: int = 20
    lowpass_period: int | None = None
    eval_points: int | None = None
    permutations: int = 2000
    curve: str = "return_mean"
    cvar: str = "paper"

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.window < 2 or self.permutations < 1 or (
                self.eval_points is not None and self.eval_points < 1):
            raise ValueError("need window >= 2, eval_points >= 1 and permutations >= 1")
        if self.cvar not in CVAR_METHODS:
            raise ValueError(f"cvar must be one of {CVAR_METHODS}, got {self.cvar!r}")


@dataclass
class _Run:
    seed: int
    steps: np.ndarray
    values: np.ndarray


def _study_runs(data: pd.DataFrame, curve: str) -> dict[tuple[str, str], list[_Run]]:
    """The complete runs' curves per (label, env): finite points, sorted by env steps."""
    out: dict[tuple[str, str], list[_Run]] = {}
    if data.empty or curve not in data or "env_steps" not in data:
        return out
    done = data[data["state"] == "complete"]
    for (label, env, seed), g in done.groupby(["label", "env", "seed"], sort=False):
        pts = g[["env_steps", curve]].astype(float).dropna().sort_values("env_steps")
        pts = pts.drop_duplicates("env_steps", keep="last")
        if len(pts) >= 3:
            out.setdefault((str(label), str(env)), []).append(_Run(
                int(seed), pts["env_steps"].to_numpy(), pts[curve].to_numpy()))
    return out


def _iteration_steps(runs: Iterable[_Run]) -> float:
    """The median over runs of each run's median env steps per iteration."""
    per = [float(np.median(np.diff(r.steps))) for r in runs]
    return float(np.median(per)) if per else 1.0


def _run_data(runs: dict[tuple[str, str], list[_Run]], params: ReliabilityParams,
              per_steps: float, grids: dict[str, list[float]]
              ) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """Each metric's per-run data (see :func:`group_statistic`) per (label, env); the
    evaluation points of DR and RR (env steps) are put in ``grids[env]``."""
    out: dict[str, dict[tuple[str, str], np.ndarray]] = {m: {} for m in CURVE_METRICS}
    period = params.window if params.lowpass_period is None else params.lowpass_period
    envs = dict.fromkeys(env for _, env in runs)
    for env in envs:
        keys = [k for k in runs if k[1] == env]
        lo = max(r.steps[0] for k in keys for r in runs[k])
        hi = min(r.steps[-1] for k in keys for r in runs[k])
        grid = None
        if hi > lo:
            k = params.eval_points or max(1, round((hi - lo) / (params.window * per_steps)))
            grid = lo + (np.arange(k) + 0.5) * (hi - lo) / k
            grids[str(env)] = [float(g) for g in grid]
        for key in keys:
            per_run: dict[str, list[Any]] = {m: [] for m in CURVE_METRICS}
            for r in runs[key]:
                step = float(np.median(np.diff(r.steps)))
                window = max(2, round(params.window * per_steps / step))
                per_run["DT"].append(dispersion_across_time(r.values, window, r.steps,
                                                            per_steps))
                per_run["SRT"].append(short_term_risk(r.values, params.alpha, r.steps,
                                                      per_steps, params.cvar))
                per_run["LRT"].append(long_term_risk(r.values, params.alpha, params.cvar))
                if grid is not None:
                    cutoff = 2 * step / (period * per_steps) if period else None
                    smooth = np.interp(grid, r.steps, lowpass(r.values, cutoff))
                    per_run["DR"].append(smooth)
                    per_run["RR"].append(smooth[-1])
            for m in PER_RUN_METRICS:
                v = np.array(per_run[m], dtype=np.float64)
                out[m][key] = v[np.isfinite(v)]
            if len(per_run["DR"]) >= 2:
                out["DR"][key] = np.stack(per_run["DR"])
                out["RR"][key] = np.array(per_run["RR"], dtype=np.float64)
    return out


def study_reliability(data: pd.DataFrame, *, pairs: Sequence[tuple[str, str]] = (),
                      params: ReliabilityParams | None = None, reps: int = 2000,
                      level: float = 0.95, seed: int = 0,
                      counts: dict[tuple[str, str], dict[str, int]] | None = None
                      ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The reliability metrics of a study from :func:`pgscope.study.analysis.load_study`'s
    rows, on its complete runs (a diverged or failed run has no curve to the end).

    Returns the tables ``reliability`` (per config, env and metric: value with its
    bootstrap interval over runs, ``n_runs``, ``few_samples``, the direction, and
    ``counts`` of that config and env when given), ``reliability_comparisons`` (per pair
    ``(a, b)`` of ``pairs``, env and metric: the difference a - b and its permutation
    p-value; with several envs a row ``env = all``: the difference in mean rank and its
    permutation p-value) and ``reliability_ranks`` (per metric and config: the mean rank
    over envs with its bootstrap interval), and the parameters and definitions for the
    summary's ``reliability`` section."""
    params = params or ReliabilityParams()
    runs = _study_runs(data, params.curve)
    per_steps = _iteration_steps(r for rs in runs.values() for r in rs)
    grids: dict[str, list[float]] = {}
    run_data = _run_data(runs, params, per_steps, grids)
    rows, comp_rows, rank_frames = [], [], []
    for m in CURVE_METRICS:
        info, stat = METRICS[m], group_statistic(m, params.alpha, params.cvar)
        for (label, env), x in run_data[m].items():
            if not len(x):
                continue
            value, low, high = bootstrap_ci(x, stat, reps=reps, level=level, seed=seed)
            rows.append(dict(label=label, env=env, metric=m, name=info.name, value=value,
                             value_low=low, value_high=high,
                             higher_is_better=info.higher_is_better, n_runs=len(x),
                             few_samples=len(x) < stats.FEW_SAMPLES,
                             **(counts or {}).get((label, env), {})))
        groups: dict[str, dict[str, np.ndarray]] = {}
        for (label, env), x in run_data[m].items():
            if len(x):
                groups.setdefault(env, {})[label] = x
        for a, b in pairs:
            for env, per in groups.items():
                if a in per and b in per:
                    res = permutation_test(per[a], per[b], stat,
                                           permutations=params.permutations, seed=seed)
                    comp_rows.append(dict(a=a, b=b, env=env, metric=m, **res,
                                          n_runs_a=len(per[a]), n_runs_b=len(per[b]),
                                          few_samples=min(len(per[a]), len(per[b]))
                                          < stats.FEW_SAMPLES))
            if len(groups) > 1:
                res = rank_permutation_test(groups, a, b, stat, info.higher_is_better,
                                            permutations=params.permutations, seed=seed)
                if res["n_envs"] > 1:
                    few_runs = any(min(len(per[a]), len(per[b])) < stats.FEW_SAMPLES
                                   for per in groups.values() if a in per and b in per)
                    comp_rows.append(dict(a=a, b=b, env="all", metric=m, **res,
                                          few_samples=few_runs))
        if groups:
            ranks = mean_ranks(groups, stat, info.higher_is_better, reps=reps, level=level,
                               seed=seed)
            few = {lab for per in groups.values() for lab, x in per.items()
                   if len(x) < stats.FEW_SAMPLES}
            ranks.insert(0, "metric", m)
            ranks["few_samples"] = ranks["label"].isin(few)
            rank_frames.append(ranks)
    tables = dict(reliability=pd.DataFrame(rows),
                  reliability_comparisons=pd.DataFrame(comp_rows),
                  reliability_ranks=(pd.concat(rank_frames, ignore_index=True)
                                     if rank_frames else pd.DataFrame()))
    section = describe(params, per_steps, level)
    section["evaluation_points"] = grids
    section["values"] = _nested(tables["reliability"], ("label", "env", "metric"),
                                ("value", "value_low", "value_high", "n_runs", "few_samples"))
    section["ranks"] = _nested(tables["reliability_ranks"], ("metric", "label"),
                               ("mean_rank", "mean_rank_low", "mean_rank_high", "n_envs",
                                "few_samples"))
    return tables, section


def _plain(v: Any) -> Any:
    """A JSON value: NumPy scalars as Python numbers, NaN as None."""
    v = v.item() if isinstance(v, np.generic) else v
    return None if isinstance(v, float) and math.isnan(v) else v


def _nested(df: pd.DataFrame, keys: tuple[str, ...], fields: tuple[str, ...]
            ) -> dict[str, Any]:
    """``df``'s ``fields`` as nested dicts keyed by the values of ``keys`` in turn."""
    out: dict[str, Any] = {}
    for rec in df.to_dict(orient="records") if not df.empty else []:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(str(rec[k]), {})
        node[str(rec[keys[-1]])] = {f: _plain(rec[f]) for f in fields if f in rec}
    return out


def describe(params: ReliabilityParams, per_steps: float, level: float = 0.95
             ) -> dict[str, Any]:
    """The parameters, units and definitions of a study's reliability metrics (the
    summary's ``reliability`` section)."""
    return dict(
        citation=CITATION, parameters=asdict(params), per_steps=per_steps, level=level,
        units=(f"DT and SRT: change of {params.curve} per {per_steps:g} env steps (the "
               "study's median iteration); LRT, DR and RR: units of "
               f"{params.curve}"),
        runs="complete runs only, each with at least 3 finite points; DR and RR need 2 "
             "runs of the config in the env",
        intervals=f"{100 * level:g}% percentile bootstrap over runs (DR and RR recomputed "
                  "on each resample); few_samples: fewer than "
                  f"{stats.FEW_SAMPLES} runs, so the interval understates the uncertainty",
        tables="values: tables.reliability (reliability.csv); comparisons: "
               "tables.reliability_comparisons; ranks: tables.reliability_ranks",
        comparisons="two-sided permutation tests exchanging runs between a and b (exact "
                    "when at most `permutations` splits); env 'all': difference in mean "
                    "rank over envs, runs exchanged within each env",
        ranks="per env, configs ranked by the metric (1 = best, ties averaged), then the "
              "mean over envs",
        metrics={k: dict(name=m.name, better="higher" if m.higher_is_better else "lower",
                         definition=m.definition) for k, m in METRICS.items()})


def format_reliability(tables: dict[str, pd.DataFrame], digits: int = 4) -> list[str]:
    """The ``reliability`` table as text lines, one per config and env, a column per
    metric (value and interval); empty when there is no such table."""
    rel = tables.get("reliability")
    if rel is None or rel.empty:
        return []
    header = ["config", "env", *(f"{m} ({'higher' if METRICS[m].higher_is_better else 'lower'}"
                                 " better)" for m in CURVE_METRICS)]
    body = []
    for (label, env), g in rel.groupby(["label", "env"], sort=False):
        cells = {r["metric"]: f"{r['value']:.{digits}g} [{r['value_low']:.{digits}g}, "
                 f"{r['value_high']:.{digits}g}]" for _, r in g.iterrows()}
        few = "!" if g["few_samples"].any() else ""
        body.append([f"{label}{few}", str(env), *(cells.get(m, "-") for m in CURVE_METRICS)])
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*row) for row in body)]
