"""Shared by the adapters: pgscope networks filled with external MLP weights, and the
agent built around them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from pgscope.agent import Agent
from pgscope.config import Config, make_config
from pgscope.envs import check_spaces, make_env
from pgscope.errors import PgscopeError
from pgscope.networks import CategoricalPolicy, GaussianPolicy, Policy, ValueNet
from pgscope.rollout import Preprocessor


class AdapterError(PgscopeError):
    """An external model or checkpoint that cannot be read or has an unsupported layout."""


#: A linear layer's (weight, bias), as stored by torch (weight is (out, in)).
Layer = tuple[torch.Tensor, torch.Tensor]


def layers_from(state: Mapping[str, torch.Tensor], prefix: str, what: str) -> list[Layer]:
    """The Linear layers ``prefix0``, ``prefix2``, ... of an ``nn.Sequential`` saved in
    ``state`` (``prefix`` ends with '.'), in order: Linear layers at even indices with
    activations between them, as both SB3 and CleanRL build their MLPs."""
    indices = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                      if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()})
    if not indices:
        raise AdapterError(f"{what}: no layers '{prefix}<i>.weight' in the state dict.")
    if indices != list(range(0, 2 * len(indices), 2)):
        raise AdapterError(f"{what}: Linear layers at indices {indices} of '{prefix[:-1]}'; "
                           "expected 0, 2, 4, ... (Linear, activation, Linear, ...).")
    out = []
    for i in indices:
        try:
            out.append((state[f"{prefix}{i}.weight"], state[f"{prefix}{i}.bias"]))
        except KeyError as exc:
            raise AdapterError(f"{what}: missing {exc.args[0]} in the state dict.") from None
    return out


def check_chain(layers: list[Layer], in_dim: int, out_dim: int, what: str) -> tuple[int, ...]:
    """Check that ``layers`` map ``in_dim`` to ``out_dim``; return the hidden sizes."""
    dims = [in_dim]
    for w, b in layers:
        if w.ndim != 2 or w.shape[1] != dims[-1] or b.shape != (w.shape[0],):
            raise AdapterError(f"{what}: a layer of shape {tuple(w.shape)} does not follow "
                               f"one of width {dims[-1]} (or its bias has the wrong shape).")
        dims.append(int(w.shape[0]))
    if dims[-1] != out_dim:
        raise AdapterError(f"{what}: the last layer has {dims[-1]} outputs, the env needs "
                           f"{out_dim}.")
    return tuple(dims[1:-1])


def _fill(net: nn.Sequential, layers: list[Layer]) -> None:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, layers, strict=True):
            lin.weight.copy_(w.to(lin.weight.dtype))
            lin.bias.copy_(b.to(lin.bias.dtype))


def env_spaces(env_id: str) -> tuple[gym.Space[Any], gym.Space[Any]]:
    """The observation and action spaces of ``env_id`` (checked to be ones pgscope runs)."""
    env = make_env(env_id)
    try:
        check_spaces(env_id, env.observation_space, env.action_space)
        return env.observation_space, env.action_space
    finally:
        env.close()


def build_external_agent(env_id: str, config: Mapping[str, Any], pi: list[Layer],
                         vf: list[Layer], log_std: torch.Tensor | None,
                         preprocessor_state: Mapping[str, Mapping[str, torch.Tensor]],
                         what: str, preset: str = "ppo") -> Agent:
    """A pgscope :class:`Agent` for ``env_id`` whose policy and value net hold the given
    layers (``log_std`` for Box actions), with ``config`` (keys of :class:`Config`) and the
    frozen normalization statistics ``preprocessor_state`` (keys ``obs_norm`` and/or
    ``reward_scaler``, as :meth:`Preprocessor.load_state_dict` reads them); ``preset``
    names the pgscope algorithm whose surrogate and update the probes use."""
    obs_space, act_space = env_spaces(env_id)
    obs_dim = int(np.prod(obs_space.shape or ()))
    discrete = isinstance(act_space, gym.spaces.Discrete)
    out_dim = int(act_space.n) if isinstance(act_space, gym.spaces.Discrete) \
        else int(np.prod(act_space.shape or ()))
    pi_hidden = check_chain(pi, obs_dim, out_dim, f"{what} policy")
    vf_hidden = check_chain(vf, obs_dim, 1, f"{what} value net")
    cfg: Config = make_config(preset, env_id, {"hidden": pi_hidden, **config})
    policy: Policy
    if discrete:
        if log_std is not None:
            raise AdapterError(f"{what}: a log-std parameter, but '{env_id}' has discrete "
                               "actions.")
        policy = CategoricalPolicy(obs_dim, out_dim, pi_hidden, cfg.activation, False)
    else:
        if log_std is None or log_std.numel() != out_dim:
            raise AdapterError(f"{what}: '{env_id}' has {out_dim}-dimensional Box actions; "
                               f"the log-std parameter has shape "
                               f"{None if log_std is None else tuple(log_std.shape)}.")
        policy = GaussianPolicy(obs_dim, out_dim, pi_hidden, cfg.activation, False)
        with torch.no_grad():
            policy.log_std.copy_(log_std.reshape(-1).float())
    _fill(policy.net, pi)
    value_net = ValueNet(obs_dim, vf_hidden, cfg.activation, False)
    _fill(value_net.net, vf)
    pre = Preprocessor(cfg, tuple(obs_space.shape or ()))
    try:
        pre.load_state_dict({k: dict(v) for k, v in preprocessor_state.items()})
    except KeyError as exc:
        raise AdapterError(f"{what}: normalization statistics '{exc.args[0]}' missing.") \
            from None
    pre.statistics_frozen = True
    policy.eval()
    value_net.eval()
    return Agent(cfg, policy, value_net, pre)


def rms_state(mean: Any, var: Any, count: Any) -> dict[str, torch.Tensor]:
    """Running mean/std statistics in :class:`pgscope.optimizations.RunningMeanStd`'s
    state-dict form."""
    return {"mean": torch.as_tensor(np.asarray(mean, dtype=np.float64)),
            "var": torch.as_tensor(np.asarray(var, dtype=np.float64)),
            "count": torch.as_tensor(float(count), dtype=torch.float64)}
