"""Robustness curves of every trained seed of a study (``pgscope study robustness STUDY
--perturb KIND=LEVEL[,LEVEL...] --episodes N``; docs/robustness.md).

Every complete run's latest checkpoint is evaluated as ``pgscope evaluate --perturb``
evaluates one run (:func:`pgscope.robustness.robustness_of_agent`: the same seeded
episodes at every level, frozen statistics); each run gives its own normalized curve
(its mean return at each level divided by its own unperturbed mean return) and its AUC.
Per config, env and kind, the curve and the AUC are then averaged over the runs (seeds),
with percentile-bootstrap intervals over runs (the study's ``[statistics]`` level, reps and
seed). Runs that are not complete (diverged, failed, unfinished) are not evaluated and are
listed. The tables go to the study's summary folder (``robustness.csv``: the curves,
``robustness_auc.csv``, ``robustness_runs.csv``: every run's points, ``robustness.json``:
all of them with the definitions), where ``pgscope report STUDY`` finds them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pgscope import seed_statistics as stats
from pgscope.errors import PgscopeError
from pgscope.perturb import (
    KINDS,
    Perturbation,
    PerturbContext,
    check_applicable,
    parse_perturbations,
)
from pgscope.run import atomic_write_json
from pgscope.study.analysis import config_pairs, factor_levels
from pgscope.study.runner import open_study, run_state
from pgscope.study.spec import StatsSpec, StudySpec

#: The file of :func:`study_robustness` in the summary folder that the report reads.
ROBUSTNESS_JSON = "robustness.json"


def _json(v: Any) -> Any:
    """NaN -> None, NumPy scalars -> Python numbers, containers element by element."""
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_json(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _interval(values: np.ndarray, reps: int, level: float, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over runs (rows) per column with a percentile-bootstrap interval over runs."""
    if len(values) == 0:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan, nan
    return stats.curve_ci(values, reps=reps, level=level, seed=seed)


def _evaluate_run(run_dir: Path, perturbations: list[Perturbation], episodes: int,
                  deterministic: bool, seed: int, level: float, reps: int) -> dict[str, Any]:
    """One run's robustness (a worker's task): its latest checkpoint, evaluated as
    ``pgscope evaluate --perturb`` evaluates it."""
    from pgscope import load_agent
    from pgscope.robustness import robustness_of_agent

    return robustness_of_agent(load_agent(run_dir), perturbations, episodes=episodes,
                               deterministic=deterministic, seed=seed, level=level,
                               reps=reps)


def study_robustness(path: str | Path, perturb: Iterable[str | Perturbation],
                     episodes: int = 10, deterministic: bool = True, seed: int = 0,
                     out: str | Path | None = None,
                     progress: Callable[[str], None] | None = None,
                     workers: int = 1) -> dict[str, Any]:
    """Evaluate every complete run of the study at ``path`` under each perturbation
    (``episodes`` episodes from reset seeds ``seed, seed + 1, ...`` per level) and write
    the tables to ``out`` (default ``STUDY/summary``). ``workers`` > 1 evaluates that many
    runs at once in separate processes; each run's episodes are seeded, so the tables are
    the same for any number of workers. Every perturbation string and its fit to each env
    of the study are checked before any run is loaded."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from pgscope.envs import make_env
    from pgscope.robustness import AUC_DEFINITION, NORMALIZATION

    perturbations = parse_perturbations(perturb)
    if episodes < 1:
        raise PgscopeError(f"episodes (--episodes) must be at least 1, got {episodes}.")
    if workers < 1:
        raise PgscopeError(f"workers (--workers) must be at least 1, got {workers}.")
    path = Path(path)
    spec = open_study(path)
    st = spec.statistics
    for env_id in spec.envs:
        env = make_env(env_id)
        try:
            check_applicable(env, perturbations, PerturbContext(seed), env_id)
        finally:
            env.close()
    runs = spec.runs()
    states = {r.rel_path: run_state(path / r.rel_path) for r in runs}
    todo = [r for r in runs if states[r.rel_path] == "complete"]
    if not todo:
        raise PgscopeError(f"study '{path}' has no complete run to evaluate.")
    task = (perturbations, episodes, deterministic, seed, st.level, st.reps)
    results: list[dict[str, Any]] = []
    if workers == 1:
        for i, r in enumerate(todo, start=1):
            if progress is not None:
                progress(f"[{i}/{len(todo)}] {r.label} {r.env_id} seed {r.seed}")
            results.append(_evaluate_run(path / r.rel_path, *task))
    else:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")
                                 ) as pool:
            futures = {pool.submit(_evaluate_run, path / r.rel_path, *task): r for r in todo}
            for i, future in enumerate(as_completed(futures), start=1):
                r = futures[future]
                future.result()  # an error stops the evaluation here
                if progress is not None:
                    progress(f"[{i}/{len(todo)}] done: {r.label} {r.env_id} seed {r.seed}")
            results = [f.result() for f in futures]  # in the order of the runs
    point_rows, auc_rows = [], []
    for r, res in zip(todo, results, strict=True):
        for c in res["robustness"]["curves"]:
            key = dict(label=r.label, env=r.env_id, seed=r.seed, kind=c["kind"])
            auc_rows.append({**key, "auc": c["auc"] if c["auc"] is not None else math.nan})
            for p in c["points"]:
                point_rows.append({**key, "level": p["level"],
                                   "nominal": p["level"] == c["nominal"],
                                   "mean_return": p["mean_return"],
                                   "normalized": (p["normalized"] if p["normalized"]
                                                  is not None else math.nan),
                                   "mean_length": p["mean_length"]})
    runs_table = pd.DataFrame(point_rows)
    run_aucs = pd.DataFrame(auc_rows)
    curves_table, auc_table = _aggregate(runs_table, run_aucs, perturbations, st)
    compared, effects = auc_comparisons(spec, run_aucs), auc_main_effects(spec, run_aucs)
    not_evaluated = [dict(label=r.label, env=r.env_id, seed=r.seed, state=states[r.rel_path])
                     for r in runs if states[r.rel_path] != "complete"]
    out = Path(out) if out is not None else path / "summary"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, df in (("robustness", curves_table), ("robustness_auc", auc_table),
                     ("robustness_runs", runs_table), ("robustness_comparisons", compared),
                     ("robustness_main_effects", effects)):
        if name == "robustness_main_effects" and not spec.factors:
            continue
        df.to_csv(out / f"{name}.csv", index=False)
        files.append(out / f"{name}.csv")
    meta = dict(
        study=spec.name, perturbations=[str(p) for p in perturbations], episodes=episodes,
        seed=seed, deterministic=deterministic, checkpoint="each run's latest",
        kinds={p.kind: dict(unit=KINDS.get(p.kind).unit,
                            definition=KINDS.get(p.kind).definition,
                            nominal=KINDS.get(p.kind).nominal) for p in perturbations},
        normalization=NORMALIZATION + "; per run, then averaged over runs",
        auc_definition=AUC_DEFINITION + "; per run, then averaged over runs",
        intervals=f"{100 * st.level:g}% percentile bootstrap over runs (seeds), "
                  f"{st.reps} resamples, seed {st.seed}",
        comparison=COMPARISON, level=st.level, evaluated=len(todo),
        not_evaluated=not_evaluated)
    atomic_write_json(out / ROBUSTNESS_JSON, _json(dict(
        **meta, curves=curves_table.to_dict(orient="records"),
        auc=auc_table.to_dict(orient="records"), runs=runs_table.to_dict(orient="records"),
        run_auc=run_aucs.to_dict(orient="records"),
        comparisons=compared.to_dict(orient="records"),
        main_effects=effects.to_dict(orient="records"))))
    files.append(out / ROBUSTNESS_JSON)
    return dict(meta=meta, curves=curves_table, auc=auc_table, runs=runs_table,
                comparisons=compared, main_effects=effects, files=files)


#: How two sets of runs' AUCs are compared (:func:`auc_comparisons`).
COMPARISON = ("a against b on the runs' own AUCs (runs whose AUC is defined): difference "
              "of the mean AUCs, P(AUC_a > AUC_b) with a bootstrap interval (ties count "
              "half), Mann-Whitney U and Welch's t (two-sided p); each side needs two runs")


def compare_aucs(x: np.ndarray, y: np.ndarray, st: StatsSpec) -> dict[str, Any]:
    """The runs' AUCs ``x`` (config a) against ``y`` (config b), as :data:`COMPARISON`
    says; NaN where a side has fewer than two runs."""
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    row: dict[str, Any] = dict(runs_a=len(x), runs_b=len(y), mean_a=math.nan, mean_b=math.nan,
                               difference=math.nan, prob_improvement=math.nan,
                               prob_improvement_low=math.nan, prob_improvement_high=math.nan,
                               mannwhitney_p=math.nan, welch_p=math.nan)
    if len(x) < 2 or len(y) < 2:
        return row
    p, lo, hi = stats.probability_of_improvement_ci(x, y, reps=st.reps, level=st.level,
                                                    seed=st.seed)
    row.update(mean_a=float(np.mean(x)), mean_b=float(np.mean(y)),
               difference=float(np.mean(x) - np.mean(y)), prob_improvement=p,
               prob_improvement_low=lo, prob_improvement_high=hi,
               mannwhitney_p=stats.mann_whitney(x, y)[1], welch_p=stats.welch_t_test(x, y)[1])
    return row


def auc_comparisons(spec: StudySpec, run_aucs: pd.DataFrame) -> pd.DataFrame:
    """The study's pairs of configs (its ``[statistics]`` baseline or all pairs), per env
    and perturbation kind: :func:`compare_aucs` of their runs' AUCs."""
    rows = []
    for (env, kind), g in run_aucs.groupby(["env", "kind"], sort=False):
        for a, b in config_pairs(spec):
            x = g.loc[g["label"] == a, "auc"].to_numpy(float)
            y = g.loc[g["label"] == b, "auc"].to_numpy(float)
            rows.append(dict(a=a, b=b, env=env, kind=kind,
                             **compare_aucs(x, y, spec.statistics)))
    return pd.DataFrame(rows)


def auc_main_effects(spec: StudySpec, run_aucs: pd.DataFrame) -> pd.DataFrame:
    """For a factorial study, each factor's level against its first level, pooled over the
    other factors (the runs of every config at that level), per env and kind: which
    switch changes robustness."""
    rows = []
    for factor in spec.factors:
        for (env, kind), g in run_aucs.groupby(["env", "kind"], sort=False):
            levels, values = factor_levels(spec, factor, g["label"])
            ref = g.loc[values == levels[0], "auc"].to_numpy(float)
            for level in levels[1:]:
                rows.append(dict(factor=factor, level=level, reference=levels[0], env=env,
                                 kind=kind, **compare_aucs(
                                     g.loc[values == level, "auc"].to_numpy(float), ref,
                                     spec.statistics)))
    return pd.DataFrame(rows)


def _aggregate(points: pd.DataFrame, aucs: pd.DataFrame, perturbations: list[Perturbation],
               st: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per config, env and kind: each level's mean normalized return and mean return over
    runs, and the mean AUC over runs, each with its interval over runs."""
    curve_rows, auc_rows = [], []
    order = {p.kind: i for i, p in enumerate(perturbations)}
    for (label, env, kind), g in points.groupby(["label", "env", "kind"], sort=False):
        wide_norm = g.pivot(index="seed", columns="level", values="normalized")
        wide_ret = g.pivot(index="seed", columns="level", values="mean_return")
        wide_len = g.pivot(index="seed", columns="level", values="mean_length")
        levels = list(wide_norm.columns)
        defined = wide_norm.dropna(axis=0, how="any").to_numpy(float)
        n_mean, n_low, n_high = _interval(defined, st.reps, st.level, st.seed)
        r_mean, r_low, r_high = _interval(wide_ret.to_numpy(float), st.reps, st.level,
                                          st.seed)
        nominal = KINDS.get(str(kind)).nominal
        for j, x in enumerate(levels):
            curve_rows.append(dict(
                label=label, env=env, kind=kind, level=float(x), nominal=x == nominal,
                runs=len(wide_ret), runs_normalized=len(defined), normalized=n_mean[j],
                normalized_low=n_low[j], normalized_high=n_high[j], mean_return=r_mean[j],
                mean_return_low=r_low[j], mean_return_high=r_high[j],
                mean_length=float(wide_len[x].mean())))
        a = aucs[(aucs["label"] == label) & (aucs["env"] == env) & (aucs["kind"] == kind)]
        values = a["auc"].to_numpy(float)
        values = values[np.isfinite(values)]
        m, lo, hi = _interval(values[:, None], st.reps, st.level, st.seed)
        auc_rows.append(dict(label=label, env=env, kind=kind, levels=f"{levels[0]:g}.."
                             f"{levels[-1]:g}", runs=len(a), runs_normalized=len(values),
                             auc=m[0], auc_low=lo[0], auc_high=hi[0],
                             few_samples=len(values) < stats.FEW_SAMPLES))
    curves = pd.DataFrame(curve_rows)
    auc = pd.DataFrame(auc_rows)
    for df in (curves, auc):
        if not df.empty:
            df.sort_values(by="kind", key=lambda s: s.map(order), kind="stable",
                           inplace=True, ignore_index=True)
    return curves, auc


def _iv(m: float, lo: float, hi: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "-"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def load_study_robustness(path: str | Path) -> dict[str, Any] | None:
    """The last ``pgscope study robustness`` of the study at ``path``, read back from
    ``STUDY/summary/robustness.json`` in the shape :func:`study_robustness` returns (tables
    as DataFrames), or None when it was never run (``pgscope study summary`` prints it)."""
    file = Path(path) / "summary" / ROBUSTNESS_JSON
    if not file.exists():
        return None
    data = json.loads(file.read_text())
    tables = {k: pd.DataFrame(data.pop(k, None) or [])
              for k in ("curves", "auc", "runs", "comparisons", "main_effects", "run_auc")}
    return dict(meta=data, **tables, files=[file])


def format_study_robustness(result: dict[str, Any], written: bool = True) -> str:
    """What ``pgscope study robustness`` prints: per kind and env, each config's normalized
    return at every level and its AUC, with intervals over runs, then the comparisons
    (``written``: end with the files written)."""
    meta, curves, auc = result["meta"], result["curves"], result["auc"]
    lines = [f"study {meta['study']}: robustness of {meta['evaluated']} complete run(s), "
             f"{meta['episodes']} episodes per level; {meta['intervals']}",
             f"normalized: {meta['normalization']}", f"AUC: {meta['auc_definition']}"]
    if meta["not_evaluated"]:
        lines.append(f"not evaluated (not complete): {len(meta['not_evaluated'])} run(s)")
    for (kind, env), g in curves.groupby(["kind", "env"], sort=False):
        lines += ["", f"{kind} on {env} (level: {meta['kinds'][kind]['unit']})"]
        levels = sorted(g["level"].unique())
        lines.append("  " + f"{'config':<20}" + "".join(f"{x:>24g}" for x in levels)
                     + f"{'AUC':>24}")
        for label, h in g.groupby("label", sort=False):
            by = {r.level: r for r in h.itertuples()}
            a = auc[(auc["label"] == label) & (auc["env"] == env) & (auc["kind"] == kind)]
            cells = [_iv(by[x].normalized, by[x].normalized_low, by[x].normalized_high)
                     if x in by else "-" for x in levels]
            a_cell = "-" if a.empty else _iv(*a[["auc", "auc_low", "auc_high"]].iloc[0])
            few = "!" if not a.empty and bool(a["few_samples"].iloc[0]) else ""
            lines.append("  " + f"{str(label) + few:<20}" + "".join(f"{c:>24}" for c in cells)
                         + f"{a_cell:>24}")
    for title, df in (("AUC comparisons", result.get("comparisons")),
                      ("AUC main effects (factor level against its first level, pooled over "
                       "the other factors)", result.get("main_effects"))):
        if df is not None and not df.empty:
            lines += ["", f"{title}: {meta['comparison']}"]
            lines += [f"  {r['kind']} on {r['env']}: {comparison_label(r)}: "
                      f"{_comparison_text(r)}" for _, r in df.iterrows()]
    if auc["few_samples"].any():
        lines += ["", f"! = fewer than {stats.FEW_SAMPLES} runs: the intervals understate "
                      "the uncertainty"]
    if written:
        lines += ["", f"written: {', '.join(p.name for p in result['files'])} in "
                      f"{Path(result['files'][0]).parent}"]
    return "\n".join(lines)


def comparison_label(r: Mapping[str, Any] | pd.Series) -> str:
    """What a row of :func:`auc_comparisons` or :func:`auc_main_effects` compares, as the
    console and the report name it: ``a vs b``, or ``factor=level vs reference``."""
    if "factor" in r:
        return f"{r['factor']}={r['level']} vs {r['reference']}"
    return f"{r['a']} vs {r['b']}"


def _comparison_text(r: pd.Series) -> str:
    """One comparison row as text: the AUC difference, P(a > b) and the tests."""
    if not math.isfinite(r["difference"]):
        return f"not compared ({r['runs_a']} and {r['runs_b']} runs; each side needs two)"
    p = _iv(r["prob_improvement"], r["prob_improvement_low"], r["prob_improvement_high"], 2)
    return (f"AUC {r['mean_a']:.3f} vs {r['mean_b']:.3f} ({r['difference']:+.3f}), "
            f"P(a > b) {p}, Mann-Whitney p {r['mannwhitney_p']:.2g}, "
            f"Welch p {r['welch_p']:.2g} ({r['runs_a']} and {r['runs_b']} runs)")


def print_progress(line: str) -> None:
    """The progress lines of ``pgscope study robustness`` (stderr)."""
    print(line, file=sys.stderr, flush=True)
