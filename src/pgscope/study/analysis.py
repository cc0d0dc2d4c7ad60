"""From a study directory to tidy data and tables (``pgscope study summary``).

:func:`load_study` gives every metrics line of every run as one pandas DataFrame;
:func:`summarize` computes the tables of SPEC.md section 4 from it with :mod:`pgscope.stats`;
:func:`write_summary` writes them as CSV and JSON (plus PNG plots) and returns them.

Scores: a run's final score is defined by the study's ``[score]`` table (recorded in the
output). Only complete runs are scored. A diverged run (NaN/Inf) has no score and counts as
a failure; runs not yet finished are listed as missing and left out.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pgscope import stats
from pgscope.run import RunDir, atomic_write_json
from pgscope.study.runner import FINISHED, open_study, run_state
from pgscope.study.spec import StudySpec

RUN_COLUMNS = ["label", "env", "seed", "preset", "state"]


def load_study(path: str | Path) -> pd.DataFrame:
    """One row per run and iteration: ``label, env, seed, preset, state`` and every
    per-iteration metric (``iteration, env_steps, return_mean, kl_mean, ...``)."""
    return _load(open_study(path), Path(path))


def _load(spec: StudySpec, path: Path) -> pd.DataFrame:
    frames = []
    for r in spec.runs():
        run_path = path / r.rel_path
        state = run_state(run_path)
        records = RunDir(run_path).read_metrics() if state != "new" else []
        if records:
            run = dict(zip(RUN_COLUMNS, (r.label, r.env_id, r.seed, r.config.preset, state),
                           strict=True))
            frames.append(pd.DataFrame([{**run, **rec} for rec in records]))
    if not frames:
        return pd.DataFrame(columns=[*RUN_COLUMNS, "iteration", "env_steps", "return_mean"])
    return pd.concat(frames, ignore_index=True)


def final_scores(spec: StudySpec, data: pd.DataFrame) -> pd.DataFrame:
    """One row per run of the spec: its state and final score (NaN unless complete)."""
    rows = []
    by_run = {k: g for k, g in data.groupby(["label", "env", "seed"], sort=False)}
    for r in spec.runs():
        g = by_run.get((r.label, r.env_id, r.seed))
        state = "new" if g is None else str(g["state"].iloc[0])
        planned = r.config.num_iterations
        window = spec.score.window(planned)
        score = math.nan
        if state == "complete":
            tail = g[g["iteration"] > planned - window]["return_mean"].astype(float)
            score = float(tail.mean()) if tail.notna().any() else math.nan
        rows.append(dict(label=r.label, env=r.env_id, seed=r.seed, state=state,
                         iterations=0 if g is None else int(g["iteration"].max()),
                         planned_iterations=planned, window=window, score=score))
    return pd.DataFrame(rows)


def _ci(prefix: str, triple: tuple[float, float, float]) -> dict[str, float]:
    return {prefix: triple[0], f"{prefix}_low": triple[1], f"{prefix}_high": triple[2]}


def aggregates(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """Per config and env: IQM/median/mean with stratified bootstrap CIs, the failure rate
    with a Wilson CI, and the seeds needed to detect the study's relative difference."""
    st = spec.statistics
    rows = []
    for (label, env), g in scores.groupby(["label", "env"], sort=False):
        finished = g[g["state"].isin(FINISHED)]
        x = finished["score"].dropna().to_numpy()
        row: dict[str, Any] = dict(label=label, env=env, runs=len(x),
                                   diverged=int((finished["state"] == "diverged").sum()),
                                   missing=int(len(g) - len(finished)))
        if len(x):
            for name, fn in (("iqm", stats.iqm), ("median", stats.median), ("mean", stats.mean)):
                row.update(_ci(name, stats.stratified_bootstrap_ci(
                    x, fn, reps=st.reps, level=st.level, seed=st.seed)))
            row["std"] = float(np.std(x, ddof=1)) if len(x) > 1 else math.nan
        threshold = spec.score.failure_threshold.get(env)
        if len(finished):  # a diverged run (NaN score) counts as a failure
            row.update(_ci("failure_rate", stats.failure_rate(
                finished["score"].to_numpy(), -math.inf if threshold is None else threshold,
                st.level)), failure_threshold=threshold)
        if len(x) > 1 and row["std"] > 0 and row["mean"] != 0:
            row["seeds_needed"] = stats.seeds_needed(
                row["std"], st.relative_difference * abs(row["mean"]), alpha=st.alpha,
                power=st.power)
        rows.append(row)
    return pd.DataFrame(rows)


def _pairs(spec: StudySpec) -> list[tuple[str, str]]:
    if spec.statistics.compare == "all":
        return list(itertools.combinations(spec.labels, 2))
    return [(label, spec.baseline) for label in spec.labels if label != spec.baseline]


def _compare(x: np.ndarray, y: np.ndarray, spec: StudySpec) -> dict[str, float]:
    st = spec.statistics
    row = dict(n_a=len(x), n_b=len(y))
    if len(x) < 2 or len(y) < 2:
        return row
    row.update(mean_a=float(np.mean(x)), mean_b=float(np.mean(y)),
               difference=float(np.mean(x) - np.mean(y)))
    row.update(_ci("prob_improvement", stats.probability_of_improvement_ci(
        x, y, reps=st.reps, level=st.level, seed=st.seed)))
    row["welch_t"], row["welch_p"] = stats.welch_t_test(x, y)
    row["mannwhitney_u"], row["mannwhitney_p"] = stats.mann_whitney(x, y)
    return row


def comparisons(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """Config a vs config b per env: P(a > b) with CI (rliable's definition), Welch's t and
    Mann-Whitney U. With several envs a row 'all' averages P(a > b) over envs (it is
    scale-free, so averaging across tasks is meaningful)."""
    ok = scores.dropna(subset=["score"])
    rows = []
    for a, b in _pairs(spec):
        per_env_x, per_env_y = [], []
        for env in spec.envs:
            x = ok[(ok["label"] == a) & (ok["env"] == env)]["score"].to_numpy()
            y = ok[(ok["label"] == b) & (ok["env"] == env)]["score"].to_numpy()
            rows.append(dict(a=a, b=b, env=env, **_compare(x, y, spec)))
            per_env_x.append(x)
            per_env_y.append(y)
        same_n = len({len(v) for v in per_env_x}) == 1 and len({len(v) for v in per_env_y}) == 1
        if len(spec.envs) > 1 and same_n and len(per_env_x[0]) > 1 and len(per_env_y[0]) > 1:
            st = spec.statistics
            rows.append(dict(a=a, b=b, env="all", **_ci(
                "prob_improvement", stats.probability_of_improvement_ci(
                    np.stack(per_env_x, 1), np.stack(per_env_y, 1), reps=st.reps,
                    level=st.level, seed=st.seed))))
    return pd.DataFrame(rows)


def _factor_levels(spec: StudySpec, factor: str, labels: pd.Series
                   ) -> tuple[list[Any], pd.Series]:
    """The factor's levels in spec order, and each row's level (from its config label)."""
    level_of = {c.label: c.overrides[factor] for c in spec.configs}
    return list(dict.fromkeys(level_of.values())), labels.map(level_of)


def main_effects(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """For a factorial study: each factor's level against its first level, pooled over all
    other factors (a = this level, b = the reference level)."""
    rows = []
    ok = scores.dropna(subset=["score"])
    for factor in spec.factors:
        for env in spec.envs:
            e = ok[ok["env"] == env]
            levels, values = _factor_levels(spec, factor, e["label"])
            ref = e[values == levels[0]]["score"].to_numpy()
            for level in levels[1:]:
                x = e[values == level]["score"].to_numpy()
                rows.append(dict(factor=factor, level=level, reference=levels[0], env=env,
                                 **_compare(x, ref, spec)))
    return pd.DataFrame(rows)


def lottery(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """The seed lottery for every config and env with at least 4 scored runs; the most
    extreme split's first group is given as seeds (``worst_split_seeds``)."""
    st = spec.statistics
    rows = []
    for (label, env), g in scores.dropna(subset=["score"]).groupby(["label", "env"],
                                                                    sort=False):
        if len(g) >= 4:
            res = stats.seed_lottery(g["score"].to_numpy(), splits=st.lottery_splits,
                                     alpha=st.alpha, seed=st.seed)
            seeds = g["seed"].to_numpy()
            res["worst_split_seeds"] = [int(seeds[i]) for i in res.pop("worst_split")]
            rows.append(dict(label=label, env=env, **res))
    return pd.DataFrame(rows)


def lottery_curves(spec: StudySpec, data: pd.DataFrame, lot: pd.DataFrame,
                   points: int = 50) -> pd.DataFrame:
    """Learning curves of the two seed groups of each config's most extreme split."""
    rows = []
    done = data[data["state"] == "complete"]
    for _, r in lot.iterrows():
        g = done[(done["label"] == r["label"]) & (done["env"] == r["env"])]
        in_a = g["seed"].isin(r["worst_split_seeds"])
        for name, part in (("group A", g[in_a]), ("group B", g[~in_a])):
            seeds = ", ".join(str(x) for x in sorted(part["seed"].unique()))
            rows += [dict(label=r["label"], env=r["env"], group=f"{name}: seeds {seeds}", **row)
                     for row in _curve_ci_rows(part, spec, points)]
    return pd.DataFrame(rows)


def _curve_ci_rows(g: pd.DataFrame, spec: StudySpec, points: int) -> list[dict[str, Any]]:
    """Mean curve with bootstrap CI over the runs (label, seed) in ``g``."""
    st = spec.statistics
    wide = g.pivot_table(index="env_steps", columns=["label", "seed"], values="return_mean",
                         dropna=False).sort_index().ffill().dropna()
    if wide.empty:
        return []
    keep = np.unique(np.linspace(0, len(wide) - 1, min(points, len(wide))).round().astype(int))
    wide = wide.iloc[keep]
    m, lo, hi = stats.curve_ci(wide.to_numpy().T, reps=st.reps, level=st.level, seed=st.seed)
    return [dict(env_steps=int(steps), mean=a, low=b, high=c, runs=wide.shape[1])
            for steps, a, b, c in zip(wide.index, m, lo, hi, strict=True)]


def curves(spec: StudySpec, data: pd.DataFrame, points: int = 50) -> pd.DataFrame:
    """Mean learning curve (return vs env steps) of complete runs with a bootstrap CI
    over runs, per config and env, on at most ``points`` evenly spaced iterations."""
    done = data[data["state"] == "complete"]
    return pd.DataFrame([dict(label=label, env=env, **row)
                         for (label, env), g in done.groupby(["label", "env"], sort=False)
                         for row in _curve_ci_rows(g, spec, points)])


def factor_curves(spec: StudySpec, data: pd.DataFrame, points: int = 50) -> pd.DataFrame:
    """For a factorial study: learning curves per level of each factor, pooled over the
    other factors (all runs with that level)."""
    done = data[data["state"] == "complete"]
    rows = []
    for factor in spec.factors:
        levels, values = _factor_levels(spec, factor, done["label"])
        for level in levels:
            for env, g in done[values == level].groupby("env", sort=False):
                rows += [dict(factor=factor, level=str(level), env=env, **row)
                         for row in _curve_ci_rows(g, spec, points)]
    return pd.DataFrame(rows)


def profiles(spec: StudySpec, scores: pd.DataFrame, points: int = 41) -> pd.DataFrame:
    """Performance profiles per env: fraction of runs scoring above tau, with CIs."""
    st = spec.statistics
    rows = []
    ok = scores.dropna(subset=["score"])
    for env in spec.envs:
        e = ok[ok["env"] == env]
        if e.empty:
            continue
        taus = np.linspace(e["score"].min(), e["score"].max(), points)
        for label, g in e.groupby("label", sort=False):
            p, lo, hi = stats.performance_profile_ci(g["score"].to_numpy(), taus,
                                                     reps=st.reps, level=st.level,
                                                     seed=st.seed)
            rows += [dict(label=label, env=env, tau=t, fraction=a, low=b, high=c)
                     for t, a, b, c in zip(taus, p, lo, hi, strict=True)]
    return pd.DataFrame(rows)


def summarize(path: str | Path) -> dict[str, Any]:
    """Every table of a study as DataFrames, plus the settings they were computed with."""
    path = Path(path)
    spec = open_study(path)
    data = _load(spec, path)
    scores = final_scores(spec, data)
    tables = dict(scores=scores, aggregates=aggregates(spec, scores),
                  comparisons=comparisons(spec, scores), curves=curves(spec, data),
                  profiles=profiles(spec, scores))
    if spec.factors:
        tables["main_effects"] = main_effects(spec, scores)
        tables["factor_curves"] = factor_curves(spec, data)
    if spec.statistics.lottery_splits > 0:
        tables["lottery"] = lottery(spec, scores)
        tables["lottery_curves"] = lottery_curves(spec, data, tables["lottery"])
    return dict(spec=spec, tables=tables, meta=dict(
        study=spec.name, spec_hash=spec.hash(), description=spec.description,
        score_definition=spec.score.describe(), score=spec.score.__dict__,
        statistics=spec.statistics.__dict__, baseline=spec.baseline,
        runs=len(scores), complete=int((scores["state"] == "complete").sum()),
        diverged=int((scores["state"] == "diverged").sum()),
        missing=scores[~scores["state"].isin(FINISHED)][
            ["label", "env", "seed", "state"]].to_dict("records")))


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe records (NaN -> null)."""
    return json.loads(df.to_json(orient="records"))


def write_summary(path: str | Path, out: str | Path | None = None, plots: bool = True
                  ) -> dict[str, Any]:
    """Write every table as CSV and all of them as one JSON (and PNG plots) to ``out``
    (default ``DIR/summary``); returns what :func:`summarize` returns plus the files."""
    path = Path(path)
    result = summarize(path)
    out = Path(out) if out is not None else path / "summary"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, df in result["tables"].items():
        df.to_csv(out / f"{name}.csv", index=False)
        files.append(out / f"{name}.csv")
    atomic_write_json(out / "summary.json", dict(
        **result["meta"], tables={k: _records(v) for k, v in result["tables"].items()}))
    files.append(out / "summary.json")
    if plots:
        from pgscope.study.plots import plot_summary

        files += plot_summary(result, out)
    result["files"] = files
    return result


def _iv(row: Any, key: str, fmt: str = "{:.1f}") -> str:
    v = row.get(key) if hasattr(row, "get") else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{fmt.format(v)} [{fmt.format(row[key + '_low'])}, {fmt.format(row[key + '_high'])}]"


def format_summary(result: dict[str, Any]) -> str:
    """The tables of :func:`summarize` as plain text (what ``pgscope study summary`` prints)."""
    meta, t = result["meta"], result["tables"]
    level = 100 * meta["statistics"]["level"]
    lines = [f"study {meta['study']}: {meta['complete']}/{meta['runs']} runs complete, "
             f"{meta['diverged']} diverged, {len(meta['missing'])} missing",
             f"final score: {meta['score_definition']}; intervals: {level:g}% stratified "
             f"bootstrap ({meta['statistics']['reps']} resamples, seed "
             f"{meta['statistics']['seed']})",
             "failure rate (Wilson CI): diverged runs and runs below the env's failure "
             f"threshold ({_thresholds(meta)})", ""]
    agg = t["aggregates"]
    rows = [[r["label"], r["env"], str(r["runs"]), _iv(r, "iqm"), _iv(r, "median"),
             _iv(r, "mean"), _iv(r, "failure_rate", "{:.2f}"),
             "-" if pd.isna(r.get("seeds_needed", math.nan)) else str(int(r["seeds_needed"]))]
            for _, r in agg.iterrows()]
    rd = meta["statistics"]["relative_difference"]
    lines += _table(["config", "env", "n", "IQM", "median", "mean", "failure rate",
                     f"seeds for {100 * rd:g}%"], rows)
    for name, title, key in (("comparisons", "comparisons (a vs b)", ("a", "b")),
                             ("main_effects", "main effects (level vs reference, pooled)",
                              ("factor", "level"))):
        df = t.get(name)
        if df is None or df.empty:
            continue
        rows = []
        for _, r in df.iterrows():
            first = f"{r[key[0]]}={r[key[1]]}" if name == "main_effects" else \
                f"{r['a']} vs {r['b']}"
            diff = "-" if pd.isna(r.get("difference", math.nan)) else f"{r['difference']:+.1f}"
            p_w, p_m = _p(r.get("welch_p", math.nan)), _p(r.get("mannwhitney_p", math.nan))
            rows.append([first, r["env"], diff, _iv(r, "prob_improvement", "{:.2f}"), p_w, p_m])
        lines += ["", title]
        lines += _table(["", "env", "mean diff", "P(a > b)", "Welch p", "Mann-Whitney p"], rows)
    lot = t.get("lottery")
    if lot is not None and not lot.empty:
        lines += ["", "seed lottery (one config's seeds split in two halves)"]
        lines += _table(["config", "env", "runs", "splits", "significant", "max |t|", "min p"],
                        [[r["label"], r["env"], str(r["runs"]), str(r["splits"]),
                          f"{100 * r['fraction_significant']:.1f}% (p < {r['alpha']:g})",
                          f"{r['max_abs_t']:.2f}", f"{r['min_p']:.4f}"]
                         for _, r in lot.iterrows()])
    return "\n".join(lines)


def _thresholds(meta: dict[str, Any]) -> str:
    given = meta["score"]["failure_threshold"]
    if not given:
        return "none set, so only divergence counts"
    return ", ".join(f"{env} < {thr:g}" for env, thr in given.items())


def _p(p: float) -> str:
    if pd.isna(p):
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + \
        [fmt.format(*r) for r in rows]
