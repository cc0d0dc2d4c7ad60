"""The authors' four configurations on Hopper, scored as in the paper, next to the published
numbers: the built-in study ``implementation-matters-hopper`` (ppo-paper, ppo-m-paper,
trpo-paper, trpo+-paper; 488 iterations x 2,048 steps; 10 seeds; docs/presets.md).

    .venv/bin/python bench/implementation_matters.py                  # the full study
    .venv/bin/python bench/implementation_matters.py --steps 4096 --seeds 2 --out runs/im-tiny
    .venv/bin/python bench/implementation_matters.py --summary-only   # tables of what ran

The runs go through the study runner (``pgscope.study.run_study``), so re-running resumes
unfinished runs and skips finished ones. The score is the papers' rule (each run's mean
return over its last 10 iterations, then the mean over runs with a 95% stratified bootstrap
CI). Writes ``OUT/implementation_matters.md``: the final scores next to the published ones
of Engstrom et al. (2020), "Implementation Matters in Deep Policy Gradients" (the table in
docs/design.md section 4.3: MuJoCo v2 envs, 95% CIs over 80 or more agents per cell), and
the ranking of the configurations with the probability of improvement of each over the next.
The full study is 40 runs of 999,424 steps (40M env steps): about 2.5 hours of both cores
at the 4,400 steps/s it made on 2026-12-02 with two workers (seed-batched engine, batches of
5 seeds, batch-stepped envs; docs/benchmarks.md); ``--steps``/``--seeds`` make a smaller
one (a different study).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pgscope import seed_statistics as stats
from pgscope.config import env_family
from pgscope.errors import RunDirError
from pgscope.metrics import metric_value
from pgscope.run import RunDir
from pgscope.study import open_study, parse_spec, run_study
from pgscope.study.analysis import final_scores, load_study, write_summary
from pgscope.study.presets import study_dict

STUDY = "implementation-matters-hopper"

#: Published final returns at 1M steps, mean [95% CI] (Engstrom et al., 2020; copied in
#: docs/design.md section 4.3), by config label and env family.
PUBLISHED: dict[str, dict[str, tuple[float, float, float]]] = {
    "ppo-paper": {"Walker2d": (3292, 3157, 3426), "Hopper": (2513, 2391, 2632),
                  "Humanoid": (806, 785, 827)},
    "ppo-m-paper": {"Walker2d": (2735, 2602, 2866), "Hopper": (2142, 2008, 2279),
                    "Humanoid": (674, 656, 695)},
    "trpo-paper": {"Walker2d": (2791, 2709, 2873), "Hopper": (2043, 1948, 2136),
                   "Humanoid": (586, 576, 596)},
    "trpo+-paper": {"Walker2d": (3050, 2976, 3126), "Hopper": (2466, 2381, 2549),
                    "Humanoid": (1030, 979, 1083)},
}


def study_spec(steps: int | None, seeds: int | None) -> Any:
    """The built-in study, or a smaller one with ``steps`` per run / ``seeds`` seeds (its
    name says its size, so it never mixes with the full one)."""
    data = study_dict(STUDY, quick=False)
    if steps is not None:
        data["total_steps"] = steps
    if seeds is not None:
        data["seeds"] = seeds
    if steps is not None or seeds is not None:
        data["name"] = f"{STUDY}-{data['total_steps']}x{data['seeds']}"
    return parse_spec(data, source=f"bench {STUDY}")


def _interval(mean: float, low: float, high: float) -> str:
    if any(isinstance(v, float) and math.isnan(v) for v in (mean, low, high)):
        return "-"
    return f"{mean:.0f} [{low:.0f}, {high:.0f}]"


def score_table(aggregates: pd.DataFrame) -> list[str]:
    """Markdown: per config and env, pgscope's mean [95% CI] next to the published one."""
    lines = ["| config | env | runs complete | pgscope: mean [95% CI] | published: mean "
             "[95% CI] | CIs overlap |", "|---|---|---|---|---|---|"]
    for _, r in aggregates.iterrows():
        ours = (r.get("mean", math.nan), r.get("mean_low", math.nan), r.get("mean_high", math.nan))
        family = env_family(r["env"]) or r["env"]
        published = PUBLISHED.get(r["label"], {}).get(family)
        overlap = "-" if published is None or math.isnan(ours[0]) else \
            ("yes" if ours[1] <= published[2] and published[1] <= ours[2] else "no")
        lines.append(f"| {r['label']} | {r['env']} | {int(r['n_complete'])} of {int(r['n'])} | "
                     f"{_interval(*ours)} | {_interval(*published) if published else '-'} | "
                     f"{overlap} |")
    return lines


def improvement(comparisons: pd.DataFrame, a: str, b: str, env: str) -> str:
    """P(a > b) [CI] from the study's all-pairs comparisons (stored once per pair)."""
    for x, y, flip in ((a, b, False), (b, a, True)):
        row = comparisons[(comparisons["a"] == x) & (comparisons["b"] == y)
                          & (comparisons["env"] == env)]
        if not row.empty and "prob_improvement" in row and not pd.isna(
                row["prob_improvement"].iloc[0]):
            p, lo, hi = (float(row[k].iloc[0]) for k in
                         ("prob_improvement", "prob_improvement_low", "prob_improvement_high"))
            if flip:
                p, lo, hi = 1 - p, 1 - hi, 1 - lo
            return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"
    return "-"


def ranking(aggregates: pd.DataFrame, comparisons: pd.DataFrame) -> list[str]:
    """Markdown: per env the configs by pgscope's mean score, the published order, and
    P(config > the next one)."""
    lines = []
    for env, everything in aggregates.groupby("env", sort=False):
        family = env_family(env) or env
        g = everything[everything["mean"].notna()]
        waiting = list(everything.loc[everything["mean"].isna(), "label"])  # no complete run
        ours = list(g.sort_values("mean", ascending=False)["label"])
        theirs = sorted((label for label in everything["label"]
                         if family in PUBLISHED.get(label, {})),
                        key=lambda label: -PUBLISHED[label][family][0])
        lines += [f"{env}: pgscope's order {' > '.join(ours) or '-'}"
                  + (f" (no complete run yet: {', '.join(waiting)})" if waiting else "")
                  + f"; published order {' > '.join(theirs) or '-'}", "",
                  "| rank | config | mean | P(config > next) [95% CI] |", "|---|---|---|---|"]
        for i, label in enumerate(ours):
            mean = float(g[g["label"] == label]["mean"].iloc[0])
            nxt = improvement(comparisons, label, ours[i + 1], env) if i + 1 < len(ours) else ""
            lines.append(f"| {i + 1} | {label} | {mean:.0f} | {nxt} |")
        lines.append("")
    return lines


def _range(values: list[float], fmt: str) -> str:
    """min-max of per-run values ('-' when none)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return "-" if not v else f"{fmt.format(min(v))}-{fmt.format(max(v))}"


def _pooled_cell(per_run: list[list[float]], fmt: str) -> str:
    """'median over every value of every run, range of the runs' largest values'."""
    pooled = [v for values in per_run for v in values]
    if not pooled:
        return "- (not logged)"
    return (f"{fmt.format(float(np.median(pooled)))}, "
            f"{_range([max(v) for v in per_run if v], fmt)}")


def trust_region_table(out: Path) -> list[str]:
    """Markdown: per config and env, the trust-region statistics of its runs' update phases
    (probe 6 over training, read as :func:`pgscope.probes.trust_region.from_metrics` reads
    them, older metric names included): the largest
    ratio pi_new / pi_old of each run during the update phase (PPO: over every minibatch
    before its step) and on the whole batch after the update, and the mean KL(old || new)
    after the update; per-run values are given as their range over the runs."""
    lines = ["| config | env | runs | max ratio in the phase: median iteration, each run's "
             "largest | max ratio after the update: median iteration, each run's largest | "
             "mean KL after: median iteration, each run's largest |",
             "|---|---|---|---|---|---|"]
    for label_dir in sorted((out / "runs").iterdir()):
        for env_dir in sorted(p for p in label_dir.iterdir() if p.is_dir()):
            runs = sorted(p for p in env_dir.glob("seed_*") if (p / "metrics.jsonl").exists())
            if not runs:
                continue
            keys = ("ratio_max", "ratio_max_after", "kl_mean")
            per_run: dict[str, list[list[float]]] = {k: [] for k in keys}
            for run in runs:
                records = RunDir.open(run).read_metrics()
                for k in keys:
                    per_run[k].append([v for v in (metric_value(r, k) for r in records)
                                       if v is not None])

            lines.append(f"| {label_dir.name} | {env_dir.name} | {len(runs)} | "
                         f"{_pooled_cell(per_run['ratio_max'], '{:.2f}')} | "
                         f"{_pooled_cell(per_run['ratio_max_after'], '{:.2f}')} | "
                         f"{_pooled_cell(per_run['kl_mean'], '{:.4f}')} |")
    return lines


def report(out: Path) -> str:
    result = write_summary(out, plots=False)
    t, meta = result["tables"], result["meta"]
    lines = [f"# {meta['study']}", "",
             f"Final score: {meta['score_definition']}; {meta['complete']} of {meta['runs']} "
             f"runs complete, {meta['diverged']} diverged, {meta['failed']} failed, "
             f"{len(meta['missing'])} missing.",
             "Published: Engstrom et al. (2020), 'Implementation Matters in Deep Policy "
             "Gradients', 1M steps on the MuJoCo v2 envs, 95% CIs over 80 or more agents "
             "(docs/design.md section 4.3).", "", *score_table(t["aggregates"]), "",
             "## Ranking", "", *ranking(t["aggregates"], t["comparisons"]),
             "## Trust region over training", "",
             "Probe 6 from each run's metrics (every iteration, all runs started so far); "
             "PPO's clip range is 0.2, so a ratio above 1.2 is outside it. TRPO logs no "
             "in-phase ratio: its one step is taken after the line search.", "",
             *trust_region_table(out)]
    return "\n".join(lines)


def _scores(study_dir: Path) -> pd.DataFrame:
    """Every complete run's score (the study's own score rule); only the scores, without
    the summary's bootstrap tables or its files."""
    scores = final_scores(open_study(study_dir), load_study(study_dir))
    return scores[scores["state"] == "complete"]


def variants_table(variants: Path | list[Path], out: Path, reference: str = "trpo-paper"
                   ) -> list[str]:
    """Markdown: each config of the variant studies ``variants`` (bench/studies/
    trpo_paper_variants.toml: ``trpo-paper`` with one key set back to ``trpo``'s;
    trpo_control.toml: ``trpo`` itself) next to ``reference``'s runs of the main study
    ``out`` on the same seeds and on all of them, with P(reference > variant) and the
    Mann-Whitney p over all the reference's seeds."""
    ref = _scores(out)
    ref = ref[ref["label"] == reference]
    lines = [f"| config | runs | mean [95% CI] | per seed | {reference}, same seeds | "
             f"P({reference} > config) [95% CI], all {len(ref)} {reference} seeds | "
             "Mann-Whitney p |", "|---|---|---|---|---|---|---|"]
    dirs = [variants] if isinstance(variants, Path) else variants
    for label, g in pd.concat([_scores(d) for d in dirs]).groupby("label", sort=False):
        x = g["score"].to_numpy()
        same = ref[ref["seed"].isin(g["seed"])]["score"].to_numpy()
        y = ref["score"].to_numpy()
        m, lo, hi = stats.stratified_bootstrap_ci(x, stats.mean)
        p, plo, phi = stats.probability_of_improvement_ci(y, x)
        per_seed = ", ".join(f"{v:.0f}" for v in g.sort_values("seed")["score"])
        lines.append(f"| {label} | {len(x)} | {_interval(m, lo, hi)} | {per_seed} | "
                     f"{same.mean():.0f} ({len(same)} runs) | {p:.2f} [{plo:.2f}, {phi:.2f}]"
                     f" | {stats.mann_whitney(y, x)[1]:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, help="env steps per run (default: the study's)")
    p.add_argument("--seeds", type=int, help="seeds per config (default: the study's 10)")
    p.add_argument("--workers", type=int, help="parallel runs (default: one per core)")
    p.add_argument("--out", type=Path, help="study directory (default runs/<study name>)")
    p.add_argument("--summary-only", action="store_true", help="only the tables")
    p.add_argument("--variants", type=Path, nargs="+", help="also the table of the trpo-paper "
                   "variant studies (bench/studies/trpo_paper_variants.toml, trpo_control.toml)"
                   " run into these directories")
    args = p.parse_args()
    for d in args.variants or []:  # before any compute: one clear error, no traceback
        try:
            open_study(d)
        except RunDirError as exc:
            p.error(f"--variants: {exc}")
    spec = study_spec(args.steps, args.seeds)
    out = args.out or Path("runs") / spec.name
    if not args.summary_only:
        outcome = run_study(spec, out, workers=args.workers)
        print(f"{outcome.runs} runs: {outcome.skipped} already finished, "
              f"{len(outcome.complete)} completed now, {len(outcome.diverged)} diverged, "
              f"{len(outcome.failed)} failed")
    text = report(out)
    if args.variants is not None:
        text += ("\n\n## trpo-paper with one key set back to trpo's, and trpo\n\n"
                 + "\n".join(variants_table(args.variants, out)))
    (out / "implementation_matters.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
