"""Gymnasium wrappers that perturb an env for robustness evaluations (:mod:`pgscope.perturb`
names them as perturbation kinds; docs/robustness.md defines each one).

- :class:`ObservationNoise`: Gaussian noise added to every observation the env returns;
- :class:`ActionNoise`: Gaussian noise added to every action before the clipping;
- :class:`ActionDelay`: the env receives the action chosen ``k`` steps before;
- :class:`ScaledModel`: MuJoCo model fields (``body_mass``, ``geom_friction``) scaled
  from the start of each episode, restored exactly at its end and at ``close()``;
- :class:`ObservationRecorder`: keeps a copy of every observation (changes nothing).

The noise wrappers draw from a generator of their own, seeded with ``[seed, tag]`` at
construction and again at every ``reset(seed=s)`` with ``[s, tag]``: an episode's noise
depends only on its reset seed, never on the env's own random state or on the policy's.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

#: The second entry of the noise generators' seeds, one per wrapper (the streams never
#: equal each other's, the env's own ``np_random`` or the evaluation's sampling stream).
OBSERVATION_NOISE_TAG = 0x0B5E
ACTION_NOISE_TAG = 0xAC7E


class _SeededNoise:
    """A Gaussian stream re-seeded with ``[seed, tag]`` at every seeded reset."""

    def __init__(self, seed: int, tag: int) -> None:
        self.tag = tag
        self.rng = np.random.default_rng([seed, tag])

    def reseed(self, seed: int | None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng([seed, self.tag])

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape)


class ObservationNoise(gym.ObservationWrapper[Any, Any, Any]):
    """``obs + scale * eps`` with ``eps ~ N(0, I)`` drawn afresh for every observation
    (the reset's included); ``scale`` is one number per observation coordinate. The result
    keeps the observation's dtype."""

    def __init__(self, env: gym.Env[Any, Any], scale: np.ndarray, seed: int = 0) -> None:
        super().__init__(env)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.noise = _SeededNoise(seed, OBSERVATION_NOISE_TAG)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        self.noise.reseed(seed)
        return super().reset(seed=seed, options=options)

    def observation(self, observation: Any) -> Any:
        obs = np.asarray(observation)
        noisy = obs + self.scale * self.noise.normal(obs.shape)
        return noisy.astype(obs.dtype, copy=False)


class ActionNoise(gym.ActionWrapper[Any, Any, Any]):
    """``action + scale * eps`` with ``eps ~ N(0, I)`` per step, then clipped to the inner
    env's action bounds when ``clip``. Its own action space is unbounded (same shape and
    dtype), so that a caller that clips to the action space it sees clips nothing: the
    noise is added to the policy's action *before* the clipping, which happens here."""

    def __init__(self, env: gym.Env[Any, Any], scale: np.ndarray, clip: bool,
                 seed: int = 0) -> None:
        super().__init__(env)
        inner = env.action_space
        if not isinstance(inner, gym.spaces.Box):
            raise TypeError(f"ActionNoise needs a Box action space, got {inner}.")
        self.inner_space = inner
        self.scale = np.asarray(scale, dtype=np.float64)
        self.clip = clip
        self.noise = _SeededNoise(seed, ACTION_NOISE_TAG)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, inner.shape, inner.dtype)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        self.noise.reseed(seed)
        return super().reset(seed=seed, options=options)

    def action(self, action: Any) -> Any:
        a = np.asarray(action, dtype=np.float64)
        noisy = a + self.scale * self.noise.normal(a.shape)
        if self.clip:
            noisy = np.clip(noisy, self.inner_space.low, self.inner_space.high)
        return noisy


def null_action(space: gym.Space[Any]) -> Any:
    """The action an :class:`ActionDelay` sends before the policy's first one arrives: the
    zero vector for a Box (the nearest point of the box to zero when zero lies outside
    it), ``space.start`` (usually 0) for a Discrete space."""
    if isinstance(space, gym.spaces.Discrete):
        return np.int64(space.start)
    if isinstance(space, gym.spaces.Box):
        return np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)
    raise TypeError(f"no null action for action space {space}.")


class ActionDelay(gym.ActionWrapper[Any, Any, Any]):
    """The env receives, at step ``t`` of an episode, the action given at step ``t - k``;
    during the first ``k`` steps it receives :func:`null_action`. ``reset`` empties the
    queue. ``k = 0`` passes every action through unchanged."""

    def __init__(self, env: gym.Env[Any, Any], steps: int) -> None:
        super().__init__(env)
        if steps < 0:
            raise ValueError(f"ActionDelay needs steps >= 0, got {steps}.")
        self.steps = int(steps)
        self.null = null_action(env.action_space)
        self.queue: deque[Any] = deque()
        self._fill()

    def _fill(self) -> None:
        self.queue = deque(np.copy(self.null) for _ in range(self.steps))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        self._fill()
        return super().reset(seed=seed, options=options)

    def action(self, action: Any) -> Any:
        self.queue.append(np.copy(action))
        return self.queue.popleft()


def mujoco_model(env: gym.Env[Any, Any]) -> Any | None:
    """The MuJoCo model of ``env`` (``env.unwrapped.model``), or None for other envs."""
    model = getattr(env.unwrapped, "model", None)
    return model if model is not None and hasattr(model, "body_mass") else None


class ScaledModel(gym.Wrapper[Any, Any, Any, Any]):
    """Multiplies the MuJoCo model's ``fields`` (e.g. ``("body_mass", "body_inertia")``)
    by ``factor`` from each ``reset`` (before the env's own reset) to the end of that
    episode. The original values are copied when the wrapper is made and written back,
    exactly, when an episode ends (terminated or truncated) and at ``close()``; each
    reset scales the originals again, so factors never compound."""

    def __init__(self, env: gym.Env[Any, Any], fields: tuple[str, ...], factor: float) -> None:
        super().__init__(env)
        model = mujoco_model(env)
        if model is None:
            raise TypeError(f"ScaledModel needs a MuJoCo env, got {env}.")
        self.model = model
        self.fields = fields
        self.factor = float(factor)
        self.original = {name: np.array(getattr(model, name), copy=True) for name in fields}

    def apply(self) -> None:
        """Write ``original * factor`` into the model."""
        for name, values in self.original.items():
            getattr(self.model, name)[...] = values * self.factor

    def restore(self) -> None:
        """Write the original values back (bit for bit)."""
        for name, values in self.original.items():
            getattr(self.model, name)[...] = values

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        self.apply()
        return super().reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        if terminated or truncated:
            self.restore()
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.restore()
        super().close()


class ObservationRecorder(gym.ObservationWrapper[Any, Any, Any]):
    """Keeps a copy of every observation the env returns (``observations``), the resets'
    included, and returns each one unchanged."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.observations: list[np.ndarray] = []

    def observation(self, observation: Any) -> Any:
        self.observations.append(np.array(observation, copy=True))
        return observation
