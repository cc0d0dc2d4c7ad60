"""The study report's hyperparameter-sensitivity section: per swept family and env, the
score against the swept value with its CI band (a log x-axis for log sweeps), the
near-best region and the failure rate and P(best) per point; a heatmap for a 2-D sweep;
and the figures of :mod:`pgscope.study.sensitivity` as a table."""

from __future__ import annotations

import math
from typing import Any

from pgscope.report.page import esc, figure, fmt, rgba, table
from pgscope.study.sensitivity import key_rows
from pgscope.study.sweep import format_value

_LINE = "#636efa"
_REGION = "#00a08b"


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _curve_figure(points: Any, row: Any, level: float) -> Any:
    """Mean score with its CI band over the swept value (top) and the failure rate with
    its Wilson CI and P(best) (bottom)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    key, scale = str(row["key"]), str(row["scale"])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3],
                        vertical_spacing=0.07)
    scored = points[points["mean"].map(_num).map(math.isfinite)]
    x, mean = [float(v) for v in scored["value"]], [float(v) for v in scored["mean"]]
    low, high = list(scored["mean_low"].map(_num)), list(scored["mean_high"].map(_num))
    fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", mode="lines",
                             fillcolor=rgba(_LINE, 0.18), line=dict(width=0),
                             hoverinfo="skip", name=f"{100 * level:g}% CI"), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=x, y=mean, mode="lines+markers", line=dict(color=_LINE, width=2),
        name="mean score (complete runs)",
        customdata=[[int(_num(r["n_complete"])), int(_num(r["n"])), _num(r["p_best"])]
                    for _, r in scored.iterrows()],
        hovertemplate=esc(key) + "=%{x:.4g}<br>mean %{y:.4g}<br>complete %{customdata[0]} "
                      "of %{customdata[1]}<br>P(best) %{customdata[2]:.2f}<extra></extra>"),
        row=1, col=1)
    region = scored[scored["in_region"].astype(bool)]
    fig.add_trace(go.Scatter(
        x=[float(v) for v in region["value"]], y=[float(v) for v in region["mean"]],
        mode="markers", marker=dict(color=_REGION, size=11, symbol="circle-open",
                                    line=dict(width=3)),
        name=f"near-best region (width {fmt(row['width'], 3)} "
             f"{'decades' if scale == 'log' else esc(key) + ' units'})", hoverinfo="skip"),
        row=1, col=1)
    fig.add_trace(go.Scatter(
        x=[float(row["best_value"])], y=[float(row["best_mean"])], mode="markers",
        marker=dict(color="#d62728", size=15, symbol="star"),
        name=f"best: {esc(key)}={esc(format_value(row['best_value']))}",
        hoverinfo="skip"), row=1, col=1)
    fig.add_hline(y=float(row["threshold"]), line_dash="dash", line_color="#888",
                  annotation_text=f"best - {row['fraction']:g} |best|", row=1, col=1)
    rates = points[points["failure_rate"].map(_num).map(math.isfinite)]
    rx = [float(v) for v in rates["value"]]
    r_mid = [float(v) for v in rates["failure_rate"]]
    fig.add_trace(go.Scatter(
        x=rx, y=r_mid, mode="lines+markers", line=dict(color="#ef553b"), name="failure rate",
        error_y=dict(type="data", symmetric=False,
                     array=[_num(h) - m for h, m in zip(rates["failure_rate_high"], r_mid,
                                                        strict=True)],
                     arrayminus=[m - _num(lo) for m, lo in zip(
                         r_mid, rates["failure_rate_low"], strict=True)]),
        hovertemplate="failure rate %{y:.2f}<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Scatter(
        x=[float(v) for v in points["value"]], y=[float(v) for v in points["p_best"]],
        mode="lines+markers", line=dict(color="#ab63fa", dash="dot"), name="P(best)",
        hovertemplate="P(best) %{y:.2f}<extra></extra>"), row=2, col=1)
    grid = [float(v) for v in points["value"]]  # ticks at the grid's values
    axis: dict[str, Any] = dict(tickvals=grid, ticktext=[format_value(v) for v in
                                                         points["value"]])
    if scale == "log":
        axis["type"] = "log"
    fig.update_xaxes(**axis, row=1, col=1)
    fig.update_xaxes(**axis, title_text=esc(key) + (" (log scale)" if scale == "log" else ""),
                     row=2, col=1)
    fig.update_yaxes(title_text="final score (env units)", row=1, col=1)
    fig.update_yaxes(title_text="fraction", range=[-0.02, 1.02], row=2, col=1)
    fig.update_layout(title=dict(text=esc(f"{row['family']} on {row['env']}: {key}"),
                                 font=dict(size=14)), height=520,
                      legend=dict(font=dict(size=11)))
    return fig


def _heatmap_figure(points: Any, row: Any) -> Any:
    """Mean score over the 2-D grid; B marks the best cell, + the near-best region."""
    import plotly.graph_objects as go

    k1, k2 = str(row["key"]), str(row["key2"])
    xs = list(dict.fromkeys(points["value"]))
    ys = list(dict.fromkeys(points["value2"]))
    z = [[math.nan] * len(xs) for _ in ys]
    text = [[""] * len(xs) for _ in ys]
    for _, p in points.iterrows():
        i, j = xs.index(p["value"]), ys.index(p["value2"])
        z[j][i] = _num(p["mean"])
        mark = " B" if bool(p["best"]) else " +" if bool(p["in_region"]) else ""
        text[j][i] = (f"{fmt(p['mean'])}{mark}<br>fail {fmt(p['failure_rate'], 2)}"
                      if math.isfinite(_num(p["mean"])) else "no score")
    fig = go.Figure(go.Heatmap(
        x=[esc(format_value(v)) for v in xs], y=[esc(format_value(v)) for v in ys], z=z,
        text=text, texttemplate="%{text}", colorscale="Viridis",
        colorbar=dict(title="mean score"),
        hovertemplate=esc(k1) + "=%{x}<br>" + esc(k2) + "=%{y}<br>mean %{z:.4g}"
                      "<extra></extra>"))
    fig.update_xaxes(type="category", title_text=esc(k1) + f" ({row['scale']} grid)")
    fig.update_yaxes(type="category", title_text=esc(k2) + f" ({row['scale2']} grid)")
    fig.update_layout(title=dict(text=esc(f"{row['family']} on {row['env']}: {k1} x {k2} "
                                          "(B = best, + = near-best region)"),
                                 font=dict(size=14)), height=460)
    return fig


def _extent(row: Any, sfx: str, what: str) -> str:
    return (f"{format_value(row[f'{what}_from{sfx}'])} .. "
            f"{format_value(row[f'{what}_to{sfx}'])}")


def sensitivity_html(tables: dict[str, Any], meta: dict[str, Any]) -> str:
    """The section: the definitions, one table row per swept family and env, and a panel
    per family and env (a curve, or a heatmap for two keys)."""
    sens, curve = tables.get("sensitivity"), tables.get("sensitivity_curve")
    info = meta.get("sensitivity", {})
    level = float(info.get("level", 0.95))
    defs = info.get("definitions", {})
    parts = [f'<p class="note">Each swept family is one config run at every point of its '
             f"grid. Near-best: mean score &gt;= best - {fmt(info.get('fraction'))} |best|; "
             f"region: {esc(defs.get('region', ''))}; width: {esc(defs.get('width', ''))}; "
             f"P(best): {esc(defs.get('p_best', ''))}; best set: "
             f"{esc(defs.get('best_set', ''))}. Intervals at {100 * level:g}%; docs/studies.md, "
             '"Hyperparameter sensitivity", defines them.</p>']
    if sens is None or sens.empty or curve is None:
        return parts[0] + '<p class="note">No swept point has a complete run yet.</p>'
    if sens["few_samples"].any():
        parts.append('<p class="note warning">Some points rest on fewer than 10 scored runs: '
                     "their intervals and P(best) understate the uncertainty.</p>")
    rows = []
    for r, sfx, first in key_rows(sens):
        rows.append([
            r["family"] if first else "", r["env"] if first else "", r[f"key{sfx}"],
            format_value(r[f"best_value{sfx}"]),
            fmt(r["best_mean"]) + f" [{fmt(r['best_mean_low'])}, "
                                  f"{fmt(r['best_mean_high'])}]" if first else "",
            fmt(r["best_p"], 2) if first else "",
            _extent(r, sfx, "best_set") + (
                f" ({int(r['best_set_points'])} point"
                f"{'' if int(r['best_set_points']) == 1 else 's'})" if first else ""),
            f"{int(r['near_points'])} of {int(r['points'])}" if first else "",
            _extent(r, sfx, "region"),
            f"{fmt(r[f'width{sfx}'], 3)} [{fmt(r[f'width{sfx}_low'], 3)}, "
            f"{fmt(r[f'width{sfx}_high'], 3)}] {r[f'width{sfx}_unit']}",
            fmt(r[f"width{sfx}_relative"], 3)])
    parts.append(table(["family", "env", "key", "best value", "best mean [CI]", "P(best)",
                        f"{100 * level:g}% best set", "near-best points", "region",
                        "width [CI]", "width / grid span"], rows, numeric=(3, 4, 5, 7, 9, 10)))
    for i, (_, r) in enumerate(sens.iterrows()):
        points = curve[(curve["family"] == r["family"]) & (curve["env"] == r["env"])]
        two = isinstance(r.get("key2"), str)
        fig = _heatmap_figure(points, r) if two else _curve_figure(points, r, level)
        parts.append(f'<h3 id="sensitivity-{i}">{esc(r["family"])} on {esc(r["env"])}</h3>'
                     + figure(fig, f"study-sensitivity-{i}"))
    return "".join(parts)
