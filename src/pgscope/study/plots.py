"""PNG plots of a study summary: learning curves with CIs, interval estimates, performance
profiles and probabilities of improvement (one panel per env).

Labels carry each config's run counts where a run did not complete, so a plot never hides
a diverged or failed run: curves and means are over complete runs ("n=3 of 5: 2
diverged"); IQM, median and profiles count diverged and failed runs as the worst outcome
(an IQM or median of -inf is written at the panel's left edge, an interval reaching -inf
ends in an arrow there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _panels(n: int, width: float = 5.0, height: float = 3.6):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _counts_note(row: Any) -> str:
    """'n=5' when every planned run completed, else e.g. 'n=3 of 5: 2 diverged'."""
    if "n_complete" not in row or pd.isna(row["n_complete"]):
        return f"n={int(row['runs'])}" if "runs" in row else ""
    n, done = int(row["n"]), int(row["n_complete"])
    others = [f"{int(row[f'n_{k}'])} {k}" for k in ("diverged", "failed", "missing")
              if f"n_{k}" in row and int(row[f"n_{k}"])]
    return f"n={n}" if done == n else f"n={done} of {n}: {', '.join(others)}"


def _curve_panel(ax: Any, df: pd.DataFrame, by: str, title: str) -> None:
    many = df[by].nunique() > 6
    cmap = plt.get_cmap("tab20" if many else "tab10")
    for i, (name, g) in enumerate(df.groupby(by, sort=False)):
        color = cmap(i % cmap.N)
        ax.plot(g["env_steps"], g["mean"], color=color, lw=1.2,
                label=f"{name} ({_counts_note(g.iloc[0])})")
        ax.fill_between(g["env_steps"], g["low"], g["high"], alpha=0.08 if many else 0.2,
                        color=color)
    ax.set(title=title, xlabel="env steps", ylabel="mean episode return")
    ax.grid(alpha=0.3)


#: Above this many configs, learning curves are drawn one small panel per config.
FACET_ABOVE = 6


def plot_curves(curves: pd.DataFrame, envs: list[str], level: float, path: Path) -> Path:
    """Learning curves per env. With more than FACET_ABOVE configs the curves are faceted:
    one small panel per config, its curve and CI in colour over the other configs' curves in
    light grey (same axes in every panel of an env), so 16 configs stay readable."""
    labels = list(dict.fromkeys(curves["label"]))
    if len(labels) > FACET_ABOVE:
        return _plot_curves_faceted(curves, envs, labels, level, path)
    fig, axes = _panels(len(envs))
    for ax, env in zip(axes, envs, strict=True):
        _curve_panel(ax, curves[curves["env"] == env], "label", env)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Learning curves: mean over seeds, {100 * level:g}% bootstrap CI", fontsize=10)
    return _save(fig, path)


def _plot_curves_faceted(curves: pd.DataFrame, envs: list[str], labels: list[str],
                         level: float, path: Path) -> Path:
    ncols = 4
    rows_per_env = -(-len(labels) // ncols)
    fig, axes = plt.subplots(rows_per_env * len(envs), ncols, squeeze=False, sharex="row",
                             figsize=(3.4 * ncols, 2.6 * rows_per_env * len(envs)))
    cmap = plt.get_cmap("tab10")  # one strong colour per panel, grey for the context
    for e, env in enumerate(envs):
        data = curves[curves["env"] == env]
        lo = data["low"].min() if not data.empty else 0.0
        hi = data["high"].max() if not data.empty else 1.0
        for i, label in enumerate(labels):
            ax = axes[e * rows_per_env + i // ncols][i % ncols]
            for other, g in data.groupby("label", sort=False):
                if other != label:
                    ax.plot(g["env_steps"], g["mean"], color="0.82", lw=0.8)
            g = data[data["label"] == label]
            color = cmap(i % cmap.N)
            if not g.empty:
                ax.fill_between(g["env_steps"], g["low"], g["high"], color=color, alpha=0.25)
                ax.plot(g["env_steps"], g["mean"], color=color, lw=1.8)
                note = _counts_note(g.iloc[0])
            else:
                note = "no complete run"
            ax.set_title(f"{label} ({note})", fontsize=8)
            ax.set_ylim(lo, hi)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if i % ncols == 0:
                ax.set_ylabel(f"{env}\nmean return", fontsize=8)
            if i // ncols == rows_per_env - 1:
                ax.set_xlabel("env steps", fontsize=8)
        for j in range(len(labels), rows_per_env * ncols):
            axes[e * rows_per_env + j // ncols][j % ncols].set_visible(False)
    fig.suptitle(f"Learning curves, one panel per config (grey: the other configs): mean over "
                 f"seeds, {100 * level:g}% bootstrap CI", fontsize=10)
    return _save(fig, path)


def plot_factor_curves(fc: pd.DataFrame, envs: list[str], level: float, path: Path) -> Path:
    factors = list(dict.fromkeys(fc["factor"]))
    fig, axes = plt.subplots(len(envs), len(factors), squeeze=False,
                             figsize=(4 * len(factors), 3.3 * len(envs)))
    for r, env in enumerate(envs):
        for c, factor in enumerate(factors):
            ax = axes[r][c]
            _curve_panel(ax, fc[(fc["env"] == env) & (fc["factor"] == factor)], "level",
                         f"{env}: {factor}")
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Main effects: runs pooled by each factor's level, {100 * level:g}% "
                 "bootstrap CI", fontsize=10)
    return _save(fig, path)


def plot_intervals(agg: pd.DataFrame, envs: list[str], level: float, path: Path) -> Path:
    metrics = ("iqm", "median", "mean")
    titles = {"iqm": "IQM", "median": "median", "mean": "mean of complete runs"}
    labels = list(dict.fromkeys(agg["label"]))
    fig, axes = plt.subplots(len(envs), 3, figsize=(12, 0.35 * len(labels) * len(envs) + 1.5),
                             squeeze=False)
    for row, env in enumerate(envs):
        e = agg[agg["env"] == env].set_index("label").reindex(labels)
        names = [f"{label} ({_counts_note(r)})" if "n" in e and not pd.isna(r["n"]) else label
                 for label, r in e.iterrows()]
        for col, m in enumerate(metrics):
            ax = axes[row][col]
            if m not in e:
                continue
            y = np.arange(len(labels))
            mid, lo, hi = (e[k].to_numpy(float) for k in (m, f"{m}_low", f"{m}_high"))
            _interval_panel(ax, y, mid, lo, hi)
            ax.set_yticks(list(y), names if col == 0 else [""] * len(labels), fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{env}: {titles[m]}", fontsize=9)
            ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Final score, {100 * level:g}% stratified bootstrap CIs (diverged and "
                 "failed runs rank lowest in IQM and median)", fontsize=10)
    return _save(fig, path)


def _interval_panel(ax: Any, y: np.ndarray, mid: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray) -> None:
    """Points with interval bars; an infinite end is drawn to the panel's edge with an
    arrow, and a point at -inf is written as '-inf' at the left edge."""
    finite = np.isfinite(np.concatenate([mid, lo, hi]))
    if not finite.any():
        return
    values = np.concatenate([mid, lo, hi])[finite]
    span = float(values.max() - values.min()) or 1.0
    left, right = float(values.min()) - 0.1 * span, float(values.max()) + 0.1 * span
    ax.set_xlim(left, right)
    for yi, m, a, b in zip(y, mid, lo, hi, strict=True):
        if np.isnan(m):
            continue
        a_draw = left if np.isneginf(a) else a
        b_draw = left if np.isneginf(b) else b
        ax.plot([a_draw, b_draw], [yi, yi], color="C0", lw=1.2)
        if np.isneginf(a):
            ax.annotate("", xy=(left, yi), xytext=(left + 0.05 * span, yi),
                        arrowprops=dict(arrowstyle="->", color="C0"))
        if np.isfinite(m):
            ax.plot([m], [yi], "o", color="C0")
        else:
            ax.text(left, yi, " -inf", va="center", ha="left", fontsize=7, color="C3")


def plot_profiles(prof: pd.DataFrame, envs: list[str], path: Path) -> Path:
    fig, axes = _panels(len(envs))
    for ax, env in zip(axes, envs, strict=True):
        for label, g in prof[prof["env"] == env].groupby("label", sort=False):
            line = ax.plot(g["tau"], g["fraction"], label=f"{label} ({_counts_note(g.iloc[0])})")
            ax.fill_between(g["tau"], g["low"], g["high"], alpha=0.15,
                            color=line[0].get_color())
        ax.set(title=env, xlabel="final score tau", ylabel="fraction of runs > tau",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle("Performance profiles (score distributions; a diverged or failed run is "
                 "below every tau and stays in the denominator)", fontsize=10)
    return _save(fig, path)


def improvement_names(c: pd.DataFrame) -> list[str]:
    """'P(a > b) [env]' per comparison row, or 'P(f=level > f=reference) [env]' per main
    effect row."""
    if "factor" in c:
        return [f"P({f}={lv} > {f}={ref}) [{env}]" for f, lv, ref, env in
                zip(c["factor"], c["level"], c["reference"], c["env"], strict=True)]
    return [f"P({a} > {b}) [{env}]" for a, b, env in zip(c["a"], c["b"], c["env"],
                                                         strict=True)]


def plot_improvement(comp: pd.DataFrame, path: Path, level: float) -> Path | None:
    """P(a > b) with CIs, for config comparisons (a, b) or main effects (level vs
    reference)."""
    if comp.empty or "prob_improvement" not in comp:
        return None
    c = comp.dropna(subset=["prob_improvement"]).reset_index(drop=True)
    names = improvement_names(c)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(c) + 1.5))
    y = range(len(c))
    mid, lo, hi = (c[k].to_numpy(float) for k in ("prob_improvement", "prob_improvement_low",
                                                   "prob_improvement_high"))
    ax.errorbar(mid, list(y), xerr=[mid - lo, hi - mid], fmt="o", capsize=3)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(-0.02, 1.02), xlabel=f"probability of improvement ({100 * level:g}% CI)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_lottery(lc: pd.DataFrame, lot: pd.DataFrame, level: float, path: Path) -> Path:
    keys = list(dict.fromkeys(zip(lc["label"], lc["env"], strict=True)))
    fig, axes = _panels(len(keys), width=5.5)
    for ax, (label, env) in zip(axes, keys, strict=True):
        r = lot[(lot["label"] == label) & (lot["env"] == env)].iloc[0]
        _curve_panel(ax, lc[(lc["label"] == label) & (lc["env"] == env)], "group",
                     f"{label} on {env}: same config, split seeds\n"
                     f"Welch t = {r['max_abs_t']:.2f}, p = {r['min_p']:.4f} (most extreme of "
                     f"{r['splits']} splits)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Seed lottery: {100 * level:g}% bootstrap CIs", fontsize=10)
    return _save(fig, path)


def plot_summary(result: dict[str, Any], out: Path) -> list[Path]:
    """All plots of a :func:`pgscope.study.analysis.summarize` result into ``out``."""
    spec, t = result["spec"], result["tables"]
    envs, level = list(spec.envs), spec.statistics.level
    files = []
    if not t["curves"].empty:
        files.append(plot_curves(t["curves"], envs, level, out / "curves.png"))
    if "iqm" in t["aggregates"]:
        files.append(plot_intervals(t["aggregates"], envs, level, out / "intervals.png"))
    if not t["profiles"].empty:
        files.append(plot_profiles(t["profiles"], envs, out / "profiles.png"))
    poi = plot_improvement(t["comparisons"], out / "improvement.png", level)
    if poi is not None:
        files.append(poi)
    if "lottery_curves" in t and not t["lottery_curves"].empty:
        files.append(plot_lottery(t["lottery_curves"], t["lottery"], level,
                                  out / "lottery.png"))
    if "main_effects" in t:
        if not t["factor_curves"].empty:
            files.append(plot_factor_curves(t["factor_curves"], envs, level,
                                            out / "main_effect_curves.png"))
        poi = plot_improvement(t["main_effects"], out / "main_effects.png", level)
        if poi is not None:
            files.append(poi)
    return files
