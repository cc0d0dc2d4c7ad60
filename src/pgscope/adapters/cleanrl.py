"""CleanRL's PPO agents: ``ppo_continuous_action.py`` and ``ppo.py`` (discrete), saved
with ``torch.save(agent.state_dict())``, read with ``weights_only=True``.

Layout expected (``obs`` the observation size, ``act`` the action size or count; CleanRL's
default hidden width is 64, any widths and depths of Linear/Tanh layers work)::

    continuous (--cleanrl-arch continuous)      discrete (--cleanrl-arch discrete)
    critic.0.weight       (64, obs)              critic.*  as on the left
    critic.0.bias         (64,)                  actor.0.weight  (64, obs)
    critic.2.weight       (64, 64)               actor.0.bias    (64,)
    critic.2.bias         (64,)                  actor.2.weight  (64, 64)
    critic.4.weight       (1, 64)                actor.2.bias    (64,)
    critic.4.bias         (1,)                   actor.4.weight  (act, 64)
    actor_mean.{0,2,4}.*  as critic, last (act, 64)  actor.4.bias (act,)
    actor_logstd          (1, act)

Observation normalization statistics (CleanRL's continuous script wraps the env in
gymnasium's ``NormalizeObservation`` and ``NormalizeReward``, then clips both to
[-10, 10]) come as an ``.npz`` with ``mean``, ``var`` and ``count`` (the wrapper's
``obs_rms``), and optionally ``return_var`` and ``return_count`` (``NormalizeReward``'s
``return_rms``; without them the value probe compares the value net with unscaled
returns). :func:`load_obs_stats` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pgscope.adapters.common import AdapterError, build_external_agent, layers_from, rms_state
from pgscope.agent import Agent

#: CleanRL's default hyperparameters per script (the ones the probes read).
DEFAULTS: dict[str, dict[str, Any]] = {
    "continuous": dict(num_envs=1, steps_per_iter=2048, gamma=0.99, gae_lambda=0.95,
                       clip_eps=0.2, epochs=10, minibatches=32, policy_lr=3e-4,
                       value_lr=3e-4, adv_norm=True, value_clip=True, value_clip_range=0.2,
                       ent_coef=0.0, max_grad_norm=0.5, grad_clip=True, lr_anneal=False,
                       action_clip=True, ortho_init=False, activation="tanh"),
    "discrete": dict(num_envs=4, steps_per_iter=512, gamma=0.99, gae_lambda=0.95,
                     clip_eps=0.2, epochs=4, minibatches=4, policy_lr=2.5e-4,
                     value_lr=2.5e-4, adv_norm=True, value_clip=True, value_clip_range=0.2,
                     ent_coef=0.01, max_grad_norm=0.5, grad_clip=True, lr_anneal=False,
                     action_clip=False, ortho_init=False, activation="tanh"),
}
#: No normalization unless statistics are given.
_NO_NORM = dict(obs_norm=False, obs_clip=False, reward_scale=False, reward_clip=False)


def load_obs_stats(path: str | Path) -> dict[str, Any]:
    """Normalization statistics from an ``.npz`` (module doc): ``{"obs": (mean, var,
    count)}`` and, when present, ``{"return": (var, count)}``. Read with
    ``allow_pickle=False``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            out: dict[str, Any] = {"obs": (f["mean"], f["var"], float(f["count"])
                                           if "count" in f else 1.0)}
            if "return_var" in f:
                out["return"] = (f["return_var"], float(f["return_count"])
                                 if "return_count" in f else 1.0)
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterError(f"cannot read observation statistics '{path}' (an .npz with "
                           f"mean, var, count): {exc}") from None
    return out


def from_cleanrl(agent: nn.Module | Mapping[str, torch.Tensor], env_id: str, arch: str, *,
                 obs_stats: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Agent:
    """A pgscope agent from a CleanRL-layout module or its ``state_dict`` (module doc).

    ``arch`` is ``continuous`` or ``discrete``; ``obs_stats`` as :func:`load_obs_stats`
    returns; ``overrides`` are config values (e.g. the script's ``gamma``, ``num_steps``
    as ``steps_per_iter`` x ``num_envs``) that replace CleanRL's defaults
    (:data:`DEFAULTS`)."""
    if arch not in DEFAULTS:
        raise AdapterError(f"--cleanrl-arch must be continuous or discrete, not '{arch}'.")
    state = agent.state_dict() if isinstance(agent, nn.Module) else dict(agent)
    state = {k: v.detach().cpu() for k, v in state.items()}
    actor = "actor_mean." if arch == "continuous" else "actor."
    expected = ("critic.", actor) + (("actor_logstd",) if arch == "continuous" else ())
    unknown = sorted(k for k in state if not k.startswith(expected))
    if unknown:
        raise AdapterError(f"CleanRL {arch} agent: unexpected keys {', '.join(unknown[:5])} "
                           f"(expected {', '.join(expected)}...; see docs/adapters.md).")
    pi = layers_from(state, actor, f"CleanRL {arch} actor")
    vf = layers_from(state, "critic.", "CleanRL critic")
    log_std = state.get("actor_logstd") if arch == "continuous" else None
    if arch == "continuous" and log_std is None:
        raise AdapterError("CleanRL continuous agent: no 'actor_logstd' parameter.")
    config = {**DEFAULTS[arch], **_NO_NORM}
    pre_state: dict[str, dict[str, torch.Tensor]] = {}
    if obs_stats and "obs" in obs_stats:
        config.update(obs_norm=True, obs_clip=True, obs_clip_bound=10.0)
        pre_state["obs_norm"] = rms_state(*obs_stats["obs"])
    if obs_stats and "return" in obs_stats:
        var, count = obs_stats["return"]
        config.update(reward_scale=True, reward_clip=True, reward_clip_bound=10.0)
        pre_state["reward_scaler"] = {**rms_state(0.0, var, count),
                                      "ret": torch.zeros(int(config["num_envs"]),
                                                         dtype=torch.float64)}
    config.update(overrides or {})
    return build_external_agent(env_id, config, pi, vf, log_std, pre_state, "CleanRL")


def load_cleanrl(path: str | Path, env_id: str, arch: str, *,
                 obs_stats: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Agent:
    """A pgscope agent from a CleanRL checkpoint (``torch.save(agent.state_dict())``,
    read with ``weights_only=True``) and an optional ``.npz`` of normalization
    statistics."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"CleanRL checkpoint '{path}' does not exist.") from None
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        raise AdapterError(f"'{path}' is not a readable state dict ({type(exc).__name__}).") \
            from None
    if not isinstance(state, Mapping):
        raise AdapterError(f"'{path}' holds a {type(state).__name__}, not a state dict "
                           "(save it with torch.save(agent.state_dict(), PATH)).")
    stats = load_obs_stats(obs_stats) if obs_stats is not None else None
    return from_cleanrl(state, env_id, arch, obs_stats=stats, overrides=overrides)
