"""The study report's robustness section, from ``STUDY/summary/robustness.json``
(``pgscope study robustness``): per perturbation kind and env, one normalized-return curve
per config over the perturbation levels with its CI band over seeds, and the AUC table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pgscope.report.page import ci_text, esc, figure, fmt, rgba, table
from pgscope.study.robustness import comparison_label


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def load_robustness(path: Path) -> dict[str, Any] | None:
    """``STUDY/summary/robustness.json``, or None when the study has none."""
    from pgscope.study.robustness import ROBUSTNESS_JSON

    file = Path(path) / "summary" / ROBUSTNESS_JSON
    if not file.exists():
        return None
    data: dict[str, Any] = json.loads(file.read_text())
    return data


def robustness_html(data: dict[str, Any], col: dict[str, str]) -> str:
    """The section: a note with the definitions, one figure per (kind, env) with a line
    and a CI band per config (colours ``col``), and the AUC table."""
    import plotly.graph_objects as go

    curves, level = data.get("curves") or [], float(data.get("level", 0.95))
    parts = [f'<p class="note">{esc(data["evaluated"])} complete run(s), each evaluated '
             f"at its latest checkpoint with {esc(data['episodes'])} episodes per level "
             f"(<code>pgscope study robustness</code>: {esc(', '.join(data['perturbations']))}"
             f"). {esc(data['normalization'])}. Shaded: {esc(data['intervals'])}. "
             f"{esc(data['auc_definition'])}. docs/robustness.md defines every kind.</p>"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in curves:
        groups.setdefault((row["kind"], row["env"]), []).append(row)
    for i, ((kind, env), rows) in enumerate(groups.items()):
        fig = go.Figure()
        labels = list(dict.fromkeys(r["label"] for r in rows))
        for label in labels:
            pts = sorted((r for r in rows if r["label"] == label), key=lambda r: r["level"])
            x = [float(r["level"]) for r in pts]
            y = [_num(r["normalized"]) for r in pts]
            low = [_num(r["normalized_low"]) for r in pts]
            high = [_num(r["normalized_high"]) for r in pts]
            c = col.get(str(label), "#636efa")
            fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself",
                                     mode="lines", fillcolor=rgba(c, 0.15), line=dict(width=0),
                                     hoverinfo="skip", showlegend=False,
                                     legendgroup=esc(label), name=f"{esc(label)} CI"))
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", line=dict(color=c, width=2),
                legendgroup=esc(label), name=esc(f"{label} ({pts[0]['runs_normalized']} runs)"),
                hovertemplate=esc(label) + ": %{y:.3f}<br>level %{x:.4g}<extra></extra>"))
        unit = data.get("kinds", {}).get(kind, {}).get("unit", "")
        fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
        fig.update_layout(title=dict(text=esc(f"{env}: {kind}"), font=dict(size=14)),
                          xaxis_title=esc(f"{kind} level ({unit})"),
                          yaxis_title="normalized return (1 = unperturbed)", height=420)
        parts.append(figure(fig, f"study-robustness-{i}"))
    auc = data.get("auc") or []
    if auc:
        parts.append(f"<h3>AUC ({100 * level:g}% CI over runs)</h3>")
        parts.append(table(["kind", "env", "config", "levels", "runs", "AUC"], [
            [r["kind"], r["env"], r["label"] + ("!" if r.get("few_samples") else ""),
             r["levels"], fmt(r["runs_normalized"]),
             ci_text(r["auc"], r["auc_low"], r["auc_high"], 3) if r["auc"] is not None
             else "-"] for r in auc], numeric=(4, 5)))
    for title, rows in (
            ("AUC comparisons", data.get("comparisons") or []),
            ("AUC main effects (a factor's level against its first level, pooled over the "
             "other factors)", data.get("main_effects") or [])):
        if rows:
            parts.append(f"<h3>{esc(title)}</h3>"
                         f'<p class="note">{esc(data.get("comparison", ""))}.</p>')
            parts.append(table(["kind", "env", "a vs b", "AUC a", "AUC b", "difference",
                                f"P(a > b) [{100 * level:g}% CI]", "Mann-Whitney p",
                                "Welch p", "runs"], [
                [r["kind"], r["env"], comparison_label(r), fmt(r["mean_a"]), fmt(r["mean_b"]),
                 fmt(r["difference"]),
                 ci_text(r["prob_improvement"], r["prob_improvement_low"],
                         r["prob_improvement_high"], 2)
                 if r["prob_improvement"] is not None else "-",
                 fmt(r["mannwhitney_p"]), fmt(r["welch_p"]),
                 f"{r['runs_a']} / {r['runs_b']}"] for r in rows],
                numeric=(3, 4, 5, 6, 7, 8)))
    return "".join(parts)
