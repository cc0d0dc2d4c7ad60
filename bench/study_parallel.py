"""Local executor vs the same runs one after another, in one benchmark run.

A study of N seeds of PPO on an env is run twice from scratch: (a) sequentially, each run
a plain ``pgscope.train`` call in this process, one after another; (b) with ``pgscope study
run``'s local executor (one worker process per core). The wall-time ratio (a)/(b) should be
close to the number of cores. Rounds alternate (a, b, a, b, ...) so that drifting machine
load hits both; the runs' metrics must be identical between (a) and (b) (timing aside).

    .venv/bin/python bench/study_parallel.py --seeds 4 --steps 20480 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pgscope.run import RunDir
from pgscope.study import parse_spec, run_study
from pgscope.train import TIMING_KEYS, train


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in RunDir(path).read_metrics()]


def _median_sps(path: Path) -> float:
    """Median per-iteration env steps/s of a run (its own work, without process start-up)."""
    return statistics.median(r["sps"] for r in RunDir(path).read_metrics())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20_480)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("bench/results/study_parallel.json"))
    args = ap.parse_args()

    spec = parse_spec(dict(name="bench-parallel", envs=[args.env], seeds=args.seeds,
                           total_steps=args.steps, configs=[dict(label="ppo", preset="ppo")]))
    rounds = []
    for rnd in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="pgscope-bench-"))
        t0 = time.perf_counter()
        for r in spec.runs():
            train(r.config, work / "seq" / r.rel_path, progress=False)
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        outcome = run_study(spec, work / "par", workers=args.workers, progress=False)
        t_par = time.perf_counter() - t0
        assert len(outcome.complete) == args.seeds, outcome
        identical = all(_metrics(work / "seq" / r.rel_path) == _metrics(work / "par" / r.rel_path)
                        for r in spec.runs())
        sps_seq = statistics.median(_median_sps(work / "seq" / r.rel_path) for r in spec.runs())
        sps_par = statistics.median(_median_sps(work / "par" / r.rel_path) for r in spec.runs())
        rounds.append(dict(sequential_s=t_seq, local_executor_s=t_par, ratio=t_seq / t_par,
                           identical_metrics=identical, run_sps_sequential=sps_seq,
                           run_sps_parallel=sps_par))
        print(f"round {rnd + 1}: sequential {t_seq:.1f} s, local executor ({args.workers} "
              f"workers) {t_par:.1f} s, ratio {t_seq / t_par:.2f}, identical metrics: "
              f"{identical}; per-run steps/s {sps_seq:.0f} alone vs {sps_par:.0f} with "
              f"{args.workers} in parallel", flush=True)
        shutil.rmtree(work)
    result = dict(
        env=args.env, seeds=args.seeds, steps_per_run=args.steps, workers=args.workers,
        cores=os.cpu_count(), machine=platform.platform(), processor=platform.processor(),
        date=time.strftime("%Y-%m-%d"), rounds=rounds,
        median_ratio=statistics.median(r["ratio"] for r in rounds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median ratio {result['median_ratio']:.2f} on {result['cores']} cores -> {args.out}")


if __name__ == "__main__":
    main()
