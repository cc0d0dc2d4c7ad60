"""The rollout (:func:`pgscope.engine.rollout.collect_lockstep`) computes, for each seed,
exactly what that seed's rollout stepped alone computes (tests/reference_rollout.py, one
env step at a time through the vector env's own ``step``): every field
of its ``Batch`` and ``FinishedEpisodes`` bit-identical (``torch.equal``), over consecutive
rollouts (episodes running across rollout boundaries, time-limit truncations, terminations),
and the collectors' and preprocessors' states (normalizer statistics, reward scaler,
sampling RNG, env state) bit-identical afterwards. A seed whose env returns a non-finite
value gets the single run's exception and the other seeds go on unchanged.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from reference_rollout import reference_collect

from pgscope.agent import Agent, build_agent
from pgscope.config import Config, make_config
from pgscope.engine.lockstep import StackedRunningMeanStd, step_envs
from pgscope.engine.rollout import collect_lockstep, collect_one
from pgscope.envs import make_vector_env
from pgscope.envs.batch_step import LocomotionBatch
from pgscope.optimizations import RunningMeanStd
from pgscope.rollout import Batch, FinishedEpisodes, NonFiniteEnvError, RolloutCollector

ROLLOUTS = 3


def _setup(cfg: Config, seeds: tuple[int, ...]) -> tuple[list[Agent], list[RolloutCollector]]:
    agents, collectors = [], []
    for seed in seeds:
        envs = make_vector_env(cfg.env_id, cfg.num_envs)
        torch.manual_seed(seed)
        agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
        agents.append(agent)
        collectors.append(RolloutCollector(cfg, envs, agent.preprocessor, seed=seed * 1000))
    return agents, collectors


def _assert_equal_tree(a: Any, b: Any, where: str) -> None:
    """Bit-identical nested containers of tensors, arrays and plain values."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            _assert_equal_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length"
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tree(x, y, f"{where}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} vs {b.dtype}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{where}: values differ"
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), f"{where}: NaN vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _assert_same_rollout(got: tuple[Batch, FinishedEpisodes],
                         want: tuple[Batch, FinishedEpisodes], where: str) -> None:
    (batch, episodes), (want_batch, want_episodes) = got, want
    for f in fields(Batch):
        _assert_equal_tree(getattr(batch, f.name), getattr(want_batch, f.name),
                           f"{where} batch.{f.name}")
    _assert_equal_tree(episodes.returns, want_episodes.returns, f"{where} episode returns")
    _assert_equal_tree(episodes.lengths, want_episodes.lengths, f"{where} episode lengths")


def _assert_same_state(got: RolloutCollector, want: RolloutCollector, where: str) -> None:
    _assert_equal_tree(got.state_dict(), want.state_dict(), f"{where} collector")
    _assert_equal_tree(got.pre.state_dict(), want.pre.state_dict(), f"{where} preprocessor")


def _compare(cfg: Config, seeds: tuple[int, ...], rollouts: int = ROLLOUTS
             ) -> list[tuple[Batch, FinishedEpisodes]]:
    """Lockstep rollouts against each seed's own collector; the rollouts seen."""
    agents, collectors = _setup(cfg, seeds)
    single_agents, single_collectors = _setup(cfg, seeds)
    seen = []
    for r in range(rollouts):
        got = collect_lockstep(collectors, [a.policy for a in agents],
                               [a.value_net for a in agents])
        for i, seed in enumerate(seeds):
            result = got[i]
            assert not isinstance(result, Exception), result
            want = reference_collect(single_collectors[i], single_agents[i].policy,
                                                single_agents[i].value_net)
            _assert_same_rollout(result, want, f"seed {seed} rollout {r}")
            _assert_same_state(collectors[i], single_collectors[i], f"seed {seed} rollout {r}")
            seen.append(result)
    for c in collectors + single_collectors:
        c.envs.close()
    return seen


def test_hopper_ppo_seeds_equal_their_single_rollouts():
    cfg = make_config("ppo", "Hopper-v5", dict(steps_per_iter=256, hidden=(8,)))
    seen = _compare(cfg, (0, 1))
    assert sum(len(e.returns) for _, e in seen) >= 4  # terminations inside and across


def test_hopper_envs_stepped_as_one_locomotion_batch_equal_single_rollouts(monkeypatch):
    """Gymnasium's MuJoCo locomotion envs are stepped through one LocomotionBatch (after
    each env's first step): the same rollouts as each seed's own collector."""
    calls = []
    step = LocomotionBatch.step

    def counted(self, actions, rows):
        calls.append(len(rows))
        return step(self, actions, rows)

    monkeypatch.setattr(LocomotionBatch, "step", counted)
    cfg = make_config("ppo", "Hopper-v5", dict(steps_per_iter=256, num_envs=2, hidden=(8,),
                                                init_log_std=0.5))
    seen = _compare(cfg, (2, 3), rollouts=2)
    assert calls and set(calls) == {4} and len(calls) == 2 * 128 - 2  # 2 seeds x 2 envs
    assert sum(len(e.returns) for _, e in seen) >= 8


def test_pendulum_two_envs_with_every_preprocessing_switch_equal_single_rollouts():
    """Reward multiplier, scaling and clipping, observation normalization and clipping,
    action clipping (a wide policy samples out of bounds) and time-limit truncations of
    two envs per seed (Pendulum's 200 steps, crossed inside the second rollout)."""
    cfg = make_config("ppo", "Pendulum-v1", dict(
        steps_per_iter=256, num_envs=2, hidden=(8,), init_log_std=1.0,
        reward_multiplier=3.0, reward_clip_bound=0.5, obs_clip_bound=1.5))
    assert cfg.reward_scale and cfg.obs_norm and cfg.action_clip and cfg.reward_clip
    seen = _compare(cfg, (3, 4))
    assert sum(len(e.returns) for _, e in seen) == 2 * 2  # each seed's two envs truncate
    assert all(b.action_saturation > 0.1 for b, _ in seen)  # the clipping matters


def test_pendulum_without_preprocessing_equals_single_rollouts():
    cfg = make_config("ppo", "Pendulum-v1", dict(
        steps_per_iter=128, hidden=(8,), reward_scale=False, reward_clip=False,
        obs_norm=False, obs_clip=False, action_clip=False), num_envs=4)
    _compare(cfg, (0, 5), rollouts=2)


class _NanAfter(gym.Env):
    """Finite observations, then NaN from env step 30 on, for the env reset with seed
    1000 only (seed 1's first env); the env reset with seed 2001 (seed 2's second env)
    raises at its step 20; others run on."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-10, 10, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
        self.doomed, self.steps = False, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.doomed, self.breaks = seed == 1000, seed == 2001
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.breaks and self.steps == 20:
            raise RuntimeError("the simulator broke at step 20")
        obs = self.np_random.normal(size=3).astype(np.float32)
        if self.doomed and self.steps >= 30:
            obs[1] = np.nan
        return obs, float(-np.sum(np.square(action))), False, self.steps % 25 == 0, {}


if "test_batched_rollout/NanAfter-v0" not in gym.registry:
    gym.register("test_batched_rollout/NanAfter-v0", entry_point=_NanAfter)


def test_seeds_whose_env_turns_nan_or_raises_get_the_single_runs_error_others_go_on():
    cfg = make_config("ppo", "test_batched_rollout/NanAfter-v0",
                      dict(steps_per_iter=64, num_envs=2, hidden=(8,)))
    seeds = (0, 1, 2, 3)
    agents, collectors = _setup(cfg, seeds)
    single_agents, single_collectors = _setup(cfg, seeds)
    got = collect_lockstep(collectors, [a.policy for a in agents],
                           [a.value_net for a in agents])
    assert isinstance(got[1], NonFiniteEnvError)
    with pytest.raises(NonFiniteEnvError) as single_error:
        reference_collect(single_collectors[1], single_agents[1].policy, single_agents[1].value_net)
    assert str(got[1]) == str(single_error.value)
    assert got[1].where == single_error.value.where
    assert isinstance(got[2], RuntimeError) and "broke at step 20" in str(got[2])
    with pytest.raises(RuntimeError, match="broke at step 20"):
        reference_collect(single_collectors[2], single_agents[2].policy, single_agents[2].value_net)
    for i in (1, 2):  # the failed seeds' envs stopped where the single run's stopped
        assert ([e.unwrapped.steps for e in collectors[i].envs.envs]
                == [e.unwrapped.steps for e in single_collectors[i].envs.envs])
    for i in (0, 3):
        result = got[i]
        assert not isinstance(result, Exception)
        want = reference_collect(single_collectors[i], single_agents[i].policy,
                                 single_agents[i].value_net)
        _assert_same_rollout(result, want, f"seed {seeds[i]}")
        _assert_same_state(collectors[i], single_collectors[i], f"seed {seeds[i]}")


def test_the_seeds_collectors_go_on_alone_after_lockstep_rollouts():
    """After a lockstep rollout of two seeds each collector is an ordinary collector
    again: collected alone (the batch of one) it continues exactly as the reference."""
    cfg = make_config("ppo", "Pendulum-v1", dict(steps_per_iter=128, num_envs=2,
                                                 hidden=(8,)))
    seeds = (0, 1)
    agents, collectors = _setup(cfg, seeds)
    single_agents, single_collectors = _setup(cfg, seeds)
    collect_lockstep(collectors, [a.policy for a in agents], [a.value_net for a in agents])
    for i, seed in enumerate(seeds):
        policy, value_net = single_agents[i].policy, single_agents[i].value_net
        reference_collect(single_collectors[i], policy, value_net)
        for r in range(2):
            _assert_same_rollout(collect_one(collectors[i], agents[i].policy,
                                             agents[i].value_net),
                                 reference_collect(single_collectors[i], policy, value_net),
                                 f"seed {seed} rollout {r}")
        _assert_same_state(collectors[i], single_collectors[i], f"seed {seed}")


# --- the stacked pieces, each against the single code it replaces ---------------------------
@pytest.mark.parametrize("num_envs", [1, 2, 3, 8, 9, 16, 33])
@pytest.mark.parametrize("shape", [(), (5,)])
def test_stacked_running_mean_std_equals_each_seeds_own(num_envs, shape):
    """Per seed bit-identical to RunningMeanStd.update, also where numpy's reductions sum
    pairwise (8 envs and more)."""
    rng = np.random.default_rng(num_envs)
    singles = [RunningMeanStd(shape) for _ in range(3)]
    stacked = StackedRunningMeanStd(singles)
    for _ in range(4):
        x = rng.normal(size=(3, num_envs, *shape)) * np.array([1.0, 30.0, 1e-3])[
            (slice(None), None, *(None,) * len(shape))] + 7.0
        for single, xi in zip(singles, x, strict=True):
            single.update(xi)
        stacked.update(x)
    want = [s.state_dict() for s in singles]
    stacked.write_back()
    _assert_equal_tree([s.state_dict() for s in singles], want, "statistics")


class _EndsOften(gym.Env):
    """Float64 observations for a float32 space; terminates with probability 0.08 per
    step (the time limit of 20 steps truncates the others)."""

    observation_space = gym.spaces.Box(-10, 10, shape=(3,), dtype=np.float32)
    action_space = gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self.np_random.normal(size=3), {}

    def step(self, action):
        obs = self.np_random.normal(size=3) + float(action.sum())
        return obs, float(self.np_random.normal()), self.np_random.random() < 0.08, False, {}


if "test_batched_rollout/EndsOften-v0" not in gym.registry:
    gym.register("test_batched_rollout/EndsOften-v0", entry_point=_EndsOften,
                 max_episode_steps=20)


@pytest.mark.filterwarnings("ignore:.*not within the observation space")
def test_step_envs_equals_the_vector_envs_own_step():
    """Observations (cast to the space's dtype), rewards, terminations, truncations, final
    observations and the envs' random streams as ``SyncVectorEnv.step`` with same-step
    autoreset, on a schedule of terminations and time-limit truncations."""
    mine = [make_vector_env("test_batched_rollout/EndsOften-v0", 3) for _ in range(2)]
    theirs = [make_vector_env("test_batched_rollout/EndsOften-v0", 3) for _ in range(2)]
    for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        a.reset(seed=10 * k)
        b.reset(seed=10 * k)
    rng = np.random.default_rng(0)
    ends = {"terminated": 0, "truncated": 0}
    for _ in range(80):
        actions = rng.uniform(-1, 1, size=(2, 3, 2)).astype(np.float32)
        obs, rewards, term, trunc, final, failed = step_envs(mine, actions)
        assert not failed
        for i, envs in enumerate(theirs):
            want_obs, want_r, want_term, want_trunc, info = envs.step(actions[i])
            _assert_equal_tree([obs[i], rewards[i], term[i], trunc[i]],
                               [want_obs, want_r, want_term, want_trunc], f"seed {i}")
            for j in range(3):
                if want_term[j] or want_trunc[j]:
                    ends["terminated" if want_term[j] else "truncated"] += 1
                    _assert_equal_tree(final[i, j], info["final_obs"][j], f"final obs {i} {j}")
                else:
                    assert (i, j) not in final
    assert min(ends.values()) >= 5 and trunc.dtype == np.bool_, ends
    for envs in mine + theirs:
        envs.close()
