"""Stable-Baselines3 PPO and A2C models (``MlpPolicy``, Box or Discrete actions).

A model ``.zip`` is read without unpickling anything: ``policy.pth`` (a ``state_dict``
saved with ``torch.save``) loads with ``weights_only=True``, and the hyperparameters come
from the JSON entry ``data``. The layout expected is SB3's ``ActorCriticPolicy`` with
separate policy and value MLPs (the default since SB3 1.8)::

    mlp_extractor.policy_net.{0,2,...}.{weight,bias}   hidden layers of the policy
    mlp_extractor.value_net.{0,2,...}.{weight,bias}    hidden layers of the value net
    action_net.{weight,bias}                            policy output (means or logits)
    value_net.{weight,bias}                             value output
    log_std                                             Box actions only

``VecNormalize`` statistics are a pickle: reading them is unpickling a file, which can run
arbitrary code, so :func:`load_sb3` refuses unless ``trust_pickle=True``
(``--trust-pickle`` on the command line).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pgscope.adapters.common import (
    AdapterError,
    build_external_agent,
    layers_from,
    rms_state,
)
from pgscope.agent import Agent

#: SB3 activation classes (as the ``data`` JSON names them) and pgscope's names for them.
ACTIVATIONS = {"Tanh": "tanh", "ReLU": "relu"}


def read_model_zip(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(policy state dict, hyperparameters JSON) of an SB3 model zip; nothing is
    unpickled."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read("data"))
            state = torch.load(io.BytesIO(z.read("policy.pth")), map_location="cpu",
                               weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"SB3 model '{path}' does not exist.") from None
    except (zipfile.BadZipFile, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) \
            as exc:
        raise AdapterError(f"'{path}' is not a readable SB3 model zip ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}).") from None
    return state, data


def constant_schedule(value: Any, name: str) -> float | None:
    """A schedule's value when it is constant: a number, or SB3's serialized
    ``ConstantSchedule(val=X)`` / ``FloatSchedule(ConstantSchedule(val=X))``. None for a
    schedule that changes (a function: its value is only in the pickle)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        text = str(value.get("value_schedule", "")) + str(value.get("__repr__", ""))
        m = re.search(r"ConstantSchedule\(val=([-+0-9.eE]+|inf)\)", text)
        if m:
            return float(m.group(1))
    return None


def activation_name(policy_kwargs: Mapping[str, Any]) -> str:
    """pgscope's name of the model's activation (SB3's default is Tanh)."""
    raw = policy_kwargs.get("activation_fn") if isinstance(policy_kwargs, Mapping) else None
    if raw is None:
        return "tanh"
    m = re.search(r"\.(\w+)'>", str(raw))
    name = m.group(1) if m else str(raw)
    if name not in ACTIVATIONS:
        raise AdapterError(f"SB3 activation_fn {raw} is not supported; pgscope's networks use "
                           f"{', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def sb3_config(data: Mapping[str, Any], clip_range: float | None = None) -> dict[str, Any]:
    """pgscope config values for an SB3 PPO or A2C model's hyperparameters (``data``)."""
    n_envs, n_steps = int(data.get("n_envs", 1)), int(data["n_steps"])
    is_ppo = "clip_range" in data  # A2C has no clip range, no epochs, no minibatches
    lr = constant_schedule(data.get("learning_rate"), "learning_rate")
    values: dict[str, Any] = {
        "num_envs": n_envs, "steps_per_iter": n_envs * n_steps,
        "gamma": float(data["gamma"]), "gae_lambda": float(data["gae_lambda"]),
        "adv_norm": bool(data.get("normalize_advantage", is_ppo)),
        "ent_coef": float(data.get("ent_coef", 0.0) or 0.0),
        "activation": activation_name(data.get("policy_kwargs") or {}),
        "action_clip": True,  # SB3 clips Box actions to the bounds before env.step
        "ortho_init": False, "lr_anneal": False, "value_clip": False,
        "obs_norm": False, "obs_clip": False, "reward_scale": False, "reward_clip": False,
        "grad_clip": data.get("max_grad_norm") is not None,
        "max_grad_norm": float(data.get("max_grad_norm") or 0.5),
    }
    if lr is not None:
        values.update(policy_lr=lr, value_lr=lr)
    if is_ppo:
        eps = constant_schedule(data["clip_range"], "clip_range")
        if clip_range is not None:
            eps = float(clip_range)
        if eps is None:
            raise AdapterError(
                "the model's clip_range is a schedule that changes during training; its "
                "value is stored only as a pickled function, which pgscope does not unpickle. "
                "Give the clip range at the model's last update (Python: clip_range=...; "
                "command line: --set clip_eps=VALUE).")
        batch = int(data.get("batch_size") or n_envs * n_steps)
        values.update(clip_eps=eps, epochs=int(data.get("n_epochs", 10)),
                      minibatches=max(1, (n_envs * n_steps) // batch))
        vf = data.get("clip_range_vf")
        if vf is not None:
            vf_eps = constant_schedule(vf, "clip_range_vf")
            if vf_eps is not None:
                values.update(value_clip=True, value_clip_range=vf_eps)
    else:  # A2C (pgscope's a2c preset): one gradient step on the whole rollout, no clip
        values.update(epochs=1, minibatches=1)
    return values


def vecnormalize_state(path: str | Path, trust_pickle: bool, num_envs: int
                       ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(config values, preprocessor state) from a ``VecNormalize`` statistics pickle."""
    if not trust_pickle:
        raise AdapterError(
            f"'{path}' is a pickle (SB3 saves VecNormalize statistics with pickle): loading "
            "it runs whatever code the file holds. Load it only if you trust its origin, "
            "with trust_pickle=True (command line: --trust-pickle).")
    with open(path, "rb") as f:
        vn = pickle.load(f)  # noqa: S301 - explicitly trusted by the caller
    eps = float(getattr(vn, "epsilon", 1e-8))
    if not math.isclose(eps, 1e-8, rel_tol=1e-6):
        raise AdapterError(f"VecNormalize epsilon {eps} differs from pgscope's 1e-8.")
    values: dict[str, Any] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    if getattr(vn, "norm_obs", False):
        rms = vn.obs_rms
        if isinstance(rms, dict):
            raise AdapterError("VecNormalize statistics of dict observations are not supported.")
        values.update(obs_norm=True, obs_clip=True, obs_clip_bound=float(vn.clip_obs))
        state["obs_norm"] = rms_state(rms.mean, rms.var, rms.count)
    if getattr(vn, "norm_reward", False):
        ret = vn.ret_rms
        values.update(reward_scale=True, reward_clip=True,
                      reward_clip_bound=float(vn.clip_reward))
        state["reward_scaler"] = {**rms_state(ret.mean, ret.var, ret.count),
                                  "ret": torch.zeros(num_envs, dtype=torch.float64)}
    return values, state


def from_sb3(state: Mapping[str, torch.Tensor], data: Mapping[str, Any], env_id: str, *,
             vecnormalize: tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]
             | None = None, clip_range: float | None = None,
             overrides: Mapping[str, Any] | None = None) -> Agent:
    """A pgscope agent from an SB3 ``ActorCriticPolicy`` state dict and the model's
    hyperparameters ``data`` (the zip's JSON, or ``{"gamma": ..., "gae_lambda": ...,
    "n_steps": ..., ...}``); ``overrides`` are config values that win over the model's."""
    if data.get("use_sde"):
        raise AdapterError("models trained with gSDE (use_sde=True) are not supported.")
    known = ("mlp_extractor.policy_net.", "mlp_extractor.value_net.", "action_net.",
             "value_net.", "log_std")
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise AdapterError(
            "the SB3 policy is not an MlpPolicy with separate policy and value MLPs "
            f"(unexpected weights: {', '.join(unknown[:5])}); shared layers, CNN or "
            "custom feature extractors are not supported.")
    pi = layers_from(state, "mlp_extractor.policy_net.", "SB3") if any(
        k.startswith("mlp_extractor.policy_net.") for k in state) else []
    vf = layers_from(state, "mlp_extractor.value_net.", "SB3") if any(
        k.startswith("mlp_extractor.value_net.") for k in state) else []
    try:
        pi.append((state["action_net.weight"], state["action_net.bias"]))
        vf.append((state["value_net.weight"], state["value_net.bias"]))
    except KeyError as exc:
        raise AdapterError(f"SB3 policy: missing {exc.args[0]}.") from None
    config = sb3_config(data, clip_range)
    pre_state: dict[str, dict[str, torch.Tensor]] = {}
    if vecnormalize is not None:
        config.update(vecnormalize[0])
        pre_state = vecnormalize[1]
    config.update(overrides or {})
    preset = "ppo" if "clip_range" in data else "a2c"
    return build_external_agent(env_id, config, pi, vf, state.get("log_std"), pre_state, "SB3",
                                preset)


def load_sb3(model: str | Path, env_id: str, *, vecnormalize: str | Path | None = None,
             trust_pickle: bool = False, clip_range: float | None = None,
             overrides: Mapping[str, Any] | None = None) -> Agent:
    """A pgscope agent from an SB3 PPO/A2C model zip (weights read with
    ``weights_only=True``; hyperparameters from its JSON) and, optionally, the
    ``VecNormalize`` statistics saved with ``VecNormalize.save`` (a pickle: needs
    ``trust_pickle=True``). The env must be the one the model was trained on."""
    state, data = read_model_zip(model)
    vn = None
    if vecnormalize is not None:
        vn = vecnormalize_state(vecnormalize, trust_pickle, int(data.get("n_envs", 1)))
    agent = from_sb3(state, data, env_id, vecnormalize=vn, clip_range=clip_range,
                     overrides=overrides)
    if vecnormalize is None and data.get("_last_original_obs") is not None:
        warnings.warn(f"'{model}' was trained inside VecNormalize (it kept the original "
                      "observations); without its statistics (vecnormalize=...) the probes "
                      "see unnormalized observations.", stacklevel=2)
    return agent
