"""The value probe over training, as "A Closer Look" (Ilyas et al., 2020) plots its
Figure 3: the mean relative error of V against its GAE targets and against returns, at
checkpoints through one run.

    .venv/bin/python bench/values_over_training.py --run runs/hopper-ppo-paper-s0 \
        --checkpoints 0 50 100 150 200 250 300 350 400 450 480 \
        --out docs/probes/hopper-ppo-paper-values

Each checkpoint's probe (``pgscope probe values RUN --checkpoint C``, 1e5 fresh pairs by
default) writes ``OUT/iter_<C>/values.json``; a checkpoint whose JSON exists is not probed
again, so the script resumes after an interruption. The figure ``OUT/values.png`` shows
the three errors the probe reports against the iteration (95% bootstrap CIs): the GAE
targets (the paper's left panel), the returns cut at the rollout end or time limit (the
paper's right panel) and pgscope's uncut true returns; ``OUT/values.csv`` holds the
numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

SERIES = {  # result key -> label
    "vs_gae_targets": "vs GAE targets (the paper's left panel)",
    "vs_cut_returns": "vs cut returns (the paper's right panel)",
    "vs_true_returns": "vs true returns (pgscope: uncut only)",
}


def probe_checkpoints(run: Path, checkpoints: list[int], out: Path, pairs: int) -> None:
    from pgscope.probes import run_probes

    for c in checkpoints:
        folder = out / f"iter_{c:06d}"
        if (folder / "values.json").exists():
            continue
        start = time.perf_counter()
        run_probes("values", run, folder, checkpoint=c, value_pairs=pairs, progress=False,
                   log=lambda line: None)
        print(f"iteration {c}: {time.perf_counter() - start:.0f} s", flush=True)


def collect(out: Path) -> list[dict[str, float]]:
    rows = []
    for path in sorted(out.glob("iter_*/values.json")):
        result = json.loads(path.read_text())
        row = {"iteration": result["checkpoint"]["iteration"],
               "env_steps": result["checkpoint"]["env_steps"]}
        for key in SERIES:
            err = result[key]["relative_error"]
            row.update({f"{key}": err["mean"], f"{key}_low": err["ci_low"],
                        f"{key}_high": err["ci_high"]})
        rows.append(row)
    return sorted(rows, key=lambda r: r["iteration"])


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    x = [r["iteration"] for r in rows]
    panels = (["vs_gae_targets"], ["vs_cut_returns", "vs_true_returns"])
    for ax, keys in zip(axes, panels, strict=True):
        for key in keys:
            ax.plot(x, [r[key] for r in rows], marker="o", label=SERIES[key])
            ax.fill_between(x, [r[f"{key}_low"] for r in rows],
                            [r[f"{key}_high"] for r in rows], alpha=0.25)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("mean relative error |V - y| / |y|")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--checkpoints", type=int, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", type=lambda s: int(float(s)), default=100_000)
    args = p.parse_args()
    if not args.run.is_dir():
        p.error(f"--run '{args.run}' is not a directory.")
    probe_checkpoints(args.run, args.checkpoints, args.out, args.pairs)
    rows = collect(args.out)
    with (args.out / "values.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "values.png", f"value prediction over training ({args.run.name})")
    print(f"{len(rows)} checkpoints -> {args.out / 'values.png'}")


if __name__ == "__main__":
    main()
