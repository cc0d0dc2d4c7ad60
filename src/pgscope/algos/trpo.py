"""The TRPO update (Schulman et al. 2015): a natural-gradient step found by conjugate
gradient on Fisher-vector products, scaled to the KL limit, then a backtracking line search
that accepts a step only if KL(old||new) <= max_kl *and* the surrogate improves. The value
net is fit separately with Adam."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pgscope.algos.common import (
    PhaseRecorder,
    first_ratio_deviation,
    minibatches,
    policy_change,
    reference_clip_range,
)
from pgscope.config import Config
from pgscope.networks import Policy, ValueNet
from pgscope.optimizations import clip_gradients, normalize_advantages, value_loss
from pgscope.rollout import Batch


def flat_grad(output: torch.Tensor, params: list[torch.nn.Parameter], **kwargs) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(output, params, **kwargs)])


def conjugate_gradient(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int, tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given only
    matrix-vector products."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fit_value(cfg: Config, value_net: ValueNet, optimizer: torch.optim.Optimizer, batch: Batch,
              generator: torch.Generator) -> dict[str, float]:
    """Regress the value net on the batch's GAE targets: epochs x minibatches of Adam."""
    phase = PhaseRecorder(clip_range=0.2)  # records no ratios: only means
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    for _ in range(cfg.epochs):
        for idx in minibatches(len(batch), cfg, generator):
            v_loss = value_loss(value_net(batch.obs[idx]), batch.values[idx],
                                batch.returns[idx], value_clip)
            optimizer.zero_grad(set_to_none=True)
            v_loss.backward()
            grad_norm = clip_gradients(value_net.parameters(),
                                       cfg.max_grad_norm if cfg.grad_clip else None)
            optimizer.step()
            phase.mean(value_loss=v_loss, value_grad_norm=grad_norm)
    return phase.result()


def trpo_update(
    cfg: Config,
    policy: Policy,
    value_net: ValueNet,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    generator: torch.Generator,
    state: dict[str, float],
    heldout_obs: torch.Tensor | None = None,
) -> dict[str, float]:
    """One TRPO iteration on ``batch``; returns the update's metrics (each key is defined
    in :mod:`pgscope.metrics`)."""
    old_policy = copy.deepcopy(policy)
    params = list(policy.parameters())
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)
    fisher_n = max(1, int(cfg.fisher_fraction * len(batch)))
    fisher_obs = batch.obs[torch.randperm(len(batch), generator=generator)[:fisher_n]]

    def ratio() -> torch.Tensor:
        return (policy.log_prob(policy.dist(batch.obs), batch.actions) - batch.logp).exp()

    def surrogate() -> torch.Tensor:
        return (ratio() * adv).mean()

    def mean_kl(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            old = old_policy.dist(obs)
        return policy.kl(old, policy.dist(obs)).mean()

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        grad_kl = flat_grad(mean_kl(fisher_obs), params, create_graph=True)
        return flat_grad(grad_kl @ v, params) + cfg.cg_damping * v

    ratio_old = ratio()  # on-policy: exactly 1
    surr_old = (ratio_old * adv).mean()
    g = flat_grad(surr_old, params)
    direction = conjugate_gradient(fisher_vector_product, g, cfg.cg_iters)
    shs = float(direction @ fisher_vector_product(direction))
    step = math.sqrt(2 * cfg.max_kl / max(shs, 1e-12)) * direction

    theta_old = parameters_to_vector(params).detach()
    step_fraction, steps_tried = 0.0, cfg.backtrack_iters
    with torch.no_grad():
        for k in range(cfg.backtrack_iters):
            fraction = cfg.backtrack_coef ** k
            vector_to_parameters(theta_old + fraction * step, params)
            if mean_kl(batch.obs) <= cfg.max_kl and surrogate() > surr_old:
                step_fraction, steps_tried = fraction, k + 1
                break
        else:
            vector_to_parameters(theta_old, params)  # no acceptable step: keep theta_old

    metrics = dict(
        policy_loss=-float(surr_old.detach()),
        policy_grad_norm=float(g.norm()),  # the policy loss is -surrogate: same norm
        **first_ratio_deviation(ratio_old),
        step_fraction=step_fraction,
        linesearch_steps=steps_tried,
        step_norm=float(step.norm()) * step_fraction,
    )
    metrics.update(fit_value(cfg, value_net, optimizer, batch, generator))
    metrics.update(policy_change(policy, old_policy, batch, heldout_obs,
                                 reference_clip_range(cfg)))
    return metrics
