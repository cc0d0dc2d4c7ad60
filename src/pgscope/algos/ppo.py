"""The PPO update: clipped surrogate (``ppo``, ``ppo-m``, ``ppo-noclip``) or adaptive KL
penalty (``ppo-kl``), with the value net trained on the same minibatches.

The whole rule reads top to bottom in :func:`ppo_update`; each code-level optimization it
uses is a named function from :mod:`pgscope.optimizations`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from pgscope.algos.common import PhaseRecorder, minibatches, policy_change, reference_clip_range
from pgscope.config import Config
from pgscope.networks import Policy, ValueNet
from pgscope.optimizations import (
    adapt_kl_beta,
    clip_gradients,
    entropy_bonus,
    kl_early_stop,
    normalize_advantages,
    value_loss,
)
from pgscope.rollout import Batch


def clipped_surrogate_loss(ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float
                           ) -> torch.Tensor:
    """-E[min(r A, clip(r, 1-eps, 1+eps) A)]."""
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv).mean()


def ppo_update(
    cfg: Config,
    policy: Policy,
    value_net: ValueNet,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    generator: torch.Generator,
    state: dict[str, float],
    heldout_obs: torch.Tensor | None = None,
    epoch_callback: Callable[[int, Policy], None] | None = None,
) -> dict[str, float]:
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
            ratio = (policy.log_prob(dist, actions) - batch.logp[idx]).exp()
            adv = normalize_advantages(batch.advantages[idx], cfg.adv_norm)
            if cfg.ppo_loss == "clip":
                policy_loss = clipped_surrogate_loss(ratio, adv, cfg.clip_eps)
            else:  # adaptive KL penalty
                with torch.no_grad():
                    old_dist = old_policy.dist(obs)
                policy_loss = -(ratio * adv).mean() + beta * policy.kl(old_dist, dist).mean()
            bonus = entropy_bonus(policy.entropy(dist), cfg.ent_coef) if cfg.ent_coef else 0.0
            values = value_net(obs)
            v_loss = value_loss(values, batch.values[idx], batch.returns[idx], value_clip)

            optimizer.zero_grad(set_to_none=True)
            (policy_loss - bonus + v_loss).backward()
            # the networks share no parameters: each norm is of its own loss's gradient
            policy_grad_norm = clip_gradients(policy.parameters(), grad_limit)  # pre-clip
            value_grad_norm = clip_gradients(value_net.parameters(), grad_limit)
            optimizer.step()

            phase.ratios(ratio)  # before this minibatch's step
            phase.mean(policy_loss=policy_loss, value_loss=v_loss,
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
