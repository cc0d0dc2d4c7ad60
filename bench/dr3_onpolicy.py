"""Issue 13's on-policy check: ppo with and without ``value_dr3_coef`` on Hopper-v5.

Runs (resumably) the study ``bench/studies/dr3_onpolicy.toml`` and reports, per config, the
critic-feature metrics (mean over seeds with a 95% bootstrap CI over seeds) at the first
and last iterations, the final score, and a plot of feature_dot, feature_srank,
explained variance and return against env steps (bands: 95% bootstrap CI over seeds).

    .venv/bin/python bench/dr3_onpolicy.py --out runs/dr3_onpolicy [--plot docs/dr3-onpolicy.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pgscope.seed_statistics import curve_ci, mean, stratified_bootstrap_ci  # noqa: E402
from pgscope.study import load_spec, run_study  # noqa: E402
from pgscope.study.analysis import load_study  # noqa: E402

SPEC = Path(__file__).parent / "studies" / "dr3_onpolicy.toml"
KEYS = ("feature_dot", "feature_cosine", "feature_srank", "explained_variance", "return_mean")


def window(df, key: str, first: bool, n: int = 5) -> np.ndarray:
    """Each seed's mean of ``key`` over its first (or last) ``n`` iterations."""
    out = []
    for _, run in df.groupby("seed"):
        run = run.sort_values("iteration")
        part = run.head(n) if first else run.tail(n)
        out.append(float(part[key].mean()))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/dr3_onpolicy")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default="bench/results/dr3_onpolicy.json")
    args = ap.parse_args()
    run_study(load_spec(SPEC), Path(args.out), workers=2, progress=True)  # resumes
    df = load_study(args.out)
    report: dict = {}
    for label, runs in df.groupby("label"):
        row = {}
        for key in KEYS:
            for first in (True, False):
                x = window(runs, key, first)
                _, lo, hi = stratified_bootstrap_ci(x[:, None], mean, reps=2000, seed=0)
                row[f"{key}_{'first' if first else 'last'}5"] = dict(
                    mean=float(x.mean()), ci_low=float(lo), ci_high=float(hi),
                    seeds=len(x))
        report[str(label)] = row
        print(label, {k: round(v["mean"], 3) for k, v in row.items()})
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        for ax, key in zip(axes, ("feature_dot", "feature_srank", "explained_variance",
                                  "return_mean"), strict=True):
            for label, runs in df.groupby("label"):
                table = runs.pivot_table(index="seed", columns="env_steps", values=key)
                curves = table.to_numpy()
                centre, lo, hi = curve_ci(curves, reps=1000, seed=0)
                steps = table.columns.to_numpy()
                ax.plot(steps, centre, label=str(label))
                ax.fill_between(steps, lo, hi, alpha=0.25)
            ax.set_title(key)
            ax.set_xlabel("env steps")
            if key == "feature_dot":
                ax.set_yscale("log")
        axes[0].legend()
        fig.suptitle("Hopper-v5, ppo vs ppo + value_dr3_coef 0.03 (5 seeds each; 95% CI)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)


if __name__ == "__main__":
    main()
