"""Are seed-batched runs statistically the same as single runs? Hopper-v5 PPO.

    flock /tmp/briefs2/bench.lock nice -n 5 .venv/bin/python bench/batched_equivalence.py \
        --steps 100000 --seeds 16

Trains seeds 0..N-1 twice: with the seed-batched engine (two processes of N/2 seeds at
once, ``pgscope train --seeds``) and with the single engine (two runs at a time, each
process training its half one after the other), into ``runs/batched_equivalence/``. Each
run's final score is the papers' rule (its mean episode return over its last 10
iterations, as ``score = "paper"`` in a study); the two groups of scores are compared
with Welch's t-test and the Mann-Whitney U test, with 95% stratified bootstrap CIs of each
group's mean and IQM and of the probability of improvement (``pgscope.seed_statistics``).

The same seed does not give the same score in the two engines (float rounding differs
in the batched matmuls and grows over training), so the question is the statistical one:
are the two samples of scores distinguishable? Rerunning resumes the runs not finished and
recomputes the statistics; results go to ``bench/results/batched_equivalence.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pgscope import seed_statistics as stats
from pgscope.run import RunDir

LAST_ITERATIONS = 10  # the papers' score rule (pgscope.study.spec.SCORE_RULES["paper"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgscope.cli", "train", *args, "--quiet"]


def batched_commands(root: Path, seeds: list[int], steps: int) -> list[list[str]]:
    half = len(seeds) // 2
    commands = []
    for group in (seeds[:half], seeds[half:]):
        spec = ",".join(map(str, group))
        if all((root / f"seed_{s}").exists() for s in group):
            commands.append(_cli("--resume", str(root), "--seeds", spec,
                                 "--batch-size", str(len(group))))
        else:
            commands.append(_cli("--algo", "ppo", "--env", "Hopper-v5", "--seeds", spec,
                                 "--batch-size", str(len(group)), "--steps", str(steps),
                                 "--out", str(root)))
    return commands


def single_commands(root: Path, seeds: list[int], steps: int) -> list[list[str]]:
    """Two shell commands, each training its half of the seeds one after the other."""
    half = len(seeds) // 2
    commands = []
    for group in (seeds[:half], seeds[half:]):
        parts = []
        for s in group:
            out = root / f"seed_{s}"
            if RunDir(out).read_status()["state"] == "complete":
                continue
            args = (["--resume", str(out)] if out.exists() else
                    ["--algo", "ppo", "--env", "Hopper-v5", "--seed", str(s), "--steps",
                     str(steps), "--out", str(out)])
            parts.append(" ".join(_cli(*args)))
        commands.append(["bash", "-c", " && ".join(parts) or "true"])
    return commands


def run_together(commands: list[list[str]]) -> float:
    start = time.time()
    procs = [subprocess.Popen(c) for c in commands]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a training process failed: exit codes {codes}")
    return time.time() - start


def score(run: Path) -> float:
    """The papers' score of a complete run; -inf for a diverged or failed one."""
    status = RunDir(run).read_status()["state"]
    if status != "complete":
        return -np.inf
    returns = [r["return_mean"] for r in RunDir(run).read_metrics()[-LAST_ITERATIONS:]
               if r["return_mean"] is not None]
    return float(np.mean(returns))


def summary(x: np.ndarray) -> dict[str, object]:
    out: dict[str, object] = {"scores": x.tolist()}
    for name, fn in (("mean", stats.mean), ("iqm", stats.iqm)):
        point, low, high = stats.stratified_bootstrap_ci(x[:, None], fn, reps=5000)
        out[name] = {"value": point, "ci95": [low, high]}
    out["sd"] = float(np.std(x, ddof=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--root", type=Path, default=Path("runs/batched_equivalence"))
    p.add_argument("--out", type=Path, default=Path("bench/results/batched_equivalence.json"))
    args = p.parse_args()
    seeds = list(range(args.seeds))
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    timing = previous.get("wall_seconds", {})
    for name, commands in (("batched", batched_commands), ("single", single_commands)):
        root = args.root / name
        root.mkdir(parents=True, exist_ok=True)
        if all(RunDir(root / f"seed_{s}").read_status()["state"] == "complete"
               for s in seeds):
            continue
        seconds = run_together(commands(root, seeds, args.steps))
        timing[name] = timing.get(name, 0.0) + seconds  # summed over resumed attempts

    x = np.array([score(args.root / "batched" / f"seed_{s}") for s in seeds])
    y = np.array([score(args.root / "single" / f"seed_{s}") for s in seeds])
    t, p_welch = stats.welch_t_test(x[np.isfinite(x)], y[np.isfinite(y)])
    u, p_mw = stats.mann_whitney(x, y)
    poi = stats.probability_of_improvement_ci(x[:, None], y[:, None], reps=5000)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "env": "Hopper-v5", "preset": "ppo", "steps_per_run": args.steps, "seeds": seeds,
        "score": f"mean episode return over the last {LAST_ITERATIONS} iterations",
        "batched": summary(x), "single": summary(y),
        "welch_t": {"t": t, "p": p_welch}, "mann_whitney": {"u": u, "p": p_mw},
        "probability_batched_beats_single": {"value": poi[0], "ci95": [poi[1], poi[2]]},
        "wall_seconds": timing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("batched", "single")},
                     indent=2))
    for name in ("batched", "single"):
        s = result[name]
        print(f"{name}: mean {s['mean']['value']:.1f} {s['mean']['ci95']}, "  # type: ignore[index]
              f"IQM {s['iqm']['value']:.1f} {s['iqm']['ci95']}")  # type: ignore[index]


if __name__ == "__main__":
    main()
