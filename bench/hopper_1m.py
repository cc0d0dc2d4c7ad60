"""Hopper-v5 at 1M steps: presets x seeds, run as ordinary (resumable) pgscope runs.

    .venv/bin/python bench/hopper_1m.py --presets ppo --seeds 0 1 2 --workers 2 --out runs/bench1m
    .venv/bin/python bench/hopper_1m.py --summary-only --out runs/bench1m

Re-running resumes unfinished runs and skips finished ones. The final score of a run is the
mean episode return over its last 10 iterations (20,480 env steps); the summary prints the
mean over seeds with each seed's score, as markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LAST = 10


def run_one(preset: str, seed: int, steps: int, out: Path) -> Path:
    run = out / f"{preset}-s{seed}"
    status = run / "status.json"
    if status.exists() and json.loads(status.read_text())["state"] == "complete":
        return run
    cmd = [sys.executable, "-m", "pgscope.cli", "train", "--quiet"]
    if (run / "config.json").exists():
        cmd += ["--resume", str(run)]
    else:
        cmd += ["--algo", preset, "--env", "Hopper-v5", "--steps", str(steps), "--seed",
                str(seed), "--out", str(run)]
    subprocess.run(cmd, check=True)
    return run


def final_score(run: Path) -> tuple[float, int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tail = [r["return_mean"] for r in records[-LAST:] if r["return_mean"] is not None]
    sps = float(np.mean([r["sps"] for r in records]))
    return float(np.mean(tail)), records[-1]["env_steps"], sps


def summarize(out: Path, presets: list[str]) -> str:
    lines = ["| preset | seeds | env steps | final return, mean over seeds | per seed | mean SPS |",
             "|---|---|---|---|---|---|"]
    for preset in presets:
        runs = sorted(out.glob(f"{preset}-s*"))
        done = [r for r in runs if (r / "status.json").exists() and json.loads(
            (r / "status.json").read_text())["state"] == "complete"]
        if not done:
            continue
        scores = [final_score(r) for r in done]
        vals = [s[0] for s in scores]
        lines.append(f"| {preset} | {len(done)} | {scores[0][1]:,} | {np.mean(vals):.0f} "
                     f"(std {np.std(vals, ddof=1) if len(vals) > 1 else 0:.0f}) | "
                     f"{', '.join(f'{v:.0f}' for v in vals)} | "
                     f"{np.mean([s[2] for s in scores]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["ppo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench1m"))
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args()
    if not args.summary_only:
        jobs = [(pr, s) for pr in args.presets for s in args.seeds]
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda job: run_one(job[0], job[1], args.steps, args.out), jobs))
    print(summarize(args.out, args.presets))


if __name__ == "__main__":
    main()
