"""An independent, plain-torch reference of one training iteration of PPO, of TRPO and of
A2C, and of the rollout-side preprocessing and GAE, written from the equations.

Nothing here imports pgscope: ``tests/test_reference_updates.py`` feeds the same inputs
(weights, batch, seed) to pgscope and to these functions and checks that both end with the
same parameters and metrics. Networks are explicit weight matrices (``Params``); the
distributions' log-probabilities, entropies and KL divergences are written out; Adam,
gradient clipping, conjugate gradient and the Fisher-vector product are spelled out too.
Only the gradients themselves come from torch's autograd.

Conventions the two implementations must share (they are choices, not accidents):

* Running mean/variance start from a prior of weight 1e-4 with mean 0 and variance 1;
  normalization divides by sqrt(var + 1e-8).
* Advantage normalization uses the unbiased standard deviation and divides by (std + 1e-8);
  a single advantage is left as it is.
* Global gradient-norm clipping multiplies the gradient by min(1, c / (norm + 1e-6)).
* Conjugate gradient stops once the squared residual norm falls below 1e-10.
* The update's random numbers come from one ``torch.Generator``, consumed in this order:
  PPO draws one ``randperm(n)`` per epoch; TRPO draws one ``randperm(n)`` whose first
  ``max(1, int(fisher_fraction * n))`` entries pick the Fisher states, then one per
  value-fit epoch. An epoch's permutation is cut into ``minibatches`` consecutive pieces,
  the first ``n % minibatches`` of them one element longer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

Tensor = torch.Tensor
#: An MLP as weight matrices ``W0, b0, W1, b1, ...`` (layer i: ``x @ Wi.T + bi``); a
#: Gaussian policy adds ``log_std``.
Params = dict[str, Tensor]

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
ADAM_BETAS = (0.9, 0.999)


# ---------------------------------------------------------------------------------------
# networks and distributions
# ---------------------------------------------------------------------------------------
def num_layers(params: Params) -> int:
    return sum(1 for k in params if k.startswith("W"))


def mlp_forward(params: Params, x: Tensor, activation: str) -> Tensor:
    """h_{i+1} = act(h_i W_i^T + b_i) for the hidden layers; the last layer is linear."""
    last = num_layers(params) - 1
    h = x
    for i in range(last + 1):
        h = h @ params[f"W{i}"].T + params[f"b{i}"]
        if i < last:
            if activation == "tanh":
                h = torch.tanh(h)
            elif activation == "relu":
                h = torch.where(h > 0, h, torch.zeros_like(h))
            else:
                raise ValueError(activation)
    return h


def value_forward(params: Params, obs: Tensor, activation: str) -> Tensor:
    return mlp_forward(params, obs, activation)[..., 0]


@dataclass
class Dist:
    """A policy's distribution at a batch of states: Gaussian (``mean``, ``log_std``) or
    categorical (``log_probs``, normalized)."""

    mean: Tensor | None = None
    log_std: Tensor | None = None
    log_probs: Tensor | None = None

    @property
    def discrete(self) -> bool:
        return self.log_probs is not None


def policy_dist(params: Params, obs: Tensor, activation: str) -> Dist:
    out = mlp_forward(params, obs, activation)
    if "log_std" in params:
        return Dist(mean=out, log_std=params["log_std"].expand_as(out))
    # log softmax: z - log sum exp z, shifted by max z for stability
    shift = out.max(dim=-1, keepdim=True).values.detach()
    log_norm = shift + torch.log(torch.exp(out - shift).sum(dim=-1, keepdim=True))
    return Dist(log_probs=out - log_norm)


def log_prob(d: Dist, actions: Tensor) -> Tensor:
    """log pi(a|s): sum over action dims of -(a-mu)^2/(2 sigma^2) - log sigma - log sqrt(2 pi),
    or log p_a."""
    if d.discrete:
        return d.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    var = torch.exp(2.0 * d.log_std)
    return (-(actions - d.mean) ** 2 / (2.0 * var) - d.log_std - LOG_SQRT_2PI).sum(-1)


def entropy(d: Dist) -> Tensor:
    """Per state: sum over dims of 1/2 + log sqrt(2 pi) + log sigma, or -sum_a p_a log p_a."""
    if d.discrete:
        return -(d.log_probs.exp() * d.log_probs).sum(-1)
    return (0.5 + LOG_SQRT_2PI + d.log_std).sum(-1)


def kl(old: Dist, new: Dist) -> Tensor:
    """Analytic KL(old || new) per state.

    Gaussian, per dim: log(s_new/s_old) + (s_old^2 + (m_old - m_new)^2) / (2 s_new^2) - 1/2.
    Categorical: sum_a p_old (log p_old - log p_new)."""
    if old.discrete:
        return (old.log_probs.exp() * (old.log_probs - new.log_probs)).sum(-1)
    var_old, var_new = torch.exp(2.0 * old.log_std), torch.exp(2.0 * new.log_std)
    per_dim = (new.log_std - old.log_std
               + (var_old + (old.mean - new.mean) ** 2) / (2.0 * var_new) - 0.5)
    return per_dim.sum(-1)


# ---------------------------------------------------------------------------------------
# the update's building blocks
# ---------------------------------------------------------------------------------------
def annealed_lr(base: float, iteration: int, num_iterations: int, anneal: bool) -> float:
    """lr_k = base * (1 - k / num_iterations) at iteration k (from 0), or base."""
    return base * (1.0 - iteration / num_iterations) if anneal else base


def epoch_minibatches(n: int, num: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's minibatches: a fresh permutation of 0..n-1 cut into ``num`` consecutive
    pieces, the first ``n % num`` of them one longer than the rest."""
    perm = torch.randperm(n, generator=generator)
    small, extra = divmod(n, num)
    pieces, start = [], 0
    for i in range(num):
        size = small + (1 if i < extra else 0)
        pieces.append(perm[start:start + size])
        start += size
    return pieces


def normalize(adv: Tensor, enabled: bool) -> Tensor:
    """(A - mean A) / (std A + 1e-8), unbiased std; unchanged when off or a single sample."""
    if not enabled or adv.numel() < 2:
        return adv
    mean = adv.sum() / adv.numel()
    std = torch.sqrt(((adv - mean) ** 2).sum() / (adv.numel() - 1))
    return (adv - mean) / (std + 1e-8)


def value_loss(v: Tensor, v_old: Tensor, target: Tensor, clip_range: float | None) -> Tensor:
    """mean (V - R)^2, or with clipping mean max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    plain = (v - target) ** 2
    if clip_range is None:
        return plain.mean()
    v_clipped = v_old + torch.clamp(v - v_old, -clip_range, clip_range)
    return torch.maximum(plain, (v_clipped - target) ** 2).mean()


def global_norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t ** 2).sum() for t in tensors))


def clip_by_global_norm(grads: list[Tensor], max_norm: float | None
                        ) -> tuple[list[Tensor], float]:
    """Scale all gradients together by min(1, max_norm / (norm + 1e-6)); return the scaled
    gradients and the norm before scaling."""
    norm = global_norm(grads)
    if max_norm is None:
        return grads, float(norm)
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale for g in grads], float(norm)


@dataclass
class Adam:
    """Adam (Kingma & Ba): m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
    theta -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""

    eps: float
    m: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)
    t: int = 0

    def step(self, params: Params, grads: dict[str, Tensor], lr: float) -> Params:
        b1, b2 = ADAM_BETAS
        self.t += 1
        out = {}
        for k, p in params.items():
            g = grads[k]
            self.m[k] = b1 * self.m.get(k, torch.zeros_like(p)) + (1 - b1) * g
            self.v[k] = b2 * self.v.get(k, torch.zeros_like(p)) + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            out[k] = (p - lr * m_hat / (torch.sqrt(v_hat) + self.eps)).detach()
        return out


def gradient_step(params: Params, loss_fn: Callable[[Params], Tensor], adam: Adam, lr: float,
                  max_grad_norm: float | None) -> tuple[Params, Tensor, float, float]:
    """One Adam step on ``loss_fn``; returns (new params, loss, pre-clip gradient norm,
    post-clip gradient norm)."""
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    loss = loss_fn(leaves)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    clipped, norm = clip_by_global_norm(list(grads), max_grad_norm)
    new = adam.step({k: leaves[k].detach() for k in names}, dict(zip(names, clipped,
                                                                     strict=True)), lr)
    return new, loss.detach(), norm, float(global_norm(clipped))


def detach(params: Params) -> Params:
    return {k: p.detach().clone() for k, p in params.items()}


# ---------------------------------------------------------------------------------------
# the update's inputs and outputs
# ---------------------------------------------------------------------------------------
@dataclass
class Hyper:
    """The hyperparameters and switches one update reads (names as in pgscope's config)."""

    algo: str
    ppo_loss: str
    activation: str
    epochs: int
    minibatches: int
    policy_lr: float
    value_lr: float
    adam_eps: float
    lr_anneal: bool
    num_iterations: int
    clip_eps: float
    target_kl: float
    kl_beta_init: float
    kl_stop: bool
    ent_coef: float
    adv_norm: bool
    value_clip: bool
    value_clip_range: float
    grad_clip: bool
    max_grad_norm: float
    max_kl: float
    cg_iters: int
    cg_damping: float
    fisher_fraction: float
    backtrack_iters: int
    backtrack_coef: float

    @property
    def clip_fraction_eps(self) -> float:
        """The eps of [1-eps, 1+eps] clip fractions count against: the PPO clip for the
        clipped surrogate with eps < 1, otherwise the nominal 0.2."""
        clipped = self.algo == "ppo" and self.ppo_loss == "clip" and self.clip_eps < 1.0
        return self.clip_eps if clipped else 0.2

    @property
    def max_norm(self) -> float | None:
        """The gradient-norm bound of each network, None when grad_clip is off."""
        return self.max_grad_norm if self.grad_clip else None

    @property
    def v_clip(self) -> float | None:
        """The value-clipping range, None when value_clip is off."""
        return self.value_clip_range if self.value_clip else None


@dataclass
class Data:
    """One iteration's training data (the fields of pgscope's Batch the updates read)."""

    obs: Tensor
    actions: Tensor
    logp: Tensor  # log pi_old(a|s) of the data-collecting policy
    values: Tensor  # V_old(s), predicted before the update
    advantages: Tensor
    returns: Tensor


@dataclass
class UpdateResult:
    policy: Params
    value: Params
    metrics: dict[str, float]
    kl_beta_next: float | None = None  # ppo-kl: the coefficient for the next iteration
    trace: dict[str, list] = field(default_factory=dict)  # per-step details for the tests
    policy_adam: Adam | None = None
    value_adam: Adam | None = None


def _ratio_stats(ratio: Tensor, eps: float, suffix: str = "") -> dict[str, float]:
    return {f"ratio_max{suffix}": float(ratio.max()), f"ratio_min{suffix}": float(ratio.min()),
            f"clip_fraction{suffix}": float(((ratio - 1).abs() > eps).double().mean())}


def _after_update_metrics(hp: Hyper, old: Params, new: Params, data: Data,
                          heldout_obs: Tensor | None) -> dict[str, float]:
    """Metrics that compare pi_new with pi_old after the update, and describe pi_old."""
    with torch.no_grad():
        d_old = policy_dist(old, data.obs, hp.activation)
        d_new = policy_dist(new, data.obs, hp.activation)
        log_r = log_prob(d_new, data.actions) - data.logp
        r = torch.exp(log_r)
        kls = kl(d_old, d_new)
        ent = float(entropy(d_old).mean())
        out = {**_ratio_stats(r, hp.clip_fraction_eps, "_after"),
               "kl_mean": float(kls.mean()), "kl_max": float(kls.max()),
               "approx_kl": float(((r - 1) - log_r).mean()), "entropy": ent}
        if heldout_obs is not None:
            kl_h = kl(policy_dist(old, heldout_obs, hp.activation),
                      policy_dist(new, heldout_obs, hp.activation))
            out.update(kl_heldout_mean=float(kl_h.mean()), kl_heldout_max=float(kl_h.max()))
        if d_old.discrete:
            out["entropy_frac"] = ent / math.log(d_old.log_probs.shape[-1])
        else:
            out["policy_std"] = float(torch.exp(old["log_std"]).mean())
        var_r = ((data.returns - data.returns.mean()) ** 2).mean()
        err = data.returns - data.values
        var_err = ((err - err.mean()) ** 2).mean()
        out["explained_variance"] = float(1.0 - var_err / var_r)
    return out


# ---------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------
def ppo_update(hp: Hyper, policy: Params, value: Params, data: Data,
               generator: torch.Generator, iteration: int, kl_beta: float | None = None,
               heldout_obs: Tensor | None = None, policy_adam: Adam | None = None,
               value_adam: Adam | None = None) -> UpdateResult:
    """One PPO update: ``epochs`` passes over ``minibatches`` minibatches; each minibatch
    takes one Adam step on the policy loss (clipped surrogate, or surrogate plus
    beta * KL(old||new)) minus the entropy bonus, and one on the value loss, each network
    with its own gradient clipping. With ``kl_stop`` the epochs end once the mean
    KL(old||new) over the batch exceeds 1.5 * target_kl."""
    n = data.obs.shape[0]
    lr = annealed_lr(hp.policy_lr, iteration, hp.num_iterations, hp.lr_anneal)
    value_lr = annealed_lr(hp.value_lr, iteration, hp.num_iterations, hp.lr_anneal)
    policy_adam = policy_adam or Adam(hp.adam_eps)
    value_adam = value_adam or Adam(hp.adam_eps)
    max_norm, v_clip = hp.max_norm, hp.v_clip
    beta = hp.kl_beta_init if kl_beta is None else kl_beta
    old = detach(policy)
    with torch.no_grad():
        d_old_all = policy_dist(old, data.obs, hp.activation)

    trace: dict[str, list] = {k: [] for k in ("policy_loss", "policy_grad_norm", "value_loss",
                                              "value_grad_norm", "ratios", "epoch_kl")}
    epochs_run = 0
    for _ in range(hp.epochs):
        for idx in epoch_minibatches(n, hp.minibatches, generator):
            obs, actions = data.obs[idx], data.actions[idx]
            adv = normalize(data.advantages[idx], hp.adv_norm)
            d_old = Dist(*(None if t is None else t[idx] for t in
                           (d_old_all.mean, d_old_all.log_std, d_old_all.log_probs)))
            seen: dict[str, Tensor] = {}

            def policy_objective(p: Params, obs=obs, actions=actions, adv=adv, d_old=d_old,
                                 idx=idx, seen=seen) -> Tensor:
                d = policy_dist(p, obs, hp.activation)
                r = torch.exp(log_prob(d, actions) - data.logp[idx])
                if hp.ppo_loss == "clip":
                    clipped = torch.clamp(r, 1 - hp.clip_eps, 1 + hp.clip_eps)
                    loss = -torch.minimum(r * adv, clipped * adv).mean()
                else:
                    loss = -(r * adv).mean() + beta * kl(d_old, d).mean()
                seen.update(ratio=r.detach(), loss=loss.detach())
                bonus = hp.ent_coef * entropy(d).mean() if hp.ent_coef else 0.0
                return loss - bonus

            policy, _, p_norm, _ = gradient_step(policy, policy_objective, policy_adam, lr,
                                                 max_norm)
            value, v_loss, v_norm, _ = gradient_step(
                value, lambda p, obs=obs, idx=idx: value_loss(
                    value_forward(p, obs, hp.activation), data.values[idx],
                    data.returns[idx], v_clip),
                value_adam, value_lr, max_norm)
            trace["policy_loss"].append(float(seen["loss"]))
            trace["policy_grad_norm"].append(p_norm)
            trace["value_loss"].append(float(v_loss))
            trace["value_grad_norm"].append(v_norm)
            trace["ratios"].append(seen["ratio"])
        epochs_run += 1
        with torch.no_grad():
            mean_kl = float(kl(d_old_all, policy_dist(policy, data.obs, hp.activation)).mean())
        trace["epoch_kl"].append(mean_kl)
        if hp.kl_stop and mean_kl > 1.5 * hp.target_kl:
            break

    ratios = torch.cat(trace["ratios"])
    metrics = {
        "policy_loss": float(np.mean(trace["policy_loss"])),
        "policy_grad_norm": float(np.mean(trace["policy_grad_norm"])),
        "value_loss": float(np.mean(trace["value_loss"])),
        "value_grad_norm": float(np.mean(trace["value_grad_norm"])),
        **_ratio_stats(ratios, hp.clip_fraction_eps),
        "ratio_first_minibatch_dev": float((trace["ratios"][0] - 1).abs().max()),
        **_after_update_metrics(hp, old, policy, data, heldout_obs),
        "lr": lr, "value_lr": value_lr, "epochs_run": epochs_run,
    }
    beta_next = None
    if hp.ppo_loss == "kl":
        metrics["kl_beta"] = beta
        kl_mean = metrics["kl_mean"]
        beta_next = (beta * 2.0 if kl_mean > 1.5 * hp.target_kl
                     else beta / 2.0 if kl_mean < hp.target_kl / 1.5 else beta)
    return UpdateResult(policy, value, metrics, beta_next, trace, policy_adam, value_adam)


# ---------------------------------------------------------------------------------------
# TRPO
# ---------------------------------------------------------------------------------------
def _flat(params: Params) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def _unflat(vector: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vector[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def fisher_vector_product(params: Params, obs: Tensor, activation: str, v: Tensor) -> Tensor:
    """F v with F the Fisher information of the policy on ``obs`` (= the Hessian of the mean
    KL(old||new) at new = old), from its closed form F = mean_s J_s^T M_s J_s:

    * Gaussian: J = d mean / d theta, M = diag(1 / sigma^2) on the mean, plus 2 I on the
      log-std block (d^2 KL / d log_std^2 = 2 per dim; the cross terms vanish at new = old);
    * categorical: J = d logits / d theta, M = diag(p) - p p^T.
    """
    names = list(params)
    gaussian = "log_std" in params
    net_names = [k for k in names if k != "log_std"]
    net = {k: params[k].detach() for k in net_names}
    tangent = _unflat(v, params)

    def outputs(*tensors: Tensor) -> Tensor:
        return mlp_forward(dict(zip(net_names, tensors, strict=True)), obs, activation)

    primals = tuple(net[k] for k in net_names)
    out, jv = torch.func.jvp(outputs, primals, tuple(tangent[k] for k in net_names))
    n = obs.shape[0]
    if gaussian:
        weighted = jv * torch.exp(-2.0 * params["log_std"].detach()) / n
    else:
        p = torch.softmax(out, dim=-1)
        weighted = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / n
    leaves = tuple(t.clone().requires_grad_(True) for t in primals)
    grads = torch.autograd.grad(outputs(*leaves), leaves, grad_outputs=weighted)
    fv = dict(zip(net_names, grads, strict=True))
    if gaussian:
        fv["log_std"] = 2.0 * tangent["log_std"]
    return torch.cat([fv[k].reshape(-1) for k in names])


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int,
                       tol: float = 1e-10) -> Tensor:
    """At most ``iters`` iterations of CG for A x = b, from x = 0 (stop when |r|^2 < tol)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    r_sq = float(r @ r)
    for _ in range(iters):
        if r_sq < tol:
            break
        ap = matvec(p)
        alpha = r_sq / float(p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        r_sq_new = float(r @ r)
        p = r + (r_sq_new / r_sq) * p
        r_sq = r_sq_new
    return x


def trpo_update(hp: Hyper, policy: Params, value: Params, data: Data,
                generator: torch.Generator, iteration: int,
                heldout_obs: Tensor | None = None,
                value_adam: Adam | None = None) -> UpdateResult:
    """One TRPO iteration: natural gradient direction x = F^-1 g by conjugate gradient
    (damped Fisher on a random subset of the states), full step sqrt(2 max_kl / x^T F x) x,
    backtracking by ``backtrack_coef`` until mean KL(old||new) <= max_kl and the surrogate
    mean(r A) improved (else keep theta_old); then the value fit, epochs x minibatches of
    Adam on the value loss."""
    n = data.obs.shape[0]
    value_lr = annealed_lr(hp.value_lr, iteration, hp.num_iterations, hp.lr_anneal)
    adv = normalize(data.advantages, hp.adv_norm)
    fisher_n = max(1, int(hp.fisher_fraction * n))
    fisher_obs = data.obs[torch.randperm(n, generator=generator)[:fisher_n]]
    old = detach(policy)
    with torch.no_grad():
        d_old = policy_dist(old, data.obs, hp.activation)

    def surrogate(p: Params) -> tuple[Tensor, Tensor]:
        r = torch.exp(log_prob(policy_dist(p, data.obs, hp.activation), data.actions)
                      - data.logp)
        return (r * adv).mean(), r

    leaves = {k: p.clone().requires_grad_(True) for k, p in old.items()}
    surr_old, ratio_old = surrogate(leaves)
    g = torch.cat([t.reshape(-1) for t in
                   torch.autograd.grad(surr_old, list(leaves.values()))])
    surr_old, ratio_old = surr_old.detach(), ratio_old.detach()

    def damped_fvp(v: Tensor) -> Tensor:
        return fisher_vector_product(old, fisher_obs, hp.activation, v) + hp.cg_damping * v

    x = conjugate_gradient(damped_fvp, g, hp.cg_iters)
    x_fx = float(x @ damped_fvp(x))
    full_step = math.sqrt(2.0 * hp.max_kl / max(x_fx, 1e-12)) * x

    theta_old = _flat(old)
    new, fraction, trials = old, 0.0, hp.backtrack_iters
    trace: dict[str, list] = {"trial_kl": [], "trial_improvement": []}
    with torch.no_grad():
        for k in range(hp.backtrack_iters):
            candidate = _unflat(theta_old + hp.backtrack_coef ** k * full_step, old)
            mean_kl = float(kl(d_old, policy_dist(candidate, data.obs, hp.activation)).mean())
            improvement = float(surrogate(candidate)[0] - surr_old)
            trace["trial_kl"].append(mean_kl)
            trace["trial_improvement"].append(improvement)
            if mean_kl <= hp.max_kl and improvement > 0:
                new, fraction, trials = candidate, hp.backtrack_coef ** k, k + 1
                break
    new = detach(new)

    # value fit
    value_adam = value_adam or Adam(hp.adam_eps)
    max_norm, v_clip = hp.max_norm, hp.v_clip
    v_losses, v_norms = [], []
    for _ in range(hp.epochs):
        for idx in epoch_minibatches(n, hp.minibatches, generator):
            value, v_loss, v_norm, _ = gradient_step(
                value, lambda p, idx=idx: value_loss(
                    value_forward(p, data.obs[idx], hp.activation), data.values[idx],
                    data.returns[idx], v_clip),
                value_adam, value_lr, max_norm)
            v_losses.append(float(v_loss))
            v_norms.append(v_norm)
    trace.update(value_loss=v_losses, value_grad_norm=v_norms, cg_solution=[x],
                 x_fx=[x_fx])

    metrics = {
        "policy_loss": -float(surr_old),
        "policy_grad_norm": float(g.norm()),
        "value_loss": float(np.mean(v_losses)),
        "value_grad_norm": float(np.mean(v_norms)),
        "ratio_first_minibatch_dev": float((ratio_old - 1).abs().max()),
        **_after_update_metrics(hp, old, new, data, heldout_obs),
        "value_lr": value_lr,
        "step_fraction": fraction,
        "linesearch_steps": trials,
        "step_norm": float((_flat(new) - theta_old).norm()),
    }
    return UpdateResult(new, value, metrics, None, trace, None, value_adam)


# ---------------------------------------------------------------------------------------
# A2C
# ---------------------------------------------------------------------------------------
def a2c_update(hp: Hyper, policy: Params, value: Params, data: Data, iteration: int,
               heldout_obs: Tensor | None = None, policy_adam: Adam | None = None,
               value_adam: Adam | None = None) -> UpdateResult:
    """One A2C iteration (synchronous advantage actor-critic): a single Adam step per
    network on the whole batch. The policy's loss is the policy-gradient loss
    -mean(log pi(a|s) A), A normalized over the batch when adv_norm is on, minus the
    entropy bonus; the value net's is the value loss (clipped around V_old when value_clip
    is on); each network's gradient is clipped by its own norm. Nothing is random.

    Logged as pgscope defines ``policy_loss``: the loss in its importance-ratio form
    -mean(r A), r = pi / pi_old, whose gradient at theta_old (r = 1, grad r = grad log pi)
    is the same policy gradient; ``ratio_first_minibatch_dev`` is max |r - 1| there."""
    lr = annealed_lr(hp.policy_lr, iteration, hp.num_iterations, hp.lr_anneal)
    value_lr = annealed_lr(hp.value_lr, iteration, hp.num_iterations, hp.lr_anneal)
    policy_adam = policy_adam or Adam(hp.adam_eps)
    value_adam = value_adam or Adam(hp.adam_eps)
    max_norm, v_clip = hp.max_norm, hp.v_clip
    adv = normalize(data.advantages, hp.adv_norm)
    old = detach(policy)
    seen: dict[str, Tensor] = {}

    def policy_objective(p: Params) -> Tensor:
        d = policy_dist(p, data.obs, hp.activation)
        logp = log_prob(d, data.actions)
        r = torch.exp(logp - data.logp).detach()
        seen.update(ratio=r, logged_loss=-(r * adv).mean())
        loss = -(logp * adv).mean()
        bonus = hp.ent_coef * entropy(d).mean() if hp.ent_coef else 0.0
        return loss - bonus

    policy, _, p_norm, _ = gradient_step(policy, policy_objective, policy_adam, lr, max_norm)
    value, v_loss, v_norm, _ = gradient_step(
        value, lambda p: value_loss(value_forward(p, data.obs, hp.activation), data.values,
                                    data.returns, v_clip),
        value_adam, value_lr, max_norm)
    metrics = {
        "policy_loss": float(seen["logged_loss"]),
        "policy_grad_norm": p_norm,
        "value_loss": float(v_loss),
        "value_grad_norm": v_norm,
        "ratio_first_minibatch_dev": float((seen["ratio"] - 1).abs().max()),
        **_after_update_metrics(hp, old, policy, data, heldout_obs),
        "lr": lr, "value_lr": value_lr,
    }
    return UpdateResult(policy, value, metrics, None, {}, policy_adam, value_adam)


# ---------------------------------------------------------------------------------------
# the rollout side: a recorded raw env stream -> the training batch
# ---------------------------------------------------------------------------------------
class RecordingWrapper(gym.Wrapper):
    """Records what the env saw and returned: each reset observation, and for each step the
    action it received, the raw reward, terminated, truncated and the observation it
    returned (the final observation when the episode ended)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.events: list[tuple] = []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.events.append(("reset", np.array(obs, dtype=np.float64)))
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.events.append(("step", np.array(action, copy=True), float(reward),
                            bool(terminated), bool(truncated), np.array(obs, dtype=np.float64)))
        return obs, reward, terminated, truncated, info


@dataclass
class RawStream:
    """Time-major arrays over ``T`` steps of ``N`` envs: ``obs[t]`` is what the agent saw
    before step t (``obs[T]`` is the observation after the last step); ``final_obs[t]``
    the observation the step returned (the final one when the episode ended)."""

    obs: np.ndarray  # (T + 1, N, obs_dim)
    env_actions: np.ndarray  # (T, N, ...)
    rewards: np.ndarray  # (T, N)
    terminated: np.ndarray  # (T, N) bool
    truncated: np.ndarray  # (T, N) bool
    final_obs: np.ndarray  # (T, N, obs_dim)


def stream_from_recorders(recorders: list[RecordingWrapper]) -> RawStream:
    """Line up each env's events into time-major arrays (same-step autoreset: an ending step
    is followed by a reset whose observation is the next step's ``obs``)."""
    columns = []
    for rec in recorders:
        obs, acts, rews, terms, truncs, finals = [], [], [], [], [], []
        current = None
        for event in rec.events:
            if event[0] == "reset":
                current = event[1]
                continue
            _, action, reward, term, trunc, returned = event
            obs.append(current)
            acts.append(action)
            rews.append(reward)
            terms.append(term)
            truncs.append(trunc)
            finals.append(returned)
            current = returned  # replaced by the reset observation if the episode ended
        obs.append(current)
        columns.append((obs, acts, rews, terms, truncs, finals))
    stack = lambda i, **kw: np.stack([np.array(c[i], **kw) for c in columns], axis=1)  # noqa: E731
    return RawStream(obs=stack(0), env_actions=stack(1), rewards=stack(2, dtype=np.float64),
                     terminated=stack(3, dtype=bool), truncated=stack(4, dtype=bool),
                     final_obs=stack(5))


class PooledStats:
    """Mean and (population) variance of every sample seen so far, pooled with a prior of
    weight 1e-4 at mean 0, variance 1: with n samples x_j,
    mean = sum x / (n + 1e-4), var = (1e-4 (1 + mean^2) + sum (x - mean)^2) / (n + 1e-4)."""

    prior = 1e-4

    def __init__(self) -> None:
        self.samples: list[np.ndarray] = []

    def add(self, rows: np.ndarray) -> None:
        """Add the samples ``rows[0], rows[1], ...`` (one per env)."""
        self.samples.extend(np.asarray(rows, dtype=np.float64))

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.array(self.samples)
        total = len(x) + self.prior
        mean = x.sum(axis=0) / total
        var = (self.prior * (1.0 + mean ** 2) + ((x - mean) ** 2).sum(axis=0)) / total
        return mean, var


@dataclass
class RolloutSwitches:
    gamma: float
    gae_lambda: float
    obs_norm: bool
    obs_clip: bool
    obs_clip_bound: float
    reward_multiplier: float
    reward_scale: bool
    reward_clip: bool
    reward_clip_bound: float
    action_clip: bool


@dataclass
class ReferenceBatch:
    """One rollout segment as the learner should see it (time-major, flattened)."""

    obs: np.ndarray  # normalized/clipped, float32 as stored
    next_obs: np.ndarray  # the state each step led to, normalized (0 after termination)
    rewards: np.ndarray
    terminated: np.ndarray
    done: np.ndarray
    values: np.ndarray
    next_values: np.ndarray
    advantages: np.ndarray
    returns: np.ndarray


def preprocess_stream(stream: RawStream, sw: RolloutSwitches) -> dict[str, np.ndarray]:
    """Observation normalization/clipping and reward multiplier/scaling/clipping along the
    raw stream, in the order the rollout applies them:

    * the observation statistics take in ``obs[t]`` (all envs) before ``obs[t]`` is
      normalized; a final observation at truncation, and the observation after a
      segment's last step, are normalized with the statistics as they are then, without
      being added to them (``next_frozen``);
    * reward: r' = multiplier * r; with scaling the discounted return G = gamma G + r' of
      each env joins the statistics, then r' / sqrt(var(G) + 1e-8); G restarts at 0 after
      an episode ends; then clipping.
    """
    T = stream.rewards.shape[0]
    obs_stats, ret_stats = PooledStats(), PooledStats()
    ret = np.zeros(stream.rewards.shape[1])

    def normalize_obs(raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.float64)
        if sw.obs_norm:
            mean, var = obs_stats.mean_var()
            out = (out - mean) / np.sqrt(var + 1e-8)
        if sw.obs_clip:
            out = np.clip(out, -sw.obs_clip_bound, sw.obs_clip_bound)
        return out.astype(np.float32)

    obs = np.zeros((T, *stream.obs.shape[1:]), dtype=np.float32)
    next_frozen = np.zeros_like(obs)
    rewards = np.zeros_like(stream.rewards)
    for t in range(T):
        if sw.obs_norm:
            obs_stats.add(stream.obs[t])
        obs[t] = normalize_obs(stream.obs[t])
        ended = stream.terminated[t] | stream.truncated[t]
        following = np.where(stream.truncated[t][:, None], stream.final_obs[t],
                             stream.obs[t + 1])
        next_frozen[t] = normalize_obs(following)
        r = sw.reward_multiplier * stream.rewards[t]
        if sw.reward_scale:
            ret = sw.gamma * ret + r
            ret_stats.add(ret)
            r = r / np.sqrt(ret_stats.mean_var()[1] + 1e-8)
            ret = np.where(ended, 0.0, ret)
        if sw.reward_clip:
            r = np.clip(r, -sw.reward_clip_bound, sw.reward_clip_bound)
        rewards[t] = r
    return dict(obs=obs, next_frozen=next_frozen, rewards=rewards)


def gae_reference(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray,
                  terminated: np.ndarray, done: np.ndarray, gamma: float, lam: float
                  ) -> np.ndarray:
    """A_t = delta_t + gamma lam (1 - done_t) A_{t+1}, with
    delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t); arrays (T, N)."""
    T = rewards.shape[0]
    adv = np.zeros_like(rewards, dtype=np.float64)
    following = np.zeros(rewards.shape[1])
    for t in range(T - 1, -1, -1):
        delta = rewards[t] + gamma * np.where(terminated[t], 0.0, next_values[t]) - values[t]
        following = delta + gamma * lam * np.where(done[t], 0.0, following)
        adv[t] = following
    return adv


def reference_batches(stream: RawStream, sw: RolloutSwitches, segment: int,
                      value_fn: Callable[[np.ndarray], np.ndarray]) -> list[ReferenceBatch]:
    """Cut the stream into rollout segments of ``segment`` steps and build each batch:
    within an episode the next state is the next stored observation, at truncation the
    final observation (bootstrapped), at termination nothing, and at a segment's end the
    observation after it (normalized without updating the statistics)."""
    pre = preprocess_stream(stream, sw)
    T, N = stream.rewards.shape
    done_all = stream.terminated | stream.truncated
    batches = []
    for start in range(0, T, segment):
        sl = slice(start, start + segment)
        obs, rewards = pre["obs"][sl], pre["rewards"][sl]
        term, done = stream.terminated[sl], done_all[sl]
        next_obs = np.zeros_like(obs)
        for t in range(segment):
            for i in range(N):
                if stream.terminated[start + t, i]:
                    continue  # no bootstrap: the stored next state stays 0
                if stream.truncated[start + t, i] or t == segment - 1:
                    next_obs[t, i] = pre["next_frozen"][start + t, i]
                else:
                    next_obs[t, i] = obs[t + 1, i]
        values = value_fn(obs.reshape(segment * N, -1)).reshape(segment, N)
        next_values = value_fn(next_obs.reshape(segment * N, -1)).reshape(segment, N)
        adv = gae_reference(rewards, values, next_values, term, done, sw.gamma, sw.gae_lambda)
        flat = lambda a: a.reshape(segment * N, *a.shape[2:])  # noqa: E731
        batches.append(ReferenceBatch(
            obs=flat(obs), next_obs=flat(next_obs), rewards=flat(rewards),
            terminated=flat(term), done=flat(done), values=flat(values),
            next_values=flat(next_values), advantages=flat(adv), returns=flat(adv + values)))
    return batches


def episode_returns(stream: RawStream) -> tuple[list[float], list[int]]:
    """Raw (unmultiplied, unscaled) returns and lengths of the episodes that ended in the
    stream, in order of ending (env order within a step)."""
    T, N = stream.rewards.shape
    acc, length = np.zeros(N), np.zeros(N, dtype=int)
    returns, lengths = [], []
    for t in range(T):
        acc += stream.rewards[t]
        length += 1
        for i in range(N):
            if stream.terminated[t, i] or stream.truncated[t, i]:
                returns.append(float(acc[i]))
                lengths.append(int(length[i]))
                acc[i], length[i] = 0.0, 0
    return returns, lengths
