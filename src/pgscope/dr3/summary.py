"""The summary of an offline DR3 experiment: a table over seeds with bootstrap CIs and the
curves against gradient steps (``pgscope dr3 summary EXPERIMENT``).

For each variant and metric the table gives the mean over seeds at the last logged step
with a 95% bootstrap CI over seeds (:func:`pgscope.seed_statistics.stratified_bootstrap_ci`,
runs resampled with replacement; with 3 seeds the interval is coarse: it cannot be
wider than the seeds' range). The figure draws, per variant, the mean over seeds against
gradient steps with a pointwise 95% bootstrap band over seeds
(:func:`pgscope.seed_statistics.curve_ci`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pgscope.dr3.dataset import OfflineError
from pgscope.dr3.trainer import EXPERIMENT_FILE, MEMBERS_DIR

#: (key, label, log scale) of the table's and the figure's metrics.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("feature_dot", "phi(s,a) . phi(s',a')", True),
    ("feature_cosine", "cosine(phi(s,a), phi(s',a'))", False),
    ("feature_srank", "srank (delta 0.01)", False),
    ("td_loss", "TD loss", True),
    ("q_abs_error", "|Q - Q_MC| / mean|Q_MC|", True),
    ("q_signed_error", "(Q - Q_MC) / mean|Q_MC|", False),
    ("feature_norm", "|phi(s,a)|", True),
    ("q_mean", "mean Q on the dataset", False),
)


def read_experiment(path: str | Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The experiment's metadata and each member's log lines."""
    path = Path(path)
    meta_path = path / EXPERIMENT_FILE
    if not meta_path.exists():
        raise OfflineError(f"'{path}' is not a DR3 experiment directory (no {EXPERIMENT_FILE});"
                           " make one with 'pgscope dr3 train DATASET --out EXPERIMENT'.")
    meta = json.loads(meta_path.read_text())
    logs = {}
    for m in meta["members"]:
        file = path / MEMBERS_DIR / f"{m['name']}.jsonl"
        lines = []
        if file.exists():
            for line in file.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        logs[m["name"]] = lines
    if not any(logs.values()):
        raise OfflineError(f"experiment '{path}' has no log lines yet.")
    return meta, logs


def curves(meta: dict[str, Any], logs: dict[str, list[dict[str, Any]]]
           ) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per variant: the steps every seed has logged and, per metric, a ``(seeds, steps)``
    array."""
    out = {}
    variants = list(dict.fromkeys(m["variant"] for m in meta["members"]))
    for variant in variants:
        names = [m["name"] for m in meta["members"] if m["variant"] == variant]
        common = set.intersection(*({r["step"] for r in logs[n]} for n in names))
        steps = np.array(sorted(common))
        if not len(steps):
            continue
        arrays = {}
        for key, _, _ in METRICS:
            rows = []
            for n in names:
                by_step = {r["step"]: r.get(key, math.nan) for r in logs[n]}
                rows.append([float(by_step[s]) for s in steps])
            arrays[key] = np.array(rows, dtype=np.float64)
        out[variant] = (steps, arrays)
    return out


def summarize(path: str | Path, out: str | Path | None = None, plots: bool = True
              ) -> dict[str, Any]:
    """Write ``summary.csv``, ``summary.json`` and (with ``plots``) ``dr3-offline.png`` into
    ``out`` (default ``EXPERIMENT/summary``); returns the table."""
    from pgscope.seed_statistics import mean, stratified_bootstrap_ci

    meta, logs = read_experiment(path)
    out = Path(out) if out is not None else Path(path) / "summary"
    if out.exists() and not out.is_dir():
        raise OfflineError(f"--out '{out}' is a file; the summary needs a directory.")
    table = []
    data = curves(meta, logs)
    for variant, (steps, arrays) in data.items():
        row: dict[str, Any] = {"variant": variant, "step": int(steps[-1]),
                               "seeds": int(arrays["td_loss"].shape[0])}
        for key, _, _ in METRICS:
            final = arrays[key][:, -1]
            if np.isfinite(final).all():
                point, low, high = stratified_bootstrap_ci(final, mean, seed=0)
            else:
                point, low, high = math.nan, math.nan, math.nan
            row[key] = {"mean": point, "ci_low": low, "ci_high": high}
        table.append(row)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = [out / "summary.csv", out / "summary.json"]
    result: dict[str, Any] = {"experiment": str(path), "dataset": meta.get("dataset_meta"),
                              "settings": meta.get("settings"), "table": table}
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "step", "seeds"] + [f"{k}{s}" for k, _, _ in METRICS
                                                        for s in ("", "_low", "_high")])
        for row in table:
            writer.writerow([row["variant"], row["step"], row["seeds"]] + [
                row[k][s] for k, _, _ in METRICS for s in ("mean", "ci_low", "ci_high")])
    if plots and data:
        plot_curves(data, out / "dr3-offline.png", title=_title(meta))
        files.append(out / "dr3-offline.png")
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return {**result, "files": files}


def _title(meta: dict[str, Any]) -> str:
    d = meta.get("dataset_meta") or {}
    s = meta.get("settings") or {}
    return (f"offline Q evaluation of a {d.get('env_id')} policy: {d.get('transitions')} "
            f"transitions, MLP {s.get('hidden')}, batch {s.get('batch')}, "
            f"target {s.get('target')}")


def plot_curves(data: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]], path: Path,
                title: str = "", keys: tuple[str, ...] = (
                    "feature_dot", "feature_srank", "td_loss", "q_abs_error",
                    "feature_cosine", "q_signed_error")) -> None:
    """One panel per metric of ``keys``: per variant the mean over seeds and a 95%
    bootstrap band over seeds, against gradient steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pgscope.seed_statistics import curve_ci

    labels = {k: (label, log) for k, label, log in METRICS}
    cols = 3 if len(keys) > 4 else 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        label, log = labels[key]
        for variant, (steps, arrays) in data.items():
            y = arrays[key]
            ok = np.isfinite(y).all(axis=0)
            if not ok.any():
                continue
            center, low, high = curve_ci(y[:, ok], seed=0)
            line, = ax.plot(steps[ok], center, label=variant)
            ax.fill_between(steps[ok], low, high, color=line.get_color(), alpha=0.2)
        if log:
            ax.set_yscale("symlog" if any((arrays[key] <= 0).any()
                                          for _, arrays in data.values()) else "log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("gradient steps")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def format_table(result: dict[str, Any]) -> str:
    """The table as text: mean [95% CI] over seeds at the last step."""
    keys = ("feature_dot", "feature_cosine", "feature_srank", "td_loss", "q_abs_error",
            "q_signed_error")
    head = f"{'variant':10s} {'step':>7s} " + " ".join(f"{k:>24s}" for k in keys)
    lines = [head]
    for row in result["table"]:
        cells = " ".join(f"{_cell(row[k]):>24s}" for k in keys)
        lines.append(f"{row['variant']:10s} {row['step']:7d} {cells}")
    return "\n".join(lines)


def _cell(d: dict[str, float]) -> str:
    return f"{d['mean']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"
