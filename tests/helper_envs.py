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


class SpaceToy(gym.Env):
    """A do-nothing env with the given spaces (for 'unsupported space' errors)."""

    def __init__(self, obs_shape=(3,), act_shape=(2,)):
        self.observation_space = gym.spaces.Box(-1, 1, shape=obs_shape, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1, 1, shape=act_shape, dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        return np.zeros(self.observation_space.shape, np.float32), 0.0, False, False, {}


class BadReward(gym.Env):
    """A 1-D toy whose reward turns NaN (or +inf) at its ``bad_at``-th step."""

    def __init__(self, bad_at: int = 300, value: float = float("nan")):
        self.observation_space = gym.spaces.Box(-10, 10, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1, 1, shape=(1,), dtype=np.float32)
        self.bad_at, self.value, self.steps = bad_at, value, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        self.steps += 1
        reward = self.value if self.steps == self.bad_at else float(-np.square(action).sum())
        return self.np_random.normal(size=3).astype(np.float32), reward, False, False, {}


class NeverEnds(SpaceToy):
    """Episodes that never end (and no time limit)."""

    def __init__(self):
        super().__init__((3,), (1,))


for _id, _entry, _kwargs, _limit in [
    ("helper_envs/ImageObs-v0", SpaceToy, {"obs_shape": (8, 8, 3)}, 50),
    ("helper_envs/MatrixAction-v0", SpaceToy, {"act_shape": (2, 2)}, 50),
    ("helper_envs/ScalarObs-v0", SpaceToy, {"obs_shape": ()}, 50),
    ("helper_envs/NanReward-v0", BadReward, {}, 1000),
    ("helper_envs/InfReward-v0", BadReward, {"value": float("inf")}, 1000),
    ("helper_envs/NeverEnds-v0", NeverEnds, {}, None),
    ("helper_envs/Unsavable-v0", NanAfter, {"nan_after": 10**12}, 50),
    ("helper_envs/ShortCartPole-v0", "gymnasium.envs.classic_control:CartPoleEnv", {}, 50),
]:
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry, kwargs=_kwargs, max_episode_steps=_limit)
