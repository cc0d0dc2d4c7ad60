"""The PPO update: clipped surrogate (``ppo``, ``ppo-m``, ``ppo-noclip``) or adaptive KL
penalty (``ppo-kl``), with the value net trained on the same minibatches.

The whole rule reads top to bottom in :func:`ppo_update`; each code-level optimization it
uses is a named function from :mod:`pgscope.optimizations`. :func:`policy_loss` is the
objective both the update and the landscape probe (:func:`surrogate`) evaluate.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch.distributions import Distribution

from pgscope.algos import (
    NOMINAL_CLIP_RANGE,
    Algorithm,
    EpochCallback,
    register_algorithm,
)
from pgscope.algos.common import (
    POLICY_CHANGE_KEYS,
    PhaseRecorder,
    log_ratio,
    minibatches,
    policy_change,
    reference_clip_range,
)
from pgscope.config import OPTIMIZATIONS_OFF, Config
from pgscope.networks import Policy, ValueNet
from pgscope.optimizations import (
    adapt_kl_beta,
    clip_gradients,
    dr3_penalty,
    entropy_bonus,
    kl_early_stop,
    normalize_advantages,
    value_loss,
)
from pgscope.rollout import Batch


def clipped_surrogate_loss(ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float
                           ) -> torch.Tensor:
    """-E[min(r A, clip(r, 1-eps, 1+eps) A)], the mean over the last (sample) dim."""
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv).mean(-1)


def policy_loss(cfg: Config, policy: Policy, old_policy: Policy, obs: torch.Tensor,
                dist: Distribution, ratio: torch.Tensor, adv: torch.Tensor,
                beta: float | torch.Tensor) -> torch.Tensor:
    """PPO's policy loss at states ``obs`` (entropy bonus excluded): the clipped surrogate,
    or for ``ppo_loss = kl`` the surrogate plus ``beta`` x mean KL(old || new). Means are
    over the last (sample) dim, so the seed-batched engine gets one loss per seed
    (``beta``: one per seed there)."""
    if cfg.ppo_loss == "clip":
        return clipped_surrogate_loss(ratio, adv, cfg.clip_eps)
    with torch.no_grad():  # adaptive KL penalty
        old_dist = old_policy.dist(obs)
    return -(ratio * adv).mean(-1) + beta * policy.kl(old_dist, dist).mean(-1)


def ppo_update(cfg: Config, policy: Policy, value_net: ValueNet,
               optimizer: torch.optim.Optimizer, batch: Batch, generator: torch.Generator,
               state: dict[str, float], heldout_obs: torch.Tensor | None = None,
               epoch_callback: EpochCallback | None = None) -> dict[str, float]:
    """One PPO update phase on ``batch``; returns the phase's metrics (each key is defined
    in :mod:`pgscope.metrics`). ``state`` carries the ppo-kl penalty coefficient
    ``kl_beta`` across iterations. ``epoch_callback(epoch, old_policy)`` runs after each
    epoch (the trust-region probe watches the update)."""
    old_policy = copy.deepcopy(policy)
    clip_range = reference_clip_range(cfg)
    phase = PhaseRecorder(clip_range)
    grad_limit = cfg.max_grad_norm if cfg.grad_clip else None
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    beta = state.get("kl_beta", cfg.kl_beta_init)
    epochs_run = 0

    for _ in range(cfg.epochs):
        for idx in minibatches(len(batch), cfg, generator):
            obs, actions = batch.obs[idx], batch.actions[idx]
            dist = policy.dist(obs)
            ratio = log_ratio(policy, dist, actions, batch.logp[idx]).exp()
            adv = normalize_advantages(batch.advantages[idx], cfg.adv_norm)
            loss = policy_loss(cfg, policy, old_policy, obs, dist, ratio, adv, beta)
            bonus = entropy_bonus(policy.entropy(dist), cfg.ent_coef) if cfg.ent_coef else 0.0
            values = value_net(obs)
            v_loss = value_loss(values, batch.values[idx], batch.returns[idx], value_clip)
            dr3 = dr3_penalty(value_net.features, obs, batch.next_obs[idx],
                              ~batch.done[idx], cfg.value_dr3_coef)

            optimizer.zero_grad(set_to_none=True)
            (loss - bonus + v_loss + dr3).backward()
            # the networks share no parameters: each norm is of its own loss's gradient
            policy_grad_norm = clip_gradients(policy.parameters(), grad_limit)  # pre-clip
            value_grad_norm = clip_gradients(value_net.parameters(), grad_limit)
            optimizer.step()

            phase.ratios(ratio)  # before this minibatch's step
            phase.mean(policy_loss=loss, value_loss=v_loss,
                       policy_grad_norm=policy_grad_norm, value_grad_norm=value_grad_norm)
        epochs_run += 1
        if epoch_callback is not None:
            epoch_callback(epochs_run, old_policy)
        if cfg.kl_stop:
            with torch.no_grad():
                kl = policy.kl(old_policy.dist(batch.obs), policy.dist(batch.obs)).mean()
            if kl_early_stop(float(kl), cfg.target_kl, cfg.kl_stop):
                break

    metrics = phase.result()
    metrics.update(policy_change(policy, old_policy, batch, heldout_obs, clip_range))
    metrics["epochs_run"] = epochs_run
    if cfg.ppo_loss == "kl":
        state["kl_beta"] = adapt_kl_beta(beta, metrics["kl_mean"], cfg.target_kl)
        metrics["kl_beta"] = beta
    return metrics


@torch.no_grad()
def surrogate(cfg: Config, policy: Policy, old_policy: Policy, batch: Batch,
              state: Mapping[str, float]) -> float:
    """PPO's objective (minus :func:`policy_loss`) on the whole batch at the policy's
    current parameters, advantages normalized over the batch when ``adv_norm`` is on."""
    dist = policy.dist(batch.obs)
    ratio = log_ratio(policy, dist, batch.actions, batch.logp).exp()
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)
    beta = state.get("kl_beta", cfg.kl_beta_init)
    return -float(policy_loss(cfg, policy, old_policy, batch.obs, dist, ratio, adv, beta))


def ppo_clip_range(cfg: Config) -> float:
    """The clipped loss's own eps when it clips (eps < 1), else the nominal one."""
    clips = cfg.ppo_loss == "clip" and cfg.clip_eps < 1.0
    return cfg.clip_eps if clips else NOMINAL_CLIP_RANGE


#: Keys a PPO run logs besides the training loop's (:mod:`pgscope.metrics`).
LOGS = ("policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm", "ratio_max",
        "ratio_min", "clip_fraction", "ratio_first_minibatch_dev", *POLICY_CHANGE_KEYS,
        "epochs_run", "kl_beta", "lr")

register_algorithm(Algorithm(
    name="ppo",
    description="Proximal Policy Optimization (Schulman et al. 2017): epochs of minibatch "
                "Adam steps on the clipped surrogate or the adaptive KL penalty",
    update=ppo_update,
    surrogate=surrogate,
    presets={
        "ppo": dict(ppo_loss="clip"),
        "ppo-m": dict(ppo_loss="clip", **OPTIMIZATIONS_OFF),
        "ppo-noclip": dict(ppo_loss="clip", clip_eps=1e32),
        "ppo-kl": dict(ppo_loss="kl", target_kl=0.01),
    },
    logs=LOGS,
    clip_range=ppo_clip_range,
))
