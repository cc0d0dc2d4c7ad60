"""Print the key figures of probe result folders as markdown (for docs/probes-hopper.md).

    .venv/bin/python bench/summarize_probes.py docs/probes/hopper-ppo-iter150 \
        docs/probes/hopper-ppo-iter480
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(d: dict, fmt: str = ".3f") -> str:
    return f"{d['mean']:{fmt}} [{d['ci_low']:{fmt}}, {d['ci_high']:{fmt}}]"


def after(record: dict, key: str) -> float:
    """``key + "_after"`` (the whole batch after the update or epoch), or ``key`` in probe
    results written before the ``*_after`` keys."""
    return record.get(f"{key}_after", record.get(key))


def main(folders: list[str]) -> None:
    for folder in map(Path, folders):
        print(f"\n### {folder.name}\n")
        g = folder / "gradients.json"
        if g.exists():
            r = json.loads(g.read_text())
            print(f"Gradients (K = {r['settings']['k']}, 'true' = "
                  f"{r['settings']['true_pairs']:,} pairs):\n")
            print("| pairs | policy pairwise cosine | policy cosine to true | policy cov. trace "
                  "| value pairwise cosine | value cosine to true |")
            print("|---|---|---|---|---|---|")
            for p, v in zip(r["policy"], r["value"], strict=True):
                print(f"| {p['n']:,} | {ci(p['pairwise_cosine'])} | {ci(p['cosine_to_true'])} "
                      f"| {ci(p['covariance_trace'], '.3g')} | {ci(v['pairwise_cosine'])} "
                      f"| {ci(v['cosine_to_true'])} |")
        v = folder / "values.json"
        if v.exists():
            r = json.loads(v.read_text())
            print(f"\nValues ({r['states']:,} states, {r['states_with_true_return']:,} with "
                  f"true returns, effective horizon {r['settings']['effective_horizon']}):\n")
            print("| against | mean relative error | mean abs error / mean abs target "
                  "| explained variance |")
            print("|---|---|---|---|")
            for key, label in (("vs_gae_targets", "GAE targets"),
                               ("vs_true_returns", "true returns")):
                e = r[key]
                print(f"| {label} | {ci(e['relative_error'])} | "
                      f"{ci(e['mean_abs_error_ratio'])} | {ci(e['explained_variance'])} |")
        b = folder / "baselines.json"
        if b.exists():
            r = json.loads(b.read_text())
            print(f"\nBaselines (true value fit: {r['true_value_fit']}):\n")
            print("| pairs | agent: cov. trace | true: cov. trace | zero: cov. trace "
                  "| agent: pairwise cos | true: pairwise cos | zero: pairwise cos |")
            print("|---|---|---|---|---|---|---|")
            for row in r["rows"]:
                print(f"| {row['n']:,} | " + " | ".join(
                    ci(row[x]["covariance_trace"], ".3g") for x in ("agent", "true", "zero"))
                    + " | " + " | ".join(ci(row[x]["pairwise_cosine"])
                                         for x in ("agent", "true", "zero")) + " |")
        t = folder / "trust-region.json"
        if t.exists():
            r = json.loads(t.read_text())
            print("\nTrust region over training:\n")
            for run in r["runs"]:
                print(f"- {run['run']}: {run['summary']}")
            print(f"\nReplay of update {r['replay']['checkpoint_iteration'] + 1}, per epoch "
                  "(whole batch): " + ", ".join(
                      f"{e['epoch']}: max ratio {after(e, 'ratio_max'):.2f}, "
                      f"KL {e['kl_mean']:.4f}" for e in r["replay"]["per_epoch"]))
            print(f"The update's metrics (docs/metrics.md): {r['replay']['phase']}")
        land = folder / "landscape.json"
        if land.exists():
            r = json.loads(land.read_text())
            print(f"\nLandscape (|step| = {r['delta_norm']:.3g}; rows = step multiples "
                  f"{r['settings']['steps']}, columns = direction multiples "
                  f"{r['settings']['directions']}):\n")
            print("surrogate:", [[round(x, 4) for x in row] for row in r["surrogate"]])
            for c, z in r["true_return"].items():
                print(f"true return ({int(c):,} steps):", [[round(x) for x in row] for row in z])
        tm = folder / "timing.json"
        if tm.exists():
            r = json.loads(tm.read_text())
            print("\nCost: " + "; ".join(f"{p['kind']} {p['seconds']:.0f} s, peak RSS "
                                         f"{p['peak_rss_mb']:.0f} MB" for p in r["probes"]))


if __name__ == "__main__":
    main(sys.argv[1:])
