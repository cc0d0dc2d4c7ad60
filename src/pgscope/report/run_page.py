"""The report of one run: summary, doctor findings (shaded on the plots), learning curve,
training diagnostics, probes, the final policy's clip and the config."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgscope.algos import kl_target
from pgscope.doctor import ALARMS, Finding, RunData, check
from pgscope.metrics import REGISTRY, metric_value
from pgscope.report import probes as probe_html
from pgscope.report.page import (
    PALETTE_10,
    SEVERITY_COLOUR,
    Page,
    badge,
    ci_text,
    esc,
    figure,
    fmt,
    kv,
    rgba,
    table,
    video,
)
from pgscope.seed_statistics import FEW_SAMPLES

#: Diagnostics panels: (anchor, title, keys, y axis type, note).
PANELS: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    ("kl", "KL(old || new) after the update", ("kl_mean", "kl_max", "approx_kl",
                                                "kl_heldout_mean"), "log",
     "log scale: KLs span orders of magnitude; dashed: 2 x the KL target"),
    ("clip", "Clip fraction", ("clip_fraction", "clip_fraction_after"), "linear",
     "fraction of ratios with |r - 1| > eps_ref"),
    ("ratio", "Probability ratio range", ("ratio_max_after", "ratio_min_after", "ratio_max",
                                          "ratio_min"), "log",
     "log scale (ratios are multiplicative); dashed: 1 +- eps for clipped PPO"),
    ("entropy", "Entropy of the data-collecting policy", ("entropy",), "linear", ""),
    ("std", "Policy standard deviation / entropy fraction", ("policy_std", "entropy_frac"),
     "linear", ""),
    ("ev", "Explained variance", ("explained_variance",), "linear",
     "1 = perfect value predictions, 0 = no better than a constant"),
    ("policy-loss", "Policy loss", ("policy_loss",), "linear", ""),
    ("value-loss", "Value loss", ("value_loss",), "log", "log scale"),
    ("grad", "Gradient norms (before clipping)", ("policy_grad_norm", "value_grad_norm"), "log",
     "log scale"),
    ("lr", "Learning rates", ("lr", "value_lr"), "linear", ""),
    ("sps", "Training speed", ("sps",), "linear", ""),
    ("saturation", "Actions outside the bounds", ("action_saturation",), "linear", ""),
    ("scale", "Scale of value targets and advantages", ("value_target_absmax",
                                                       "advantage_absmax"), "log",
     "log scale; learner units (after reward scaling)"),
    ("trpo", "TRPO line search", ("step_fraction", "linesearch_steps"), "linear", ""),
    ("epochs", "PPO epochs run", ("epochs_run", "kl_beta"), "linear", ""),
    ("features", "Critic features (DR3 co-adaptation)", ("feature_dot", "feature_norm"),
     "linear", "value net's penultimate features on the batch; a growing phi(s) . phi(s') "
     "is co-adaptation (docs/dr3.md)"),
    ("feature-cosine", "Cosine of consecutive states' critic features", ("feature_cosine",),
     "linear", "at most 1: features of consecutive states pointing the same way"),
    ("feature-rank", "Effective rank of the critic features", ("feature_srank",), "linear",
     "srank_0.01: singular directions holding 99% of the singular-value sum"),
)


def _x(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["env_steps"]) for r in records]


def _series(records: list[dict[str, Any]], key: str) -> list[float | None]:
    out = []
    for r in records:
        v = metric_value(r, key)
        out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
    return out


def _steps_of(records: list[dict[str, Any]], iteration: int, start: bool) -> float:
    """env_steps at the start (end of the previous iteration) or end of ``iteration``."""
    by_it = {int(r["iteration"]): int(r["env_steps"]) for r in records}
    if start:
        return float(by_it.get(iteration - 1, 0))
    return float(by_it.get(iteration, max(by_it.values(), default=0)))


def shade_findings(fig: Any, records: list[dict[str, Any]], findings: list[Finding],
                   keys: tuple[str, ...]) -> list[int]:
    """Shade the iteration ranges of the findings that concern ``keys``; returns their
    numbers (1-based positions in ``findings``)."""
    shown = []
    for n, f in enumerate(findings, start=1):
        if not set(f.metrics) & set(keys) or not f.ranges:
            continue
        shown.append(n)
        for a, b in f.ranges:
            x0, x1 = _steps_of(records, a, True), _steps_of(records, b, False)
            fig.add_vrect(x0=x0, x1=x1, fillcolor=SEVERITY_COLOUR[f.severity], opacity=0.13,
                          line_width=0, annotation_text=f"#{n}", annotation_position="top left",
                          annotation_font_size=10)
    return shown


def _finding_links(numbers: list[int], findings: list[Finding]) -> str:
    if not numbers:
        return ""
    links = ", ".join(f'<a href="#finding-{n}">#{n} {esc(findings[n - 1].alarm)}</a>'
                      for n in numbers)
    return f'<p class="caption">shaded: doctor findings {links}</p>'


def learning_curve(records: list[dict[str, Any]], findings: list[Finding]) -> str:
    import plotly.graph_objects as go
    from scipy import stats as sps

    x = np.array(_x(records), dtype=float)
    mean = np.array([np.nan if v is None else v for v in _series(records, "return_mean")])
    lo = np.array([np.nan if v is None else v for v in _series(records, "return_min")])
    hi = np.array([np.nan if v is None else v for v in _series(records, "return_max")])
    fig = go.Figure()
    ok = np.isfinite(mean)
    fig.add_trace(go.Scatter(x=np.concatenate([x[ok], x[ok][::-1]]),
                             y=np.concatenate([hi[ok], lo[ok][::-1]]), fill="toself",
                             mode="lines",
                             fillcolor=rgba("#9aa4ae", 0.18), line=dict(width=0),
                             hoverinfo="skip", name="range of the iteration's episodes"))
    fig.add_trace(go.Scatter(x=x[ok], y=mean[ok], mode="lines", line=dict(color="#9aa4ae",
                             width=1), name="mean return of the iteration's episodes"))
    # mean over a sliding window of 10 iterations with a 95% t-interval over them
    w = 10
    sm, sl, sh, sx = [], [], [], []
    vals = [(xi, v) for xi, v in zip(x, mean, strict=True) if np.isfinite(v)]
    for i in range(w - 1, len(vals)):
        win = np.array([v for _, v in vals[i - w + 1:i + 1]])
        m, s = float(win.mean()), float(win.std(ddof=1))
        half = float(sps.t.ppf(0.975, w - 1)) * s / math.sqrt(w)
        sx.append(vals[i][0])
        sm.append(m)
        sl.append(m - half)
        sh.append(m + half)
    if sx:
        c = PALETTE_10[0]
        fig.add_trace(go.Scatter(x=sx + sx[::-1], y=sh + sl[::-1], fill="toself", mode="lines",
                                 fillcolor=rgba(c, 0.2), line=dict(width=0),
                                 hoverinfo="skip", name="95% CI of the 10-iteration mean"))
        fig.add_trace(go.Scatter(x=sx, y=sm, mode="lines", line=dict(color=c, width=2.5),
                                 name="mean over the last 10 iterations"))
    shown = shade_findings(fig, records, findings, ("return_mean",))
    fig.update_layout(xaxis_title="env steps", yaxis_title="episode return (env units)",
                      legend=dict(orientation="h", y=-0.2))
    return figure(fig, "curve-return", height=430) + _finding_links(shown, findings)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def last_evaluation(records: list[dict[str, Any]]) -> tuple[str, str]:
    """The summary row of the run's last evaluation: its mean return with its interval."""
    r = [r for r in records if r.get("eval_return") is not None][-1]
    mean = float(r["eval_return"])
    text = ci_text(mean, float(_or(r.get("eval_return_low"), mean)),
                   float(_or(r.get("eval_return_high"), mean)), 4)
    return (f"last evaluation return (iteration {r.get('iteration')}, "
            f"{r.get('eval_episodes')} episodes, 95% bootstrap CI)", text)


def has_evaluations(records: list[dict[str, Any]]) -> bool:
    """Whether the run evaluated during training (``eval_every``; ``eval_*`` keys)."""
    return any(r.get("eval_return") is not None for r in records)


def evaluation_curve(records: list[dict[str, Any]]) -> str:
    """The evaluations during training (:mod:`pgscope.periodic_eval`): the mean return of
    each evaluation's episodes with its bootstrap interval as a band, over env steps."""
    import plotly.graph_objects as go

    rows = [r for r in records if r.get("eval_return") is not None]
    x = [int(r["env_steps"]) for r in rows]
    mean = [float(r["eval_return"]) for r in rows]
    low = [float(_or(r.get("eval_return_low"), r["eval_return"])) for r in rows]
    high = [float(_or(r.get("eval_return_high"), r["eval_return"])) for r in rows]
    c = PALETTE_10[1]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", mode="lines",
                             fillcolor=rgba(c, 0.2), line=dict(width=0), hoverinfo="skip",
                             name="95% bootstrap CI over the evaluation's episodes"))
    fig.add_trace(go.Scatter(
        x=x, y=mean, mode="lines+markers", line=dict(color=c, width=2.5),
        name="mean return of the evaluation episodes",
        customdata=[[r.get("iteration"), r.get("eval_episodes")] for r in rows],
        hovertemplate="eval_return = %{y:.4g}<br>iteration %{customdata[0]}, "
                      "%{customdata[1]} episodes<br>env steps %{x}<extra></extra>"))
    fig.update_layout(xaxis_title="env steps", yaxis_title="episode return (env units)",
                      legend=dict(orientation="h", y=-0.2))
    few = [r for r in rows if r.get("eval_few_samples")]
    note = ("Each point: the policy after that iteration's update, on envs of its own with "
            "frozen observation statistics (config eval_every, eval_episodes, "
            "eval_deterministic); <code>pgscope evaluate RUN --checkpoint I --seed "
            "eval_seed</code> replays one.")
    if few:
        note += (f" {len(few)} of {len(rows)} intervals rest on fewer than {FEW_SAMPLES} "
                 "episodes and understate the uncertainty.")
    return figure(fig, "curve-eval", height=400) + f'<p class="caption">{note}</p>'


def axis_unit(unit: str) -> str:
    """A metric's unit as an axis title: the registry writes dimensionless as '1'."""
    return "dimensionless" if unit == "1" else unit


def line_label(text: str, ytype: str) -> dict[str, Any]:
    """``add_hline`` keywords for a line's label: none on a log axis, where plotly places
    the line in data units but its annotation in log10 units (a label for a line at 100
    stretched the axis to 1e100); the panel's note names the line there."""
    if ytype == "log":
        return {}
    return dict(annotation_text=esc(text), annotation_position="top left")


def alarm_lines(keys: Sequence[str]) -> dict[float, list[str]]:
    """The fixed levels the doctor's alarms compare ``keys`` with (:attr:`Alarm.lines`),
    each with the alarms that watch it: what a panel showing ``keys`` draws."""
    out: dict[float, list[str]] = {}
    for alarm in ALARMS:
        for key, level in alarm.lines:
            if key in keys and alarm.name not in out.setdefault(level, []):
                out[level].append(alarm.name)
    return out


def kl_alarm_line(cfg: dict[str, Any]) -> float:
    """Where the KL panel draws its dashed line: 2 x the run's KL target
    (:func:`pgscope.algos.kl_target`), the level above which the doctor's
    ``kl-above-target`` fires."""
    return 2 * kl_target(cfg)[0]


def diagnostics(records: list[dict[str, Any]], findings: list[Finding],
                cfg: dict[str, Any]) -> str:
    import plotly.graph_objects as go

    x = _x(records)
    panels = []
    for anchor, title, keys, ytype, note in PANELS:
        present = [k for k in keys if any(v is not None for v in _series(records, k))]
        if not present:
            continue
        fig = go.Figure()
        for i, key in enumerate(present):
            m = REGISTRY.get(key)
            y = _series(records, key)
            if ytype == "log":
                y = [v if v is not None and v > 0 else None for v in y]
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines", name=key, line=dict(color=PALETTE_10[i], width=1.5),
                hovertemplate=f"{esc(key)} = %{{y:.4g}} {esc(m.unit if m else '')}"
                              "<br>env steps %{x}<extra></extra>"))
        if anchor == "kl":  # the doctor's kl-above-target threshold
            name = kl_target(cfg)[1]
            fig.add_hline(y=kl_alarm_line(cfg), line_dash="dash", line_color="#555",
                          line_width=1, **line_label(f"2 x the KL target ({name})", ytype))
        if anchor == "ratio" and cfg.get("algo") == "ppo" and cfg.get("ppo_loss") == "clip" \
                and float(cfg.get("clip_eps", 1e32)) < 1:
            for y in (1 - cfg["clip_eps"], 1 + cfg["clip_eps"]):
                fig.add_hline(y=y, line_dash="dash", line_color="#555", line_width=1)
        for level, names in alarm_lines(present).items():  # the doctor's fixed levels
            if ytype == "log" and level <= 0:
                continue
            fig.add_hline(y=level, line_dash="dot", line_color="#b22", line_width=1,
                          **line_label(", ".join(names), ytype))
        if anchor in ("clip", "saturation"):
            fig.update_yaxes(rangemode="tozero")
        units = sorted({axis_unit(REGISTRY[k].unit) for k in present if k in REGISTRY})
        if ytype == "log":  # label the powers of ten only, not the minor ticks
            fig.update_yaxes(dtick=1, minor=dict(ticks="outside", showgrid=False))
        fig.update_layout(title=dict(text=esc(title), font=dict(size=14)),
                          xaxis_title="env steps", yaxis_title=esc(", ".join(units)),
                          yaxis_type=ytype, yaxis_exponentformat="e", showlegend=True,
                          legend=dict(orientation="h", y=-0.28), height=330)
        shown = shade_findings(fig, records, findings, tuple(present))
        meaning = "".join(f"<li><b>{esc(k)}</b> ({esc(REGISTRY[k].unit)}): "
                          f"{esc(REGISTRY[k].meaning)}</li>" for k in present if k in REGISTRY)
        panels.append(
            f'<div class="panel" id="panel-{esc(anchor)}">{figure(fig, f"fig-{anchor}")}'
            f'<p class="caption">{esc(note)}</p>{_finding_links(shown, findings)}'
            f"<details><summary>what the lines are</summary><ul class=\"caption\">{meaning}"
            "</ul></details></div>")
    return '<div class="grid">' + "".join(panels) + "</div>"


def findings_html(findings: list[Finding], records: list[dict[str, Any]]) -> str:
    from pgscope.doctor import ALARMS

    if not findings:
        return (f"<p>{badge('healthy')} No alarm fired: {len(ALARMS)} checks "
                "(<code>pgscope doctor</code>; thresholds and sources in docs/doctor.md).</p>")
    panel_of = {k: a for a, _, keys, _, _ in PANELS for k in keys}
    rows = []
    for n, f in enumerate(findings, start=1):
        where = next((panel_of[k] for k in f.metrics if k in panel_of), None)
        if "return_mean" in f.metrics:
            where = "curve"
        link = (f'<a href="#{"learning" if where == "curve" else "panel-" + where}">'
                f"{esc(f.iterations_text())}</a>") if where else esc(f.iterations_text())
        rows.append([f"#{n}", badge(f.severity), f"<b>{esc(f.alarm)}</b><br>{esc(f.sign)}",
                     link, esc(f.evidence), esc(f.threshold), esc(f.source)])
    return (f"<p>{badge(f'{len(findings)} alarm(s)', 'warning')} Each finding's iterations "
            "link to the plot where they are shaded.</p>"
            + table(["#", "severity", "alarm", "iterations", "evidence", "threshold",
                     "source"], rows, raw=(1, 2, 3, 4, 5, 6),
                    row_ids=[f"finding-{n}" for n in range(1, len(findings) + 1)]))


def _env_summary(env_id: str) -> list[tuple[str, str]]:
    try:
        import gymnasium as gym

        env = gym.make(env_id)
        try:
            return [("observation space", str(env.observation_space)),
                    ("action space", str(env.action_space)),
                    ("time limit", str(getattr(env.spec, "max_episode_steps", None)))]
        finally:
            env.close()
    except Exception:  # noqa: BLE001 - the summary is best effort
        return [("spaces", "(the env could not be created here)")]


def config_html(cfg: dict[str, Any], meta: dict[str, Any]) -> str:
    preset_values: dict[str, Any] = {}
    try:
        from pgscope import make_config

        preset_values = json.loads(json.dumps(
            make_config(cfg.get("preset", "ppo"), cfg.get("env_id", "")).to_dict()))
    except Exception:  # noqa: BLE001 - an env this machine cannot make: no highlighting
        preset_values = {}
    from pgscope.algos import unread_keys

    unread = set(unread_keys(str(cfg.get("algo", ""))))
    rows: list[list[str]] = []
    unread_rows: list[list[str]] = []
    ids, changed_rows = [], []
    for k in sorted(cfg):
        changed = bool(preset_values) and preset_values.get(k) != cfg[k] and k not in (
            "seed", "total_steps")
        row = [f'<span class="{"changed" if changed else ""}">{esc(k)}</span>',
               esc(json.dumps(cfg[k])), esc(json.dumps(preset_values.get(k))) if changed else ""]
        (unread_rows if k in unread else rows).append(row)
        ids.append(f"cfg-{k}")
        if changed:
            changed_rows.append([esc(k) + (" <em>(not read by this algorithm)</em>"
                                           if k in unread else ""), esc(json.dumps(cfg[k])),
                                 esc(json.dumps(preset_values.get(k)))])
    changed_html = (
        f"<h3>Changed from the preset {esc(cfg.get('preset', '?'))} "
        f"({len(changed_rows)} key{'s' if len(changed_rows) != 1 else ''})</h3>"
        + (table(["key", "value", "preset value"], changed_rows, raw=(0, 1, 2))
           if changed_rows else '<p class="note">none: the preset as it is.</p>')
        + "<h3>Every key</h3>") if preset_values else ""
    versions = meta.get("versions", {})
    ext = meta.get("extensions", [])
    return (kv([(k, str(v)) for k, v in versions.items()])
            + (f'<p class="note">extended: {esc(json.dumps(ext))}</p>' if ext else "")
            + changed_html
            + '<p class="note">Highlighted: values that differ from the preset\'s for this env '
              "(seed and total_steps aside).</p>"
            + table(["key", "value", "preset value"], rows, raw=(0, 1, 2))
            + (f"<details><summary>Not read by {esc(cfg.get('algo', '?'))} "
               f"({len(unread_rows)} keys: another algorithm's; whatever their values, they "
               "change nothing in this run)</summary>"
               + table(["key", "value", "preset value"], unread_rows, raw=(0, 1, 2))
               + "</details>" if unread_rows else ""))


def find_video(run: Path) -> Path | None:
    folder = run / "videos"
    clips = sorted((p for p in folder.glob("*") if p.suffix.lower() in (".mp4", ".gif")),
                   key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return clips[-1] if clips else None


def run_page(path: Path, video_file: Path | None = None) -> Page:
    data = RunData.load(path)
    records = data.records
    meta = json.loads((path / "config.json").read_text())
    cfg = meta.get("config", {})
    findings = check(data)
    state = str(data.status.get("state", "unknown"))
    name = path.resolve().name
    env_id, preset = cfg.get("env_id", "?"), cfg.get("preset", "?")
    page = Page(f"pgscope run {name}: {preset} on {env_id}, seed {cfg.get('seed')}",
                f"{badge(state)} {esc(path)}")

    returns = [r["return_mean"] for r in records if r.get("return_mean") is not None]
    last = np.array(returns[-10:], dtype=float)
    if len(last) >= 2:
        from scipy import stats as sps

        half = float(sps.t.ppf(0.975, len(last) - 1)) * last.std(ddof=1) / math.sqrt(len(last))
        final = ci_text(last.mean(), last.mean() - half, last.mean() + half, 4)
    else:
        final = fmt(last.mean()) if len(last) else "-"
    sps_vals = [r["sps"] for r in records if isinstance(r.get("sps"), (int, float))]
    summary = [("env", env_id), ("preset (algorithm)", f"{preset} ({cfg.get('algo')})"),
               ("seed", str(cfg.get("seed"))), ("state", state),
               ("iterations", f"{len(records)} of {data.planned_iterations}"),
               ("env steps", fmt(records[-1]["env_steps"] if records else 0)),
               (f"final return (last {len(last)} iteration{'s' if len(last) != 1 else ''} "
                "with episodes" + (", 95% t-CI)" if len(last) >= 2 else ")"), final),
               ("best iteration return", fmt(max(returns) if returns else None)),
               ("first iteration return", fmt(returns[0] if returns else None)),
               ("training time", f"{fmt((records[-1].get('time_elapsed') or 0) / 60, 3)} min"
                if records else "-"),
               ("median env steps / s", fmt(float(np.median(sps_vals)) if sps_vals else None)),
               ("doctor", "healthy" if not findings else
                f"{len(findings)} alarm(s): " + ", ".join(f.alarm for f in findings))]
    if has_evaluations(records):
        summary.insert(6, last_evaluation(records))
    if data.status.get("error"):
        summary.append(("error", str(data.status["error"])))
    summary += [("writer host", str(data.status.get("host", "?")))] + _env_summary(env_id)
    page.add("summary", "Summary", kv(summary))
    page.add("doctor", "Doctor", findings_html(findings, records))
    if records:
        page.add("learning", "Learning curve", learning_curve(records, findings))
    if has_evaluations(records):
        page.add("evaluation", "Evaluation during training", evaluation_curve(records))
    if records:
        page.add("diagnostics", "Training diagnostics",
                 '<p class="note">Names and units from the metric registry '
                 "(docs/metrics.md). Click a legend entry to hide a line, double-click to "
                 "show it alone; drag to zoom, double-click to reset.</p>"
                 + diagnostics(records, findings, cfg))
    folders = probe_html.probe_folders(path)
    if folders:
        parts = []
        for folder in folders:
            it = probe_html.folder_iteration(folder)
            parts.append(probe_html.probe_folder_html(
                folder, f"Probes at iteration {it}" if it is not None else folder.name,
                f"probes-{folder.name}"))
        page.add("probes", "Probes", "".join(parts))
    clip = video_file or find_video(path)
    if clip is not None and clip.exists():
        page.add("video", "The policy", f'<p class="note">{esc(clip.name)}</p>' + video(clip))
    page.add("config", "Config and environment", config_html(cfg, meta))
    return page
