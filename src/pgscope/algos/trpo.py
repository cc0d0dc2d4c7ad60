"""The TRPO update (Schulman et al. 2015): a natural-gradient step found by conjugate
gradient on Fisher-vector products, scaled to the KL limit, then a backtracking line search
that accepts a step only if KL(old||new) <= max_kl *and* the surrogate improves. The value
net is fit separately with Adam. With ``max_kl_final`` the KL limit moves linearly from
``max_kl`` to it over the run (:func:`kl_limit`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from pgscope.algos import Algorithm, EpochCallback, register_algorithm
from pgscope.algos.common import (
    POLICY_CHANGE_KEYS,
    PhaseRecorder,
    first_ratio_deviation,
    flat_grad,
    log_ratio,
    minibatches,
    policy_change,
    reference_clip_range,
)
from pgscope.config import OPTIMIZATIONS_OFF, Config
from pgscope.errors import ConfigError
from pgscope.networks import Policy, ValueNet
from pgscope.optimizations import (
    clip_gradients,
    dr3_penalty,
    normalize_advantages,
    value_loss,
)
from pgscope.rollout import Batch


def batch_ratio(policy: Policy, batch: Batch) -> torch.Tensor:
    """r = pi(a|s) / pi_old(a|s) for every pair of the batch."""
    return log_ratio(policy, policy.dist(batch.obs), batch.actions, batch.logp).exp()


def surrogate_objective(policy: Policy, batch: Batch, adv: torch.Tensor) -> torch.Tensor:
    """TRPO's surrogate mean(r A) on the whole batch."""
    return (batch_ratio(policy, batch) * adv).mean()


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


def kl_limit(cfg: Config, update: int) -> float:
    """The KL limit of TRPO update ``update`` (0-based) of the run's ``num_iterations``:
    ``max_kl``, or with ``max_kl_final`` > 0 the linear schedule
    ``max_kl + (max_kl_final - max_kl) * (update + 1) / num_iterations``, which ends at
    ``max_kl_final`` on the last update (Engstrom et al.'s code raises its limit by one
    increment before each policy step: MadryLab/implementation-matters,
    src/policy_gradients/agent.py)."""
    if cfg.max_kl_final <= 0:
        return cfg.max_kl
    done = min(update + 1, cfg.num_iterations)
    return cfg.max_kl + (cfg.max_kl_final - cfg.max_kl) * done / cfg.num_iterations


def fit_value(cfg: Config, value_net: ValueNet, optimizer: torch.optim.Optimizer, batch: Batch,
              generator: torch.Generator) -> dict[str, float]:
    """Regress the value net on the batch's GAE targets: epochs x minibatches of Adam."""
    phase = PhaseRecorder(clip_range=0.2)  # records no ratios: only means
    value_clip = cfg.value_clip_range if cfg.value_clip else None
    for _ in range(cfg.epochs):
        for idx in minibatches(len(batch), cfg, generator):
            v_loss = value_loss(value_net(batch.obs[idx]), batch.values[idx],
                                batch.returns[idx], value_clip)
            dr3 = dr3_penalty(value_net.features, batch.obs[idx], batch.next_obs[idx],
                              ~batch.done[idx], cfg.value_dr3_coef)
            optimizer.zero_grad(set_to_none=True)
            (v_loss + dr3).backward()
            grad_norm = clip_gradients(value_net.parameters(),
                                       cfg.max_grad_norm if cfg.grad_clip else None)
            optimizer.step()
            phase.mean(value_loss=v_loss, value_grad_norm=grad_norm)
    return phase.result()


def trpo_update(cfg: Config, policy: Policy, value_net: ValueNet,
                optimizer: torch.optim.Optimizer, batch: Batch, generator: torch.Generator,
                state: dict[str, float], heldout_obs: torch.Tensor | None = None,
                epoch_callback: EpochCallback | None = None) -> dict[str, float]:
    """One TRPO iteration on ``batch``; returns the update's metrics (each key is defined
    in :mod:`pgscope.metrics`). ``epoch_callback(1, old_policy)`` runs once, after the
    policy step (the trust-region probe watches the update). ``state["updates"]`` counts
    the updates done, for the KL limit's schedule (:func:`kl_limit`)."""
    updates = int(state.get("updates", 0))
    max_kl = kl_limit(cfg, updates)
    state["updates"] = updates + 1
    old_policy = copy.deepcopy(policy)
    params = list(policy.parameters())
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)
    fisher_n = max(1, int(cfg.fisher_fraction * len(batch)))
    fisher_obs = batch.obs[torch.randperm(len(batch), generator=generator)[:fisher_n]]

    def surrogate() -> torch.Tensor:
        return surrogate_objective(policy, batch, adv)

    def mean_kl(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            old = old_policy.dist(obs)
        return policy.kl(old, policy.dist(obs)).mean()

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        grad_kl = flat_grad(mean_kl(fisher_obs), params, create_graph=True)
        return flat_grad(grad_kl @ v, params) + cfg.cg_damping * v

    ratio_old = batch_ratio(policy, batch)  # on-policy: exactly 1
    surr_old = (ratio_old * adv).mean()
    g = flat_grad(surr_old, params)
    direction = conjugate_gradient(fisher_vector_product, g, cfg.cg_iters)
    shs = float(direction @ fisher_vector_product(direction))
    step = math.sqrt(2 * max_kl / max(shs, 1e-12)) * direction

    theta_old = parameters_to_vector(params).detach()
    step_fraction, steps_tried = 0.0, cfg.backtrack_iters
    with torch.no_grad():
        for k in range(cfg.backtrack_iters):
            fraction = cfg.backtrack_coef ** k
            vector_to_parameters(theta_old + fraction * step, params)
            if mean_kl(batch.obs) <= max_kl and surrogate() > surr_old:
                step_fraction, steps_tried = fraction, k + 1
                break
        else:
            vector_to_parameters(theta_old, params)  # no acceptable step: keep theta_old
    if epoch_callback is not None:
        epoch_callback(1, old_policy)

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
    policy_optimizer=False,
    check=check_unused_keys,
))
