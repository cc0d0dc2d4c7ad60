"""Stepping many MuJoCo locomotion envs at once, with the results of their own ``step``.

A gymnasium MuJoCo env's ``step`` spends about half its time outside the physics on
Hopper-v5 (measured here: about 230 us per step, of which ``mj_step`` about 130 us): the
health check, the observation, the reward and the info dict are a dozen small NumPy calls
on arrays of 6 numbers. :class:`LocomotionBatch` steps K envs together: the physics of
each env exactly as its own ``step`` runs it (``ctrl``, ``mj_step`` with the env's frame
skip, ``mj_rnePostConstraint``), then the observation, reward, termination and time limit
of all K from their stacked ``qpos``/``qvel``, as whole-array operations with the same
dtypes and the same order of floating-point operations as the env's own code; the result
is bit-identical to calling ``env.step`` on each (tests/test_batch_step.py checks this
over thousands of steps with terminations, time limits and resets, for every kind below).

It applies only where that is known to hold: an env made by ``gymnasium.make`` with its
default wrappers (``TimeLimit`` over ``OrderEnforcing`` over ``PassiveEnvChecker``, no
render mode) around exactly one of the classes in :data:`KINDS` (gymnasium's v5 Hopper,
Walker2d and HalfCheetah; a subclass could change ``step``, so it does not count), after
the env's first two steps (the checker's one-off checks run in the env's own ``step``).
Everything else steps through ``env.step``. The rollouts of the training engine use
it (:func:`pgscope.engine.lockstep.step_envs`); setting the environment variable
``PGSCOPE_BATCH_STEP=0`` turns it off (to measure what it saves).

The step logic of the v5 envs is gymnasium 1.x's (``hopper_v5.py``, ``walker2d_v5.py``,
``half_cheetah_v5.py``): reward = forward weight x (x after - x before) / dt (+ the
healthy reward when healthy) - control weight x sum(action^2); observation = qpos without
the x position (unless the env keeps it) and qvel (clipped to [-10, 10] for Hopper and
Walker2d); Hopper is healthy when every state entry after the first two is in the healthy
state range, z in the z range and the angle in the angle range, Walker2d on z and angle
only; HalfCheetah never terminates. The coefficients and ranges are read from each env.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
from gymnasium.wrappers.common import OrderEnforcing, PassiveEnvChecker, TimeLimit


def _in_range(x: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """``low < x < high``, elementwise."""
    low, high = bounds
    return (low < x) & (x < high)


def _walker_healthy(env: Any, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    return (_in_range(qpos[:, 1], env._healthy_z_range)
            & _in_range(qpos[:, 2], env._healthy_angle_range))


def _hopper_healthy(env: Any, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    state = np.concatenate([qpos, qvel], axis=1)[:, 2:]
    state_ok = _in_range(state, env._healthy_state_range).all(axis=1)
    return state_ok & _walker_healthy(env, qpos, qvel)


@dataclass(frozen=True)
class Kind:
    """What one env class's ``step`` computes after the physics: ``healthy(env, qpos,
    qvel) -> [K] bool`` for K envs with ``env``'s settings (None: the env never
    terminates and has no healthy reward) and whether the observed velocities are
    clipped to [-10, 10]."""

    healthy: Callable[[Any, np.ndarray, np.ndarray], np.ndarray] | None
    clip_velocity: bool


#: The env classes :class:`LocomotionBatch` steps, with what their ``step`` computes.
KINDS: dict[type, Kind] = {
    HopperEnv: Kind(_hopper_healthy, clip_velocity=True),
    Walker2dEnv: Kind(_walker_healthy, clip_velocity=True),
    HalfCheetahEnv: Kind(None, clip_velocity=False),
}


def _wrappers(env: gym.Env[Any, Any]) -> tuple[TimeLimit, OrderEnforcing, PassiveEnvChecker
                                               ] | None:
    """The three wrappers of ``gymnasium.make`` when ``env`` is exactly those around a
    :data:`KINDS` class with no render mode; else None."""
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    if [type(e) for e in chain[:3]] != [TimeLimit, OrderEnforcing, PassiveEnvChecker]:
        return None
    if len(chain) != 4 or type(chain[3]) not in KINDS or chain[3].render_mode is not None:
        return None
    return chain[0], chain[1], chain[2]  # type: ignore[return-value]


def enabled() -> bool:
    """Whether batch stepping is on (``PGSCOPE_BATCH_STEP`` unset or not ``0``)."""
    return os.environ.get("PGSCOPE_BATCH_STEP", "1") != "0"


#: The attributes of an env that its ``step`` reads; one batch shares them all.
_SHARED = ("frame_skip", "dt", "_forward_reward_weight", "_ctrl_cost_weight",
           "_exclude_current_positions_from_observation", "_healthy_reward",
           "_terminate_when_unhealthy", "_healthy_state_range", "_healthy_z_range",
           "_healthy_angle_range")


def _shared(env: Any) -> tuple[Any, ...]:
    return (type(env), *(getattr(env, name, None) for name in _SHARED))


class LocomotionBatch:
    """K envs of one :data:`KINDS` class with the same settings (reward weights, ranges,
    frame skip), each as ``gymnasium.make`` wraps it, stepped together; :meth:`make` says
    whether ``envs`` qualify."""

    def __init__(self, envs: Sequence[gym.Env[Any, Any]]) -> None:
        chains = [_wrappers(e) for e in envs]
        if not envs or any(c is None for c in chains):
            raise TypeError("LocomotionBatch steps envs made by gymnasium.make around "
                            f"one of {', '.join(k.__name__ for k in KINDS)}")
        self.bases: list[Any] = [e.unwrapped for e in envs]
        if len({_shared(b) for b in self.bases}) != 1:
            raise TypeError("LocomotionBatch steps envs of one class with the same settings")
        self.limits = [c[0] for c in chains if c is not None]
        self.orders = [c[1] for c in chains if c is not None]
        self.checkers = [c[2] for c in chains if c is not None]
        first = self.bases[0]
        self.kind = KINDS[type(first)]
        self.first_position = 1 if first._exclude_current_positions_from_observation else 0
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
        first = self.bases[0]
        qpos = np.zeros((len(rows), first.model.nq))
        qvel = np.zeros((len(rows), first.model.nv))
        x_before = np.zeros(len(rows))
        errors: dict[int, Exception] = {}
        for r, k in enumerate(rows):  # each env's do_simulation
            model, data = self.bases[k].model, self.bases[k].data
            try:
                x_before[r] = data.qpos[0]
                data.ctrl[:] = actions[k]
                mujoco.mj_step(model, data, nstep=first.frame_skip)
                mujoco.mj_rnePostConstraint(model, data)
            except Exception as exc:  # noqa: BLE001 - that env's own failure
                errors[k] = exc
                continue
            qpos[r], qvel[r] = data.qpos, data.qvel
        # np.clip(qvel, -10, 10) as the env computes it, as two ufunc calls (same values)
        velocity = np.minimum(np.maximum(qvel, -10), 10) if self.kind.clip_velocity else qvel
        obs = np.concatenate([qpos[:, self.first_position:], velocity], axis=1)
        # the env's own dtypes: a Python float times the float64 velocity, a Python float
        # times the action's own dtype (float32 actions give a float32 control cost)
        forward = first._forward_reward_weight * ((qpos[:, 0] - x_before) / first.dt)
        ctrl = first._ctrl_cost_weight * np.sum(np.square(actions[rows]), axis=1)
        if self.kind.healthy is None:
            reward = forward - ctrl
            terminated = np.zeros(len(rows), dtype=np.bool_)
        else:
            healthy = self.kind.healthy(first, qpos, qvel)
            reward = (forward + healthy * first._healthy_reward) - ctrl
            terminated = ~healthy & first._terminate_when_unhealthy
        truncated = np.zeros(len(rows), dtype=np.bool_)
        for r, k in enumerate(rows):  # each env's TimeLimit wrapper
            if k in errors:
                continue
            limit: Any = self.limits[k]
            limit._elapsed_steps += 1
            truncated[r] = limit._elapsed_steps >= limit._max_episode_steps
        return obs, reward, terminated, truncated, errors
