"""The report of a study: outcome counts, doctor findings per run, learning curves per
config with CIs over seeds, final-score tables (IQM, median, mean with CIs, failure rates,
seeds needed), comparisons (probability of improvement, Mann-Whitney, Welch), performance
profiles, the reliability metrics of Chan et al. (2020) and, for factorial studies, main
effects. The numbers are those of
``pgscope study summary`` (:func:`pgscope.study.analysis.summarize`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pgscope.report.page import Page, badge, ci_text, esc, figure, fmt, kv, palette, rgba, table
from pgscope.seed_statistics import FEW_SAMPLES


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _counts(r: Any, suffix: str = "") -> str:
    keys = ("n_complete", "n_diverged", "n_failed", "n_missing")
    if f"n{suffix}" not in r or _isnan(r.get(f"n{suffix}")):
        return "-"
    return "/".join(str(int(r[k + suffix])) for k in keys) + f" of {int(r['n' + suffix])}"


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _ci(r: Any, key: str, digits: int = 4) -> str:
    if key not in r or _isnan(r.get(key)):
        return "-"
    return ci_text(r[key], r.get(f"{key}_low"), r.get(f"{key}_high"), digits)


def _p(v: Any) -> str:
    if _isnan(v):
        return "-"
    return f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def colours(labels: list[str]) -> dict[str, str]:
    """One colour per config, the same in every plot of the report."""
    pal = palette(len(labels))
    return {label: pal[i % len(pal)] for i, label in enumerate(labels)}


def _band_figures(frame: Any, envs: list[str], col: dict[str, str], x_key: str,
                  y_key: str, alpha: float, name: Any, shape: str = "linear") -> list[Any]:
    """One figure per env: each config's line (``y_key`` over ``x_key``, named
    ``name(label, first_row)``) over its shaded interval ``low``..``high``, which toggles
    with the line (same legend group)."""
    import plotly.graph_objects as go

    figs = []
    for env in envs:
        fig = go.Figure()
        for label, g in frame[frame["env"] == env].groupby("label", sort=False):
            c, x, group = col[str(label)], list(g[x_key]), esc(label)
            fig.add_trace(go.Scatter(x=x + x[::-1], y=list(g["high"]) + list(g["low"])[::-1],
                                     fill="toself", mode="lines", fillcolor=rgba(c, alpha),
                                     line=dict(width=0), hoverinfo="skip", showlegend=False,
                                     legendgroup=group, name=f"{group} CI"))
            fig.add_trace(go.Scatter(
                x=x, y=list(g[y_key]), mode="lines", line=dict(color=c, width=2, shape=shape),
                legendgroup=group, name=esc(name(label, g.iloc[0])),
                hovertemplate=group + ": %{y:.4g}<br>%{x:.4g}<extra></extra>"))
        figs.append(fig)
    return figs


def curves_html(curves: Any, envs: list[str], col: dict[str, str], level: float) -> str:
    if curves.empty:
        return '<p class="note">No complete run yet: no learning curves.</p>'
    parts = []

    def name(label: str, r0: Any) -> str:
        return (f"{label} (complete {int(r0.get('n_complete', r0['runs']))} of "
                f"{int(r0.get('n', r0['runs']))})")
    for i, (env, fig) in enumerate(zip(envs, _band_figures(
            curves, envs, col, "env_steps", "mean", 0.15, name), strict=True)):
        fig.update_layout(title=dict(text=esc(env), font=dict(size=14)),
                          xaxis_title="env steps",
                          yaxis_title="mean episode return (env units)", height=460,
                          legend=dict(font=dict(size=11)))
        parts.append(figure(fig, f"study-curve-{i}"))
    return (f'<p class="note">Mean over the complete runs (seeds) of each config, with a '
            f"{100 * level:g}% bootstrap CI over runs (shaded). Click a legend entry to hide "
            "a config, double-click to show it alone.</p>" + "".join(parts))


def intervals_html(agg: Any, envs: list[str], col: dict[str, str], level: float) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if agg.empty or "iqm" not in agg:
        return ""
    parts = []
    names = {"iqm": "IQM", "median": "median", "mean": "mean (complete runs)"}
    for i, env in enumerate(envs):
        e = agg[agg["env"] == env]
        fig = make_subplots(rows=1, cols=3, shared_yaxes=True, subplot_titles=[
            esc(f"{env}: {names[m]}, {100 * level:g}% CI") for m in names])
        for j, m in enumerate(names, start=1):
            if m not in e:
                continue
            for _, r in e.iterrows():
                mid, lo, hi = (_num(r.get(k)) for k in (m, f"{m}_low", f"{m}_high"))
                if not math.isfinite(mid):
                    continue  # -inf (every run failed): in the table only
                lo = lo if math.isfinite(lo) else mid
                fig.add_trace(go.Scatter(
                    x=[mid], y=[esc(r["label"])], mode="markers",
                    marker=dict(color=col[str(r["label"])], size=9),
                    error_x=dict(type="data", symmetric=False, array=[hi - mid],
                                 arrayminus=[mid - lo], thickness=2),
                    showlegend=False, name=esc(r["label"]),
                    hovertemplate=esc(f"{r['label']} {names[m]}") + ": %{x:.1f}<extra></extra>"),
                    row=1, col=j)
            fig.update_xaxes(title_text="final score (env units)", row=1, col=j)
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(height=140 + 28 * len(e))
        parts.append(figure(fig, f"study-intervals-{i}"))
    return "".join(parts)


def profiles_html(prof: Any, envs: list[str], col: dict[str, str], level: float) -> str:
    if prof.empty:
        return ""
    parts = []
    for i, (env, fig) in enumerate(zip(envs, _band_figures(
            prof, envs, col, "tau", "fraction", 0.12, lambda label, _: label, shape="hv"),
            strict=True)):
        fig.update_layout(title=dict(text=esc(f"{env}: performance profile"),
                                     font=dict(size=14)),
                          xaxis_title="final score tau (env units)",
                          yaxis_title="fraction of runs with score > tau",
                          yaxis_range=[-0.02, 1.02], height=420)
        parts.append(figure(fig, f"study-profiles-{i}"))
    return (f'<p class="note">Fraction of runs scoring above tau with {100 * level:g}% CIs; '
            "a diverged or failed run is below every tau and stays in the denominator.</p>"
            + "".join(parts))


def improvement_html(comp: Any, level: float, anchor: str) -> str:
    import plotly.graph_objects as go

    if comp.empty or "prob_improvement" not in comp:
        return ""
    c = comp.dropna(subset=["prob_improvement"])
    if c.empty:
        return ""
    from pgscope.study.plots import improvement_names

    names = improvement_names(c)
    mid = c["prob_improvement"].to_numpy(float)
    lo, hi = c["prob_improvement_low"].to_numpy(float), c["prob_improvement_high"].to_numpy(float)
    fig = go.Figure(go.Scatter(x=mid, y=[esc(n) for n in names], mode="markers",
                               marker=dict(size=9, color="#636efa"),
                               error_x=dict(type="data", symmetric=False, array=hi - mid,
                                            arrayminus=mid - lo), showlegend=False,
                               hovertemplate="%{y}: %{x:.2f}<extra></extra>"))
    fig.add_vline(x=0.5, line_dash="dash", line_color="#555")
    fig.update_layout(xaxis_title=f"probability of improvement ({100 * level:g}% CI)",
                      xaxis_range=[-0.02, 1.02], yaxis_autorange="reversed",
                      height=120 + 26 * len(c))
    return figure(fig, anchor)


def reliability_html(t: dict[str, Any], envs: list[str], col: dict[str, str],
                     section: dict[str, Any]) -> str:
    """The reliability metrics (Chan et al., 2020): a table of every metric with its
    interval per config and env, one panel per metric (each config's value with its
    interval, one column per env), the mean ranks over envs and the permutation tests."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from pgscope.reliability import CURVE_METRICS, METRICS

    rel = t.get("reliability")
    if rel is None or rel.empty:
        return ('<p class="note">No complete run with at least 3 points on its learning '
                "curve: no reliability metrics.</p>")
    level = float(section.get("level", 0.95))
    params = section.get("parameters", {})
    parts = [f'<p class="note">The reliability metrics of {esc(section.get("citation", ""))}'
             f" on the complete runs' learning curves ({esc(params.get('curve', ''))}), each "
             f"with a {100 * level:g}% bootstrap interval over runs. CVaR level alpha = "
             f"{esc(params.get('alpha'))}; DT window {esc(params.get('window'))} iterations; "
             "DR and RR read the low-pass filtered curves at the centres of segments of "
             "about one window (RR: the last centre); units: "
             f"{esc(section.get('units', ''))}. docs/studies.md, \"Reliability metrics\", "
             "defines them.</p>"]
    few = sorted({f"{r['label']} ({r['env']})" for _, r in rel.iterrows() if r["few_samples"]})
    if few:
        parts.append(f'<p class="note warning">Intervals over fewer than {FEW_SAMPLES} runs '
                     f"({esc(', '.join(few))}) understate the uncertainty.</p>")
    rows = []
    for (label, env), g in rel.groupby(["label", "env"], sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        rows.append([label, env, fmt(int(g["n_runs"].max())),
                     *(_ci(by[m], "value") if m in by else "-" for m in CURVE_METRICS)])
    header = ["config", "env", "runs", *(
        f"{m} ({'higher' if METRICS[m].higher_is_better else 'lower'} is better)"
        for m in CURVE_METRICS)]
    parts.append(table(header, rows, numeric=tuple(range(2, 3 + len(CURVE_METRICS)))))
    for m in CURVE_METRICS:
        d = rel[rel["metric"] == m]
        if d.empty:
            continue
        info = METRICS[m]
        fig = make_subplots(rows=1, cols=len(envs), subplot_titles=[esc(e) for e in envs])
        for j, env in enumerate(envs, start=1):
            for _, r in d[d["env"] == env].iterrows():
                mid, lo, hi = (_num(r.get(k)) for k in ("value", "value_low", "value_high"))
                fig.add_trace(go.Scatter(
                    x=[mid], y=[esc(r["label"])], mode="markers",
                    marker=dict(color=col.get(str(r["label"]), "#636efa"), size=9),
                    error_x=dict(type="data", symmetric=False, array=[hi - mid],
                                 arrayminus=[mid - lo], thickness=2),
                    showlegend=False, name=esc(r["label"]),
                    hovertemplate=esc(f"{r['label']} {m}") + ": %{x:.4g}<extra></extra>"),
                    row=1, col=j)
        better = "higher" if info.higher_is_better else "lower"
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(title=dict(text=esc(f"{m}: {info.name} ({better} is better), "
                                              f"{100 * level:g}% CI"), font=dict(size=14)),
                          height=150 + 28 * d["label"].nunique())
        parts.append(f'<h3 id="reliability-{m.lower()}">{esc(m)}: {esc(info.name)}</h3>'
                     f'<p class="note">{esc(info.definition)}.</p>'
                     + figure(fig, f"study-reliability-{m.lower()}"))
    ranks = t.get("reliability_ranks")
    if ranks is not None and not ranks.empty:
        parts.append("<h3>Mean rank over envs</h3>"
                     '<p class="note">Per env the configs are ranked by each metric (1 = best, '
                     f"ties averaged), then the ranks averaged over envs; {100 * level:g}% "
                     "bootstrap intervals resample every config's runs.</p>")
        parts.append(table(["metric", "config", "mean rank", "envs"], [
            [r["metric"], r["label"] + ("!" if r["few_samples"] else ""),
             _ci(r, "mean_rank", 3), fmt(r["n_envs"])] for _, r in ranks.iterrows()],
            numeric=(2, 3)))
    comp = t.get("reliability_comparisons")
    if comp is not None and not comp.empty:
        parts.append("<h3>Permutation tests</h3>"
                     '<p class="note">a - b per env (in the metric\'s units) and, for env '
                     "all, the difference in mean rank (negative: a ranks better); two-sided "
                     "p-values from exchanging runs between a and b.</p>")
        parts.append(table(["a vs b", "env", "metric", "difference", "p", "splits"], [
            [f"{r['a']} vs {r['b']}", r["env"], r["metric"],
             fmt(r.get("difference") if r["env"] != "all" else r.get("rank_difference")),
             _p(r.get("p_value")),
             f"{int(r['permutations'])}"
             + (" (all)" if r["env"] != "all" and bool(r.get("exact")) else "")]
            for _, r in comp.iterrows()], numeric=(3, 4, 5)))
    return "".join(parts)


def study_page(path: Path) -> Page:
    from pgscope.doctor import diagnose_study
    from pgscope.study.analysis import summarize

    result = summarize(path)
    meta, t, spec = result["meta"], result["tables"], result["spec"]
    st = meta["statistics"]
    level = float(st["level"])
    labels = [c.label for c in spec.configs]
    col = colours(labels)
    envs = list(spec.envs)
    done = f"{meta['complete']}/{meta['runs']} complete"
    page = Page(f"pgscope study {meta['study']}", f"{badge(done, 'complete')} {esc(path)}")
    missing = meta["missing"]
    page.add("summary", "Summary", kv([
        ("study", meta["study"]), ("description", meta.get("description") or "-"),
        ("design", f"{len(labels)} configs x {len(envs)} envs x {len(spec.seeds)} seeds"),
        ("envs", ", ".join(envs)),
        ("runs", f"{meta['runs']} planned: {meta['complete']} complete, {meta['diverged']} "
                 f"diverged, {meta['failed']} failed, {len(missing)} missing"),
        ("final score", meta["score_definition"]),
        ("intervals", f"{100 * level:g}% stratified bootstrap, {st['reps']} resamples, "
                      f"seed {st['seed']}"),
        ("outcome rule", meta["outcome_rule"]),
        ("baseline", str(meta.get("baseline") or "-"))]))

    rows = diagnose_study(path)
    scores = t["scores"]
    score_of = {(r.label, r.env, int(r.seed)): r for r in scores.itertuples()}
    table_rows = []
    for r in rows:
        s = score_of.get((r["label"], r["env"], int(r["seed"])))
        alarms = sorted({f.alarm for f in r["findings"]})
        run_dir = Path(path) / r["run"]
        link, command = Path(r["run"]) / "report.html", f"pgscope report {run_dir}"
        seed = (f'<a href="{esc(link)}">{esc(r["seed"])}</a>'
                if (run_dir / "report.html").exists() else
                f'<span title="{esc(command)}">{esc(r["seed"])}</span>')
        table_rows.append([
            f'<span style="color:{col.get(r["label"], "#000")}">&#9632;</span> '
            f"{esc(r['label'])}", esc(r["env"]), seed,
            esc(s.outcome if s is not None else r["state"]),
            esc(fmt(s.score) if s is not None else "-"),
            esc(", ".join(alarms)) if alarms else badge("healthy")])
    fired = sum(1 for r in rows if r["findings"])
    page.add("runs", "Runs and doctor findings",
             f"<p>{fired} of {len(rows)} runs fired at least one alarm "
             "(<code>pgscope doctor</code> on each run). A seed links to its run's report "
             "where one was written (<code>pgscope report RUN</code>; hover a seed for the "
             "command).</p>"
             + table(["config", "env", "seed", "outcome", "final score", "doctor alarms"],
                     table_rows, numeric=(2, 4), raw=(0, 1, 2, 3, 4, 5)))
    page.add("curves", "Learning curves", curves_html(t["curves"], envs, col, level))

    agg = t["aggregates"]
    rd = st["relative_difference"]
    agg_rows = [[r["label"], r["env"], _counts(r), _ci(r, "iqm"), _ci(r, "median"),
                 _ci(r, "mean"), fmt(r.get("std")), _ci(r, "failure_rate", 3),
                 fmt(r.get("seeds_needed"))] for _, r in agg.iterrows()]
    few = [f"{r['label']} ({r['env']})" for _, r in agg.iterrows() if r.get("few_samples")]
    few_note = (f'<p class="note warning">Intervals over fewer than {FEW_SAMPLES} scored runs '
                f"({esc(', '.join(few))}): a bootstrap over so few understates the "
                "uncertainty (it resamples only the values seen); read them with care or add "
                "seeds.</p>") if few else ""
    page.add("scores", "Final scores",
             '<p class="note">runs: complete/diverged/failed/missing of n planned. IQM and '
             "median rank diverged and failed runs lowest (-inf); mean and std use the "
             "complete runs.</p>" + few_note
             + table(["config", "env", "runs", "IQM", "median", "mean", "std", "failure rate",
                      f"seeds to detect {100 * rd:g}%"], agg_rows, numeric=(3, 4, 5, 6, 7, 8))
             + intervals_html(agg, envs, col, level))
    comp = t["comparisons"]
    if not comp.empty:
        comp_rows = [[f"{r['a']} vs {r['b']}", r["env"], _counts(r, "_a"), _counts(r, "_b"),
                      _ci(r, "prob_improvement", 3), _p(r.get("mannwhitney_p")),
                      fmt(r.get("difference")), fmt(r.get("welch_t")), _p(r.get("welch_p"))]
                     for _, r in comp.iterrows()]
        page.add("comparisons", "Comparisons",
                 table(["a vs b", "env", "runs a", "runs b", "P(a > b)", "Mann-Whitney p",
                        "mean difference (complete)", "Welch t", "Welch p"], comp_rows,
                       numeric=(4, 5, 6, 7, 8))
                 + improvement_html(comp, level, "study-poi"))
    power_rows = [[r["label"], r["env"], fmt(r.get("mean")), fmt(r.get("std")),
                   fmt(rd * abs(_num(r.get("mean")))) if not _isnan(r.get("mean")) else "-",
                   fmt(r.get("seeds_needed"))] for _, r in agg.iterrows()]
    page.add("power", "Power analysis",
             f'<p class="note">Seeds per config needed to detect a difference of '
             f"{100 * rd:g}% of the config's mean with a two-sided Welch test at alpha "
             f"{st['alpha']:g} and power {st['power']:g} (from the complete runs' mean and "
             "std).</p>" + table(["config", "env", "mean", "std", "difference to detect",
                                  "seeds needed"], power_rows, numeric=(2, 3, 4, 5)))
    page.add("profiles", "Performance profiles", profiles_html(t["profiles"], envs, col, level))
    page.add("reliability", "Reliability metrics",
             reliability_html(t, envs, col, meta.get("reliability", {})))
    from pgscope.report.robustness import load_robustness, robustness_html

    robustness = load_robustness(path)  # pgscope study robustness wrote it
    if robustness is not None:
        page.add("robustness", "Robustness", robustness_html(robustness, col))
    if "main_effects" in t and not t["main_effects"].empty:
        me = t["main_effects"]
        me_rows = [[f"{r['factor']}={r['level']} vs {r['reference']}", r["env"],
                    _counts(r, "_a"), _counts(r, "_b"), _ci(r, "prob_improvement", 3),
                    _p(r.get("mannwhitney_p")), fmt(r.get("difference")), _p(r.get("welch_p"))]
                   for _, r in me.iterrows()]
        page.add("main-effects", "Main effects",
                 table(["level vs reference", "env", "runs a", "runs b", "P(a > b)",
                        "Mann-Whitney p", "mean difference", "Welch p"], me_rows,
                       numeric=(4, 5, 6, 7))
                 + improvement_html(me, level, "study-main-effects"))
    if "sensitivity" in meta:  # swept families (pgscope.study.sensitivity)
        from pgscope.report.sensitivity import sensitivity_html

        page.add("sensitivity", "Hyperparameter sensitivity", sensitivity_html(t, meta))
    lot = t.get("lottery")
    if lot is not None and not lot.empty:
        page.add("lottery", "Seed lottery", table(
            ["config", "env", "runs", "splits", "significant splits", "max |t|", "min p"],
            [[r["label"], r["env"], _counts(r), fmt(r["splits"]),
              f"{100 * r['fraction_significant']:.1f}%", fmt(r["max_abs_t"]),
              _p(r["min_p"])] for _, r in lot.iterrows()], numeric=(3, 4, 5, 6)))
    cfg_rows = [[f'<span style="color:{col[c.label]}">&#9632;</span> {esc(c.label)}',
                 esc(c.preset), esc(", ".join(f"{k}={v}" for k, v in c.overrides.items())
                                    or "-")] for c in spec.configs]
    page.add("configs", "Configs", table(["config", "preset", "overrides"], cfg_rows,
                                         raw=(0, 1, 2)))
    if missing:
        page.add("missing", "Missing runs", table(
            ["config", "env", "seed", "state", "why"],
            [[m["label"], m["env"], m["seed"], m["state"], m["why"]] for m in missing]))
    return page
