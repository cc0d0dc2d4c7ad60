"""Where one iteration of the engine goes, against the envs alone and the CPU's arithmetic
speed (docs/benchmarks.md, "What the targets would take").

    .venv/bin/python bench/iteration_split.py --seeds 1 8

For each seed count N, in this process with one torch thread: the N Hopper-v5 envs
stepped alone through ``step_envs`` with a ``LocomotionBatch`` (3 x 2,048 steps, uniform
random actions), then ``train_batch`` of N ``ppo`` seeds for 4 iterations, reporting
their own ``rollout_s`` and ``update_s``; and the single-thread GFLOP/s of ``torch.bmm``
on the update's shapes ([8, 64, 64] x [8, 64, 64]) and of a 1024 x 1024 matmul. Run it on
a quiet machine (pause background jobs): it holds no lock and measures wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

ENV, STEPS = "Hopper-v5", 2048


def split(n: int) -> dict[str, object]:
    import numpy as np

    from pgscope.config import make_config
    from pgscope.engine.lockstep import step_envs
    from pgscope.envs import make_vector_env
    from pgscope.envs.batch_step import LocomotionBatch
    from pgscope.train import train_batch

    envs = [make_vector_env(ENV, 1) for _ in range(n)]
    for s, e in enumerate(envs):
        e.reset(seed=s)
    rng = np.random.default_rng(0)
    low, high = envs[0].action_space.low, envs[0].action_space.high
    batch = LocomotionBatch.make([e.envs[0] for e in envs])
    env_only = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(STEPS):
            step_envs(envs, rng.uniform(low, high, (n, *low.shape)).astype(np.float32),
                      batch=batch)
        env_only.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as d:
        cfgs = [make_config("ppo", ENV, {"seed": s, "total_steps": STEPS * 4}) for s in range(n)]
        train_batch(cfgs, [f"{d}/s{s}" for s in range(n)], progress=False)
        with open(f"{d}/s0/metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
    return {"seeds": n, "env_only_s": [round(x, 3) for x in env_only],
            "rollout_s": [round(r["rollout_s"], 3) for r in rows],
            "update_s": [round(r["update_s"], 3) for r in rows]}


def gflops() -> dict[str, float]:
    import torch

    def rate(f: Callable[[], object], flop: float, reps: int) -> float:
        f()
        start = time.perf_counter()
        for _ in range(reps):
            f()
        return round(flop * reps / (time.perf_counter() - start) / 1e9, 1)

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(8, 64, 64), torch.randn(8, 64, 64)
    return {"mm_1024_gflops": rate(lambda: a @ b, 2 * 1024**3, 20),
            "bmm_8x64_gflops": rate(lambda: torch.bmm(x, w), 2 * 8 * 64**3, 20_000)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    for n in args.seeds:
        print(json.dumps(split(n)), flush=True)
    print(json.dumps(gflops()))


if __name__ == "__main__":
    main()
