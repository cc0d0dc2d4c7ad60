"""``pgscope selftest``: train PPO and TRPO on the sanity environments of
:mod:`pgscope.envs.sanity` and check the learned values and policies against their known
answers. Each check isolates one part of the agent (value regression, observation input,
discounting, policy gradient, conditioning on observations; discrete and continuous).

It goes through the real :func:`pgscope.train.train` path (rollout, GAE, update, run
directory, checkpoint loading), with small networks and the code-level optimizations that
change the reward scale switched off, so the expected numbers stay exact.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.distributions import Categorical

from pgscope.agent import Agent
from pgscope.config import make_config
from pgscope.run import load_agent
from pgscope.train import train

OBS_ZERO = np.array([[0.0]], dtype=np.float32)
OBS_PM = np.array([[1.0], [-1.0]], dtype=np.float32)
DISCOUNT = 0.5


@torch.no_grad()
def _p_action1(agent: Agent, obs: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(agent.preprocessor.obs(obs, update=False))
    dist = cast(Categorical, agent.policy.dist(x))  # the sanity envs' discrete policies
    probs: np.ndarray = dist.probs[:, 1].numpy()
    return probs


def _close(name: str, got: float, want: float, tol: float) -> tuple[bool, str]:
    return abs(got - want) <= tol, f"{name}={got:+.3f} (want {want:+.3f} +- {tol})"


def _above(name: str, got: float, bound: float) -> tuple[bool, str]:
    return got >= bound, f"{name}={got:.3f} (want >= {bound})"


Check = Callable[[Agent], list[tuple[bool, str]]]

CHECKS: dict[str, Check] = {
    "pgscope/ConstantReward-v0": lambda a: [_close("V(0)", a.value(OBS_ZERO)[0], 1.0, 0.05)],
    "pgscope/ObsReward-v0": lambda a: [
        _close("V(+1)", a.value(OBS_PM)[0], 1.0, 0.1),
        _close("V(-1)", a.value(OBS_PM)[1], -1.0, 0.1),
    ],
    "pgscope/Discounting-v0": lambda a: [
        _close("V(first)", a.value(OBS_ZERO)[0], DISCOUNT, 0.1),
        _close("V(second)", a.value(OBS_PM)[0], 1.0, 0.1),
    ],
    "pgscope/ActionReward-v0": lambda a: [_above("P(best)", _p_action1(a, OBS_ZERO)[0], 0.9)],
    "pgscope/ActionObsReward-v0": lambda a: [
        _above("P(best|+1)", _p_action1(a, OBS_PM)[0], 0.9),
        _above("P(best|-1)", 1 - _p_action1(a, OBS_PM)[1], 0.9),
        _above("V(+1)", a.value(OBS_PM)[0], 0.6),
        _above("V(-1)", a.value(OBS_PM)[1], 0.6),
    ],
    "pgscope/ContActionReward-v0": lambda a: [
        _close("mean(0)", a.act(OBS_ZERO)[0, 0], 0.5, 0.15)],
    "pgscope/ContActionObsReward-v0": lambda a: [
        _close("mean(+1)", a.act(OBS_PM)[0, 0], 0.5, 0.15),
        _close("mean(-1)", a.act(OBS_PM)[1, 0], -0.5, 0.15),
    ],
}

#: Small, fast settings; reward/observation scaling off so values keep their exact units.
SELFTEST_SETTINGS = dict(
    num_envs=8, steps_per_iter=512, total_steps=512 * 12, minibatches=4, epochs=8,
    hidden=(32, 32), policy_lr=3e-3, value_lr=1e-2, lr_anneal=False, gamma=DISCOUNT,
    obs_norm=False, obs_clip=False, reward_scale=False, reward_clip=False,
    value_clip=False, grad_clip=False, max_kl=0.1, checkpoint_every=1000,
)


@dataclass
class SelftestResult:
    env_id: str
    algo: str
    passed: bool
    seconds: float
    details: list[str] = field(default_factory=list)


def run_check(env_id: str, algo: str, seed: int = 0, workdir: Path | None = None
              ) -> SelftestResult:
    """Train ``algo`` ('ppo' or 'trpo') on one sanity env and check the result."""
    t0 = time.perf_counter()
    cfg = make_config(algo, env_id, dict(SELFTEST_SETTINGS, seed=seed))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run_dir = train(cfg, Path(tmp) / "run", progress=False)
        agent = load_agent(run_dir)
    checks = CHECKS[env_id](agent)
    return SelftestResult(env_id, algo, all(ok for ok, _ in checks),
                          time.perf_counter() - t0, [msg for _, msg in checks])


def run_selftest(algos: Sequence[str] = ("ppo", "trpo"), verbose: bool = False
                 ) -> list[SelftestResult]:
    """Every sanity env for every algorithm; returns the results (and prints them)."""
    results = []
    for algo in algos:
        for env_id in CHECKS:
            r = run_check(env_id, algo)
            results.append(r)
            if verbose:
                mark = "PASS" if r.passed else "FAIL"
                print(f"{mark} {algo:4s} {env_id:32s} {r.seconds:4.1f}s  {'; '.join(r.details)}",
                      flush=True)
    return results
