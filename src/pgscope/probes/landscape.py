"""Probe 5 of "A Closer Look at Deep Policy Gradients": the optimization landscape
(docs/design.md section 3).

Take the agent's actual update step ``Delta = theta_new - theta_old`` (replayed from a
checkpoint on a fresh training batch, exactly as training does it) and a random Gaussian
direction ``d`` of unit L2 norm over the policy parameters. On the grid
``theta_old + a Delta + b d`` evaluate

* the algorithm's own surrogate objective on that training batch, as the algorithm
  defines it (:attr:`pgscope.algos.Algorithm.surrogate`: PPO's clipped surrogate, with the
  KL penalty for ppo-kl; TRPO's ``mean(ratio A)``), advantages normalized over the batch
  when the agent normalizes them, and
* the true mean episode return of the policy at that point from fresh rollouts, at several
  sample counts: episodes are started until the count of env steps is reached and every
  started episode is run to its end (so short episodes are not favoured); the estimate at
  a smaller count uses the episodes that started first, nested inside the larger sample.

An episode that does not end within the env's time limit (or within
:data:`EPISODE_CAP` steps when the env has none) is cut there with a warning, and the count
of cut episodes is recorded as ``episodes_capped``: an env whose episodes never end cannot
stall the probe.

Finding to look for: the surrogate can rise where the true return falls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.algos import algorithm
from pgscope.config import Config
from pgscope.envs import make_vector_env
from pgscope.errors import ProbeError
from pgscope.optimizations import clip_actions
from pgscope.probes import ProbeInput, ProbeSettings, probe
from pgscope.probes.trust_region import replay_update
from pgscope.rollout import Batch

#: Episode length cap for envs without a time limit (an episode that never ends would
#: otherwise stall a landscape evaluation forever).
EPISODE_CAP = 10_000


def episode_returns(agent: Agent, n_steps: int, seed: int, n_envs: int = 32,
                    cap: int | None = None, capped: list[int] | None = None
                    ) -> list[tuple[int, int, float]]:
    """(start step, length, undiscounted return) of every episode started before
    ``n_steps`` env steps were used, each run to its end. Stochastic policy, frozen
    observation statistics.

    An episode still running after ``cap`` steps (default: the env's time limit, or
    :data:`EPISODE_CAP` when it has none) is cut there, counted with the return it has,
    and its env reset; the number of cut episodes is appended to ``capped``."""
    envs = make_vector_env(agent.config.env_id, n_envs)
    if cap is None:
        limit = envs.envs[0].spec.max_episode_steps if envs.envs[0].spec else None
        cap = limit or EPISODE_CAP
    pre = agent.preprocessor.with_frozen_statistics(n_envs)
    sample = agent.policy.numpy_sampler()
    rng = np.random.default_rng([seed, 0xE7A1])
    space = envs.single_action_space
    box = space if isinstance(space, gym.spaces.Box) else None
    low, high = (None, None) if box is None else (box.low, box.high)  # no bounds: discrete
    n_capped = 0
    try:
        raw, _ = envs.reset(seed=seed)
        used = 0  # env steps spent on counted episodes
        start = np.zeros(n_envs, dtype=np.int64)
        ret, length = np.zeros(n_envs), np.zeros(n_envs, dtype=np.int64)
        active = np.ones(n_envs, dtype=bool)  # finished envs keep stepping, ignored
        episodes: list[tuple[int, int, float]] = []
        while active.any():
            action = sample(pre.obs(raw, update=False), rng)
            action = clip_actions(action, low, high, agent.config.action_clip)
            raw, r, term, trunc, _ = envs.step(action)
            used += int(active.sum())
            ret += r
            length += 1
            cut = (length >= cap) & ~(term | trunc)
            for i in np.flatnonzero((term | trunc | cut) & active):
                episodes.append((int(start[i]), int(length[i]), float(ret[i])))
                n_capped += int(cut[i])
                active[i] = used < n_steps
            for i in np.flatnonzero(term | trunc | cut):
                ret[i], length[i], start[i] = 0.0, 0, used
            if cut.any():
                raw, _ = envs.reset(options={"reset_mask": cut})
        return sorted(episodes)
    finally:
        envs.close()
        if capped is not None:
            capped.append(n_capped)


def nested_means(episodes: list[tuple[int, int, float]], counts: Sequence[int]
                 ) -> list[float]:
    """Mean return of the first-started episodes whose lengths add up to each count."""
    lengths = np.cumsum([e[1] for e in episodes])
    rets = np.array([e[2] for e in episodes])
    out = []
    for n in counts:
        m = int(np.searchsorted(lengths, n) + 1)
        out.append(float(rets[:m].mean()))
    return out


def landscape_probe(run_dir: str | Path, iteration: int | None = None,
                    steps: Sequence[float] = (0, 0.75, 1.5, 2.25, 3.0),
                    directions: Sequence[float] = (0, 0.75, 1.5, 2.25, 3.0),
                    counts: Sequence[int] = (2_000, 20_000, 100_000), seed: int = 0,
                    progress: bool = True) -> dict:
    """Probe 5 (see module doc). Returns a JSON-ready dict with the grid, the surrogate and
    the true-return surfaces (one per sample count), and the norms of Delta and d."""
    counts = sorted(int(c) for c in counts)
    if len(steps) < 2 or len(directions) < 1 or min(counts) < 1:
        raise ProbeError("the landscape grid needs at least two step multiples, one "
                         "direction multiple and positive sample counts.")
    if max(abs(x) for x in (*steps, *directions)) > 100:
        raise ProbeError("grid multiples beyond 100 leave any meaningful parameter range.")
    captured: dict = {}
    replay = replay_update(run_dir, iteration, seed, capture=captured)
    agent: Agent = captured["agent"]
    batch: Batch = captured["batch"]
    params = list(agent.policy.parameters())
    theta_new = parameters_to_vector(params).detach().clone()
    theta_old = parameters_to_vector(captured["old_policy"].parameters()).detach().clone()
    delta = theta_new - theta_old
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(delta.shape, generator=gen)
    d /= d.norm()
    surrogate = algorithm(agent.config.algo).surrogate
    old_policy, state = captured["old_policy"], captured["state_before"]

    shape = (len(steps), len(directions))
    surr = np.zeros(shape)
    true = np.zeros((len(counts), *shape))
    capped: list[int] = []
    bar = tqdm(total=surr.size, desc="landscape", disable=not progress)
    for i, a in enumerate(steps):
        for j, b in enumerate(directions):
            vector_to_parameters(theta_old + a * delta + b * d, params)
            surr[i, j] = surrogate(agent.config, agent.policy, old_policy, batch, state)
            eps = episode_returns(agent, max(counts), seed=seed * 7919 + i * 101 + j,
                                  capped=capped)
            true[:, i, j] = nested_means(eps, counts)
            bar.update(1)
    bar.close()
    if sum(capped):
        warnings.warn(f"landscape: {sum(capped)} episodes ran past the episode cap and were "
                      "cut there (the env has no time limit); their returns are partial.",
                      stacklevel=2)
    vector_to_parameters(theta_new, params)
    return {
        "settings": {"steps": list(steps), "directions": list(directions), "counts": counts,
                     "seed": seed, "env_id": agent.config.env_id,
                     "preset": agent.config.preset,
                     "checkpoint_iteration": replay["checkpoint_iteration"]},
        "episodes_capped": int(sum(capped)),
        "delta_norm": float(delta.norm()), "direction_norm": 1.0,
        "surrogate": surr.tolist(),
        "true_return": {str(c): true[k].tolist() for k, c in enumerate(counts)},
        "update_phase": replay["phase"],
    }


def _check(settings: ProbeSettings, cfg: Config) -> None:
    if not settings.landscape_counts or min(settings.landscape_counts) < 1:
        raise ProbeError("--landscape-counts must be positive numbers of env steps.")
    grid = settings.landscape_grid
    if len(grid) < 2 or not all(math.isfinite(x) for x in grid):
        raise ProbeError("--landscape-grid needs at least two finite multiples.")


#: What the result's top-level keys hold.
SCHEMA = {"settings": "steps, directions, counts, seed, env_id, preset, "
                      "checkpoint_iteration",
          "surrogate": "[step][direction] the algorithm's surrogate on the training batch",
          "true_return": "per sample count: [step][direction] mean episode return",
          "delta_norm, direction_norm": "norms of the update step and random direction",
          "episodes_capped": "episodes cut at the episode cap",
          "update_phase": "the replayed update's own metrics"}


def _headline(result: dict[str, Any]) -> str:
    return (f"landscape: step norm {result['delta_norm']:.3g}, surrogate at the step "
            f"{result['surrogate'][1][0]:.3g} vs {result['surrogate'][0][0]:.3g} at theta_old")


@probe("landscape", order=40, settings=("landscape_counts", "landscape_grid"),
       plot="plot_landscape", headline=_headline, schema=SCHEMA, check=_check)
def _compute(p: ProbeInput) -> dict:
    """The surrogate on the training batch vs the true mean return on the grid
    theta + a step + b random direction."""
    s = p.settings
    return landscape_probe(p.run_dir, p.checkpoint, s.landscape_grid, s.landscape_grid,
                           s.landscape_counts, p.seed, p.progress)
