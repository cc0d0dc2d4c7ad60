"""Probe 5 of "A Closer Look at Deep Policy Gradients": the optimization landscape
(docs/design.md section 3).

Take the agent's actual update step ``Delta = theta_new - theta_old`` (replayed from a
checkpoint on a fresh training batch, exactly as training does it) and random Gaussian
directions ``d_1 .. d_D`` of unit L2 norm over the policy parameters. On the grid
``theta_old + a Delta + b d_k`` evaluate

* the algorithm's own surrogate objective on that training batch, as the algorithm
  defines it (:attr:`pgscope.algos.Algorithm.surrogate`: PPO's clipped surrogate, with the
  KL penalty for ppo-kl; TRPO's ``mean(ratio A)``), advantages normalized over the batch
  when the agent normalizes them, and
* the true mean episode return of the policy at that point from fresh rollouts, at several
  sample counts: episodes are started until the count of env steps is reached and every
  started episode is run to its end (so short episodes are not favoured); the estimate at
  a smaller count uses the episodes that started first, nested inside the larger sample.

The paper plots one random direction; pgscope draws ``D`` (default 5) and reports, per
grid point, the mean over the directions and a 95% Student-t interval over them. Every
grid point of every direction runs its own envs with their own seeds (:func:`grid_seeds`:
no env seed is shared by two points), so the estimates along the step (``b = 0``, the same
parameters for every direction) are independent repeats and their interval is a
confidence interval for the true return there; away from it the interval also spans the
choice of direction.

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
from scipy import stats
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.algos import algorithm
from pgscope.config import Config
from pgscope.envs import make_vector_env
from pgscope.errors import ProbeError
from pgscope.html_format import fmt, table
from pgscope.optimizations import clip_actions
from pgscope.probes import ProbeInput, ProbeSettings, probe
from pgscope.probes.trust_region import replay_update
from pgscope.rollout import Batch

#: Episode length cap for envs without a time limit (an episode that never ends would
#: otherwise stall a landscape evaluation forever).
EPISODE_CAP = 10_000
#: Parallel envs of one grid point's rollouts (each with its own env seed).
ENVS_PER_POINT = 32

#: How the probe's definition differs from the paper's (recorded in the result's settings).
DEFINITIONS = {
    "directions": "the paper's: one random direction; pgscope's: random_directions of them, "
                  "means and 95% Student-t intervals over the directions",
    "env_seeds": "pgscope's: every grid point of every direction runs envs of its own seeds "
                 "(disjoint ranges of envs_per_point seeds), so the points are independent",
}


def grid_seeds(seed: int, shape: tuple[int, ...], n_envs: int = ENVS_PER_POINT
               ) -> np.ndarray:
    """The first env seed of each grid point, an array of ``shape`` (random direction,
    step multiple, direction multiple). Point ``p`` resets its ``n_envs`` envs with seeds
    ``s_p .. s_p + n_envs - 1`` (gymnasium seeds env ``i`` of a vector env with
    ``seed + i``); the ranges of distinct points never overlap, nor do those of distinct
    probe seeds on the same grid."""
    n_points = math.prod(shape)
    return ((seed * n_points + np.arange(n_points)) * n_envs).reshape(shape)


def direction_interval(values: np.ndarray, level: float = 0.95
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the first axis (the random directions) and its Student-t interval,
    ``mean -/+ t_{(1 + level) / 2, D - 1} sd / sqrt(D)``, elementwise; NaN bounds for a
    single direction."""
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(0)
    D = values.shape[0]
    if D < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    half = stats.t.ppf((1 + level) / 2, D - 1) * values.std(0, ddof=1) / math.sqrt(D)
    return mean, mean - half, mean + half


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
        episodes: list[tuple[int, int, int, float]] = []  # start, env, length, return
        while active.any():
            action = sample(pre.obs(raw, update=False), rng)
            action = clip_actions(action, low, high, agent.config.action_clip)
            raw, r, term, trunc, _ = envs.step(action)
            used += int(active.sum())
            ret += r
            length += 1
            cut = (length >= cap) & ~(term | trunc)
            for i in np.flatnonzero((term | trunc | cut) & active):
                episodes.append((int(start[i]), int(i), int(length[i]), float(ret[i])))
                n_capped += int(cut[i])
                active[i] = used < n_steps
            for i in np.flatnonzero(term | trunc | cut):
                ret[i], length[i], start[i] = 0.0, 0, used
            if cut.any():
                raw, _ = envs.reset(options={"reset_mask": cut})
        # by start, and episodes that start together by env, not by length: sorting on
        # the length would put the short ones first and bias small counts low
        return [(s, n, r) for s, _, n, r in sorted(episodes, key=lambda e: e[:2])]
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
                    progress: bool = True, random_directions: int = 5) -> dict:
    """Probe 5 (see module doc). ``steps`` and ``directions`` are the grid's multiples of
    the step and of each of the ``random_directions`` random directions. Returns a
    JSON-ready dict with the grid, the surrogate and the true-return surfaces (one per
    sample count; means over the random directions, their intervals, and each direction's
    own surface), the env seeds of every point, and the norms of Delta and d."""
    counts = sorted(int(c) for c in counts)
    if len(steps) < 2 or len(directions) < 1 or min(counts) < 1:
        raise ProbeError("the landscape grid needs at least two step multiples, one "
                         "direction multiple and positive sample counts.")
    if max(abs(x) for x in (*steps, *directions)) > 100:
        raise ProbeError("grid multiples beyond 100 leave any meaningful parameter range.")
    if random_directions < 1:
        raise ProbeError("the landscape needs at least one random direction.")
    captured: dict = {}
    replay = replay_update(run_dir, iteration, seed, capture=captured)
    agent: Agent = captured["agent"]
    batch: Batch = captured["batch"]
    params = list(agent.policy.parameters())
    theta_new = parameters_to_vector(params).detach().clone()
    theta_old = parameters_to_vector(captured["old_policy"].parameters()).detach().clone()
    delta = theta_new - theta_old
    gen = torch.Generator().manual_seed(seed)
    surrogate = algorithm(agent.config.algo).surrogate
    old_policy, state = captured["old_policy"], captured["state_before"]

    shape = (random_directions, len(steps), len(directions))
    seeds = grid_seeds(seed, shape)
    surr = np.zeros(shape)
    true = np.zeros((len(counts), *shape))
    capped: list[int] = []
    bar = tqdm(total=surr.size, desc="landscape", disable=not progress)
    for k in range(random_directions):
        d = torch.randn(delta.shape, generator=gen)
        d /= d.norm()
        for i, a in enumerate(steps):
            for j, b in enumerate(directions):
                vector_to_parameters(theta_old + a * delta + b * d, params)
                surr[k, i, j] = surrogate(agent.config, agent.policy, old_policy, batch, state)
                eps = episode_returns(agent, max(counts), seed=int(seeds[k, i, j]),
                                      n_envs=ENVS_PER_POINT, capped=capped)
                true[:, k, i, j] = nested_means(eps, counts)
                bar.update(1)
    bar.close()
    if sum(capped):
        warnings.warn(f"landscape: {sum(capped)} episodes ran past the episode cap and were "
                      "cut there (the env has no time limit); their returns are partial.",
                      stacklevel=2)
    vector_to_parameters(theta_new, params)
    surr_mean, surr_low, surr_high = direction_interval(surr)
    true_stats = {str(c): direction_interval(true[n]) for n, c in enumerate(counts)}
    return {
        "settings": {"steps": list(steps), "directions": list(directions), "counts": counts,
                     "random_directions": random_directions, "seed": seed,
                     "envs_per_point": ENVS_PER_POINT, "interval": "95% Student t over the "
                     "random directions", "definitions": DEFINITIONS,
                     "env_id": agent.config.env_id, "preset": agent.config.preset,
                     "checkpoint_iteration": replay["checkpoint_iteration"]},
        "episodes_capped": int(sum(capped)),
        "delta_norm": float(delta.norm()), "direction_norm": 1.0,
        "surrogate": surr_mean.tolist(),
        "true_return": {c: m.tolist() for c, (m, _, _) in true_stats.items()},
        "intervals": {
            "surrogate": {"ci_low": surr_low.tolist(), "ci_high": surr_high.tolist()},
            "true_return": {c: {"ci_low": lo.tolist(), "ci_high": hi.tolist()}
                            for c, (_, lo, hi) in true_stats.items()},
        },
        "per_direction": {"surrogate": surr.tolist(),
                          "true_return": {str(c): true[n].tolist()
                                          for n, c in enumerate(counts)}},
        "env_seeds": seeds.tolist(),
        "update_phase": replay["phase"],
    }


def _check(settings: ProbeSettings, cfg: Config) -> None:
    if not settings.landscape_counts or min(settings.landscape_counts) < 1:
        raise ProbeError("--landscape-counts must be positive numbers of env steps.")
    if settings.landscape_directions < 1:
        raise ProbeError("--landscape-directions must be at least 1 (the paper used 1; "
                         "intervals need 2 or more).")
    grid = settings.landscape_grid
    if len(grid) < 2 or not all(math.isfinite(x) for x in grid):
        raise ProbeError("--landscape-grid needs at least two finite multiples.")


#: What the result's top-level keys hold.
SCHEMA = {"settings": "steps, directions (multiples), counts, random_directions, seed, "
                      "envs_per_point, interval, definitions, env_id, preset, "
                      "checkpoint_iteration",
          "surrogate": "[step][direction] the algorithm's surrogate on the training batch, "
                       "mean over the random directions",
          "true_return": "per sample count: [step][direction] mean episode return, mean "
                         "over the random directions",
          "intervals": "ci_low and ci_high of surrogate and true_return (95% t over the "
                       "random directions)",
          "per_direction": "surrogate and true_return of each random direction",
          "env_seeds": "[random direction][step][direction] first env seed of each point",
          "delta_norm, direction_norm": "norms of the update step and random direction",
          "episodes_capped": "episodes cut at the episode cap",
          "update_phase": "the replayed update's own metrics"}


def _headline(result: dict[str, Any]) -> str:
    return (f"landscape: step norm {result['delta_norm']:.3g}, surrogate at the step "
            f"{result['surrogate'][1][0]:.3g} vs {result['surrogate'][0][0]:.3g} at theta_old")


def _reading(r: dict[str, Any]) -> str:
    counts = r["settings"]["counts"]
    top = r["true_return"][str(counts[-1])]
    s0, s1 = r["surrogate"][0][0], r["surrogate"][1][0]
    t0, t1 = top[0][0], top[1][0]
    agree = (s1 - s0) * (t1 - t0) > 0
    return (f"Along the update step the surrogate changes by {fmt(s1 - s0, 3)} and the "
            f"true return (from {int(counts[-1]):,} steps) by {fmt(t1 - t0, 3)}: the "
            f"surrogate {'predicts' if agree else 'does not predict'} the direction of "
            "the true change.")


def _table(r: dict[str, Any]) -> str:
    a = r["settings"]["steps"]
    header = ["multiple of the step", "surrogate"] + [
        f"true return ({int(c):,} steps)" for c in r["settings"]["counts"]]
    rows = [[fmt(a[i]), fmt(r["surrogate"][i][0])]
            + [fmt(r["true_return"][str(c)][i][0]) for c in r["settings"]["counts"]]
            for i in range(len(a))]
    return table(header, rows, tuple(range(len(header)))) + (
        f'<p class="note">Random direction multiple 0 (the slice along the step); '
        f'|step| = {fmt(r.get("delta_norm"), 3)}.</p>')


@probe("landscape", order=40,
       settings=("landscape_counts", "landscape_grid", "landscape_directions"),
       plot="plot_landscape", headline=_headline, schema=SCHEMA, check=_check,
       reading=_reading, table=_table)
def _compute(p: ProbeInput) -> dict:
    """The surrogate on the training batch vs the true mean return on the grid
    theta + a step + b random direction, over several random directions."""
    s = p.settings
    return landscape_probe(p.run_dir, p.checkpoint, s.landscape_grid, s.landscape_grid,
                           s.landscape_counts, p.seed, p.progress, s.landscape_directions)
