"""TRPO for N seeds at once: :func:`pgscope.algos.trpo.trpo_update` with batched
gradients, Fisher-vector products and line-search evaluations.

Each seed solves its own conjugate-gradient system (a seed whose residual is small stops
iterating, as the single loop breaks), scales its own step to ``max_kl`` and accepts its
own line-search fraction (the first fraction with KL <= max_kl and an improved
surrogate; none: it stays at theta_old). The Fisher-vector products of all seeds are one
double backward through the summed KLs: no seed's KL depends on another's parameters,
so the stacked product is each seed's own."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch

from pgscope.algos.common import (
    first_ratio_deviation,
    log_ratio,
    policy_change,
    reference_clip_range,
)
from pgscope.algos.trpo import kl_limit
from pgscope.batched.common import (
    BATCHED_UPDATES,
    SeedNets,
    SeedPhases,
    StackedBatch,
    seed_mean_kl,
    seed_minibatches,
)
from pgscope.batched.stacked import clip_gradients_per_seed, side_by_side
from pgscope.config import Config
from pgscope.optimizations import dr3_penalty, normalize_advantages, value_loss
from pgscope.rollout import Batch


def conjugate_gradient_per_seed(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                                iters: int, tol: float = 1e-10) -> torch.Tensor:
    """:func:`pgscope.algos.trpo.conjugate_gradient` for each row of ``b`` (``[N, P]``)
    with its own matrix: ``Avp`` maps ``[N, P]`` to the rows' products. A row whose
    residual falls below ``tol`` stops where the single loop would break."""
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


def fit_value(cfg: Config, nets: SeedNets, batch: StackedBatch,
              generators: Sequence[torch.Generator]) -> list[dict[str, float]]:
    """:func:`pgscope.algos.trpo.fit_value` for every seed: epochs x minibatches of Adam
    on each seed's GAE targets."""
    phases = SeedPhases(len(nets), clip_range=0.2)  # records no ratios: only means
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    everyone = torch.ones(len(nets), dtype=torch.bool)

    value_net = nets.value.batched()
    for _ in range(cfg.epochs):
        for mb in seed_minibatches(batch, cfg, generators, everyone):
            v_loss = value_loss(value_net(mb.obs), mb.values, mb.returns, value_clip)
            dr3 = dr3_penalty(value_net.features, mb.obs, mb.next_obs, mb.valid,
                              cfg.value_dr3_coef)
            nets.adam.zero_grad()
            (v_loss + dr3).sum().backward()
            grad_norm = clip_gradients_per_seed(list(nets.value.parameters()),
                                                cfg.max_grad_norm if cfg.grad_clip else None)
            nets.adam.step(everyone)
            phases.record(everyone, value_loss=v_loss, value_grad_norm=grad_norm)
    return phases.results()


def trpo_update(cfg: Config, nets: SeedNets, batches: Sequence[Batch],
                generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
                heldout_obs: Sequence[torch.Tensor | None]) -> list[dict[str, float]]:
    """One TRPO iteration of every seed; each seed's metrics as ``trpo_update``'s (and its
    ``state["updates"]`` counted alike, for the KL limit's schedule)."""
    updates = [int(s.get("updates", 0)) for s in states]
    limits = [kl_limit(cfg, u) for u in updates]
    max_kl = torch.tensor(limits)
    for state, u in zip(states, updates, strict=True):
        state["updates"] = u + 1
    old_policies = [copy.deepcopy(p) for p in nets.policies]
    old = nets.policy.detached()
    params = list(nets.policy.parameters())
    batch = StackedBatch.stack(batches)
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)  # each seed's own
    fisher_n = max(1, int(cfg.fisher_fraction * batch.pairs))
    fisher_obs = torch.stack([b.obs[torch.randperm(len(b), generator=g)[:fisher_n]]
                              for b, g in zip(batches, generators, strict=True)])

    policy, old_policy = nets.policy.batched(), nets.policy.batched(old)

    def ratio() -> torch.Tensor:
        """Each seed's r = pi / pi_old on its whole batch: ``[N, pairs]``."""
        return log_ratio(policy, policy.dist(batch.obs), batch.actions, batch.logp).exp()

    def surrogate() -> torch.Tensor:
        """Each seed's mean(r A) on its whole batch: ``[N]``."""
        return (ratio() * adv).mean(1)

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        kl = seed_mean_kl(policy, old_policy, fisher_obs).sum()
        grad_kl = side_by_side(torch.autograd.grad(kl, params, create_graph=True))
        product = torch.autograd.grad((grad_kl * v).sum(), params)
        return side_by_side(product) + cfg.cg_damping * v

    ratio_old = ratio()
    surr_old = (ratio_old * adv).mean(1)
    g = side_by_side(torch.autograd.grad(surr_old.sum(), params))
    direction = conjugate_gradient_per_seed(fisher_vector_product, g, cfg.cg_iters)
    shs = (direction * fisher_vector_product(direction)).sum(1)
    scale = torch.tensor([math.sqrt(2 * limit / max(float(s), 1e-12))
                          for limit, s in zip(limits, shs, strict=True)])
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

    out = [dict(policy_loss=-float(surr_old[i]), policy_grad_norm=float(g[i].norm()),
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


BATCHED_UPDATES["trpo"] = trpo_update
