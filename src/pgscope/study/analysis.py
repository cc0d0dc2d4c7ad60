"""From a study directory to tidy data and tables (``pgscope study summary``).

:func:`load_study` gives every metrics line of every run as one pandas DataFrame;
:func:`summarize` computes the tables of docs/design.md section 4 from it with
:mod:`pgscope.seed_statistics`;
:func:`write_summary` writes them as CSV and JSON (plus PNG plots) and returns them.

Scores: a run's final score is defined by the study's ``[score]`` table (recorded in the
output), or by a named rule (:data:`pgscope.study.spec.SCORE_RULES`) given to
:func:`summarize`: ``"engstrom-code"``, each run's mean return over its last 5 iterations
(the authors' run.py), ``"last-10"`` (alias ``"paper"``) over its last 10, or
``"eval-last"``, the return of its last evaluation during training (``eval_return``, config
``eval_every``); then the mean over runs with its CI. Every planned run has one of four
outcomes (:data:`OUTCOME_RULE`, stated in every summary):

- **complete**: finished, with a score;
- **diverged**: stopped by NaN/Inf (``status.json`` "diverged");
- **failed**: training stopped by an error (``status.json`` "failed"); the next
  ``pgscope study run`` resumes it, so this outcome can still change;
- **missing**: not finished (never started, running, or interrupted), or complete but
  without any episode ending in the score window.

Diverged and failed runs count as failures. Rank-based statistics (IQM, median,
probability of improvement, Mann-Whitney U, performance profiles) enter them as the worst
possible score, -inf (their ``rank_score``), so they are never silently dropped; mean-based
ones (mean, std, Welch's t, seeds needed, the seed lottery) cannot use -inf and are
computed on the complete runs, with the number left out next to them. Missing runs are
listed and never counted.

Every aggregate and comparison row carries ``n`` (planned runs), ``n_complete``,
``n_diverged``, ``n_failed`` and ``n_missing`` (suffixed ``_a``/``_b`` for the two sides of
a comparison). ``summary.json`` and the CSV files keep full float precision.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pgscope import seed_statistics as stats
from pgscope.reliability import format_reliability, study_reliability
from pgscope.run import RunDir, atomic_write_json
from pgscope.study.runner import FAILED, FINISHED, open_study, run_state
from pgscope.study.spec import ScoreSpec, StudySpec, check_score_inputs

RUN_COLUMNS = ["label", "env", "seed", "preset", "state"]

#: The rule by which runs that did not complete enter the statistics (one sentence, printed
#: in the summary header and written to summary.json).
OUTCOME_RULE = (
    "a diverged (NaN/Inf) or failed (stopped by an error, retried by the next study run) "
    "run counts as a failure: rank statistics (IQM, median, P(a > b), Mann-Whitney U, "
    "performance profiles) place it below every completed run (score -inf, ties among such "
    "runs count one half), mean statistics (mean, std, Welch's t, seeds needed, seed "
    "lottery) use the completed runs only and show how many runs they leave out, and "
    "unfinished runs are listed as missing and never counted.")
#: The run counts on every aggregate row (comparison rows: suffixed _a and _b).
COUNT_COLUMNS = ("n", "n_complete", "n_diverged", "n_failed", "n_missing")
#: Outcomes that count as failures and rank below every completed run.
FAILURES = ("diverged", FAILED)


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
    """One row per run of the spec: its state, final score (NaN unless complete), outcome
    and ``rank_score`` (see :func:`with_outcomes`)."""
    rows = []
    by_run = {k: g for k, g in data.groupby(["label", "env", "seed"], sort=False)}
    for r in spec.runs():
        g = by_run.get((r.label, r.env_id, r.seed))
        state = "new" if g is None else str(g["state"].iloc[0])
        planned = r.config.num_iterations
        window = spec.score.window(planned)
        score = math.nan
        if g is not None and state == "complete" and spec.score.last_evaluations is not None:
            score = _evaluation_score(g, window)
        elif g is not None and state == "complete":
            tail = g[g["iteration"] > planned - window]["return_mean"].astype(float)
            score = float(tail.mean()) if tail.notna().any() else math.nan
        rows.append(dict(label=r.label, env=r.env_id, seed=r.seed, state=state,
                         iterations=0 if g is None else int(g["iteration"].max()),
                         planned_iterations=planned, window=window, score=score))
    return with_outcomes(pd.DataFrame(rows))


def _evaluation_score(g: pd.DataFrame, last: int) -> float:
    """The mean ``eval_return`` of a run's last ``last`` evaluations during training (the
    lines with ``eval_episodes``); NaN when it has none, or only null returns."""
    if "eval_episodes" not in g or "eval_return" not in g:
        return math.nan
    evals = g[g["eval_episodes"].notna()].sort_values("iteration").tail(last)
    values = evals["eval_return"].astype(float)
    return float(values.mean()) if values.notna().any() else math.nan


def with_outcomes(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` (columns ``state`` and ``score``) with the columns ``outcome`` (complete /
    diverged / failed / missing) and ``rank_score`` (the score; -inf for a failure; NaN if
    missing) of the outcome rule (:data:`OUTCOME_RULE`) added or recomputed."""
    out = scores.copy()
    state, score = out["state"].astype(str), out["score"].astype(float)
    scored = (state == "complete") & np.isfinite(score)
    failure = state.isin(FAILURES)
    out["outcome"] = np.where(scored, "complete", np.where(failure, state, "missing"))
    out["rank_score"] = np.where(scored, score, np.where(failure, -np.inf, np.nan))
    return out


def _counts(g: pd.DataFrame, suffix: str = "") -> dict[str, int]:
    """n (planned), n_complete, n_diverged, n_failed, n_missing of the runs in ``g``."""
    outcome = g["outcome"]
    return {f"{col}{suffix}": len(g) if col == "n" else int((outcome == col[2:]).sum())
            for col in COUNT_COLUMNS}


def _ranked(g: pd.DataFrame) -> np.ndarray:
    """Scores for rank statistics: complete runs' scores and -inf for failures."""
    return g.loc[g["outcome"] != "missing", "rank_score"].to_numpy(dtype=np.float64)


def _completed(g: pd.DataFrame) -> np.ndarray:
    """Scores for mean statistics: the complete runs only."""
    return g.loc[g["outcome"] == "complete", "score"].to_numpy(dtype=np.float64)


def _ci(prefix: str, triple: tuple[float, float, float]) -> dict[str, float]:
    return {prefix: triple[0], f"{prefix}_low": triple[1], f"{prefix}_high": triple[2]}


def aggregates(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """Per config and env: the run counts; IQM and median (diverged and failed runs as
    -inf) and mean and std (complete runs only) with stratified bootstrap CIs; the failure
    rate (diverged and failed runs and runs below the env's threshold, over all but the
    missing runs) with a Wilson CI; and the seeds needed to detect the study's relative
    difference (from the complete runs' mean and std)."""
    st = spec.statistics
    rows = []
    for (label, env), g in with_outcomes(scores).groupby(["label", "env"], sort=False):
        ranked, x = _ranked(g), _completed(g)
        row: dict[str, Any] = dict(label=label, env=env, **_counts(g))
        if len(ranked):
            for name, fn in (("iqm", stats.iqm), ("median", stats.median)):
                row.update(_ci(name, stats.stratified_bootstrap_ci(
                    ranked, fn, reps=st.reps, level=st.level, seed=st.seed)))
        if len(x):
            row.update(_ci("mean", stats.stratified_bootstrap_ci(
                x, stats.mean, reps=st.reps, level=st.level, seed=st.seed)))
            row["std"] = float(np.std(x, ddof=1)) if len(x) > 1 else math.nan
        threshold = spec.score.failure_threshold.get(env)
        if len(ranked):
            row.update(_ci("failure_rate", stats.failure_rate(
                ranked, -math.inf if threshold is None else threshold, st.level)),
                failure_threshold=threshold)
        if len(x) > 1 and row["std"] > 0 and row["mean"] != 0:
            row["seeds_needed"] = stats.seeds_needed(
                row["std"], st.relative_difference * abs(row["mean"]), alpha=st.alpha,
                power=st.power)
        rows.append(row)
    return pd.DataFrame(rows)


def config_pairs(spec: StudySpec) -> list[tuple[str, str]]:
    """The pairs ``(a, b)`` of config labels the study compares: each config against the
    ``[statistics]`` baseline, or every pair (``compare = "all"``)."""
    if spec.statistics.compare == "all":
        return list(itertools.combinations(spec.labels, 2))
    return [(label, spec.baseline) for label in spec.labels if label != spec.baseline]


def _compare(ga: pd.DataFrame, gb: pd.DataFrame, spec: StudySpec) -> dict[str, Any]:
    """Runs ``ga`` (config a) against ``gb`` (config b): their counts; P(a > b) and
    Mann-Whitney U with diverged and failed runs as -inf; mean difference and Welch's t
    on the complete runs (each family needs at least two runs per side)."""
    st = spec.statistics
    row: dict[str, Any] = {**_counts(ga, "_a"), **_counts(gb, "_b")}
    x, y = _ranked(ga), _ranked(gb)
    if len(x) >= 2 and len(y) >= 2:
        row.update(_ci("prob_improvement", stats.probability_of_improvement_ci(
            x, y, reps=st.reps, level=st.level, seed=st.seed)))
        row["mannwhitney_u"], row["mannwhitney_p"] = stats.mann_whitney(x, y)
    xc, yc = _completed(ga), _completed(gb)
    if len(xc) >= 2 and len(yc) >= 2:
        row.update(mean_a=float(np.mean(xc)), mean_b=float(np.mean(yc)),
                   difference=float(np.mean(xc) - np.mean(yc)))
        row["welch_t"], row["welch_p"] = stats.welch_t_test(xc, yc)
    return row


def comparisons(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """Config a vs config b per env: P(a > b) with CI (rliable's definition) and
    Mann-Whitney U, counting diverged and failed runs as the worst outcome; the mean
    difference and Welch's t on complete runs; the run counts of both sides. With several
    envs a row 'all' averages P(a > b) over envs (it is scale-free, so averaging across
    tasks is meaningful); it needs the same number of ranked runs in every env."""
    scores = with_outcomes(scores)
    st = spec.statistics
    rows = []
    for a, b in config_pairs(spec):
        per_env_a, per_env_b = [], []
        for env in spec.envs:
            ga = scores[(scores["label"] == a) & (scores["env"] == env)]
            gb = scores[(scores["label"] == b) & (scores["env"] == env)]
            rows.append(dict(a=a, b=b, env=env, **_compare(ga, gb, spec)))
            per_env_a.append(ga)
            per_env_b.append(gb)
        xs, ys = [_ranked(g) for g in per_env_a], [_ranked(g) for g in per_env_b]
        same_n = len({len(v) for v in xs}) == 1 and len({len(v) for v in ys}) == 1
        if len(spec.envs) > 1 and same_n and len(xs[0]) > 1 and len(ys[0]) > 1:
            rows.append(dict(a=a, b=b, env="all",
                             **_counts(pd.concat(per_env_a), "_a"),
                             **_counts(pd.concat(per_env_b), "_b"),
                             **_ci("prob_improvement", stats.probability_of_improvement_ci(
                                 np.stack(xs, 1), np.stack(ys, 1), reps=st.reps,
                                 level=st.level, seed=st.seed))))
    return pd.DataFrame(rows)


def factor_levels(spec: StudySpec, factor: str, labels: pd.Series
                  ) -> tuple[list[Any], pd.Series]:
    """The factor's levels in spec order, and each row's level (from its config label,
    ``labels``)."""
    level_of = {c.label: c.overrides[factor] for c in spec.configs}
    return list(dict.fromkeys(level_of.values())), labels.map(level_of)


def main_effects(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """For a factorial study: each factor's level against its first level, pooled over all
    other factors (a = this level, b = the reference level)."""
    rows = []
    scores = with_outcomes(scores)
    for factor in spec.factors:
        for env in spec.envs:
            e = scores[scores["env"] == env]
            levels, values = factor_levels(spec, factor, e["label"])
            ref = e[values == levels[0]]
            for level in levels[1:]:
                rows.append(dict(factor=factor, level=level, reference=levels[0], env=env,
                                 **_compare(e[values == level], ref, spec)))
    return pd.DataFrame(rows)


def lottery(spec: StudySpec, scores: pd.DataFrame) -> pd.DataFrame:
    """The seed lottery (Welch's t, so complete runs only) for every config and env with at
    least 4 complete runs, with the run counts; the most extreme split's first group is
    given as seeds (``worst_split_seeds``)."""
    st = spec.statistics
    rows = []
    for (label, env), g in with_outcomes(scores).groupby(["label", "env"], sort=False):
        done = g[g["outcome"] == "complete"]
        if len(done) >= 4:
            res: dict[str, Any] = stats.seed_lottery(
                done["score"].to_numpy(), splits=st.lottery_splits, alpha=st.alpha,
                seed=st.seed)
            seeds = done["seed"].to_numpy()
            res["worst_split_seeds"] = [int(seeds[i]) for i in res.pop("worst_split")]
            rows.append(dict(label=label, env=env, **_counts(g), **res))
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
    over runs, per config and env, on at most ``points`` evenly spaced iterations. Each row
    carries the config's run counts: a diverged or failed run has no curve to the end, so
    the curve is over the complete runs and the counts say how many it leaves out."""
    done = data[data["state"] == "complete"]
    scores = final_scores(spec, data)
    rows = []
    for (label, env), g in done.groupby(["label", "env"], sort=False):
        counts = _counts(scores[(scores["label"] == label) & (scores["env"] == env)])
        rows += [dict(label=label, env=env, **counts, **row)
                 for row in _curve_ci_rows(g, spec, points)]
    return pd.DataFrame(rows)


def factor_curves(spec: StudySpec, data: pd.DataFrame, points: int = 50) -> pd.DataFrame:
    """For a factorial study: learning curves per level of each factor, pooled over the
    other factors (all complete runs with that level; the counts cover all its runs)."""
    done = data[data["state"] == "complete"]
    scores = final_scores(spec, data)
    rows = []
    for factor in spec.factors:
        levels, values = factor_levels(spec, factor, done["label"])
        _, score_values = factor_levels(spec, factor, scores["label"])
        for level in levels:
            for env, g in done[values == level].groupby("env", sort=False):
                counts = _counts(scores[(score_values == level) & (scores["env"] == env)])
                rows += [dict(factor=factor, level=str(level), env=env, **counts, **row)
                         for row in _curve_ci_rows(g, spec, points)]
    return pd.DataFrame(rows)


def profiles(spec: StudySpec, scores: pd.DataFrame, points: int = 41) -> pd.DataFrame:
    """Performance profiles per env: fraction of runs scoring above tau, with CIs, on
    ``points`` values of tau spanning the env's complete scores. A diverged or failed run
    is below every tau and stays in the denominator; missing runs are
    left out. Each row carries the config's run counts."""
    st = spec.statistics
    rows = []
    scores = with_outcomes(scores)
    for env in spec.envs:
        e = scores[scores["env"] == env]
        finite = _completed(e)
        if not len(finite):
            continue
        taus = np.linspace(finite.min(), finite.max(), points)
        for label, g in e.groupby("label", sort=False):
            x = _ranked(g)
            if not len(x):
                continue
            p, lo, hi = stats.performance_profile_ci(x, taus, reps=st.reps, level=st.level,
                                                     seed=st.seed)
            counts = _counts(g)
            rows += [dict(label=label, env=env, **counts, tau=t, fraction=a, low=b, high=c)
                     for t, a, b, c in zip(taus, p, lo, hi, strict=True)]
    return pd.DataFrame(rows)


def mark_few_samples(tables: dict[str, pd.DataFrame]) -> None:
    """Add ``few_samples`` to the aggregates and comparisons: True where an interval rests
    on fewer than :data:`pgscope.seed_statistics.FEW_SAMPLES` scored runs (of either side
    of a comparison), which the console, the report and the JSON then flag."""
    def scored(df: pd.DataFrame, suffix: str = "") -> pd.Series:
        return df[f"n{suffix}"] - df[f"n_missing{suffix}"]

    agg = tables.get("aggregates")
    if agg is not None and not agg.empty:
        agg["few_samples"] = scored(agg) < stats.FEW_SAMPLES
    comp = tables.get("comparisons")
    if comp is not None and not comp.empty:
        comp["few_samples"] = (scored(comp, "_a") < stats.FEW_SAMPLES) | (
            scored(comp, "_b") < stats.FEW_SAMPLES)


def reliability(spec: StudySpec, data: pd.DataFrame, scores: pd.DataFrame
                ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The reliability metrics of Chan et al. (2020) on the complete runs' learning
    curves (:func:`pgscope.reliability.study_reliability`): the tables ``reliability``,
    ``reliability_comparisons`` (the spec's pairs) and ``reliability_ranks``, each
    ``reliability`` row with its config's run counts, and the summary's ``reliability``
    section (parameters, units, definitions)."""
    st = spec.statistics
    counts = {(str(label), str(env)): _counts(g) for (label, env), g in
              with_outcomes(scores).groupby(["label", "env"], sort=False)}
    return study_reliability(data, pairs=config_pairs(spec), reps=st.reps, level=st.level,
                             seed=st.seed, counts=counts)


def summarize(path: str | Path, score: str | None = None) -> dict[str, Any]:
    """Every table of a study as DataFrames, plus the settings they were computed with;
    ``score`` names a score rule (:data:`pgscope.study.spec.SCORE_RULES`, e.g. "paper")
    to use instead of the spec's ``[score]`` (its failure thresholds are kept)."""
    path = Path(path)
    spec = open_study(path)
    if score is not None:
        spec = dataclasses.replace(spec, score=ScoreSpec.named(
            score, spec.score.failure_threshold))
        check_score_inputs(spec, source=f"--score {score}")
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
    mark_few_samples(tables)
    rel_tables, rel_meta = reliability(spec, data, scores)
    tables.update(rel_tables)
    sensitivity: dict[str, Any] = {}
    if spec.sweeps:  # hyperparameter sensitivity of the swept families
        from pgscope.study.sensitivity import sensitivity_meta, sensitivity_tables

        tables.update(sensitivity_tables(spec, scores, tables["aggregates"]))
        sensitivity["sensitivity"] = sensitivity_meta(spec)
    missing = scores[scores["outcome"] == "missing"]
    return dict(spec=spec, tables=tables, meta=dict(reliability=rel_meta, **sensitivity,
        study=spec.name, spec_hash=spec.hash(), description=spec.description,
        score_definition=spec.score.describe(), score=spec.score.__dict__,
        statistics=spec.statistics.__dict__, baseline=spec.baseline,
        outcome_rule=OUTCOME_RULE, runs=len(scores),
        complete=int((scores["outcome"] == "complete").sum()),
        diverged=int((scores["outcome"] == "diverged").sum()),
        failed=int((scores["outcome"] == FAILED).sum()),
        missing=[dict(label=r.label, env=r.env, seed=int(r.seed), state=r.state,
                      why=_why_missing(r.state, spec.score))
                 for r in missing.itertuples()]))


def _why_missing(state: str, score: ScoreSpec | None = None) -> str:
    if state == "new":
        return "not started"
    if state in FINISHED and score is not None and score.last_evaluations is not None:
        return "complete, but without an evaluation during training (eval_every)"
    if state in FINISHED:  # complete, but no score
        return "complete, but no episode ended in the score window"
    return "started, not finished (running or interrupted); the next 'pgscope study run' resumes it"


def _json_value(v: Any) -> Any:
    """A JSON value with full precision: NaN -> null, +-inf -> the strings 'inf'/'-inf'
    (JSON has no infinities), NumPy scalars -> Python numbers, lists element by element."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe records, every float at full precision (pandas' ``to_json`` would round
    to 10 decimals, writing a p-value of 3e-12 as 0)."""
    return [{str(k): _json_value(v) for k, v in rec.items()}
            for rec in df.to_dict(orient="records")]


def write_summary(path: str | Path, out: str | Path | None = None, plots: bool = True,
                  score: str | None = None) -> dict[str, Any]:
    """Write every table as CSV and all of them as one JSON (and PNG plots) to ``out``
    (default ``DIR/summary``); returns what :func:`summarize` returns plus the files
    (``score``: a named score rule, as for :func:`summarize`)."""
    path = Path(path)
    result = summarize(path, score)
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
    """The tables of :func:`summarize` as plain text (what ``pgscope study summary`` prints).
    Numbers are rounded for reading; the CSV and JSON files keep full precision."""
    meta, t = result["meta"], result["tables"]
    level = 100 * meta["statistics"]["level"]
    lines = [f"study {meta['study']}: {meta['complete']}/{meta['runs']} runs complete, "
             f"{meta['diverged']} diverged, {meta['failed']} failed, "
             f"{len(meta['missing'])} missing",
             f"outcomes: {meta['outcome_rule']}",
             f"final score: {meta['score_definition']}; intervals: {level:g}% stratified "
             f"bootstrap ({meta['statistics']['reps']} resamples, seed "
             f"{meta['statistics']['seed']})",
             "failure rate (Wilson CI): diverged and failed runs and runs below the env's "
             f"failure threshold ({_thresholds(meta)}), over all but the missing runs",
             "runs: complete/diverged/failed/missing of n planned; * = complete runs only",
             ""]
    agg = t["aggregates"]
    rows = [[r["label"] + ("!" if r.get("few_samples") else ""), r["env"], _runs(r),
             _iv(r, "iqm"), _iv(r, "median"), _iv(r, "mean"), _iv(r, "failure_rate", "{:.2f}"),
             "-" if pd.isna(r.get("seeds_needed", math.nan)) else str(int(r["seeds_needed"]))]
            for _, r in agg.iterrows()]
    rd = meta["statistics"]["relative_difference"]
    lines += _table(["config", "env", "runs", "IQM", "median", "mean*", "failure rate",
                     f"seeds for {100 * rd:g}%*"], rows)
    for name, title, key in (("comparisons", "comparisons (a vs b)", ("a", "b")),
                             ("main_effects", "main effects (level vs reference, pooled)",
                              ("factor", "level"))):
        df = t.get(name)
        if df is None or df.empty:
            continue
        rows = []
        for _, r in df.iterrows():
            first = f"{r[key[0]]}={r[key[1]]}" if name == "main_effects" else \
                f"{r['a']} vs {r['b']}" + ("!" if r.get("few_samples") else "")
            diff = "-" if pd.isna(r.get("difference", math.nan)) else f"{r['difference']:+.1f}"
            p_w, p_m = _p(r.get("welch_p", math.nan)), _p(r.get("mannwhitney_p", math.nan))
            rows.append([first, r["env"], _runs(r, "_a"), _runs(r, "_b"),
                         _iv(r, "prob_improvement", "{:.2f}"), p_m, diff, p_w])
        lines += ["", title]
        lines += _table(["", "env", "runs a", "runs b", "P(a > b)", "Mann-Whitney p",
                         "mean diff*", "Welch p*"], rows)
    if any(df is not None and "few_samples" in df and df["few_samples"].any()
           for df in (t.get("aggregates"), t.get("comparisons"))):
        lines += ["", f"! = intervals over fewer than {stats.FEW_SAMPLES} scored runs of a "
                  "config: a bootstrap over so few understates the uncertainty (it resamples "
                  "only the values seen; few_samples in the CSV and JSON); add seeds"]
    lot = t.get("lottery")
    if lot is not None and not lot.empty:
        lines += ["", "seed lottery (one config's complete runs split in two halves)"]
        lines += _table(["config", "env", "runs", "splits", "significant", "max |t|", "min p"],
                        [[r["label"], r["env"], _runs(r), str(r["splits"]),
                          f"{100 * r['fraction_significant']:.1f}% (p < {r['alpha']:g})",
                          f"{r['max_abs_t']:.2f}", f"{r['min_p']:.4g}"]
                         for _, r in lot.iterrows()])
    if "sensitivity" in meta:
        from pgscope.study.sensitivity import format_sensitivity

        lines += ["", *format_sensitivity(t, meta)]
    rel = format_reliability(t)
    if rel:
        lines += ["", "reliability (Chan et al., 2020; complete runs; ! = fewer than "
                  f"{stats.FEW_SAMPLES} runs; tests and ranks in reliability_*.csv)", *rel]
    return "\n".join(lines)


def _runs(row: Any, suffix: str = "") -> str:
    """'complete/diverged/failed/missing of n' for one side of a row."""
    parts = "/".join(str(int(row[f"{col}{suffix}"])) for col in COUNT_COLUMNS[1:])
    return f"{parts} of {int(row['n' + suffix])}"


def _thresholds(meta: dict[str, Any]) -> str:
    given = meta["score"]["failure_threshold"]
    if not given:
        return "none set, so only diverged and failed runs count"
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
