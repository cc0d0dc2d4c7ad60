"""Saving and restoring an env's dynamic state, so that a resumed run continues its episodes
exactly where a killed run left them.

A snapshot holds only tensors, strings and plain containers, so it travels in a checkpoint
that loads with ``torch.load(..., weights_only=True)``:

- MuJoCo envs (:class:`gymnasium.envs.mujoco.MujocoEnv`): the full integration state from
  ``mujoco.mj_getState(..., mjSTATE_INTEGRATION)`` (time, qpos, qvel, act, warm-start
  accelerations, controls, applied forces, mocap, user data), which makes the next
  ``mj_step`` bit-identical, and every fixed-size array of ``mjData``: the quantities the
  last step derived (body positions, contact forces, ...), which some envs read before
  stepping (Humanoid's centre of mass; tested against an uninterrupted env);
- classic-control envs and pgscope's own envs: every plain attribute of the env (arrays,
  numbers, booleans, strings, None), e.g. CartPole's ``state`` and
  ``steps_beyond_terminated``, Pendulum's ``state`` and ``last_u``;
- for both: the env's random generator state and the plain attributes of every wrapper
  (the time limit's elapsed steps among them).

Any other env returns ``None`` from :func:`env_state`: pgscope cannot know what hidden state
it keeps, so the run restarts its episodes on resume and says so in its ``events.log``.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import numpy as np
import torch

_EXACT_MODULES = ("gymnasium.envs.classic_control", "pgscope.envs")
_PLAIN = (bool, int, float, str, type(None))


def _is_mujoco(env: gym.Env) -> bool:
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
    except ImportError:  # pragma: no cover - mujoco is a dependency
        return False
    return isinstance(env, MujocoEnv)


def savable(env: gym.Env) -> bool:
    """Whether :func:`env_state` can snapshot ``env`` exactly."""
    base = env.unwrapped
    return _is_mujoco(base) or any(
        cls.__module__.startswith(_EXACT_MODULES) for cls in type(base).__mro__)


def _plain_attributes(obj: object) -> dict[str, Any]:
    """Arrays as tensors; numbers, booleans, strings and None as one JSON string."""
    arrays, plain = {}, {}
    for key, value in vars(obj).items():
        if key in ("env", "_env") or key.startswith("_np_random"):
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[key] = torch.from_numpy(value.copy())
        elif isinstance(value, _PLAIN) and not isinstance(value, np.generic):
            plain[key] = value
        elif isinstance(value, np.generic):
            plain[key] = value.item()
    return {"arrays": arrays, "plain": json.dumps(plain)}


def _set_plain_attributes(obj: object, saved: dict[str, Any]) -> None:
    for key, value in saved["arrays"].items():
        setattr(obj, key, value.numpy().copy())
    for key, value in json.loads(saved["plain"]).items():
        setattr(obj, key, value)


def _chain(env: gym.Env) -> list[gym.Env]:
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


#: The sparse constraint-Jacobian index arrays: a model with a dense Jacobian never reads
#: or writes them, so they hold whatever the data arena held before (not the env's state,
#: and not the same bits from one process or batch to the next).
SPARSE_JACOBIAN_INDEX = ("efc_J_rownnz", "efc_J_rowadr", "efc_J_rowsuper", "efc_J_colind",
                         "efc_JT_rownnz", "efc_JT_rowadr", "efc_JT_rowsuper", "efc_JT_colind")


def _unused_arrays(model: Any) -> frozenset[str]:
    """The data arrays of :data:`SPARSE_JACOBIAN_INDEX` when ``model`` is dense."""
    import mujoco

    return frozenset() if mujoco.mj_isSparse(model) else frozenset(SPARSE_JACOBIAN_INDEX)


def env_state(env: gym.Env) -> dict[str, Any] | None:
    """A snapshot of ``env``'s dynamic state, or None when it cannot be saved exactly."""
    if not savable(env):
        return None
    chain = _chain(env)
    base = chain[-1]
    rng = base._np_random  # None before the first reset
    state: dict[str, Any] = {
        "classes": [type(e).__name__ for e in chain],
        "wrappers": [_plain_attributes(w) for w in chain[:-1]],
        "rng": json.dumps(None if rng is None else
                          {"type": type(rng.bit_generator).__name__,
                           "state": rng.bit_generator.state}),
    }
    if _is_mujoco(base):
        import mujoco

        sim: Any = base  # a MujocoEnv: its model and data

        kind = mujoco.mjtState.mjSTATE_INTEGRATION
        buf = np.empty(mujoco.mj_stateSize(sim.model, kind))
        mujoco.mj_getState(sim.model, sim.data, buf, kind)
        state["mujoco"] = torch.from_numpy(buf)
        unused = _unused_arrays(sim.model)
        state["mujoco_arrays"] = {
            name: torch.from_numpy(np.array(value))
            for name in dir(sim.data) if not name.startswith("_") and name not in unused
            and isinstance(value := getattr(sim.data, name), np.ndarray) and value.size}
    else:
        state["attributes"] = _plain_attributes(base)
    return state


def set_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    """Restore a snapshot of :func:`env_state` into an env made from the same id."""
    chain = _chain(env)
    if [type(e).__name__ for e in chain] != state["classes"]:
        raise ValueError(f"env state of {state['classes']} does not fit {chain}")
    for wrapper, saved in zip(chain[:-1], state["wrappers"], strict=True):
        _set_plain_attributes(wrapper, saved)
    base = chain[-1]
    rng = json.loads(state["rng"])
    if rng is not None:
        bit_generator = getattr(np.random, rng["type"])()
        bit_generator.state = rng["state"]
        base._np_random = np.random.Generator(bit_generator)
    if "mujoco" in state:
        import mujoco

        sim: Any = base  # a MujocoEnv: its model and data

        for name, value in state["mujoco_arrays"].items():
            target = getattr(sim.data, name, None)
            if isinstance(target, np.ndarray) and target.shape == tuple(value.shape):
                target[...] = value.numpy()  # arrays sized by this step's contacts: skipped
        mujoco.mj_setState(sim.model, sim.data, state["mujoco"].numpy(),
                           mujoco.mjtState.mjSTATE_INTEGRATION)
    else:
        _set_plain_attributes(base, state["attributes"])
