"""Pieces shared by the algorithms' updates (and by the probes that replay or evaluate
them): minibatching, the probability ratio, flat gradients, phase-wide statistics, the
metrics that compare the policy before and after an update, and the optimizer. Every
metric key is defined in :mod:`pgscope.metrics` (rendered as docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution

from pgscope.algos import algorithm
from pgscope.config import Config
from pgscope.engine.nets import (  # noqa: F401 - re-exported: the updates' pieces
    PhaseRecorder,
    first_ratio_deviation,
    minibatches,
    ratio_stats,
)
from pgscope.networks import Policy
from pgscope.optimizations import annealed_lr
from pgscope.rollout import Batch

#: Keys of :func:`policy_change`, which every algorithm's update calls (each logged under
#: its condition in :mod:`pgscope.metrics`).
POLICY_CHANGE_KEYS = ("ratio_max_after", "ratio_min_after", "clip_fraction_after", "kl_mean",
                      "kl_max", "approx_kl", "entropy", "kl_heldout_mean", "kl_heldout_max",
                      "entropy_frac", "policy_std", "action_saturation",
                      "value_target_absmax", "advantage_absmax")


def reference_clip_range(cfg: Config) -> float:
    """The eps of the range [1-eps, 1+eps] that ``clip_fraction`` and
    ``clip_fraction_after`` are measured against, as the config's algorithm defines it
    (:attr:`pgscope.algos.Algorithm.clip_range`): its own clip when it has one, else the
    nominal 0.2, so that every algorithm's fractions are comparable."""
    return algorithm(cfg.algo).clip_range(cfg)


def log_ratio(policy: Policy, dist: Distribution, actions: torch.Tensor, logp: torch.Tensor
              ) -> torch.Tensor:
    """log r = log pi(a|s) - log pi_old(a|s) for the actions of a batch, with ``dist`` the
    policy's distribution at their states and ``logp`` the stored log pi_old(a|s)."""
    return policy.log_prob(dist, actions) - logp


def flat_grad(output: torch.Tensor, params: Iterable[torch.nn.Parameter], **kwargs: Any
              ) -> torch.Tensor:
    """The gradient of the scalar ``output`` with respect to ``params`` as one flat vector
    (``torch.autograd.grad`` keyword arguments pass through)."""
    grads = torch.autograd.grad(output, list(params), **kwargs)
    return torch.cat([g.reshape(-1) for g in grads])


@torch.no_grad()
def trust_region_stats(policy: Policy, old_policy: Policy, batch: Batch, clip_range: float
                       ) -> dict[str, float]:
    """How far ``policy`` is from ``old_policy`` on the whole batch: ``ratio_max_after``,
    ``ratio_min_after``, ``clip_fraction_after`` (against ``clip_range``) of
    r = pi / pi_old for the batch actions, the analytic KL(old || new) (``kl_mean``,
    ``kl_max``) and the k3 estimator ``approx_kl`` = mean((r - 1) - log r). The update's
    ``*_after`` metrics, and the trust-region probe's measure at any point of an update."""
    old, new = old_policy.dist(batch.obs), policy.dist(batch.obs)
    kl = policy.kl(old, new)
    log_r = log_ratio(policy, new, batch.actions, batch.logp)
    ratio = log_r.exp()
    return dict(ratio_stats(ratio, clip_range, suffix="_after"),
                kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                approx_kl=float(((ratio - 1) - log_r).mean()))


@torch.no_grad()
def policy_change(policy: Policy, old_policy: Policy, batch: Batch,
                  heldout_obs: torch.Tensor | None, clip_range: float) -> dict[str, float]:
    """How far the update moved the policy, and what the data-collecting policy was.

    After the update, on the whole training batch: ``ratio_max_after``,
    ``ratio_min_after``, ``clip_fraction_after`` (against ``clip_range``) of
    r = pi_new / pi_old for the batch actions, the analytic KL(old || new) (``kl_mean``,
    ``kl_max``) and the k3 estimator ``approx_kl`` = mean((r - 1) - log r); the same KL on
    held-out states (``kl_heldout_*``, when given). Of the data-collecting policy:
    ``entropy``, and ``entropy_frac`` (discrete) or ``policy_std`` and
    ``action_saturation`` (Gaussian); and the scale of the batch's targets
    (:func:`target_scale`).
    """
    out = trust_region_stats(policy, old_policy, batch, clip_range)
    entropy = float(policy.entropy(old_policy.dist(batch.obs)).mean())
    out["entropy"] = entropy
    if heldout_obs is not None:
        kl_h = policy.kl(old_policy.dist(heldout_obs), policy.dist(heldout_obs))
        out.update(kl_heldout_mean=float(kl_h.mean()), kl_heldout_max=float(kl_h.max()))
    if policy.discrete:
        max_entropy = policy.max_entropy()  # 0 with a single action
        out["entropy_frac"] = entropy / max_entropy if max_entropy > 0 else float("nan")
    else:
        out["policy_std"] = old_policy.mean_std()
        out["action_saturation"] = batch.action_saturation
    out.update(target_scale(batch))
    return out


def target_scale(batch: Batch) -> dict[str, float]:
    """``value_target_absmax`` and ``advantage_absmax``: the largest |GAE return| and
    |GAE advantage| of the batch, in the reward units the value net learns (after reward
    scaling and clipping; advantages before any normalization)."""
    return {"value_target_absmax": float(batch.returns.abs().max()),
            "advantage_absmax": float(batch.advantages.abs().max())}


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(target - prediction) / Var(target); NaN when the targets are constant."""
    var = float(targets.var(unbiased=False))
    if var == 0.0:
        return float("nan")
    return 1.0 - float((targets - predictions).var(unbiased=False)) / var


def make_optimizer(cfg: Config, policy: Policy | nn.Module, value_net: nn.Module
                   ) -> torch.optim.Adam:
    """Adam with one parameter group per network ('policy', 'value'). Adam is
    per-parameter, so this equals two separate optimizers. An algorithm whose update moves
    the policy itself (``policy_optimizer`` off: TRPO's natural-gradient steps) gets an
    optimizer that holds the value net only."""
    groups: list[dict[str, Any]] = [
        {"params": value_net.parameters(), "lr": cfg.value_lr, "name": "value"}]
    if algorithm(cfg.algo).policy_optimizer:
        groups.insert(0, {"params": policy.parameters(), "lr": cfg.policy_lr, "name": "policy"})
    return torch.optim.Adam(groups, eps=cfg.adam_eps, fused=True)


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: Config, iteration: int
                       ) -> float | None:
    """Apply lr annealing (if on) for 0-based ``iteration`` (the update that follows the
    checkpoint of that many iterations) to each parameter group; return the policy's lr
    (None when the optimizer has no policy group: TRPO's, which reads no ``policy_lr``)."""
    for group in optimizer.param_groups:
        base = cfg.policy_lr if group["name"] == "policy" else cfg.value_lr
        group["lr"] = annealed_lr(base, iteration, cfg.num_iterations, cfg.lr_anneal)
    return next((float(g["lr"]) for g in optimizer.param_groups if g["name"] == "policy"),
                None)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rates the optimizer's groups hold: ``lr`` (the policy's; PPO only, as
    TRPO's optimizer holds the value net only) and ``value_lr``. Adam never changes them,
    so read after this iteration's annealing they are the ones its update used."""
    keys = {"policy": "lr", "value": "value_lr"}
    return {keys[group["name"]]: float(group["lr"]) for group in optimizer.param_groups}
