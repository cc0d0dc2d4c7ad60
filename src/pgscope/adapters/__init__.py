"""Agents trained elsewhere: the agent protocol the probes use, and adapters that turn a
Stable-Baselines3 model or a CleanRL checkpoint into an object that satisfies it.

The agent protocol
------------------
A probe needs, of an agent (:class:`ProbeAgent`; pgscope's own :class:`pgscope.agent.Agent`
satisfies it):

``policy``
    a :class:`pgscope.networks.Policy`: the action distribution at a batch of (already
    preprocessed) observations, log-probabilities, entropy, KL, the mode and a fast NumPy
    sampler; its ``parameters()`` are the ones whose gradients the probes measure.
``value_net``
    an ``nn.Module`` mapping a batch of preprocessed observations to ``V(s)`` (shape
    ``(batch,)``), in the reward units it was trained on; its ``parameters()`` are the
    value net's probed parameters.
``preprocessor``
    a :class:`pgscope.rollout.Preprocessor`: the observation normalization/clipping and
    reward scaling/clipping of training, whose statistics the probes freze
    (``with_frozen_statistics``).
``config``
    a :class:`pgscope.config.Config` holding the rest: ``env_id``, ``gamma``,
    ``gae_lambda``, the clip range ``clip_eps``, the steps per rollout segment
    (``steps_per_iter`` / ``num_envs``), ``adv_norm``, ``action_clip``, the update's
    ``epochs``/``minibatches``/learning rates, and ``algo``, whose registered surrogate
    (:attr:`pgscope.algos.Algorithm.surrogate`) is the objective the landscape probe
    evaluates.

The adapters load the external weights into pgscope's own networks (the same
architecture: separate policy and value MLPs, a state-independent log-std for Box
actions), so every probe runs on them unchanged: :func:`from_sb3`/:func:`load_sb3` and
:func:`from_cleanrl`/:func:`load_cleanrl` return a :class:`pgscope.agent.Agent`, and
:func:`pgscope.probes.run` runs any probe on it. Layouts, what is read from where and
what is assumed: docs/adapters.md.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from pgscope.adapters.cleanrl import from_cleanrl, load_cleanrl, load_obs_stats
from pgscope.adapters.sb3 import from_sb3, load_sb3
from pgscope.config import Config
from pgscope.networks import Policy
from pgscope.rollout import Preprocessor


@runtime_checkable
class ProbeAgent(Protocol):
    """What a probe needs of an agent (module doc). :class:`pgscope.agent.Agent` and every
    adapter's result satisfy it."""

    config: Config
    policy: Policy
    value_net: torch.nn.Module
    preprocessor: Preprocessor


__all__ = ["ProbeAgent", "from_cleanrl", "from_sb3", "load_cleanrl", "load_obs_stats",
           "load_sb3"]
