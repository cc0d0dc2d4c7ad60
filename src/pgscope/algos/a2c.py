"""A2C, the synchronous advantage actor-critic (Mnih et al. 2016, "Asynchronous Methods
for Deep Reinforcement Learning", whose A3C it makes synchronous): one gradient step per
iteration on the whole batch, with the policy-gradient loss -mean(log pi(a|s) A), an
entropy bonus and a value regression.

That is PPO with one epoch, no clipping and the full batch as its one minibatch: at the
data-collecting policy every ratio r = pi / pi_old is 1 and grad r = grad log pi, so the
gradient of PPO's unclipped surrogate -mean(r A) is the policy gradient, and a clip never
binds. So this module runs :func:`pgscope.algos.ppo.ppo_update` in that configuration
(clip off, KL penalty and KL early stopping off) instead of repeating it; the config must
say ``epochs = 1`` and ``minibatches = 1``, and the PPO-only keys (``ppo_loss``,
``clip_eps``, ``target_kl``, ``kl_beta_init``, ``kl_stop``) are not read.

It logs PPO's keys except those of PPO's sample reuse: ``ratio_max``, ``ratio_min`` and
``clip_fraction`` over on-policy ratios (all 1: no information) and ``epochs_run``
(always 1); ``policy_loss`` is -mean(r A) at r = 1, i.e. -mean(A).

The ``a2c`` preset keeps every other setting of the ``ppo`` preset (Adam with PPO's
learning rates, the per-env learning rates, 2048-step batches, GAE lambda 0.95, the
code-level optimizations but value clipping, advantage normalization), so that ``a2c``
against ``ppo`` in a study isolates what PPO adds: reusing each batch for epochs of
minibatch steps, and the clip. These are not the defaults of other A2C implementations:
the A3C paper uses RMSProp, 5-step rollouts per actor (t_max = 5) and an entropy bonus of
0.01; stable-baselines3's A2C uses RMSprop (lr 7e-4, alpha 0.99, eps 1e-5), n_steps = 5
per env, gae_lambda = 1, value-loss weight 0.5, gradient clipping at 0.5 and no advantage
normalization. With 2048-step batches a2c takes one gradient step where those take ~400,
so it learns far more slowly per env step; ``--set steps_per_iter=... policy_lr=...``
moves it towards them (pgscope writes a metrics line and a checkpoint per iteration, which
makes 5-step iterations slow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from pgscope.algos import COMMON_READS, Algorithm, register_algorithm
from pgscope.algos.ppo import LOGS as PPO_LOGS
from pgscope.algos.ppo import ppo_update
from pgscope.algos.ppo import surrogate as ppo_surrogate
from pgscope.config import Config
from pgscope.engine.nets import EpochCallback, SeedNets
from pgscope.errors import ConfigError
from pgscope.networks import Policy
from pgscope.rollout import Batch

#: PPO's keys that describe sample reuse, which A2C does not do.
NOT_LOGGED = ("ratio_max", "ratio_min", "clip_fraction", "epochs_run", "kl_beta")


def as_ppo(cfg: Config) -> Config:
    """The PPO configuration A2C is: the clipped loss with a clip that never binds
    (as ``ppo-noclip``), no KL early stopping."""
    return replace(cfg, ppo_loss="clip", clip_eps=1e32, kl_stop=False)


def a2c_update(cfg: Config, nets: SeedNets, batches: Sequence[Batch],
               generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
               heldout_obs: Sequence[torch.Tensor | None],
               epoch_callback: EpochCallback | None = None) -> list[dict[str, float]]:
    """One A2C step of each seed on its whole batch: PPO's update with one epoch of one
    minibatch and no clip (see the module doc); returns each seed's metrics without
    :data:`NOT_LOGGED`."""
    out = ppo_update(as_ppo(cfg), nets, batches, generators, states, heldout_obs,
                     epoch_callback)
    return [{k: v for k, v in metrics.items() if k not in NOT_LOGGED} for metrics in out]


def surrogate(cfg: Config, policy: Policy, old_policy: Policy, batch: Batch,
              state: Mapping[str, float]) -> float:
    """A2C's objective mean(r A) on the whole batch (PPO's without a clip)."""
    return ppo_surrogate(as_ppo(cfg), policy, old_policy, batch, state)


def check(cfg: Config) -> None:
    """A2C takes one step on the whole batch per iteration: the config must say so."""
    for key in ("epochs", "minibatches"):
        if getattr(cfg, key) != 1:
            raise ConfigError(
                f"config key '{key}' must be 1 for a2c, which takes one gradient step on "
                f"the whole batch per iteration (got {getattr(cfg, key)}); PPO without the "
                "clip is preset ppo-noclip.")


register_algorithm(Algorithm(
    name="a2c",
    description="A2C (Mnih et al. 2016, synchronous): one full-batch policy-gradient step "
                "per iteration; PPO with one epoch, one minibatch and no clip",
    update=a2c_update,
    surrogate=surrogate,
    presets={"a2c": dict(epochs=1, minibatches=1, value_clip=False)},
    logs=tuple(k for k in PPO_LOGS if k not in NOT_LOGGED),
    reads=(*COMMON_READS, "policy_lr", "ent_coef"),  # PPO's, less what as_ppo fixes
    check=check,
))
