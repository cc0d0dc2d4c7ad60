"""PPO for N seeds at once: :func:`pgscope.algos.ppo.ppo_update` with one seed-batched
forward/backward per minibatch index for all seeds (:class:`pgscope.batched.stacked.
SeedBatched`; the loss pieces are the single run's, each giving one value per seed).

Seed i draws its minibatches from its own generator, normalizes its own advantages,
clips its own gradient norms, steps its own Adam moments and stops its own epochs
(``kl_stop``; a stopped seed draws and steps no more); ppo-kl keeps a beta per seed."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from pgscope.algos.common import log_ratio, policy_change, reference_clip_range
from pgscope.algos.ppo import policy_loss
from pgscope.batched.common import (
    BATCHED_UPDATES,
    SeedNets,
    SeedPhases,
    StackedBatch,
    seed_mean_kl,
    seed_minibatches,
)
from pgscope.batched.stacked import clip_gradients_per_seed
from pgscope.config import Config
from pgscope.optimizations import (
    adapt_kl_beta,
    dr3_penalty,
    entropy_bonus,
    kl_early_stop,
    normalize_advantages,
    value_loss,
)
from pgscope.rollout import Batch


def ppo_update(cfg: Config, nets: SeedNets, batches: Sequence[Batch],
               generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
               heldout_obs: Sequence[torch.Tensor | None]) -> list[dict[str, float]]:
    """One PPO update phase of every seed; each seed's metrics as ``ppo_update``'s."""
    old_policies = [copy.deepcopy(p) for p in nets.policies]
    old = nets.policy.detached()
    batch = StackedBatch.stack(batches)
    clip_range = reference_clip_range(cfg)
    phases = SeedPhases(len(nets), clip_range)
    grad_limit = cfg.max_grad_norm if cfg.grad_clip else None
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    betas = [s.get("kl_beta", cfg.kl_beta_init) for s in states]
    active = torch.ones(len(nets), dtype=torch.bool)  # seeds still in their epochs
    epochs_run = torch.zeros(len(nets), dtype=torch.long)

    policy = nets.policy.batched()  # every seed's policy, value net, theta_old at once
    old_policy = nets.policy.batched(old)
    value_net = nets.value.batched()
    beta = torch.tensor(betas)  # each seed's ppo-kl penalty coefficient
    for _ in range(cfg.epochs):
        for mb in seed_minibatches(batch, cfg, generators, active):  # [N, m, ...]
            dist = policy.dist(mb.obs)
            ratio = log_ratio(policy, dist, mb.actions, mb.logp).exp()
            adv = normalize_advantages(mb.advantages, cfg.adv_norm)
            loss = policy_loss(cfg, policy, old_policy, mb.obs, dist, ratio, adv, beta)
            bonus = entropy_bonus(policy.entropy(dist), cfg.ent_coef) if cfg.ent_coef else 0.0
            v_loss = value_loss(value_net(mb.obs), mb.values, mb.returns, value_clip)
            dr3 = dr3_penalty(value_net.features, mb.obs, mb.next_obs, mb.valid,
                              cfg.value_dr3_coef)
            nets.adam.zero_grad()
            (loss - bonus + v_loss + dr3).sum().backward()  # each seed's gradient: its own
            policy_grad_norm = clip_gradients_per_seed(list(nets.policy.parameters()),
                                                       grad_limit)
            value_grad_norm = clip_gradients_per_seed(list(nets.value.parameters()),
                                                      grad_limit)
            nets.adam.step(active)

            phases.record(active, ratio, policy_loss=loss, value_loss=v_loss,
                          policy_grad_norm=policy_grad_norm, value_grad_norm=value_grad_norm)
        epochs_run += active
        if cfg.kl_stop:
            with torch.no_grad():
                kl = seed_mean_kl(policy, old_policy, batch.obs)
            stop = torch.tensor([kl_early_stop(float(k), cfg.target_kl, cfg.kl_stop)
                                 for k in kl])
            active &= ~stop
            if not active.any():
                break

    nets.store()
    out = phases.results()
    for i, metrics in enumerate(out):
        metrics.update(policy_change(nets.policies[i], old_policies[i], batches[i],
                                     heldout_obs[i], clip_range))
        metrics["epochs_run"] = int(epochs_run[i])
        if cfg.ppo_loss == "kl":
            states[i]["kl_beta"] = adapt_kl_beta(betas[i], metrics["kl_mean"], cfg.target_kl)
            metrics["kl_beta"] = betas[i]
    return out


BATCHED_UPDATES["ppo"] = ppo_update
