"""Sanity environments for the selftest, after Andy Jones, "Debugging RL, without the
agonizing pain" (2021). Each isolates one part of an agent; the expected value or policy is
known in closed form. Continuous-action versions of his envs 4 and 5 are pgscope's own.

| id                         | tests                                        |
|----------------------------|----------------------------------------------|
| pgscope/ConstantReward-v0  | value net learns a constant (V = 1)           |
| pgscope/ObsReward-v0       | value net uses the observation (V = +-1)      |
| pgscope/Discounting-v0     | discounting across two steps (V0 = gamma)     |
| pgscope/ActionReward-v0    | policy prefers the rewarded action            |
| pgscope/ActionObsReward-v0 | policy and value condition on the observation |
| pgscope/ContActionReward-v0    | Gaussian mean moves to the best action 0.5 |
| pgscope/ContActionObsReward-v0 | Gaussian mean tracks 0.5 * obs              |
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class _SanityEnv(gym.Env):
    """One- or two-step episodes with a 1-D observation."""

    metadata: dict[str, Any] = {"render_modes": []}
    random_obs = False

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._obs = 0.0
        self._t = 0

    def _draw_obs(self) -> float:
        return float(self.np_random.choice([-1.0, 1.0])) if self.random_obs else 0.0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._obs = self._draw_obs()
        return np.array([self._obs], dtype=np.float32), {}

    def reward(self, action: Any) -> float:
        raise NotImplementedError

    def step(self, action: Any):
        r = self.reward(action)
        return np.array([self._obs], dtype=np.float32), r, True, False, {}


class ConstantReward(_SanityEnv):
    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.Discrete(1)

    def reward(self, action: Any) -> float:
        return 1.0


class ObsReward(ConstantReward):
    random_obs = True

    def reward(self, action: Any) -> float:
        return self._obs


class Discounting(ConstantReward):
    """Observation 0 then 1; reward 1 at the end of the second step only."""

    def step(self, action: Any):
        self._t += 1
        if self._t == 1:
            self._obs = 1.0
            return np.array([1.0], dtype=np.float32), 0.0, False, False, {}
        return np.array([1.0], dtype=np.float32), 1.0, True, False, {}


class ActionReward(_SanityEnv):
    """Action 1 earns +1, action 0 earns -1."""

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.Discrete(2)

    def reward(self, action: Any) -> float:
        return 1.0 if int(action) == 1 else -1.0


class ActionObsReward(ActionReward):
    """+1 when the action matches the observation (action 1 for obs +1, 0 for -1)."""

    random_obs = True

    def reward(self, action: Any) -> float:
        return 1.0 if int(action) == int(self._obs > 0) else -1.0


class ContActionReward(_SanityEnv):
    """Continuous action a in [-1, 1]; reward 1 - 4 (a - 0.5)^2, best at a = 0.5."""

    target_gain = 0.0
    target_offset = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def target(self) -> float:
        return self.target_offset + self.target_gain * self._obs

    def reward(self, action: Any) -> float:
        a = float(np.clip(np.asarray(action).reshape(-1)[0], -1.0, 1.0))
        return 1.0 - 4.0 * (a - self.target()) ** 2


class ContActionObsReward(ContActionReward):
    """Continuous action; best action 0.5 * obs."""

    random_obs = True
    target_gain = 0.5
    target_offset = 0.0


SANITY_ENVS: dict[str, type[gym.Env]] = {
    "pgscope/ConstantReward-v0": ConstantReward,
    "pgscope/ObsReward-v0": ObsReward,
    "pgscope/Discounting-v0": Discounting,
    "pgscope/ActionReward-v0": ActionReward,
    "pgscope/ActionObsReward-v0": ActionObsReward,
    "pgscope/ContActionReward-v0": ContActionReward,
    "pgscope/ContActionObsReward-v0": ContActionObsReward,
}


def register_all() -> None:
    for env_id, cls in SANITY_ENVS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{__name__}:{cls.__name__}", max_episode_steps=10,
                         disable_env_checker=True)
