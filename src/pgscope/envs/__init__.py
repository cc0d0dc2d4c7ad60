"""Environment creation: any id ``gymnasium.make`` accepts, vectorized with gymnasium.

Ids of the form ``module:EnvName-v0`` import ``module`` first (gymnasium's own rule), so
environments registered by a user's module work unchanged. pgscope's own small envs
(the selftest probe envs) are registered under the ``pgscope/`` namespace on import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import gymnasium as gym
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from pgscope.envs import probes as probes
from pgscope.envs import tabular as tabular  # registers pgscope/Tabular-v0 on import
from pgscope.errors import EnvError

probes.register_all()


def _suggest(env_id: str) -> str:
    name = env_id.split(":")[-1]
    close = difflib.get_close_matches(name, list(gym.registry.keys()), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def make_env(env_id: str, **kwargs) -> gym.Env:
    """``gymnasium.make(env_id)`` with clear errors for unknown ids and missing modules."""
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        raise EnvError(f"unknown env id '{env_id}' ({exc}).{_suggest(env_id)}") from None
    except ModuleNotFoundError as exc:
        raise EnvError(
            f"cannot make env '{env_id}': module '{exc.name}' is not importable. "
            "Ids of the form 'module:EnvName-v0' need 'module' on the Python path."
        ) from None


def check_env_id(env_id: str) -> None:
    """Make and close the env once, so that a bad id fails before anything is written."""
    make_env(env_id).close()


def make_vector_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """``num_envs`` copies in a SyncVectorEnv with same-step autoreset, so that
    ``info["final_obs"]`` holds the last observation of a truncated episode (needed to
    bootstrap at time limits)."""
    factories: list[Callable[[], gym.Env]] = [lambda: make_env(env_id)] * num_envs
    envs = SyncVectorEnv(factories, autoreset_mode=AutoresetMode.SAME_STEP)
    if not isinstance(envs.single_action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise EnvError(
            f"env '{env_id}' has action space {envs.single_action_space}; pgscope supports "
            "Box (continuous) and Discrete actions."
        )
    if not isinstance(envs.single_observation_space, gym.spaces.Box):
        raise EnvError(
            f"env '{env_id}' has observation space {envs.single_observation_space}; pgscope "
            "needs a Box observation space (flatten it with a gymnasium wrapper first)."
        )
    return envs
