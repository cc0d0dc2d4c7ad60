"""The PPO update: clipped surrogate (``ppo``, ``ppo-m``, ``ppo-noclip``) or adaptive KL
penalty (``ppo-kl``), with the value net trained on the same minibatches.

The whole rule reads top to bottom in :func:`ppo_update`, written once over a batch of
N >= 1 seeds (a single run is the batch of one; :mod:`pgscope.engine.nets`); each
code-level optimization it uses is a named function from :mod:`pgscope.optimizations`.
:func:`policy_loss` is the objective both the update and the landscape probe
(:func:`surrogate`) evaluate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributions import Distribution

from pgscope.algos import (
    COMMON_READS,
    NOMINAL_CLIP_RANGE,
    Algorithm,
    register_algorithm,
    typical_kl_target,
)
from pgscope.algos.common import (
    POLICY_CHANGE_KEYS,
    log_ratio,
    policy_change,
    reference_clip_range,
)
from pgscope.config import OPTIMIZATIONS_OFF, Config
from pgscope.engine.nets import (
    EpochCallback,
    SeedNets,
    SeedPhases,
    StackedBatch,
    seed_mean_kl,
    seed_minibatches,
)
from pgscope.engine.stacked import clip_gradients_per_seed
from pgscope.networks import Policy
from pgscope.optimizations import (
    adapt_kl_beta,
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
    over the last (sample) dim, so the engine gets one loss per seed
    (``beta``: one per seed there)."""
    if cfg.ppo_loss == "clip":
        return clipped_surrogate_loss(ratio, adv, cfg.clip_eps)
    with torch.no_grad():  # adaptive KL penalty
        old_dist = old_policy.dist(obs)
    return -(ratio * adv).mean(-1) + beta * policy.kl(old_dist, dist).mean(-1)


def ppo_update(cfg: Config, nets: SeedNets, batches: Sequence[Batch],
               generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
               heldout_obs: Sequence[torch.Tensor | None],
               epoch_callback: EpochCallback | None = None) -> list[dict[str, float]]:
    """One PPO update phase of each seed on its batch; returns each seed's metrics (each
    key is defined in :mod:`pgscope.metrics`). Tensors carry the seed dim first
    (``[N, m, ...]``); seed i draws its minibatches from ``generators[i]``, normalizes
    its own advantages, clips its own gradient norms, steps its own Adam moments and stops
    its own epochs (``kl_stop``: a stopped seed draws and steps no more). ``states[i]``
    carries seed i's ppo-kl penalty coefficient ``kl_beta`` across iterations.
    ``epoch_callback(epoch, old_policies)`` runs after each epoch (the trust-region probe
    watches the update)."""
    old_policies = nets.snapshot()
    old = nets.policy.detached()
    batch = StackedBatch.stack(batches)
    clip_range = reference_clip_range(cfg)
    phases = SeedPhases(len(nets), clip_range)
    grad_limit = cfg.max_grad_norm if cfg.grad_clip else None
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    penalty = cfg.ppo_loss == "kl"
    betas = [s.get("kl_beta", cfg.kl_beta_init) if penalty else 0.0 for s in states]
    beta = torch.tensor(betas, dtype=batch.advantages.dtype)  # each seed's ppo-kl penalty
    active = torch.ones(len(nets), dtype=torch.bool)  # seeds still in their epochs
    epochs_run = torch.zeros(len(nets), dtype=torch.long)

    policy = nets.policy.batched()  # every seed's policy, value net, theta_old at once
    old_policy = nets.policy.batched(old)
    value_net = nets.value.batched()
    for epoch in range(1, cfg.epochs + 1):
        for mb in seed_minibatches(batch, cfg, generators, active):  # [N, m, ...]
            dist = policy.dist(mb.obs)
            ratio = log_ratio(policy, dist, mb.actions, mb.logp).exp()
            adv = normalize_advantages(mb.advantages, cfg.adv_norm)
            loss = policy_loss(cfg, policy, old_policy, mb.obs, dist, ratio, adv, beta)
            bonus = entropy_bonus(policy.entropy(dist), cfg.ent_coef) if cfg.ent_coef else 0.0
            v_loss = value_loss(value_net(mb.obs), mb.values, mb.returns, value_clip)
            dr3 = dr3_penalty(value_net.features, mb.obs, mb.next_obs, mb.valid,
                              cfg.value_dr3_coef, cfg.value_dr3_form)

            nets.adam.zero_grad()
            (loss - bonus + v_loss + dr3).sum().backward()  # each seed's gradient: its own
            # the networks share no parameters: each norm is of its own loss's gradient
            policy_grad_norm = clip_gradients_per_seed(nets.policy.flat_params, grad_limit)
            value_grad_norm = clip_gradients_per_seed(nets.value.flat_params, grad_limit)
            nets.adam.step(active)

            phases.record(active, ratio,  # ratios from before this minibatch's step
                          policy_loss=loss, value_loss=v_loss,
                          policy_grad_norm=policy_grad_norm, value_grad_norm=value_grad_norm)
        epochs_run += active
        nets.epoch_end(epoch, old_policies, epoch_callback)
        if cfg.kl_stop:
            with torch.no_grad():
                kl = seed_mean_kl(policy, old_policy, batch.obs)
            active &= torch.tensor([not kl_early_stop(float(k), cfg.target_kl, cfg.kl_stop)
                                    for k in kl])
            if not active.any():
                break

    nets.store()
    out = phases.results()
    for i, metrics in enumerate(out):
        metrics.update(policy_change(nets.policies[i], old_policies[i], batches[i],
                                     heldout_obs[i], clip_range))
        metrics["epochs_run"] = int(epochs_run[i])
        if penalty:
            states[i]["kl_beta"] = adapt_kl_beta(betas[i], metrics["kl_mean"], cfg.target_kl)
            metrics["kl_beta"] = betas[i]
    return out


@torch.no_grad()
def surrogate(cfg: Config, policy: Policy, old_policy: Policy, batch: Batch,
              state: Mapping[str, float]) -> float:
    """PPO's objective (minus :func:`policy_loss`) on the whole batch at the policy's
    current parameters, advantages normalized over the batch when ``adv_norm`` is on."""
    dist = policy.dist(batch.obs)
    ratio = log_ratio(policy, dist, batch.actions, batch.logp).exp()
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)
    beta = state.get("kl_beta", cfg.kl_beta_init) if cfg.ppo_loss == "kl" else 0.0
    return -float(policy_loss(cfg, policy, old_policy, batch.obs, dist, ratio, adv, beta))


def ppo_clip_range(cfg: Config) -> float:
    """The clipped loss's own eps when it clips (eps < 1), else the nominal one."""
    clips = cfg.ppo_loss == "clip" and cfg.clip_eps < 1.0
    return cfg.clip_eps if clips else NOMINAL_CLIP_RANGE


def ppo_kl_target(config: Mapping[str, Any]) -> tuple[float, str]:
    """``target_kl`` when the run uses it (the adaptive KL penalty, or KL early
    stopping); else the typical target (the clipped loss sets no KL target)."""
    if config.get("ppo_loss") == "kl" or config.get("kl_stop"):
        return float(config.get("target_kl", 0.01)), "target_kl"
    return typical_kl_target(config)


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
    reads=(*COMMON_READS, "policy_lr", "ppo_loss", "clip_eps", "ent_coef", "kl_stop",
           "target_kl", "kl_beta_init"),
    clip_range=ppo_clip_range,
    kl_target=ppo_kl_target,
))
