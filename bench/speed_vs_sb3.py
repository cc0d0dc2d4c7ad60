"""Training speed: pgscope PPO vs stable-baselines3 PPO on Hopper-v5, same run, alternating.

    make bench-deps && .venv/bin/python bench/speed_vs_sb3.py --rounds 3 --iterations 10

Both use the same hyperparameters: 2048 env steps per rollout, minibatch 64, 10 epochs,
1 env, 64x64 tanh MLPs, Adam. Each measurement is a fresh training run of ``--iterations``
iterations in its own subprocess (so torch's thread setting of one cannot leak into the
other), and the runs alternate
pgscope, SB3 (torch threads = 1), SB3 (torch default threads) so that machine-load drift hits
all of them alike. Steps per second = env steps / wall seconds, including everything each
library does: each is timed from before its set-up (env, networks, optimizer) to the end of
training; for pgscope that includes writing a metrics line and a checkpoint every
iteration. Library imports are outside the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = 2048


def measure_pgscope(iterations: int) -> float:
    from pgscope import make_config, train

    cfg = make_config("ppo", "Hopper-v5", dict(total_steps=STEPS * iterations, seed=0,
                                                minibatches=STEPS // 64, epochs=10))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()  # wall time of the whole run, set-up and I/O included
        train(cfg, Path(tmp) / "run", progress=False)
        return STEPS * iterations / (time.perf_counter() - start)


def measure_sb3(iterations: int, threads: int | None) -> float:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    if threads is not None:
        torch.set_num_threads(threads)

    start = time.perf_counter()  # wall time of the whole run, set-up included
    model = PPO("MlpPolicy", gym.make("Hopper-v5"), n_steps=STEPS, batch_size=64, n_epochs=10,
                learning_rate=3e-4, device="cpu", seed=0, verbose=0)
    model.learn(STEPS * iterations)
    return STEPS * iterations / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--one", choices=["pgscope", "sb3-1", "sb3-default"])
    p.add_argument("--out", type=Path, default=Path("bench/results/speed_vs_sb3.json"))
    args = p.parse_args()
    if args.one:  # child process: one measurement, printed as JSON
        sps = (measure_pgscope(args.iterations) if args.one == "pgscope" else
               measure_sb3(args.iterations, 1 if args.one == "sb3-1" else None))
        print(json.dumps({"sps": sps}))
        return

    kinds = ["pgscope", "sb3-1", "sb3-default"]
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            out = subprocess.run([sys.executable, __file__, "--one", kind, "--iterations",
                                  str(args.iterations)], capture_output=True, text=True,
                                 check=True)
            sps = json.loads(out.stdout.strip().splitlines()[-1])["sps"]
            results[kind].append(sps)
            print(f"round {r + 1}: {kind:12s} {sps:7.0f} steps/s", flush=True)
    med = {k: float(np.median(v)) for k, v in results.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "iterations_per_run": args.iterations,
        "sps": results,
        "median_sps": med,
        "ratio_vs_sb3_1thread": med["pgscope"] / med["sb3-1"],
        "ratio_vs_sb3_default_threads": med["pgscope"] / med["sb3-default"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
