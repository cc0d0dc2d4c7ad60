"""An agent: policy, value net and the observation/reward preprocessing state, built from a
config and an env's spaces, and restorable from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from pgscope.config import Config
from pgscope.networks import CategoricalPolicy, GaussianPolicy, Policy, ValueNet
from pgscope.rollout import Preprocessor


@dataclass
class Agent:
    """A trained (or fresh) agent. ``act`` maps raw env observations to actions."""

    config: Config
    policy: Policy
    value_net: ValueNet
    preprocessor: Preprocessor

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True,
            rng: np.random.Generator | None = None) -> np.ndarray:
        """Actions for a batch of raw observations (normalization stats are not updated):
        the mode of the policy (the default, as for :func:`pgscope.evaluate.evaluate`), or
        a sample when ``deterministic`` is False."""
        x = self.preprocessor.obs(np.asarray(obs), update=False)
        if not deterministic:
            return self.policy.numpy_sampler()(x, rng or np.random.default_rng())
        policy = self.policy
        actions: np.ndarray = policy.mode(policy.dist(torch.from_numpy(x))).numpy()
        return actions

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> np.ndarray:
        """V(s) for a batch of raw observations, in the (possibly scaled) reward units the
        value net was trained on."""
        x = torch.from_numpy(self.preprocessor.obs(np.asarray(obs), update=False))
        values: np.ndarray = self.value_net(x).numpy()
        return values


def _shape(space: gym.Space[Any]) -> tuple[int, ...]:
    return tuple(space.shape or ())


def spaces_signature(obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> dict[str, object]:
    """What a checkpoint must match to be loaded into an agent for these spaces."""
    act: dict[str, object]
    if isinstance(act_space, gym.spaces.Discrete):
        act = {"type": "discrete", "n": int(act_space.n)}
    else:
        act = {"type": "box", "shape": list(_shape(act_space))}
    return {"obs_shape": list(_shape(obs_space)), "action": act}


def build_agent(cfg: Config, obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> Agent:
    """Fresh networks (initialized from the global torch RNG) for the given spaces."""
    obs_dim = int(np.prod(_shape(obs_space)))
    policy: Policy
    if isinstance(act_space, gym.spaces.Discrete):
        policy = CategoricalPolicy(obs_dim, int(act_space.n), cfg.hidden, cfg.activation,
                                   cfg.ortho_init)
    else:
        policy = GaussianPolicy(obs_dim, int(np.prod(_shape(act_space))), cfg.hidden,
                                cfg.activation, cfg.ortho_init, cfg.init_log_std)
    value_net = ValueNet(obs_dim, cfg.hidden, cfg.activation, cfg.ortho_init)
    return Agent(cfg, policy, value_net, Preprocessor(cfg, _shape(obs_space)))
