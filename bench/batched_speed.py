"""Seed-batched training speed on Hopper-v5 PPO (2,048 steps per iteration).

    make bench-deps
    flock /tmp/briefs2/bench.lock nice -n 5 .venv/bin/python bench/batched_speed.py \
        --part a --rounds 3 --iterations 5
    ... --part b --iterations 3         # throughput and memory against the batch size

Part (a), side by side in alternating rounds (so that machine-load drift hits every kind
alike), aggregate env steps per second of 16 seeds:

- ``batched-2x8``: two processes of 8 seeds each, the seed-batched engine, at once;
- ``batched-1x16``: one process of 16 seeds;
- ``sb3-2at-a-time``: 16 stable-baselines3 PPO runs with the same hyperparameters (2,048
  steps per rollout, minibatch 64, 10 epochs, one env, 64x64 tanh MLPs, Adam 3e-4, one
  torch thread), two processes at once, each running its half one after the other;
- ``single-2at-a-time``: the same with pgscope's ``train`` (one seed at a time: the
  engine's batch of one);
- ``single-1at-a-time`` / ``sb3-1at-a-time``: one process running 4 seeds one after the
  other (a single run on an otherwise quiet machine);
- ``envs-2x8``: the env-only limit: the same envs (each seed's own one-env vector env, as
  a run makes it) stepped with random actions, two processes of 8 seeds at once;
- ``batched-2x8-own-step``: ``batched-2x8`` with every env stepped by its own ``step``
  (``PGSCOPE_BATCH_STEP=0``: no :class:`pgscope.envs.batch_step.LocomotionBatch`);
- ``envs-batch-step-2x8``: ``envs-2x8`` with the envs stepped as the batched rollout
  steps them (``step_envs`` through a ``LocomotionBatch``): the env-only limit of the
  seed-batched engine.

Every process imports its libraries, signals that it is ready and waits; the parent starts
all of a kind's processes together and the kind's time is from that start to the last
process's end (set-up of envs, networks and optimizers included; for pgscope the metrics
lines and checkpoints every iteration too).

Part (b): one process of N seeds (1, 2, 4, 8, 16, 32) at a time, each with one torch thread:
aggregate steps per second against N, and memory: the peak resident set size of the
process and (peak - the size after imports) / N, the memory one more seed costs.

Part (update): the cost of one PPO minibatch forward/backward (policy and value losses) for
16 seeds at once, as the engine does it (``torch.func.vmap`` over ``functional_call``)
and written as batched matmuls (``torch.baddbmm``), against 16 single-seed passes; Hopper
sizes (11 -> 64 -> 64 -> 3), minibatch 64, one thread.

Results go to ``bench/results/batched_speed.json`` after every measurement; a rerun skips
the measurements already there (delete the file to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 2048
ENV = "Hopper-v5"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_for_go(go: Path | None) -> None:
    if go is None:
        return
    go.with_suffix(f".ready{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.01)


def child(kind: str, seeds: list[int], iterations: int, go: Path | None) -> dict[str, float]:
    """One process's measurement (run in a subprocess)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if kind == "batched-own-step":  # every env stepped by its own step, no LocomotionBatch
        os.environ["PGSCOPE_BATCH_STEP"] = "0"
        kind = "batched"
    if kind == "sb3":
        import gymnasium as gym
        from stable_baselines3 import PPO
    else:
        from pgscope import make_config, train
        from pgscope.engine.lockstep import step_envs
        from pgscope.envs import make_vector_env
        from pgscope.envs.batch_step import LocomotionBatch
        from pgscope.train import train_batch
    baseline = _rss_mb()
    _wait_for_go(go)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "batched":
            cfgs = [make_config("ppo", ENV, dict(seed=s, total_steps=STEPS * iterations))
                    for s in seeds]
            train_batch(cfgs, [Path(tmp) / f"seed_{s}" for s in seeds], progress=False)
        elif kind == "single":
            for s in seeds:
                train(make_config("ppo", ENV, dict(seed=s, total_steps=STEPS * iterations)),
                      Path(tmp) / f"seed_{s}", progress=False)
        elif kind == "sb3":
            for s in seeds:
                model = PPO("MlpPolicy", gym.make(ENV), n_steps=STEPS, batch_size=64,
                            n_epochs=10, learning_rate=3e-4, device="cpu", seed=s, verbose=0)
                model.learn(STEPS * iterations)
        elif kind in ("envs", "envs-batch"):
            envs = [make_vector_env(ENV, 1) for _ in seeds]
            for s, e in zip(seeds, envs, strict=True):
                e.reset(seed=s * 1000)
            rng = np.random.default_rng(0)
            low, high = envs[0].action_space.low, envs[0].action_space.high
            if kind == "envs":
                for _ in range(STEPS * iterations):
                    for e in envs:
                        e.step(rng.uniform(low, high).astype(np.float32))
            else:  # the same envs, stepped as the batched rollout steps them
                batch = LocomotionBatch.make([e.envs[0] for e in envs])
                for _ in range(STEPS * iterations):
                    actions = rng.uniform(low, high, (len(envs), *low.shape)).astype(np.float32)
                    step_envs(envs, actions, batch=batch)
        else:
            raise ValueError(kind)
    end = time.time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(start=start, end=end, steps=STEPS * iterations * len(seeds),
                peak_rss_mb=peak, baseline_rss_mb=baseline)


def launch(kind: str, groups: list[list[int]], iterations: int) -> dict[str, float]:
    """Run ``kind`` in one process per seed group, all started together; aggregate."""
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--child", kind, "--seeds", ",".join(map(str, g)),
             "--iterations", str(iterations), "--go", str(go)],
            stdout=subprocess.PIPE, text=True) for g in groups]
        while len(list(Path(tmp).glob("go.ready*"))) < len(procs):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"a {kind} process failed before it was ready")
            time.sleep(0.05)
        t0 = time.time()
        go.touch()
        outs = []
        for p in procs:
            stdout, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a {kind} process failed (exit {p.returncode})")
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    seconds = max(o["end"] for o in outs) - t0
    steps = sum(o["steps"] for o in outs)
    return dict(steps=steps, seconds=seconds, steps_per_s=steps / seconds,
                peak_rss_mb=max(o["peak_rss_mb"] for o in outs),
                baseline_rss_mb=max(o["baseline_rss_mb"] for o in outs),
                loadavg_1min=os.getloadavg()[0])


#: Part (a): kind -> (child kind, seed groups, one process per group, run at once).
PART_A = {
    "batched-2x8": ("batched", [list(range(8)), list(range(8, 16))]),
    "batched-1x16": ("batched", [list(range(16))]),
    "sb3-2at-a-time": ("sb3", [list(range(8)), list(range(8, 16))]),
    "single-2at-a-time": ("single", [list(range(8)), list(range(8, 16))]),
    "envs-2x8": ("envs", [list(range(8)), list(range(8, 16))]),
    "batched-2x8-own-step": ("batched-own-step", [list(range(8)), list(range(8, 16))]),
    "envs-batch-step-2x8": ("envs-batch", [list(range(8)), list(range(8, 16))]),
    # a single run on a quiet machine: one process, 4 seeds one after the other
    "single-1at-a-time": ("single", [list(range(4))]),
    "sb3-1at-a-time": ("sb3", [list(range(4))]),
}
SIZES = (1, 2, 4, 8, 16, 32)


def update_costs(n: int = 16, batch: int = 64, reps: int = 30, rounds: int = 5
                 ) -> dict[str, float]:
    """Milliseconds per minibatch index for ``n`` seeds: vmap, baddbmm, n single passes
    (best of ``rounds`` timings of ``reps`` calls each)."""
    import torch
    from torch.distributions import Normal
    from torch.func import vmap

    from pgscope.algos.common import make_optimizer
    from pgscope.algos.ppo import clipped_surrogate_loss
    from pgscope.config import make_config
    from pgscope.engine.nets import SeedNets
    from pgscope.networks import GaussianPolicy, ValueNet
    from pgscope.optimizations import normalize_advantages, value_loss

    torch.set_num_threads(1)
    cfg = make_config("ppo", ENV)
    policies = [GaussianPolicy(11, 3, (64, 64), "tanh", True) for _ in range(n)]
    values = [ValueNet(11, (64, 64), "tanh", True) for _ in range(n)]
    nets = SeedNets(cfg, policies, values,
                    [make_optimizer(cfg, p, v) for p, v in zip(policies, values, strict=True)])
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(n, batch, 11, generator=g), torch.randn(n, batch, 3, generator=g)
    logp, adv, old_v, ret = (torch.randn(n, batch, generator=g) for _ in range(4))

    def losses(p, v, obs, act, logp, adv, old_v, ret):  # type: ignore[no-untyped-def]
        dist = nets.bound(p).dist(obs)
        ratio = (dist.log_prob(act).sum(-1) - logp).exp()
        loss = clipped_surrogate_loss(ratio, normalize_advantages(adv, True), 0.2)
        return loss + value_loss(nets.value.call(v, "forward", obs), old_v, ret, 0.2)

    seed_losses = vmap(losses)

    def with_vmap() -> None:
        seed_losses(nets.policy.params, nets.value.params, obs, act, logp, adv, old_v,
                    ret).sum().backward()

    def stacked(prefix_nets, names):  # type: ignore[no-untyped-def]
        return [torch.stack([dict(m.named_parameters())[k].detach() for m in prefix_nets])
                .requires_grad_() for k in names]

    lin = [f"net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    pw, vw = stacked(policies, lin), stacked(values, lin)
    log_std = torch.stack([p.log_std.detach() for p in policies]).unsqueeze(1)
    log_std.requires_grad_()

    def mlp(x, w):  # type: ignore[no-untyped-def]
        for i in range(0, len(w), 2):
            x = torch.baddbmm(w[i + 1].unsqueeze(1), x, w[i].transpose(1, 2))
            x = x.tanh() if i < len(w) - 2 else x
        return x

    def with_bmm() -> None:
        mean = mlp(obs, pw)
        ratio = (Normal(mean, log_std.exp().expand_as(mean)).log_prob(act).sum(-1)
                 - logp).exp()
        a = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True) + 1e-8)
        loss = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a).mean(-1)
        v = mlp(obs, vw).squeeze(-1)
        clipped = old_v + (v - old_v).clamp(-0.2, 0.2)
        v_loss = torch.max((v - ret).pow(2), (clipped - ret).pow(2)).mean(-1)
        (loss + v_loss).sum().backward()

    def singles() -> None:
        for i in range(n):
            dist = policies[i].dist(obs[i])
            ratio = (dist.log_prob(act[i]).sum(-1) - logp[i]).exp()
            loss = clipped_surrogate_loss(ratio, normalize_advantages(adv[i], True), 0.2)
            (loss + value_loss(values[i](obs[i]), old_v[i], ret[i], 0.2)).backward()

    best = {"vmap": float("inf"), "baddbmm": float("inf"), "singles": float("inf")}
    for _ in range(rounds):  # alternate, keep each one's best
        for name, fn in (("vmap", with_vmap), ("baddbmm", with_bmm), ("singles", singles)):
            fn()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / reps * 1e3)
    return {f"{k}_ms": v for k, v in best.items()} | {"seeds": n, "minibatch": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["a", "b", "update"], default="a")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--runs-per-process", type=int, default=8,
                   help="part (a), sb3 and single: runs per process (8 = all 16 seeds; fewer "
                        "measure the same per-process throughput in less time)")
    p.add_argument("--kinds", default=",".join(PART_A))
    p.add_argument("--out", type=Path, default=Path("bench/results/batched_speed.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seeds", help=argparse.SUPPRESS)
    p.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        seeds = [int(s) for s in args.seeds.split(",")]
        print(json.dumps(child(args.child, seeds, args.iterations, args.go)))
        return

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("machine", f"{platform.machine()}, {os.cpu_count()} cores, "
                                  f"{platform.platform()}")
    results.setdefault("env", ENV)
    measurements = results.setdefault("measurements", [])

    def done(key: dict[str, object]) -> bool:
        return any(all(m.get(k) == v for k, v in key.items()) for m in measurements)

    def record(key: dict[str, object], value: dict[str, float]) -> None:
        measurements.append({**key, **value, "date": time.strftime("%Y-%m-%d %H:%M")})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(measurements[-1]), flush=True)

    if args.part == "a":
        for r in range(args.rounds):
            for kind in args.kinds.split(","):
                child_kind, groups = PART_A[kind]
                if child_kind in ("sb3", "single"):
                    groups = [g[:args.runs_per_process] for g in groups]
                key = dict(part="a", kind=kind, round=r, iterations=args.iterations,
                           runs=sum(len(g) for g in groups))
                if not done(key):
                    record(key, launch(child_kind, groups, args.iterations))
    elif args.part == "update":
        record(dict(part="update"), dict(update_costs(), loadavg_1min=os.getloadavg()[0]))
    else:
        for n in SIZES:
            key = dict(part="b", kind="batched", seeds=n, iterations=args.iterations)
            if not done(key):
                record(key, launch("batched", [list(range(n))], args.iterations))


if __name__ == "__main__":
    main()
