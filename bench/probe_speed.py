"""The gradient probe's wall time against the env alone: the same number of env steps with
random actions, through the same vector env with the same number of envs.

    nice -n 5 .venv/bin/python bench/probe_speed.py --env Hopper-v5 \
        --run runs/hopper-ppo-s0 --true-pairs 1000000

The probe runs its default grid (``pgscope.probes.DEFAULT_SIZES``, K = 10) unless
``--sizes`` / ``--k`` say otherwise; ``--run`` takes a pgscope run (its latest checkpoint,
or ``--checkpoint``), else a freshly initialized agent of the ``ppo`` preset is probed.
Each measurement runs in its own subprocess, so its wall time, CPU time and peak resident
memory (ru_maxrss) are its own; with ``--rounds`` > 1 the two alternate. Prints both
times, their ratio and the peak memory, and writes them to ``--out``
(bench/results/probe_speed.json). ``--save DIR`` also keeps the probe's result (its
``gradients.json`` and ``.png``, as ``pgscope probe gradients --out DIR`` writes them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _agent(env_id: str, run: str | None, checkpoint: int | None):
    from pgscope import load_agent, make_config
    from pgscope.agent import build_agent
    from pgscope.envs import make_env

    if run is not None:
        return load_agent(run, checkpoint)
    env = make_env(env_id)
    try:
        return build_agent(make_config("ppo", env_id, {}), env.observation_space,
                           env.action_space)
    finally:
        env.close()


def _env_only(env_id: str, steps: int, n_envs: int, seed: int) -> None:
    from pgscope.envs import make_vector_env

    envs = make_vector_env(env_id, n_envs)
    try:
        envs.reset(seed=seed)
        envs.action_space.seed(seed)
        for _ in range(-(-steps // n_envs)):
            envs.step(envs.action_space.sample())
    finally:
        envs.close()


def phase(args: argparse.Namespace) -> None:
    """One measurement in this process; prints its JSON line."""
    import torch

    torch.set_num_threads(1)  # as training and the tests
    from pgscope.probes import run_probes
    from pgscope.probes.gradients import gradient_probe

    steps = args.true_pairs + args.k * sum(args.sizes)
    agent = _agent(args.env, args.run, args.checkpoint) if args.phase == "probe" else None
    wall, cpu = time.perf_counter(), time.process_time()
    if agent is not None and args.save is not None:  # as `pgscope probe gradients --out`
        run_probes("gradients", args.run, args.save, checkpoint=args.checkpoint,
                   seed=args.seed, progress=False, sizes=tuple(args.sizes), k=args.k,
                   true_pairs=args.true_pairs, log=lambda line: None)
    elif agent is not None:
        gradient_probe(agent, args.sizes, args.k, args.true_pairs, seed=args.seed,
                       progress=False)
    else:
        _env_only(args.env, steps, args.envs, args.seed)
    print(json.dumps({"phase": args.phase, "env_steps": steps,
                      "wall_s": time.perf_counter() - wall,
                      "cpu_s": time.process_time() - cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    from pgscope.probes import DEFAULT_SIZES
    from pgscope.probes.sampling import MAX_ENVS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--run", help="a pgscope run directory (default: a fresh ppo agent)")
    p.add_argument("--checkpoint", type=int)
    p.add_argument("--true-pairs", type=lambda s: int(float(s)), default=1_000_000)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--envs", type=int, default=MAX_ENVS,
                   help="envs of the env-only run (the probe's chunks use up to this many)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/probe_speed.json"))
    p.add_argument("--save", type=Path,
                   help="also write the probe's gradients.json and .png here, as "
                        "`pgscope probe gradients RUN --out SAVE` does (needs --run)")
    p.add_argument("--phase", choices=["env", "probe"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase is not None:
        phase(args)
        return
    if args.true_pairs < 10 * max(args.sizes) or args.k < 2:
        p.error("--true-pairs must be at least 10x the largest size and --k at least 2.")
    if args.run is not None and not Path(args.run).is_dir():
        p.error(f"--run '{args.run}' is not a directory.")
    if args.save is not None and args.run is None:
        p.error("--save needs --run (the probe's files record the run they measured).")
    rows = []
    for r in range(args.rounds):
        for name in ("env", "probe"):
            cmd = [sys.executable, __file__, "--phase", name, *sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append({"round": r, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    env_s = float(np.median([row["wall_s"] for row in rows if row["phase"] == "env"]))
    probe_s = float(np.median([row["wall_s"] for row in rows if row["phase"] == "probe"]))
    env_cpu = float(np.median([row["cpu_s"] for row in rows if row["phase"] == "env"]))
    probe_cpu = float(np.median([row["cpu_s"] for row in rows if row["phase"] == "probe"]))
    summary = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(),
        "python": platform.python_version(), "command": " ".join(sys.argv),
        "env": args.env, "run": args.run, "checkpoint": args.checkpoint,
        "sizes": args.sizes, "k": args.k, "true_pairs": args.true_pairs, "envs": args.envs,
        "env_steps": rows[0]["env_steps"], "env_only_s": env_s, "probe_s": probe_s,
        "ratio": probe_s / env_s, "cpu_ratio": probe_cpu / env_cpu,
        "peak_rss_mb": {name: max(row["peak_rss_mb"] for row in rows if row["phase"] == name)
                        for name in ("env", "probe")},
        "rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['env_steps']} env steps: env only {env_s:.1f} s, gradient probe "
          f"{probe_s:.1f} s, ratio {summary['ratio']:.2f} (CPU time ratio "
          f"{summary['cpu_ratio']:.2f}); peak RSS env only {summary['peak_rss_mb']['env']:.0f}"
          f" MB, probe {summary['peak_rss_mb']['probe']:.0f} MB -> {args.out}")


if __name__ == "__main__":
    main()
