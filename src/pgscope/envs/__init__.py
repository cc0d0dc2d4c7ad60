"""Environment creation: any id ``gymnasium.make`` accepts, vectorized with gymnasium.

Ids of the form ``module:EnvName-v0`` import ``module`` first (gymnasium's own rule), so
environments registered by a user's module work unchanged. pgscope's own small envs (the
selftest's sanity envs, the tabular MDP of the probe tests) are registered under the
``pgscope/`` namespace on import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import gymnasium as gym
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from pgscope.envs import sanity as sanity
from pgscope.envs import tabular as tabular  # registers pgscope/Tabular-v0 on import
from pgscope.errors import EnvError

sanity.register_all()


def _suggest(env_id: str) -> str:
    name = env_id.split(":")[-1]
    if name in gym.registry:  # registered, but it failed for another reason
        return ""
    close = difflib.get_close_matches(name, list(gym.registry.keys()), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def make_env(env_id: str, **kwargs: Any) -> gym.Env[Any, Any]:
    """``gymnasium.make(env_id)`` with clear errors for unknown ids and missing modules."""
    if not env_id or env_id.startswith(":") or env_id.endswith(":"):
        raise EnvError(f"env id '{env_id}' is malformed: use a gymnasium id such as "
                       "'Hopper-v5', or 'module:EnvName-v0' for an env your module registers.")
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as exc:  # a known id whose extra is missing
        raise EnvError(f"env '{env_id}' needs a package that is not installed: {exc}") \
            from None
    except gym.error.Error as exc:
        raise EnvError(f"unknown env id '{env_id}' ({exc}).{_suggest(env_id)}") from None
    except ModuleNotFoundError as exc:
        module = env_id.split(":")[0] if ":" in env_id else exc.name
        raise EnvError(
            f"cannot make env '{env_id}': module '{module}' is not importable ({exc}). "
            "Ids of the form 'module:EnvName-v0' need 'module' on the Python path."
        ) from None


def check_spaces(env_id: str, obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> None:
    """pgscope's networks are MLPs: a flat Box observation and a Discrete or flat Box
    action space. Anything else gets one clear error naming the space."""
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)) or (
            isinstance(act_space, gym.spaces.Box) and len(act_space.shape) != 1):
        raise EnvError(
            f"env '{env_id}' has action space {act_space}; pgscope supports Discrete actions "
            "and 1-D Box (continuous) actions (flatten others with a gymnasium wrapper).")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        kind = ("image-like " if isinstance(obs_space, gym.spaces.Box)
                and len(obs_space.shape) >= 2 else "")
        raise EnvError(
            f"env '{env_id}' has {kind}observation space {obs_space}; pgscope's MLPs need a "
            "1-D Box observation (flatten it with a gymnasium wrapper, e.g. "
            "FlattenObservation, first).")


def check_env_id(env_id: str) -> None:
    """Make and close the env once and check its spaces, so that a bad id or an
    unsupported env fails before anything is written or computed."""
    env = make_env(env_id)
    try:
        check_spaces(env_id, env.observation_space, env.action_space)
    finally:
        env.close()


def make_vector_env(env_id: str, num_envs: int) -> SyncVectorEnv:
    """``num_envs`` copies in a SyncVectorEnv with same-step autoreset, so that
    ``info["final_obs"]`` holds the last observation of a truncated episode (needed to
    bootstrap at time limits)."""
    factories: list[Callable[[], gym.Env]] = [lambda: make_env(env_id)] * num_envs
    envs = SyncVectorEnv(factories, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        check_spaces(env_id, envs.single_observation_space, envs.single_action_space)
    except EnvError:
        envs.close()
        raise
    return envs
