"""The TRPO update (Schulman et al. 2015): a natural-gradient step found by conjugate
gradient on Fisher-vector products, scaled to the KL limit, then a backtracking line search
that accepts a step only if KL(old||new) <= max_kl *and* the surrogate improves. The value
net is fit separately with Adam. With ``max_kl_final`` the KL limit moves linearly from
``max_kl`` to it over the run (:func:`kl_limit`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pgscope.algos import COMMON_READS, Algorithm, register_algorithm
from pgscope.algos.common import (
    POLICY_CHANGE_KEYS,
    first_ratio_deviation,
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
from pgscope.engine.stacked import clip_gradients_per_seed, side_by_side
from pgscope.errors import ConfigError
from pgscope.networks import Policy
from pgscope.optimizations import dr3_penalty, normalize_advantages, value_loss
from pgscope.rollout import Batch


def batch_ratio(policy: Policy, batch: Batch | StackedBatch) -> torch.Tensor:
    """r = pi(a|s) / pi_old(a|s) for every pair of the batch (of each seed's batch)."""
    return log_ratio(policy, policy.dist(batch.obs), batch.actions, batch.logp).exp()


def surrogate_objective(policy: Policy, batch: Batch | StackedBatch, adv: torch.Tensor
                        ) -> torch.Tensor:
    """TRPO's surrogate mean(r A) on the whole batch (over the last, sample, dim)."""
    return (batch_ratio(policy, batch) * adv).mean(-1)


def conjugate_gradient(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int, tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``A_i x_i = b_i`` for each row ``b_i`` of ``b`` (``[N, P]``),
    ``A_i`` symmetric positive-definite and given only through ``Avp``, which maps
    ``[N, P]`` to the rows' products. A row whose residual falls below ``tol`` stops there
    (its x, r and p are kept); the others go on."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = (r * r).sum(1)
    running = torch.ones(b.shape[0], dtype=torch.bool)
    for _ in range(iters):
        running &= rr >= tol
        if not running.any():
            break
        Ap = Avp(p)
        alpha = (rr / (p * Ap).sum(1)).unsqueeze(1)
        keep = running.unsqueeze(1)
        x = torch.where(keep, x + alpha * p, x)
        r = torch.where(keep, r - alpha * Ap, r)
        rr_new = (r * r).sum(1)
        p = torch.where(keep, r + (rr_new / rr).unsqueeze(1) * p, p)
        rr = torch.where(running, rr_new, rr)
    return x


def kl_limit(cfg: Config, update: int) -> float:
    """The KL limit of TRPO update ``update`` (0-based) of the run's ``num_iterations``:
    ``max_kl``, or with ``max_kl_final`` > 0 the linear schedule
    ``max_kl + (max_kl_final - max_kl) * (update + 1) / num_iterations``, which ends at
    ``max_kl_final`` on the last update: the schedule Engstrom et al.'s TRPO+ config files
    describe, one increment before each policy step (MadryLab/implementation-matters,
    src/policy_gradients/agent.py), although their code never applies it (preset
    ``trpo+-paper-files`` runs it; ``trpo+-paper`` the constant limit their code ran)."""
    if cfg.max_kl_final <= 0:
        return cfg.max_kl
    done = min(update + 1, cfg.num_iterations)
    return cfg.max_kl + (cfg.max_kl_final - cfg.max_kl) * done / cfg.num_iterations


def fit_value(cfg: Config, nets: SeedNets, batch: StackedBatch,
              generators: Sequence[torch.Generator]) -> list[dict[str, float]]:
    """Regress each seed's value net on its GAE targets: epochs x minibatches of Adam."""
    phases = SeedPhases(len(nets), clip_range=0.2)  # records no ratios: only means
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    grad_limit = cfg.max_grad_norm if cfg.grad_clip else None
    everyone = torch.ones(len(nets), dtype=torch.bool)

    value_net = nets.value.batched()
    for _ in range(cfg.epochs):
        for mb in seed_minibatches(batch, cfg, generators, everyone):
            v_loss = value_loss(value_net(mb.obs), mb.values, mb.returns, value_clip)
            dr3 = dr3_penalty(value_net.features, mb.obs, mb.next_obs, mb.valid,
                              cfg.value_dr3_coef, cfg.value_dr3_form)
            nets.adam.zero_grad()
            (v_loss + dr3).sum().backward()
            grad_norm = clip_gradients_per_seed(nets.value.flat_params, grad_limit)
            nets.adam.step(everyone)
            phases.record(everyone, value_loss=v_loss, value_grad_norm=grad_norm)
    return phases.results()


def trpo_update(cfg: Config, nets: SeedNets, batches: Sequence[Batch],
                generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
                heldout_obs: Sequence[torch.Tensor | None],
                epoch_callback: EpochCallback | None = None) -> list[dict[str, float]]:
    """One TRPO iteration of each seed on its batch; returns each seed's metrics (each key
    is defined in :mod:`pgscope.metrics`). Tensors carry the seed dim first; each seed
    solves its own conjugate-gradient system, scales its own step to its KL limit and
    accepts its own line-search fraction (none acceptable: it stays at theta_old). The
    Fisher-vector products of all seeds are one double backward through the summed KLs:
    no seed's KL depends on another's parameters, so each row is the seed's own product.
    ``epoch_callback(1, old_policies)`` runs once, after the policy step.
    ``states[i]["updates"]`` counts seed i's updates, for the KL limit's schedule
    (:func:`kl_limit`)."""
    updates = [int(s.get("updates", 0)) for s in states]
    limits = [kl_limit(cfg, u) for u in updates]
    max_kl = torch.tensor(limits, dtype=torch.float64)  # each seed's limit, compared exactly
    for state, u in zip(states, updates, strict=True):
        state["updates"] = u + 1
    old_policies = nets.snapshot()
    old = nets.policy.detached()
    params = list(nets.policy.parameters())
    batch = StackedBatch.stack(batches)
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)  # each seed's own
    fisher_n = max(1, int(cfg.fisher_fraction * batch.pairs))
    fisher_obs = torch.stack([b.obs[torch.randperm(len(b), generator=g)[:fisher_n]]
                              for b, g in zip(batches, generators, strict=True)])

    policy, old_policy = nets.policy.batched(), nets.policy.batched(old)

    def surrogate() -> torch.Tensor:
        return surrogate_objective(policy, batch, adv)  # [N]

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        kl = seed_mean_kl(policy, old_policy, fisher_obs).sum()
        grad_kl = side_by_side(torch.autograd.grad(kl, params, create_graph=True))
        product = torch.autograd.grad((grad_kl * v).sum(), params)
        return side_by_side(product) + cfg.cg_damping * v

    ratio_old = batch_ratio(policy, batch)  # on-policy: exactly 1
    surr_old = (ratio_old * adv).mean(-1)
    g = side_by_side(torch.autograd.grad(surr_old.sum(), params))
    direction = conjugate_gradient(fisher_vector_product, g, cfg.cg_iters)
    shs = (direction * fisher_vector_product(direction)).sum(1)
    scale = torch.tensor([math.sqrt(2 * limit / max(float(s), 1e-12))
                          for limit, s in zip(limits, shs, strict=True)], dtype=g.dtype)
    step = scale.unsqueeze(1) * direction

    theta_old = nets.policy.flat().detach()
    theta_new = theta_old.clone()
    step_fraction = torch.zeros(len(nets), dtype=torch.float64)
    steps_tried = torch.full((len(nets),), cfg.backtrack_iters)
    accepted = torch.zeros(len(nets), dtype=torch.bool)
    surr_old = surr_old.detach()
    with torch.no_grad():
        for k in range(cfg.backtrack_iters):
            fraction = cfg.backtrack_coef ** k
            trial = theta_old + fraction * step
            nets.policy.set_flat(trial)
            ok = ((seed_mean_kl(policy, old_policy, batch.obs) <= max_kl)
                  & (surrogate() > surr_old) & ~accepted)
            theta_new[ok] = trial[ok]
            step_fraction[ok], steps_tried[ok] = fraction, k + 1
            accepted |= ok
            if accepted.all():
                break
        nets.policy.set_flat(theta_new)  # a seed with no acceptable step keeps theta_old
    nets.epoch_end(1, old_policies, epoch_callback)

    out = [dict(policy_loss=-float(surr_old[i]),
                policy_grad_norm=float(g[i].norm()),  # the loss is -surrogate: same norm
                **first_ratio_deviation(ratio_old[i]), step_fraction=float(step_fraction[i]),
                linesearch_steps=int(steps_tried[i]),
                step_norm=float(step[i].norm()) * float(step_fraction[i]))
           for i in range(len(nets))]
    for metrics, fit in zip(out, fit_value(cfg, nets, batch, generators), strict=True):
        metrics.update(fit)
    nets.store()
    for i, metrics in enumerate(out):
        metrics.update(policy_change(nets.policies[i], old_policies[i], batches[i],
                                     heldout_obs[i], reference_clip_range(cfg)))
    return out


@torch.no_grad()
def surrogate(cfg: Config, policy: Policy, old_policy: Policy, batch: Batch,
              state: Mapping[str, float]) -> float:
    """TRPO's surrogate mean(r A) on the whole batch at the policy's current parameters,
    advantages normalized over the batch when ``adv_norm`` is on."""
    return float(surrogate_objective(policy, batch,
                                     normalize_advantages(batch.advantages, cfg.adv_norm)))


#: Keys a TRPO run logs besides the training loop's (:mod:`pgscope.metrics`).
LOGS = ("policy_loss", "policy_grad_norm", "ratio_first_minibatch_dev", "step_fraction",
        "linesearch_steps", "step_norm", "value_loss", "value_grad_norm", *POLICY_CHANGE_KEYS)

def check_unused_keys(cfg: Config) -> None:
    """Refuse the switches TRPO's update would silently ignore: it has no entropy bonus
    (``ent_coef``) and no epochs of policy steps to stop (``kl_stop``); its step is bounded
    by ``max_kl`` and the line search instead (the registry's ``check`` of a TRPO config)."""
    if cfg.ent_coef != 0:
        raise ConfigError(f"ent_coef = {cfg.ent_coef:g}: TRPO has no entropy bonus (its step "
                          "maximizes the surrogate within max_kl); set ent_coef=0, or use a "
                          "ppo preset for an entropy bonus.")
    if cfg.kl_stop:
        raise ConfigError("kl_stop = true: TRPO takes one step per iteration, bounded by "
                          "max_kl and the line search; there are no epochs to stop. Set "
                          "kl_stop=false (or lower max_kl).")


def trpo_kl_target(config: Mapping[str, Any]) -> tuple[float, str]:
    """The KL limit, the larger end when it moves towards ``max_kl_final``."""
    limit = float(config.get("max_kl", 0.01))
    final = float(config.get("max_kl_final") or 0.0)
    return (final, "max_kl_final") if final > limit else (limit, "max_kl")


register_algorithm(Algorithm(
    name="trpo",
    description="Trust Region Policy Optimization (Schulman et al. 2015): a natural-gradient "
                "step with a KL limit and a backtracking line search; value net fit by Adam",
    update=trpo_update,
    surrogate=surrogate,
    presets={
        "trpo": dict(OPTIMIZATIONS_OFF),
        "trpo+": {**OPTIMIZATIONS_OFF, "reward_scale": True, "reward_clip": True,
                  "obs_norm": True, "obs_clip": True, "ortho_init": True, "grad_clip": True,
                  "value_clip": False},
    },
    logs=LOGS,
    reads=(*COMMON_READS, "max_kl", "max_kl_final", "cg_iters", "cg_damping",
           "backtrack_iters", "backtrack_coef", "fisher_fraction"),
    policy_optimizer=False,
    check=check_unused_keys,
    kl_target=trpo_kl_target,
))
