"""Probes 1 and 2 of "A Closer Look at Deep Policy Gradients": gradient variance and
convergence to the true gradient (docs/design.md section 3).

At each sample size N of a grid, K independent estimates of the algorithm's own gradient
at theta_old are drawn from independent fresh rollouts; the probe reports their mean
pairwise cosine similarity, the trace of their covariance, and their mean cosine to a
"true" gradient: the same estimator on a much larger sample. Separately for the policy
(the surrogate) and the value net (its own regression loss).

The estimator. At theta_old every ratio is 1, so the gradient of PPO's clipped surrogate,
of its KL-penalized variant and of TRPO's surrogate are all ``mean_t grad log pi(a_t|s_t)
A_t``, with A the agent's own GAE advantages, normalized over the sample when the agent
normalizes advantages. It is accumulated in a streaming way (sums over chunks), so memory
is bounded whatever N is: with normalization,
``g = (sum A grad log pi - mean(A) sum grad log pi) / (std(A) N)``, which is exact.
Per-sample gradients (``torch.func.vmap`` of ``grad``) give the per-pair gradient
variance, streamed the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.algos.common import flat_grad
from pgscope.config import Config
from pgscope.errors import ProbeError
from pgscope.probes import ProbeInput, ProbeSettings, interval, probe
from pgscope.probes.bootstrap import bootstrap_ci, cosine_matrix, pairwise_summary, summarize
from pgscope.probes.sampling import batch_chunks
from pgscope.rollout import Batch


@dataclass
class GradientAccumulator:
    """Streams the surrogate gradient (policy) and value-loss gradient over chunks.

    ``advantages`` can replace the agent's own (probe 4 swaps in other baselines).
    """

    agent: Agent
    per_sample: bool = False
    n: int = 0
    sum_a: float = 0.0
    sum_a2: float = 0.0
    sum_glogp_a: torch.Tensor | None = None
    sum_glogp: torch.Tensor | None = None
    sum_value_grad: torch.Tensor | None = None
    # per-sample second moments of grad log pi (for the per-pair variance)
    sq: dict[str, float] = field(default_factory=lambda: {"g2a2": 0.0, "g2a": 0.0, "g2": 0.0})

    def add(self, batch: Batch, advantages: torch.Tensor | None = None) -> None:
        agent = self.agent
        adv = (batch.advantages if advantages is None else advantages).double()
        pol = list(agent.policy.parameters())
        logp = agent.policy.log_prob(agent.policy.dist(batch.obs), batch.actions)
        g_a = flat_grad((logp * adv.float()).sum(), pol, retain_graph=True).double()
        g_1 = flat_grad(logp.sum(), pol).double()
        vals = list(agent.value_net.parameters())
        g_v = flat_grad((agent.value_net(batch.obs) - batch.returns).pow(2).sum(), vals)
        self.sum_glogp_a = g_a if self.sum_glogp_a is None else self.sum_glogp_a + g_a
        self.sum_glogp = g_1 if self.sum_glogp is None else self.sum_glogp + g_1
        g_v = g_v.double()
        self.sum_value_grad = g_v if self.sum_value_grad is None else self.sum_value_grad + g_v
        self.n += len(batch)
        self.sum_a += float(adv.sum())
        self.sum_a2 += float((adv**2).sum())
        if self.per_sample:
            norms2 = per_sample_logp_grad_sqnorms(agent, batch)
            self.sq["g2a2"] += float((norms2 * adv**2).sum())
            self.sq["g2a"] += float((norms2 * adv).sum())
            self.sq["g2"] += float(norms2.sum())

    def _norm(self) -> tuple[float, float]:
        if not self.agent.config.adv_norm:
            return 0.0, 1.0
        mean = self.sum_a / self.n
        var = (self.sum_a2 - self.n * mean**2) / max(self.n - 1, 1)
        return mean, float(np.sqrt(max(var, 0.0))) + 1e-8

    def policy_gradient(self) -> np.ndarray:
        if self.sum_glogp_a is None or self.sum_glogp is None:
            raise ValueError("no samples added yet")
        mean, std = self._norm()
        g = (self.sum_glogp_a - mean * self.sum_glogp) / (std * self.n)
        return g.numpy()

    def value_gradient(self) -> np.ndarray:
        if self.sum_value_grad is None:
            raise ValueError("no samples added yet")
        return (self.sum_value_grad / self.n).numpy()

    def per_sample_variance(self) -> float:
        """Trace of the covariance of the per-pair gradient terms grad log pi * A_hat."""
        mean, std = self._norm()
        second = (self.sq["g2a2"] - 2 * mean * self.sq["g2a"] + mean**2 * self.sq["g2"]) / (
            std**2 * self.n)
        return float(second - np.sum(self.policy_gradient() ** 2))


def per_sample_logp_grad_sqnorms(agent: Agent, batch: Batch, chunk: int = 2048
                                 ) -> torch.Tensor:
    """||grad_theta log pi(a_i|s_i)||^2 for every pair, via ``torch.func`` (vmap of grad;
    no Python loop over samples), in chunks to bound memory."""
    policy = agent.policy
    assert isinstance(policy, torch.nn.Module)  # every Policy is a module
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def logp_one(p: dict[str, torch.Tensor], obs: torch.Tensor, act: torch.Tensor
                 ) -> torch.Tensor:
        return functional_call(policy, p, (obs[None], act[None])).sum()

    per_sample = vmap(grad(logp_one), in_dims=(None, 0, 0))
    out = []
    for start in range(0, len(batch), chunk):
        grads = per_sample(params, batch.obs[start:start + chunk],
                           batch.actions[start:start + chunk])
        out.append(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
    return torch.cat(out).double()


def estimate(agent: Agent, n_pairs: int, seed: int, per_sample: bool = False,
             max_envs: int = 64) -> GradientAccumulator:
    """One gradient estimate from ``n_pairs`` fresh pairs (streamed)."""
    acc = GradientAccumulator(agent, per_sample=per_sample)
    for batch in batch_chunks(agent, n_pairs, seed, max_envs=max_envs):
        acc.add(batch)
    return acc


def _cos_to(target: np.ndarray, estimates: np.ndarray, seed: int) -> dict[str, float]:
    cos = cosine_matrix(np.vstack([target[None], estimates]))[0, 1:]
    return summarize(float(cos.mean()),
                     bootstrap_ci(lambda i: float(cos[i].mean()), len(cos), seed=seed))


def _stats(estimates: np.ndarray, true: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    k = len(estimates)
    norms = np.linalg.norm(estimates, axis=1)
    return {
        **pairwise_summary(estimates, seed),
        "cosine_to_true": _cos_to(true, estimates, seed),
        "mean_norm": summarize(float(norms.mean()),
                               bootstrap_ci(lambda i: float(norms[i].mean()), k, seed=seed)),
    }


def gradient_probe(agent: Agent, sizes: Iterable[int] = (100, 1000, 10_000, 100_000),
                   k: int = 10, true_pairs: int = 1_000_000, seed: int = 0,
                   progress: bool = True, reference: dict[str, np.ndarray] | None = None
                   ) -> dict:
    """Probes 1-2: gradient variance and convergence at each sample size (see module doc).

    Returns a JSON-ready dict with the settings, and per size and network (policy, value):
    mean pairwise cosine, mean cosine to the true gradient, covariance trace and mean
    norm of the K estimates, each with a bootstrap 95% CI over the K estimates.
    ``reference`` (e.g. the exact expected gradient of a tabular MDP, by network name)
    adds ``cosine_to_reference`` per size and for the true gradient.
    """
    sizes = sorted(int(n) for n in sizes)
    if k < 2:
        raise ProbeError("k must be at least 2 to compare estimates.")
    if true_pairs < 10 * max(sizes):
        raise ProbeError(f"true_pairs ({true_pairs}) should be at least 10x the largest sample "
                         f"size ({max(sizes)}) for a meaningful 'true' gradient.")
    total = true_pairs + k * sum(sizes)
    bar = tqdm(total=total, unit="pair", desc="gradient probe", disable=not progress)
    true_acc = GradientAccumulator(agent, per_sample=True)
    for batch in batch_chunks(agent, true_pairs, seed=_seed(seed, -1, 0)):
        true_acc.add(batch)
        bar.update(len(batch))
    true = {"policy": true_acc.policy_gradient(), "value": true_acc.value_gradient()}
    result: dict = {
        "settings": {"sizes": sizes, "k": k, "true_pairs": true_pairs, "seed": seed,
                     "adv_norm": agent.config.adv_norm, "env_id": agent.config.env_id,
                     "horizon": agent.config.steps_per_env},
        "true": {"policy_norm": float(np.linalg.norm(true["policy"])),
                 "value_norm": float(np.linalg.norm(true["value"])),
                 "per_pair_policy_variance": true_acc.per_sample_variance()},
        "policy": [], "value": [],
    }
    for net, ref in (reference or {}).items():
        result["true"][f"{net}_cosine_to_reference"] = float(
            cosine_matrix(np.vstack([ref, true[net]]))[0, 1])
    for i, n in enumerate(sizes):
        ests: dict[str, list[np.ndarray]] = {"policy": [], "value": []}
        for j in range(k):
            acc = estimate(agent, n, seed=_seed(seed, i, j))
            ests["policy"].append(acc.policy_gradient())
            ests["value"].append(acc.value_gradient())
            bar.update(n)
        for net in ("policy", "value"):
            row = _stats(np.stack(ests[net]), true[net], seed)
            if reference is not None and net in reference:
                row["cosine_to_reference"] = _cos_to(reference[net], np.stack(ests[net]), seed)
            result[net].append({"n": n, **row})
    bar.close()
    return result


def _seed(seed: int, size_index: int, j: int) -> int:
    """Env seeds of distinct estimates never overlap (each uses at most 1000 env seeds)."""
    return (seed + 1) * 10**8 + (size_index + 1) * 10**6 + j * 1000


def _check(settings: ProbeSettings, cfg: Config) -> None:
    if settings.true_pairs < 10 * max(settings.sizes):
        raise ProbeError(f"--true-pairs {settings.true_pairs} is too small for the grid: the "
                         f"'true' gradient needs at least 10x the largest size "
                         f"({max(settings.sizes)}).")


#: What the result's top-level keys hold.
SCHEMA = {"settings": "sizes, k, true_pairs, seed, adv_norm, env_id, horizon",
          "true": "norms of the 'true' policy and value gradients, per-pair variance",
          "policy": "per size n: pairwise_cosine, covariance_trace, cosine_to_true, "
                    "mean_norm (each mean with a bootstrap CI)",
          "value": "the same for the value net's gradient"}


def _headline(result: dict) -> str:
    row = result["policy"][-1]
    return (f"gradients: at {row['n']} pairs, pairwise cosine {interval(row['pairwise_cosine'])}"
            f", cosine to the 'true' gradient {interval(row['cosine_to_true'])}")


@probe("gradients", order=10, settings=("sizes", "k", "true_pairs"), plot="plot_gradients",
       headline=_headline, schema=SCHEMA, check=_check)
def _compute(p: ProbeInput) -> dict:
    """K independent estimates of the algorithm's own gradient at each sample size:
    pairwise cosine, covariance trace, cosine to a 'true' gradient."""
    s = p.settings
    return gradient_probe(p.agent, s.sizes, s.k, s.true_pairs, p.seed, p.progress)
