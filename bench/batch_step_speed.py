"""Env-only speed of batch stepping: :class:`pgscope.envs.batch_step.LocomotionBatch`
against each env's own ``step``, per MuJoCo env and number of envs K.

    nice -n 5 .venv/bin/python bench/batch_step_speed.py     # Hopper, Swimmer, Ant, Humanoid
    nice -n 5 .venv/bin/python bench/batch_step_speed.py --envs Ant-v5 --k 1,4,16 --rounds 5

For every env id and K (1 and 8 by default), K envs made by ``gymnasium.make`` (reset with
seeds 0..K-1 and stepped twice, the checker's steps) are stepped with random float32
actions (pre-drawn, uniform over the action space) in two ways, one after the other in
each round (so that load drift hits both alike), each on its own K envs (the two sets
follow the same trajectories: batch stepping is bit-identical):

- ``own``: each env's own ``env.step`` (through its wrappers), as the engine steps envs
  that do not qualify or with ``PGSCOPE_BATCH_STEP=0``;
- ``batch``: one ``LocomotionBatch.step`` of all K per step.

Envs whose episodes end are reset by their own ``reset`` in ``own`` and ``batch`` (as the
engine does). Every measurement runs about ``--steps`` env steps in all (K envs x steps/K
batch steps); the table gives env steps per second, the median over the rounds, and
batch / own as the median of the per-round ratios. Results go to
``bench/results/batch_step_speed.json`` (overwritten).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from pgscope.envs.batch_step import LocomotionBatch

MODES = ("own", "batch")


def _envs(env_id: str, k: int) -> list[gym.Env[Any, Any]]:
    envs = [gym.make(env_id) for _ in range(k)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
        for _ in range(2):  # the checker's steps, in the env's own step
            env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    return envs


def _runner(mode: str, envs: list[gym.Env[Any, Any]], actions: np.ndarray
            ) -> Callable[[], None]:
    """A function that steps ``envs`` once per row of ``actions`` ``[T, K, nu]``."""
    k = len(envs)
    if mode == "own":
        def run() -> None:
            for step in actions:
                for j, env in enumerate(envs):
                    _, _, term, trunc, _ = env.step(step[j])
                    if term or trunc:
                        env.reset()
        return run
    if mode == "batch":
        batch = LocomotionBatch.make(envs)
        if batch is None or not batch.ready():
            raise RuntimeError("these envs are not batch-stepped")
        rows = list(range(k))

        def run() -> None:
            for step in actions:
                _, _, term, trunc, _ = batch.step(step, rows)
                for j in np.flatnonzero(term | trunc):
                    envs[j].reset()
        return run
    raise ValueError(mode)


def measure(env_ids: list[str], ks: list[int], rounds: int, steps: int
            ) -> list[dict[str, Any]]:
    """One record per env id, K, mode and round: env steps per second."""
    records = []
    for env_id in env_ids:
        for k in ks:
            space = gym.make(env_id).action_space
            rng = np.random.default_rng(0)
            actions = rng.uniform(space.low, space.high,
                                  (max(1, steps // k), k, *space.shape)).astype(np.float32)
            runners = {mode: _runner(mode, _envs(env_id, k), actions) for mode in MODES}
            for run in runners.values():  # warm-up
                run()
            for r in range(rounds):
                for mode in MODES:
                    start = time.perf_counter()
                    runners[mode]()
                    seconds = time.perf_counter() - start
                    records.append(dict(env=env_id, k=k, mode=mode, round=r,
                                        steps=actions.shape[0] * k, seconds=seconds,
                                        steps_per_s=actions.shape[0] * k / seconds))
                    print(json.dumps(records[-1]), flush=True)
    return records


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: median steps/s per env, K and mode, and the median per-round ratio."""
    rows = ["| env | K | own `step` (steps/s) | `LocomotionBatch` (steps/s) | batch / own "
            "|", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((rec["env"], rec["k"]) for rec in records))
    for env_id, k in keys:
        mine = [rec for rec in records if (rec["env"], rec["k"]) == (env_id, k)]
        speed = {mode: {rec["round"]: rec["steps_per_s"] for rec in mine if rec["mode"] == mode}
                 for mode in MODES}
        ratio = statistics.median(speed["batch"][r] / speed["own"][r] for r in speed["own"])
        med = {mode: statistics.median(v.values()) for mode, v in speed.items()}
        rows.append(f"| {env_id} | {k} | {med['own']:,.0f} | {med['batch']:,.0f} | "
                    f"**{ratio:.2f}x** |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", default="Hopper-v5,Swimmer-v5,Ant-v5,Humanoid-v5")
    p.add_argument("--k", default="1,8", help="numbers of envs, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1600, help="env steps per measurement")
    p.add_argument("--out", type=Path, default=Path("bench/results/batch_step_speed.json"))
    args = p.parse_args()
    records = measure(args.envs.split(","), [int(k) for k in args.k.split(",")],
                      args.rounds, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        date=time.strftime("%Y-%m-%d %H:%M"), loadavg_1min=os.getloadavg()[0],
        args=vars(args) | {"out": str(args.out)}, measurements=records), indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
