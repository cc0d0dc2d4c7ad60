"""Small envs for the tests, registered on import (also reachable as
``helper_envs:helper_envs/NanAfter-v0`` through gymnasium's module:id form)."""

import gymnasium as gym
import numpy as np


class NanAfter(gym.Env):
    """A 2-D continuous-control toy whose observations turn NaN after ``nan_after`` steps."""

    def __init__(self, nan_after: int = 300):
        self.observation_space = gym.spaces.Box(-10, 10, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
        self.nan_after = nan_after
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        self.steps += 1
        obs = self.np_random.normal(size=3).astype(np.float32)
        if self.steps > self.nan_after:
            obs[:] = np.nan
        return obs, float(-np.sum(np.square(action))), False, False, {}


if "helper_envs/NanAfter-v0" not in gym.registry:
    gym.register("helper_envs/NanAfter-v0", entry_point=NanAfter, max_episode_steps=50)


class DieOnce(gym.Wrapper):
    """CartPole that kills its own process (SIGKILL, like the OOM killer) at its
    ``die_at``-th step, once: the first time, it creates the marker file named by the
    environment variable ``PGSCOPE_TEST_DIE_MARKER`` (no variable: never dies)."""

    def __init__(self, die_at: int = 700):
        super().__init__(gym.make("CartPole-v1"))
        self.die_at = die_at
        self.steps = 0

    def step(self, action):
        import os
        import signal
        from pathlib import Path

        self.steps += 1
        marker = os.environ.get("PGSCOPE_TEST_DIE_MARKER")
        if marker and self.steps == self.die_at and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.env.step(action)


if "helper_envs/DieOnce-v0" not in gym.registry:
    gym.register("helper_envs/DieOnce-v0", entry_point=DieOnce)
