"""Hyperparameter sensitivity of a study's sweeps (:mod:`pgscope.study.sweep`).

For each swept family (the config a ``sweep`` was declared on) and env,
:func:`sensitivity_tables` reads the score curve over the grid from the study's final
scores and aggregates and measures how sharply it peaks. With ``f`` the spec's
``[statistics] sensitivity_fraction`` (default 0.1) and each point's **mean** final score
over its complete runs (the aggregates' ``mean``, with their bootstrap CI):

- **best point**: the grid point with the highest mean (points without a complete run are
  never best); its mean with its CI.
- **P(best)**: per point, the fraction of ``reps`` bootstrap resamples (each point's
  complete runs resampled with replacement, independently per point; ties share a
  resample) in which it has the highest mean. The **best set** is the smallest set of
  points, taken in order of P(best), whose P(best) sums to at least the study's ``level``:
  a bootstrap confidence set for *which* value is best, reported as the range of its values.
- **near-best**: the points whose mean >= ``best - f |best|`` (``(1 - f) best`` when the
  best mean is positive); ``near_points`` of ``points`` (``near_fraction``).
- **region**: the near-best points connected to the best point along the grid (a run of
  neighbouring values; in 2-D, neighbours along either key); ``region_points``, its values
  from ``region_from`` to ``region_to`` per key.
- **width**: ``region_to - region_from`` in the key's units for a linear scale,
  ``log10(region_to / region_from)`` (decades) for a log scale; ``span`` the same over the
  whole grid and ``width_relative = width / span``. 0 means only the best point is within
  ``f`` (the grid's spacing is the resolution). Its CI, and that of ``near_fraction``, is the
  percentile interval of the same quantity recomputed on each bootstrap resample.
- **failure rate** per point: the aggregates' (diverged and failed runs and runs below the
  env's failure threshold, Wilson CI).

Mean-based, like the aggregates' mean: diverged and failed runs are left out of the curve
and counted in each point's run counts and failure rate.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from pgscope import seed_statistics as stats
from pgscope.study.analysis import _table
from pgscope.study.spec import StudySpec
from pgscope.study.sweep import SweepSpec, format_value

#: The definitions of the sensitivity figures, written to summary.json and the report.
DEFINITIONS = {
    "curve": "each grid point's mean final score over its complete runs with the "
             "aggregates' stratified bootstrap CI, and its failure rate (Wilson CI)",
    "best": "the grid point with the highest mean (a point without a complete run is never "
            "best), with the CI of its mean",
    "p_best": "the fraction of bootstrap resamples (each point's complete runs resampled "
              "independently) in which a point has the highest mean; ties share a resample",
    "best_set": "the fewest points, in order of P(best), whose P(best) sums to >= level: a "
                "confidence set for which value is best (best_set_from .. best_set_to)",
    "near_best": "points whose mean >= best - f |best| ((1 - f) x best for a positive best)",
    "region": "the near-best points connected to the best point through neighbouring grid "
              "points (along either key in 2-D); region_from .. region_to per key",
    "width": "region_to - region_from in the key's units (linear scale) or "
             "log10(region_to / region_from) in decades (log scale); 0 = only the best point; "
             "width_relative = width / span of the whole grid; CIs: percentile intervals of "
             "the same figure on the bootstrap resamples",
}
_NAN = math.nan


def _units(scale: str, low: float, high: float) -> float:
    """The distance from ``low`` to ``high`` on ``scale`` (decades for log)."""
    if scale == "log":
        return math.log10(high / low)
    return float(high - low)


def _region(near: np.ndarray, best: int, shape: tuple[int, ...]) -> list[int]:
    """Flat indices of the near-best points connected to ``best`` on a grid of ``shape``
    (neighbours differ by one step along one key)."""
    if not near[best]:
        return [best]
    seen, queue = {best}, deque([best])
    while queue:
        here = np.unravel_index(queue.popleft(), shape)
        for axis in range(len(shape)):
            for step in (-1, 1):
                there = list(here)
                there[axis] += step
                if 0 <= there[axis] < shape[axis]:
                    flat = int(np.ravel_multi_index(tuple(there), shape))
                    if flat not in seen and near[flat]:
                        seen.add(flat)
                        queue.append(flat)
    return sorted(seen)


def _extent(sweep: SweepSpec, points: list[int], axis: int) -> tuple[float, float, float]:
    """(from, to, width) of ``points`` (flat indices) along key ``axis``."""
    grid = sweep.grids[axis]
    idx = [int(np.unravel_index(p, sweep.shape)[axis]) for p in points]
    low, high = grid[min(idx)], grid[max(idx)]
    return float(low), float(high), _units(sweep.scales[axis], low, high)


def _near(means: np.ndarray, fraction: float) -> tuple[np.ndarray, int, float]:
    """(near-best mask, index of the best, threshold) of one vector of means (NaN: no
    score)."""
    best = int(np.nanargmax(means))
    top = float(means[best])
    threshold = top - fraction * abs(top)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(means, nan=-np.inf) >= threshold, best, threshold


def _bootstrap_means(samples: list[np.ndarray], reps: int, seed: int) -> np.ndarray:
    """(reps, points) bootstrap means, each point's runs resampled independently; NaN for
    a point without runs."""
    rng = np.random.default_rng(seed)
    out = np.full((reps, len(samples)), np.nan)
    for j, x in enumerate(samples):
        if len(x):
            out[:, j] = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)
    return out


def _family(spec: StudySpec, sweep: SweepSpec, env: str, scores: pd.DataFrame,
            agg: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    st = spec.statistics
    f = st.sensitivity_fraction
    points = sweep.points()
    done = scores[(scores["env"] == env) & (scores["outcome"] == "complete")]
    samples = [done.loc[done["label"] == label, "score"].to_numpy(dtype=np.float64)
               for label, _ in points]
    means = np.array([float(np.mean(x)) if len(x) else _NAN for x in samples])
    if not np.isfinite(means).any():
        return None
    near, best, threshold = _near(means, f)
    region = _region(near, best, sweep.shape)
    boot = _bootstrap_means(samples, st.reps, st.seed)
    top = np.nanmax(boot, axis=1, keepdims=True)
    is_best = boot == top
    p_best = (is_best / is_best.sum(axis=1, keepdims=True)).mean(axis=0)
    near_frac_b: list[float] = []
    widths_b: list[list[float]] = [[] for _ in sweep.keys]
    for means_b in boot:
        nb, bb, _ = _near(means_b, f)
        near_frac_b.append(nb.mean())
        reg = _region(nb, bb, sweep.shape)
        for axis in range(len(sweep.keys)):
            widths_b[axis].append(_extent(sweep, reg, axis)[2])
    order = np.argsort(-p_best, kind="stable")
    cumulative = np.cumsum(p_best[order])
    best_set = sorted(order[:int(np.searchsorted(cumulative, st.level - 1e-12)) + 1].tolist())

    label_b, values_b = points[best]
    row: dict[str, Any] = dict(
        env=env, family=sweep.family, preset=sweep.preset, keys=" x ".join(sweep.keys),
        points=len(points), points_scored=int(np.isfinite(means).sum()),
        best_label=label_b, best_mean=float(means[best]),
        best_mean_low=agg.get(label_b, {}).get("mean_low", _NAN),
        best_mean_high=agg.get(label_b, {}).get("mean_high", _NAN),
        best_p=float(p_best[best]), best_set_points=len(best_set), fraction=f,
        threshold=threshold, near_points=int(near.sum()),
        near_fraction=float(near.mean()),
        **dict(zip(("near_fraction_low", "near_fraction_high"),
                   stats.percentile_interval(np.array(near_frac_b), st.level), strict=True)),
        region_points=len(region), region_fraction=len(region) / len(points))
    for axis, key in enumerate(sweep.keys):
        sfx = "" if axis == 0 else str(axis + 1)
        grid, scale = sweep.grids[axis], sweep.scales[axis]
        r_from, r_to, width = _extent(sweep, region, axis)
        s_from, s_to, _ = _extent(sweep, best_set, axis)
        span = _units(scale, grid[0], grid[-1])
        w_low, w_high = stats.percentile_interval(np.array(widths_b[axis]), st.level)
        row.update({f"key{sfx}": key, f"scale{sfx}": scale,
                    f"best_value{sfx}": values_b[axis],
                    f"best_set_from{sfx}": s_from, f"best_set_to{sfx}": s_to,
                    f"region_from{sfx}": r_from, f"region_to{sfx}": r_to,
                    f"width{sfx}": width, f"width{sfx}_low": w_low, f"width{sfx}_high": w_high,
                    f"width{sfx}_unit": "decades" if scale == "log" else f"{key} units",
                    f"span{sfx}": span,
                    f"width{sfx}_relative": width / span if span > 0 else _NAN})
    curve = []
    for j, (label, values) in enumerate(points):
        a = agg.get(label, {})
        point: dict[str, Any] = dict(env=env, family=sweep.family, label=label)
        for axis, key in enumerate(sweep.keys):
            sfx = "" if axis == 0 else str(axis + 1)
            point.update({f"key{sfx}": key, f"value{sfx}": values[axis]})
        point.update({k: a.get(k, _NAN) for k in (
            "n", "n_complete", "n_diverged", "n_failed", "n_missing", "mean", "mean_low",
            "mean_high", "std", "failure_rate", "failure_rate_low", "failure_rate_high")})
        point.update(p_best=float(p_best[j]), best=j == best, near_best=bool(near[j]),
                     in_region=j in region, in_best_set=j in best_set)
        curve.append(point)
    scored = [p["n"] - p["n_missing"] for p in curve if not pd.isna(p["n"])]
    row["few_samples"] = bool(not scored or min(scored) < stats.FEW_SAMPLES)
    for p in curve:
        p["few_samples"] = bool(pd.isna(p["n"]) or p["n"] - p["n_missing"] < stats.FEW_SAMPLES)
    return row, curve


def sensitivity_tables(spec: StudySpec, scores: pd.DataFrame, aggregates: pd.DataFrame
                       ) -> dict[str, pd.DataFrame]:
    """The tables ``sensitivity`` (one row per family and env: best point, P(best), best
    set, near-best points, region and width with CIs) and ``sensitivity_curve`` (one row
    per grid point: values, counts, mean with CI, failure rate, P(best), membership);
    ``scores`` with outcomes (:func:`pgscope.study.analysis.with_outcomes`)."""
    rows, curve = [], []
    for env in spec.envs:
        agg = {str(r["label"]): r.to_dict() for _, r in
               aggregates[aggregates["env"] == env].iterrows()} if not aggregates.empty else {}
        for sweep in spec.sweeps:
            got = _family(spec, sweep, env, scores, agg)
            if got is not None:
                rows.append(got[0])
                curve += got[1]
    return dict(sensitivity=pd.DataFrame(rows), sensitivity_curve=pd.DataFrame(curve))


def sensitivity_meta(spec: StudySpec) -> dict[str, Any]:
    """The summary's ``sensitivity`` section: the settings, every sweep and the
    definitions of the figures."""
    st = spec.statistics
    return dict(fraction=st.sensitivity_fraction, level=st.level, reps=st.reps, seed=st.seed,
                sweeps=[dict(family=s.family, preset=s.preset, keys=list(s.keys),
                             scales=list(s.scales), grids=[list(g) for g in s.grids],
                             labels=list(s.labels)) for s in spec.sweeps],
                definitions=dict(DEFINITIONS))


def _g(v: Any, fmt: str = "{:.4g}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def key_rows(sens: pd.DataFrame) -> Iterator[tuple[pd.Series, str, bool]]:
    """The rows of the sensitivity table: per swept family and env, one per swept key, as
    ``(row, suffix, first)``: the suffix picks the key's columns ("" for the first key, "2"
    for the second of two crossed keys) and ``first`` marks the family's first row, which
    alone carries the columns common to both keys."""
    for _, r in sens.iterrows():
        for sfx in ("", "2") if isinstance(r.get("key2"), str) else ("",):
            yield r, sfx, sfx == ""


def format_sensitivity(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> list[str]:
    """The sensitivity tables as plain text lines (part of ``pgscope study summary``)."""
    sens, curve = tables.get("sensitivity"), tables.get("sensitivity_curve")
    info = meta["sensitivity"]
    level = 100 * info["level"]
    lines = [f"hyperparameter sensitivity (sweeps; * = complete runs only; near-best: mean* >= "
             f"best - {info['fraction']:g} |best|; P(best): share of {info['reps']} bootstrap "
             f"resamples in which the point is best; best set: {level:g}% of them; width of "
             "the near-best region around the best point: decades for log sweeps)"]
    if sens is None or sens.empty:
        return [*lines, "  no swept point has a complete run yet"]
    rows = []
    for r, sfx, first in key_rows(sens):
        rows.append([
            r["family"] + ("!" if r["few_samples"] and first else "") if first else "",
            r["env"] if first else "", r[f"key{sfx}"], format_value(r[f"best_value{sfx}"]),
            (f"{r['best_mean']:.1f} [{r['best_mean_low']:.1f}, {r['best_mean_high']:.1f}]"
             if first else ""), f"{r['best_p']:.2f}" if first else "",
            f"{format_value(r[f'best_set_from{sfx}'])}..{format_value(r[f'best_set_to{sfx}'])}"
            + (f" ({int(r['best_set_points'])})" if first else ""),
            f"{int(r['near_points'])}/{int(r['points'])}" if first else "",
            f"{format_value(r[f'region_from{sfx}'])}..{format_value(r[f'region_to{sfx}'])}",
            f"{r[f'width{sfx}']:.2f} [{_g(r[f'width{sfx}_low'], '{:.2f}')}, "
            f"{_g(r[f'width{sfx}_high'], '{:.2f}')}] {r[f'width{sfx}_unit']} "
            f"(of {r[f'span{sfx}']:.3g})"])
    lines += _table(["family", "env", "key", "best value", "best mean*", "P(best)",
                     "best set (points)", "near-best", "region", "width [CI] (of span)"], rows)
    if curve is not None and not curve.empty:
        lines += ["", "sensitivity curves (B = best, + = in the near-best region, ~ = "
                  "near-best elsewhere; runs: complete/diverged/failed/missing of n)"]
        rows = []
        for _, p in curve.iterrows():
            value = format_value(p["value"])
            if isinstance(p.get("key2"), str):
                value = f"{value}, {p['key2']}={format_value(p['value2'])}"
            mark = "B" if p["best"] else "+" if p["in_region"] else "~" if p["near_best"] \
                else ""
            runs = "-" if pd.isna(p["n"]) else (
                "/".join(str(int(p[c])) for c in ("n_complete", "n_diverged", "n_failed",
                                                  "n_missing")) + f" of {int(p['n'])}")
            rows.append([p["family"], p["env"], f"{p['key']}={value}", runs,
                         "-" if pd.isna(p["mean"]) else
                         f"{p['mean']:.1f} [{p['mean_low']:.1f}, {p['mean_high']:.1f}]",
                         "-" if pd.isna(p["failure_rate"]) else f"{p['failure_rate']:.2f}",
                         f"{p['p_best']:.2f}", mark])
        lines += _table(["family", "env", "point", "runs", "mean*", "failure rate",
                         "P(best)", ""], rows)
    return lines
