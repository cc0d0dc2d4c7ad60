"""Stepping many MuJoCo locomotion envs at once, with the results of their own ``step``.

A gymnasium MuJoCo env's ``step`` spends about half its time outside the physics on
Hopper-v5 (measured here: about 230 us per step, of which ``mj_step`` about 130 us): the
health check, the observation, the reward and the info dict are a dozen small NumPy calls
on arrays of 6 numbers. :class:`LocomotionBatch` steps K envs together: the physics of
each env exactly as its own ``step`` runs it (``ctrl``, ``mj_step`` with the env's frame
skip, ``mj_rnePostConstraint``), then the observation, reward, termination and time limit
of all K from their stacked ``qpos``/``qvel`` (and the other ``MjData`` arrays the env
reads), as whole-array operations with the same dtypes and the same order of
floating-point operations as the env's own code; the result is bit-identical to calling
``env.step`` on each (tests/test_batch_step.py checks this over thousands of steps with
terminations, time limits and resets, for every kind below).

It applies only where that is known to hold: an env made by ``gymnasium.make`` with its
default wrappers (``TimeLimit`` over ``OrderEnforcing`` over ``PassiveEnvChecker``, no
render mode) around exactly one of the classes in :data:`KINDS` (gymnasium's v5 Hopper,
Walker2d, HalfCheetah, Swimmer, Ant and Humanoid; a subclass could change ``step``, so it
does not count), with options its :class:`Kind` reproduces (:meth:`Kind.reproduces`), after
the env's first two steps (the checker's one-off checks run in the env's own ``step``);
one batch holds envs of one class with the same model file and settings. Everything else
steps through ``env.step``. The rollouts of the training engine use it
(:func:`pgscope.engine.lockstep.step_envs`); setting the environment variable
``PGSCOPE_BATCH_STEP=0`` turns it off (to measure what it saves).

The step logic is gymnasium 1.x's (``hopper_v5.py``, ``walker2d_v5.py``,
``half_cheetah_v5.py``, ``swimmer_v5.py``, ``ant_v5.py``, ``humanoid_v5.py``); every kind's
forward reward is forward weight x (x after - x before) / dt, of the x coordinate its env
tracks (the root joint's, Ant's main body's, Humanoid's mass centre):

- Hopper, Walker2d, HalfCheetah, Swimmer: reward = forward (+ the healthy reward when
  healthy) - control weight x sum(action^2); observation = qpos without the x position
  (x and y for Swimmer) unless the env keeps it, and qvel (clipped to [-10, 10] for Hopper
  and Walker2d); Hopper is healthy when every state entry after the first two is in the
  healthy state range, z in the z range and the angle in the angle range, Walker2d on z and
  angle only; HalfCheetah and Swimmer never terminate.
- Ant: observation = qpos (without x, y), qvel and (by default) ``cfrc_ext`` of every body
  but the world, clipped to the contact force range; reward = (forward + healthy reward)
  - (control cost on the action + contact weight x sum(clipped cfrc_ext^2)); healthy when
  qpos and qvel are finite and z is in the closed z range.
- Humanoid: observation = qpos (without x, y), qvel, and (each by default)
  ``cinert``/``cvel`` of every body but the world, ``qfrc_actuator`` past the free joint,
  ``cfrc_ext`` of every body but the world; reward = (forward + healthy reward) - (control
  weight x sum(data.ctrl^2) + contact weight x sum(cfrc_ext^2) clipped to the contact cost
  range); healthy when z is in the open z range; the mass centre is computed per env
  after its physics (a weighted sum whose rounding a stacked form need not keep).

The coefficients and ranges are read from each env. Sums over one env's numbers
(``np.sum`` over a row of a stacked C-contiguous array) add in the order of the env's own
1-D sum (NumPy's pairwise summation along contiguous memory); the tests compare the bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.humanoid_v5 import HumanoidEnv
from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
from gymnasium.wrappers.common import OrderEnforcing, PassiveEnvChecker, TimeLimit


def _in_range(x: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """``low < x < high``, elementwise."""
    low, high = bounds
    return (low < x) & (x < high)


def _in_closed_range(x: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """``low <= x <= high``, elementwise."""
    low, high = bounds
    return (low <= x) & (x <= high)


def _walker_healthy(env: Any, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    return (_in_range(qpos[:, 1], env._healthy_z_range)
            & _in_range(qpos[:, 2], env._healthy_angle_range))


def _hopper_healthy(env: Any, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    state = np.concatenate([qpos, qvel], axis=1)[:, 2:]
    state_ok = _in_range(state, env._healthy_state_range).all(axis=1)
    return state_ok & _walker_healthy(env, qpos, qvel)


@dataclass
class Frame:
    """The envs one batch step stepped, one row each, as their physics left them: what
    their ``step`` computes its results from."""

    qpos: np.ndarray  # [n, nq]
    qvel: np.ndarray  # [n, nv]
    x_before: np.ndarray  # [n] the x coordinate the forward reward tracks, before the physics
    x_after: np.ndarray  # [n] and after it
    actions: np.ndarray  # [n, nu] the actions as given, in their own dtype
    gathered: dict[str, np.ndarray]  # [n, ...] each MjData array in the kind's ``gathered``

    def forward_reward(self, env: Any) -> np.ndarray:
        """Forward weight x the x velocity ``(x after - x before) / dt`` (float64)."""
        return env._forward_reward_weight * ((self.x_after - self.x_before) / env.dt)

    def action_cost(self, env: Any) -> np.ndarray:
        """Control weight x sum(action^2), in the env's own dtype: a Python float times
        the action's dtype (float32 actions give a float32 control cost)."""
        return env._ctrl_cost_weight * np.sum(np.square(self.actions), axis=1)


#: The attributes of every kind's env that its ``step`` reads (the model file among them);
#: one batch shares them all, with those of its :attr:`Kind.settings`.
_COMMON = ("fullpath", "frame_skip", "dt", "_forward_reward_weight", "_ctrl_cost_weight",
           "_exclude_current_positions_from_observation")


@dataclass(frozen=True, kw_only=True)
class Kind:
    """What one env class's ``step`` computes around its physics, for K envs of that
    class with ``env``'s settings (``env``: the first of them). A subclass says how many
    leading ``qpos`` entries the observation leaves out when the env excludes the current
    position (``excluded``), the other attributes its ``step`` reads (``settings``), the
    ``MjData`` arrays it reads after the physics (``gathered``, copied per env into the
    :class:`Frame`), which options it reproduces, which x coordinate its forward reward
    tracks, and the observations, rewards and terminations from a :class:`Frame`."""

    excluded: int = 1
    settings: tuple[str, ...] = ()
    gathered: tuple[str, ...] = ()

    def reproduces(self, env: Any) -> bool:
        """Whether :meth:`finish` reproduces the ``step`` of ``env`` with its options;
        envs it does not step one by one."""
        return True

    def x_position(self, env: Any) -> Any:
        """The x coordinate whose velocity the env rewards, as its ``step`` reads it
        (here the root joint's ``qpos[0]``)."""
        return env.data.qpos[0]

    def observed_from(self, env: Any) -> int:
        """The first ``qpos`` entry in the observation."""
        return self.excluded if env._exclude_current_positions_from_observation else 0

    def finish(self, env: Any, frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Observations ``[n, obs_dim]`` (float64), rewards (float64) and terminated
        ``[n]`` of the envs in ``frame``."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Planar(Kind):
    """Hopper, Walker2d, HalfCheetah, Swimmer: ``healthy(env, qpos, qvel) -> [K] bool``
    (None: the env never terminates and has no healthy reward) and whether the observed
    velocities are clipped to [-10, 10]."""

    healthy: Callable[[Any, np.ndarray, np.ndarray], np.ndarray] | None
    clip_velocity: bool

    def finish(self, env: Any, frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qpos, qvel = frame.qpos, frame.qvel
        # np.clip(qvel, -10, 10) as the env computes it, as two ufunc calls (same values)
        velocity = np.minimum(np.maximum(qvel, -10), 10) if self.clip_velocity else qvel
        obs = np.concatenate([qpos[:, self.observed_from(env):], velocity], axis=1)
        forward, ctrl = frame.forward_reward(env), frame.action_cost(env)
        if self.healthy is None:
            return obs, forward - ctrl, np.zeros(len(qpos), dtype=np.bool_)
        healthy = self.healthy(env, qpos, qvel)
        reward = (forward + healthy * env._healthy_reward) - ctrl
        return obs, reward, ~healthy & env._terminate_when_unhealthy


@dataclass(frozen=True, kw_only=True)
class Ant(Kind):
    """gymnasium's Ant-v5 (module docstring); ``main_body`` an int or a body name."""

    excluded: int = 2
    settings: tuple[str, ...] = (
        "_contact_cost_weight", "_healthy_reward", "_main_body", "_terminate_when_unhealthy",
        "_healthy_z_range", "_contact_force_range", "_include_cfrc_ext_in_observation")
    gathered: tuple[str, ...] = ("cfrc_ext",)

    def reproduces(self, env: Any) -> bool:
        if type(env._main_body) not in (int, str):
            return False
        try:
            env.data.body(env._main_body)
        except (KeyError, IndexError, TypeError, ValueError):
            return False
        return True

    def x_position(self, env: Any) -> Any:
        return env.data.body(env._main_body).xpos[0]

    def finish(self, env: Any, frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qpos, qvel, n = frame.qpos, frame.qvel, len(frame.qpos)
        low, high = env._contact_force_range
        contact = np.clip(frame.gathered["cfrc_ext"], low, high)  # [n, nbody, 6]
        parts = [qpos[:, self.observed_from(env):], qvel]
        if env._include_cfrc_ext_in_observation:
            parts.append(contact[:, 1:].reshape(n, -1))
        obs = np.concatenate(parts, axis=1)
        healthy = (np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
                   & _in_closed_range(qpos[:, 2], env._healthy_z_range))
        contact_cost = env._contact_cost_weight * np.sum(np.square(contact.reshape(n, -1)),
                                                         axis=1)
        reward = ((frame.forward_reward(env) + healthy * env._healthy_reward)
                  - (frame.action_cost(env) + contact_cost))
        return obs, reward, ~healthy & env._terminate_when_unhealthy


#: Humanoid's optional observation parts: (the env's switch, the MjData array, its first
#: row observed).
_HUMANOID_PARTS = (("_include_cinert_in_observation", "cinert", 1),
                   ("_include_cvel_in_observation", "cvel", 1),
                   ("_include_qfrc_actuator_in_observation", "qfrc_actuator", 6),
                   ("_include_cfrc_ext_in_observation", "cfrc_ext", 1))


@dataclass(frozen=True, kw_only=True)
class Humanoid(Kind):
    """gymnasium's Humanoid-v5 (module docstring). Its observation switches are tested
    with ``is True``; envs made with switches that are not bools are refused."""

    excluded: int = 2
    settings: tuple[str, ...] = (
        "_contact_cost_weight", "_contact_cost_range", "_healthy_reward",
        "_terminate_when_unhealthy", "_healthy_z_range",
        *(switch for switch, _, _ in _HUMANOID_PARTS))
    gathered: tuple[str, ...] = ("cinert", "cvel", "qfrc_actuator", "cfrc_ext", "ctrl")

    def reproduces(self, env: Any) -> bool:
        return all(type(getattr(env, switch)) is bool for switch, _, _ in _HUMANOID_PARTS)

    def x_position(self, env: Any) -> Any:
        # the x of the mass centre: sum over bodies of mass x xipos, over the total mass
        mass = env.model.body_mass
        return np.einsum("b,bj->j", mass, env.data.xipos)[0] / mass.sum()

    def finish(self, env: Any, frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qpos, got, n = frame.qpos, frame.gathered, len(frame.qpos)
        parts = [qpos[:, self.observed_from(env):], frame.qvel]
        parts += [got[name][:, first:].reshape(n, -1)
                  for switch, name, first in _HUMANOID_PARTS if getattr(env, switch)]
        obs = np.concatenate(parts, axis=1)
        healthy = _in_range(qpos[:, 2], env._healthy_z_range)
        ctrl_cost = env._ctrl_cost_weight * np.sum(np.square(got["ctrl"]), axis=1)
        low, high = env._contact_cost_range
        contact_cost = np.clip(env._contact_cost_weight * np.sum(
            np.square(got["cfrc_ext"].reshape(n, -1)), axis=1), low, high)
        reward = ((frame.forward_reward(env) + healthy * env._healthy_reward)
                  - (ctrl_cost + contact_cost))
        return obs, reward, ~healthy & env._terminate_when_unhealthy


_HEALTH = ("_healthy_reward", "_terminate_when_unhealthy", "_healthy_z_range",
           "_healthy_angle_range")

#: The env classes :class:`LocomotionBatch` steps, with what their ``step`` computes.
KINDS: dict[type, Kind] = {
    HopperEnv: Planar(healthy=_hopper_healthy, clip_velocity=True,
                      settings=(*_HEALTH, "_healthy_state_range")),
    Walker2dEnv: Planar(healthy=_walker_healthy, clip_velocity=True, settings=_HEALTH),
    HalfCheetahEnv: Planar(healthy=None, clip_velocity=False),
    SwimmerEnv: Planar(healthy=None, clip_velocity=False, excluded=2),
    AntEnv: Ant(),
    HumanoidEnv: Humanoid(),
}


def _wrappers(env: gym.Env[Any, Any]) -> tuple[TimeLimit, OrderEnforcing, PassiveEnvChecker
                                               ] | None:
    """The three wrappers of ``gymnasium.make`` when ``env`` is exactly those around a
    :data:`KINDS` class with no render mode and options its kind reproduces; else None."""
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    if [type(e) for e in chain[:3]] != [TimeLimit, OrderEnforcing, PassiveEnvChecker]:
        return None
    if len(chain) != 4 or type(chain[3]) not in KINDS or chain[3].render_mode is not None:
        return None
    if not KINDS[type(chain[3])].reproduces(chain[3]):
        return None
    return chain[0], chain[1], chain[2]  # type: ignore[return-value]


def enabled() -> bool:
    """Whether batch stepping is on (``PGSCOPE_BATCH_STEP`` unset or not ``0``)."""
    return os.environ.get("PGSCOPE_BATCH_STEP", "1") != "0"


def _shared(env: Any) -> tuple[Any, ...]:
    """What one batch shares: the class and the settings its step reads (unhashable
    settings, such as a range given as a list, raise TypeError: not batched)."""
    kind = KINDS[type(env)]
    return (type(env), *(getattr(env, name) for name in (*_COMMON, *kind.settings)))


class LocomotionBatch:
    """K envs of one :data:`KINDS` class with the same model and settings (reward
    weights, ranges, frame skip), each as ``gymnasium.make`` wraps it, stepped together;
    :meth:`make` says whether ``envs`` qualify."""

    def __init__(self, envs: Sequence[gym.Env[Any, Any]]) -> None:
        chains = [_wrappers(e) for e in envs]
        if not envs or any(c is None for c in chains):
            raise TypeError("LocomotionBatch steps envs made by gymnasium.make around "
                            f"one of {', '.join(k.__name__ for k in KINDS)} with options "
                            "it reproduces")
        self.bases: list[Any] = [e.unwrapped for e in envs]
        if len({_shared(b) for b in self.bases}) != 1:
            raise TypeError("LocomotionBatch steps envs of one class with the same settings")
        self.limits = [c[0] for c in chains if c is not None]
        self.orders = [c[1] for c in chains if c is not None]
        self.checkers = [c[2] for c in chains if c is not None]
        self.kind = KINDS[type(self.bases[0])]
        model, data = self.bases[0].model, self.bases[0].data
        self._sizes = model.nq, model.nv, model.nu
        self._gathered = {name: getattr(data, name).shape for name in self.kind.gathered}
        self._ready = False

    @staticmethod
    def make(envs: Sequence[gym.Env[Any, Any]]) -> LocomotionBatch | None:
        """A batch of ``envs`` when batch stepping is :func:`enabled` and every env
        qualifies; else None (step them one by one)."""
        if not enabled():
            return None
        try:
            return LocomotionBatch(envs)
        except TypeError:
            return None

    def ready(self) -> bool:
        """Whether every env has been reset and has taken the steps its checker checks
        (the first, and the second for data reuse) in its own ``step``; once true, it
        stays true (resets go through each env's own ``reset``), so it is checked only
        until then."""
        if not self._ready:
            self._ready = all(o._has_reset for o in self.orders) and all(
                c.checked_step and getattr(c, "checked_data_reuse", True)
                for c in self.checkers)
        return self._ready

    def step(self, actions: np.ndarray, rows: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, Exception]]:
        """Step env ``k`` with ``actions[k]`` for every ``k`` in ``rows`` (the others are
        left as they are); returns the observations ``[len(rows), obs_dim]`` (float64),
        rewards (float64), terminated and truncated, one row per stepped env, each what
        that env's own ``step`` returns, and ``{k: exception}`` for the envs whose physics
        raised (their rows are meaningless and their time limits not advanced). Needs
        :meth:`ready`."""
        rows = list(rows)
        first, kind, n = self.bases[0], self.kind, len(rows)
        nq, nv, nu = self._sizes
        if actions.shape[1:] != (nu,):  # the env's own do_simulation check
            raise ValueError(f"Action dimension mismatch. Expected {(nu,)}, "
                             f"found {actions.shape[1:]}")
        frame = Frame(np.zeros((n, nq)), np.zeros((n, nv)), np.zeros(n), np.zeros(n),
                      actions[rows], {name: np.zeros((n, *shape))
                                      for name, shape in self._gathered.items()})
        errors: dict[int, Exception] = {}
        for r, k in enumerate(rows):  # each env's step up to its results
            env = self.bases[k]
            model, data = env.model, env.data
            try:
                x_before = kind.x_position(env)
                data.ctrl[:] = actions[k]  # do_simulation
                mujoco.mj_step(model, data, nstep=first.frame_skip)
                mujoco.mj_rnePostConstraint(model, data)
            except Exception as exc:  # noqa: BLE001 - that env's own failure
                errors[k] = exc
                continue
            frame.x_before[r], frame.x_after[r] = x_before, kind.x_position(env)
            frame.qpos[r], frame.qvel[r] = data.qpos, data.qvel
            for name, stacked in frame.gathered.items():
                stacked[r] = getattr(data, name)
        obs, reward, terminated = kind.finish(first, frame)
        truncated = np.zeros(n, dtype=np.bool_)
        for r, k in enumerate(rows):  # each env's TimeLimit wrapper
            if k in errors:
                continue
            limit: Any = self.limits[k]
            limit._elapsed_steps += 1
            truncated[r] = limit._elapsed_steps >= limit._max_episode_steps
        return obs, reward, terminated, truncated, errors
