"""Rollouts and returns: the layer between the envs and the algorithm updates.

The per-step loop does only what must happen per step (normalize the observation, sample
an action, step the envs, scale the reward); log-probabilities and values are computed
afterwards in one batched forward pass each, since the networks do not change during a
rollout.

GAE follows the correctness rule of docs/design.md section 1.6: at time-limit truncation the
advantage bootstraps from ``V(s_final)``; at termination it does not; across a rollout
boundary it bootstraps from the value of the next observation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv

from pgscope.config import Config
from pgscope.envs.state import env_state, set_env_state
from pgscope.errors import DivergenceError
from pgscope.networks import Policy, ValueNet
from pgscope.optimizations import (
    ObsNormalizer,
    RewardScaler,
    clip_observations,
    clip_rewards,
    multiply_rewards,
)


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    done: np.ndarray,
    gamma: float,
    lam: float,
) -> np.ndarray:
    """Generalized advantage estimates for arrays of shape ``(T, num_envs)``.

    ``next_values[t]`` is ``V`` of the state reached after step ``t``: the next stored
    observation within an episode, the final observation of a truncated episode, or the
    observation after the rollout's last step. ``terminated[t]`` switches the bootstrap
    off; ``done[t]`` (terminated or truncated) stops the GAE trace.
    """
    advantages = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1], dtype=np.float64)
    # the one-step TD errors and the trace's decay of every step at once; only the
    # recursion A_t = delta_t + gamma lam (1 - done_t) A_{t+1} runs step by step
    delta = rewards + gamma * next_values * (1.0 - terminated) - values
    decay = gamma * lam * (1.0 - done)
    for t in reversed(range(rewards.shape[0])):
        running = delta[t] + decay[t] * running
        advantages[t] = running
    return advantages


@dataclass
class Batch:
    """One iteration's training data, flattened time-major over (steps, envs).

    ``rewards`` (after scaling/clipping, the units the value net learns), ``terminated``
    and ``done`` keep the episode structure for the probes; the updates use ``terminated``
    only to choose the pairs of the DR3 term (``value_dr3_coef``,
    :func:`pgscope.features.dr3_pairs`).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    done: torch.Tensor
    next_obs: torch.Tensor  # the state after each step (final obs at truncation)
    num_envs: int = 1  # columns of the time-major layout; 0 once pairs are reordered
    # fraction of the sampled action components outside the action bounds (Box actions;
    # NaN when unknown): the rollout's ``action_saturation`` metric
    action_saturation: float = float("nan")

    def __len__(self) -> int:
        return self.obs.shape[0]

    def select(self, idx: torch.Tensor) -> Batch:
        """The pairs at ``idx`` (every tensor indexed alike; the layout is lost)."""
        pairs: dict[str, Any] = {f.name: getattr(self, f.name)[idx] for f in fields(self)
                                 if f.name not in _NOT_PER_PAIR}
        return Batch(**pairs, num_envs=0)

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        pairs: dict[str, Any] = {f.name: torch.cat([getattr(p, f.name) for p in parts])
                                 for f in fields(Batch) if f.name not in _NOT_PER_PAIR}
        return Batch(**pairs, num_envs=0)

    def head_index(self, n: int) -> torch.Tensor:
        """Indices of the first ``n`` pairs in env-major order (whole env segments first),
        so a partial batch keeps complete segments plus one segment's prefix."""
        if self.num_envs < 1:
            raise ValueError("head_index needs the time-major layout of a collected batch")
        steps = len(self) // self.num_envs
        return torch.arange(len(self)).reshape(steps, self.num_envs).T.reshape(-1)[:n]

    def recompute_advantages(self, value_fn: Callable[[torch.Tensor], torch.Tensor],
                             gamma: float, lam: float) -> torch.Tensor:
        """GAE advantages of this (time-major) batch with another value function
        ``value_fn(obs) -> values`` in place of the agent's value net."""
        if self.num_envs < 1:
            raise ValueError("advantages need the time-major layout of a collected batch")
        shape = (len(self) // self.num_envs, self.num_envs)
        with torch.no_grad():
            v = value_fn(self.obs).double().numpy().reshape(shape)
            nv = value_fn(self.next_obs).double().numpy().reshape(shape)
        adv = gae(self.rewards.numpy().reshape(shape), v, nv,
                  self.terminated.numpy().reshape(shape).astype(float),
                  self.done.numpy().reshape(shape).astype(float), gamma, lam)
        return torch.from_numpy(adv.reshape(-1)).float()


#: Batch fields that describe the whole batch rather than one entry per pair.
_NOT_PER_PAIR = ("num_envs", "action_saturation")


def action_saturation(actions: np.ndarray, low: np.ndarray | None,
                      high: np.ndarray | None) -> float:
    """Fraction of the sampled action components outside ``[low, high]`` (the env sees them
    clipped to the bound, or out of range); NaN without bounds (discrete actions)."""
    if low is None or high is None or actions.size == 0:
        return float("nan")
    return float(np.mean((actions < low) | (actions > high)))


@dataclass
class FinishedEpisodes:
    """Raw (unscaled) returns and lengths of the episodes finished in one rollout."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


class Preprocessor:
    """Observation normalization/clipping and reward scaling/clipping, as switched on.

    With ``statistics_frozen`` it applies its statistics without updating them (the probes
    and evaluation use such a copy, :meth:`with_frozen_statistics`, so that measuring an
    agent never changes it)."""

    def __init__(self, cfg: Config, obs_shape: tuple[int, ...]) -> None:
        self.cfg = cfg
        self.obs_shape = obs_shape
        self.statistics_frozen = False
        self.obs_norm = ObsNormalizer(obs_shape) if cfg.obs_norm else None
        self.obs_clip = cfg.obs_clip_bound if cfg.obs_clip else None
        self.reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma) if cfg.reward_scale else None
        self.reward_clip = cfg.reward_clip_bound if cfg.reward_clip else None

    def obs(self, raw: np.ndarray, update: bool) -> np.ndarray:
        out = raw.astype(np.float64)
        if self.obs_norm is not None:
            if update and not self.statistics_frozen:
                self.obs_norm.update(out)
            out = self.obs_norm(out)
        return clip_observations(out, self.obs_clip).astype(np.float32)

    def reward(self, raw: np.ndarray, done: np.ndarray) -> np.ndarray:
        out = multiply_rewards(raw.astype(np.float64), self.cfg.reward_multiplier)
        if self.reward_scaler is not None:
            out = self.reward_scaler(out, done, update=not self.statistics_frozen)
        return clip_rewards(out, self.reward_clip)

    def with_frozen_statistics(self, num_envs: int) -> Preprocessor:
        """A copy with these statistics, frozen, for ``num_envs`` parallel envs."""
        copy = Preprocessor(replace(self.cfg, num_envs=num_envs), self.obs_shape)
        state = self.state_dict()
        if "reward_scaler" in state:
            state["reward_scaler"] = dict(state["reward_scaler"], ret=torch.zeros(num_envs))
        copy.load_state_dict(state)
        copy.statistics_frozen = True
        return copy

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        state = {}
        if self.obs_norm is not None:
            state["obs_norm"] = self.obs_norm.state_dict()
        if self.reward_scaler is not None:
            state["reward_scaler"] = self.reward_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.obs_norm is not None:
            self.obs_norm.load_state_dict(state["obs_norm"])
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(state["reward_scaler"])


@dataclass
class RolloutBuffers:
    """The arrays one rollout fills, time-major ``(steps, envs, ...)``."""

    obs: np.ndarray
    next_obs: np.ndarray  # the state after each step (final obs at truncation)
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    done: np.ndarray
    episodes: FinishedEpisodes


class NonFiniteEnvError(DivergenceError):
    """The env itself returned a NaN or infinite reward or observation."""


def check_finite_env_output(values: np.ndarray, what: str, step: int) -> None:
    """Raise :class:`NonFiniteEnvError` naming the env step, env index and value when an
    env's reward or observation is NaN or infinite (before it can reach a loss)."""
    if np.isfinite(values).all():
        return
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        env_index = int(np.argwhere(bad)[0][0]) if values.ndim else 0
        value = values[tuple(np.argwhere(bad)[0])] if values.ndim else float(values)
        raise NonFiniteEnvError(
            f"the env returned a non-finite {what} ({value}) at env step {step} of this "
            f"process's rollouts (env {env_index}); the env, not the learner, produced it.",
            iteration=-1, where=f"env {what}")


class RolloutCollector:
    """Steps a vector env with the current policy, keeping episodes running across
    iterations (a rollout may cut an episode anywhere).

    :meth:`state_dict` snapshots everything needed to continue the episodes in progress
    exactly (the current observations, the running episode returns and lengths, the
    sampling RNG and each env's own state, see :mod:`pgscope.envs.state`)."""

    def __init__(self, cfg: Config, envs: SyncVectorEnv, pre: Preprocessor,
                 seed: int) -> None:
        self.cfg = cfg
        self.envs = envs
        self.pre = pre
        # the sampling stream must not equal the envs' own (gymnasium seeds env i's
        # np_random exactly like default_rng(seed + i))
        self.rng = np.random.default_rng([seed, 0x5A3D])
        space = envs.single_action_space
        box = space if isinstance(space, gym.spaces.Box) else None  # else Discrete
        self.discrete = box is None
        self.low = None if box is None else box.low
        self.high = None if box is None else box.high
        self.act_shape: tuple[int, ...] = () if box is None else box.shape
        self.raw_obs, _ = envs.reset(seed=seed)
        check_finite_env_output(self.raw_obs, "observation", 0)
        self.ep_return = np.zeros(cfg.num_envs)
        self.ep_length = np.zeros(cfg.num_envs, dtype=np.int64)
        self.steps_taken = 0

    def state_dict(self) -> dict[str, Any]:
        """The collector's state; ``envs`` is None when some env cannot be saved exactly."""
        snapshots = [env_state(env) for env in getattr(self.envs, "envs", [])]
        exact = bool(snapshots) and all(s is not None for s in snapshots)
        return {"raw_obs": torch.from_numpy(np.array(self.raw_obs)),
                "ep_return": torch.from_numpy(self.ep_return.copy()),
                "ep_length": torch.from_numpy(self.ep_length.copy()),
                "steps_taken": self.steps_taken,
                "sample_rng": json.dumps(self.rng.bit_generator.state),
                "envs": snapshots if exact else None}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a :meth:`state_dict`. Returns True when the episodes in progress continue
        exactly; False when the envs could not be saved and restart their episodes (the
        sampling RNG is restored either way)."""
        self.rng.bit_generator.state = json.loads(state["sample_rng"])
        self.steps_taken = int(state["steps_taken"])
        if state["envs"] is None:
            return False
        for env, snapshot in zip(self.envs.envs, state["envs"], strict=True):
            set_env_state(env, snapshot)
        self.raw_obs = state["raw_obs"].numpy().copy()
        self.ep_return = state["ep_return"].numpy().copy()
        self.ep_length = state["ep_length"].numpy().copy()
        return True

    def start_rollout(self) -> RolloutBuffers:
        """Empty arrays for one rollout, which :func:`pgscope.engine.rollout.collect_lockstep`
        fills (stepping every collector of a batch together) and
        :meth:`finish_rollout` turns into a :class:`Batch`."""
        T, N = self.cfg.steps_per_env, self.cfg.num_envs
        obs_dim = self.envs.single_observation_space.shape or ()
        return RolloutBuffers(
            obs=np.zeros((T, N, *obs_dim), dtype=np.float32),
            next_obs=np.zeros((T, N, *obs_dim), dtype=np.float32),
            actions=np.zeros((T, N, *self.act_shape),
                             dtype=np.int64 if self.discrete else np.float32),
            rewards=np.zeros((T, N)), terminated=np.zeros((T, N)), done=np.zeros((T, N)),
            episodes=FinishedEpisodes())

    @torch.no_grad()
    def finish_rollout(self, buffers: RolloutBuffers, policy: Policy, value_net: ValueNet
                       ) -> tuple[Batch, FinishedEpisodes]:
        """The :class:`Batch` of a rollout whose steps are all taken: values,
        log-probabilities and GAE in one batched pass each."""
        cfg, T, N = self.cfg, self.cfg.steps_per_env, self.cfg.num_envs
        obs, next_obs, actions = buffers.obs, buffers.next_obs, buffers.actions
        rewards, terminated, done = buffers.rewards, buffers.terminated, buffers.done
        next_obs[T - 1, ~done[T - 1].astype(bool)] = self.pre.obs(
            self.raw_obs, update=False)[~done[T - 1].astype(bool)]

        flat = lambda a: torch.from_numpy(a.reshape(T * N, *a.shape[2:]))  # noqa: E731
        obs_t, actions_t = flat(obs), flat(actions)
        values = value_net(obs_t).numpy().reshape(T, N).astype(np.float64)
        next_obs_t = flat(next_obs)
        next_values = value_net(next_obs_t).numpy().reshape(T, N).astype(np.float64)
        advantages = gae(rewards, values, next_values, terminated, done,
                         cfg.gamma, cfg.gae_lambda)
        dist = policy.dist(obs_t)
        batch = Batch(
            obs=obs_t,
            actions=actions_t,
            logp=policy.log_prob(dist, actions_t),
            values=torch.from_numpy(values.reshape(-1)).float(),
            advantages=torch.from_numpy(advantages.reshape(-1)).float(),
            returns=torch.from_numpy((advantages + values).reshape(-1)).float(),
            rewards=torch.from_numpy(rewards.reshape(-1)),
            terminated=torch.from_numpy(terminated.reshape(-1)).bool(),
            done=torch.from_numpy(done.reshape(-1)).bool(),
            next_obs=next_obs_t,
            num_envs=N,
            action_saturation=action_saturation(actions, self.low, self.high),
        )
        return batch, buffers.episodes
