"""Pieces shared by the PPO and TRPO updates: minibatching, phase-wide statistics and the
metrics that compare the policy before and after an update (SPEC.md section 2)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pgscope.config import Config
from pgscope.networks import Policy
from pgscope.rollout import Batch


def minibatches(n: int, cfg: Config, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: a fresh permutation split into ``cfg.minibatches``."""
    perm = torch.randperm(n, generator=generator)
    yield from torch.tensor_split(perm, cfg.minibatches)


def reference_clip_range(cfg: Config) -> float:
    """The range [1-eps, 1+eps] that ``clip_fraction`` is measured against: the PPO clip
    when there is one, else the nominal 0.2 (so ppo-noclip, ppo-kl and TRPO are comparable)."""
    clips = cfg.algo == "ppo" and cfg.ppo_loss == "clip" and cfg.clip_eps < 1.0
    return cfg.clip_eps if clips else 0.2


class PhaseStats:
    """Accumulates ratio and loss statistics over a whole update phase (every minibatch of
    every epoch), never just the last minibatch. Values are kept as tensors and reduced
    once at the end, so recording costs no per-minibatch synchronisation."""

    def __init__(self, clip_range: float) -> None:
        self.clip_range = clip_range
        self.ratio_list: list[torch.Tensor] = []
        self.values: dict[str, list[torch.Tensor | float]] = {}

    def ratios(self, ratio: torch.Tensor) -> None:
        self.ratio_list.append(ratio.detach())

    def mean(self, **values: torch.Tensor | float) -> None:
        for k, v in values.items():
            self.values.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else v)

    def result(self) -> dict[str, float]:
        out = {k: float(torch.as_tensor(v).mean()) for k, v in self.values.items()}
        if self.ratio_list:
            ratios = torch.cat(self.ratio_list)
            out.update(
                ratio_max=float(ratios.max()),
                ratio_min=float(ratios.min()),
                clip_fraction=float(((ratios - 1).abs() > self.clip_range).double().mean()),
                # must be ~0: the first minibatch is evaluated at the data-collecting policy
                ratio_first_minibatch_dev=float((self.ratio_list[0] - 1).abs().max()),
            )
        return out


@torch.no_grad()
def policy_change(policy: Policy, old_policy: Policy, batch: Batch,
                  heldout_obs: torch.Tensor | None) -> dict[str, float]:
    """KL(old || new) after the update (analytic; mean and max over states) on the training
    batch and on held-out states, the k3 estimator ``mean((r - 1) - log r)`` on the batch
    actions, and the entropy/std of the data-collecting policy."""
    old, new = old_policy.dist(batch.obs), policy.dist(batch.obs)
    kl = policy.kl(old, new)
    log_ratio = policy.log_prob(new, batch.actions) - batch.logp
    k3 = ((log_ratio.exp() - 1) - log_ratio).mean()
    entropy = float(policy.entropy(old).mean())
    out = dict(kl_mean=float(kl.mean()), kl_max=float(kl.max()), kl_k3=float(k3),
               entropy=entropy)
    if heldout_obs is not None:
        kl_h = policy.kl(old_policy.dist(heldout_obs), policy.dist(heldout_obs))
        out.update(kl_heldout_mean=float(kl_h.mean()), kl_heldout_max=float(kl_h.max()))
    if policy.discrete:
        max_entropy = policy.max_entropy()  # 0 with a single action
        out["entropy_frac"] = entropy / max_entropy if max_entropy > 0 else float("nan")
    else:
        out["policy_std"] = float(old_policy.log_std.exp().mean())
    return out


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(target - prediction) / Var(target); NaN when the targets are constant."""
    var = float(targets.var(unbiased=False))
    if var == 0.0:
        return float("nan")
    return 1.0 - float((targets - predictions).var(unbiased=False)) / var


def make_optimizer(cfg: Config, policy: nn.Module, value_net: nn.Module) -> torch.optim.Adam:
    """Adam with one parameter group per network ('policy', 'value'). Adam is
    per-parameter, so this equals two separate optimizers. TRPO's policy takes natural
    gradient steps instead, so its optimizer holds the value net only."""
    groups = [{"params": value_net.parameters(), "lr": cfg.value_lr, "name": "value"}]
    if cfg.algo == "ppo":
        groups.insert(0, {"params": policy.parameters(), "lr": cfg.policy_lr, "name": "policy"})
    return torch.optim.Adam(groups, eps=cfg.adam_eps, fused=True)
