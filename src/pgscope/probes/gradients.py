"""Probes 1 and 2 of "A Closer Look at Deep Policy Gradients": gradient variance and
convergence to the true gradient (docs/design.md section 3).

At each sample size N of a grid (default :data:`pgscope.probes.DEFAULT_SIZES`: the
paper's log grid 1e2 .. 1e5 plus 2,048, one PPO batch in the paper), K independent
estimates of the algorithm's own gradient at theta_old are drawn from independent fresh
rollouts; the probe reports their mean pairwise cosine similarity, the trace of their
covariance, and their mean cosine to a "true" gradient: the same estimator on a much
larger sample. Separately for the policy (the algorithm's objective) and the value net
(its own regression loss).

The estimator. At theta_old every ratio is 1, so the gradient of PPO's clipped surrogate,
of its KL-penalized variant and of TRPO's surrogate are all ``mean_t grad log pi(a_t|s_t)
A_t``, with A the agent's own GAE advantages, normalized over the sample when the agent
normalizes advantages. When the config has an entropy bonus (``ent_coef`` > 0) the
algorithm ascends surrogate + ent_coef x mean_t H(pi(.|s_t)), and the estimate adds
``ent_coef x mean_t grad H(pi(.|s_t))`` (``entropy_bonus=False`` keeps the surrogate's
gradient alone, the paper's estimator). It is accumulated in a streaming way (sums over
chunks), so memory is bounded whatever N is: with normalization,
``g = (sum A grad log pi - mean(A) sum grad log pi) / (std(A) N) + ent_coef sum grad H / N``,
which is exact. Per-pair gradients (``torch.func.vmap`` of ``jacrev``, in chunks of a
bounded number of floats) give the per-pair gradient variance, streamed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.algos.common import flat_grad
from pgscope.config import Config
from pgscope.errors import ProbeError
from pgscope.html_format import fmt, interval_text, table
from pgscope.networks import Policy
from pgscope.probes import DEFAULT_SIZES, ProbeInput, ProbeSettings, interval, probe
from pgscope.probes.bootstrap import bootstrap_ci, cosine_matrix, pairwise_summary, summarize
from pgscope.probes.sampling import batch_chunks
from pgscope.rollout import Batch
from pgscope.seed_statistics import few_samples_note


@dataclass
class GradientAccumulator:
    """Streams the policy's gradient estimate (surrogate, plus the entropy bonus when the
    config has one and ``entropy_bonus`` is on) and the value-loss gradient over chunks.

    ``advantages`` can replace the agent's own (probe 4 swaps in other baselines).
    """

    agent: Agent
    per_sample: bool = False
    entropy_bonus: bool = True
    n: int = 0
    sum_a: float = 0.0
    sum_a2: float = 0.0
    sum_glogp_a: torch.Tensor | None = None
    sum_glogp: torch.Tensor | None = None
    sum_gent: torch.Tensor | None = None
    sum_value_grad: torch.Tensor | None = None
    # per-pair Gram matrices of (grad log pi, grad H), summed with weights 1, A and A^2
    # (for the per-pair variance)
    gram: list[torch.Tensor] = field(default_factory=list)

    @property
    def ent_coef(self) -> float:
        """The entropy bonus's weight in the estimated gradient (0 when left out)."""
        return float(self.agent.config.ent_coef) if self.entropy_bonus else 0.0

    def add(self, batch: Batch, advantages: torch.Tensor | None = None) -> None:
        agent = self.agent
        adv = (batch.advantages if advantages is None else advantages).double()
        pol = list(agent.policy.parameters())
        dist = agent.policy.dist(batch.obs)
        logp = agent.policy.log_prob(dist, batch.actions)
        g_a = flat_grad((logp * adv.float()).sum(), pol, retain_graph=True).double()
        g_1 = flat_grad(logp.sum(), pol, retain_graph=self.ent_coef > 0).double()
        self.sum_glogp_a = g_a if self.sum_glogp_a is None else self.sum_glogp_a + g_a
        self.sum_glogp = g_1 if self.sum_glogp is None else self.sum_glogp + g_1
        if self.ent_coef > 0:
            g_h = flat_grad(agent.policy.entropy(dist).sum(), pol, allow_unused=True,
                            materialize_grads=True).double()
            self.sum_gent = g_h if self.sum_gent is None else self.sum_gent + g_h
        vals = list(agent.value_net.parameters())
        g_v = flat_grad((agent.value_net(batch.obs) - batch.returns).pow(2).sum(), vals)
        g_v = g_v.double()
        self.sum_value_grad = g_v if self.sum_value_grad is None else self.sum_value_grad + g_v
        self.n += len(batch)
        self.sum_a += float(adv.sum())
        self.sum_a2 += float((adv**2).sum())
        if self.per_sample:
            grams = per_pair_gram(agent.policy, batch, entropy=self.ent_coef > 0)
            sums = [torch.einsum("i,ijk->jk", adv**power, grams) for power in range(3)]
            self.gram = sums if not self.gram else [a + b for a, b in zip(self.gram, sums,
                                                                          strict=True)]

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
        if self.sum_gent is not None:
            g = g + self.ent_coef * self.sum_gent / self.n
        return g.numpy()

    def value_gradient(self) -> np.ndarray:
        if self.sum_value_grad is None:
            raise ValueError("no samples added yet")
        return (self.sum_value_grad / self.n).numpy()

    def per_sample_variance(self) -> float:
        """Trace of the covariance of the per-pair terms u_i = grad log pi_i * A_hat_i
        (+ ent_coef grad H_i with the entropy bonus), whose mean is the estimate."""
        if not self.gram:
            raise ValueError("no per-pair gradients accumulated (per_sample=False)")
        mean, std = self._norm()
        s0, s1, s2 = self.gram
        c = self.ent_coef
        # sum_i ||u_i||^2 with A_hat_i = (A_i - mean) / std, expanded in the streamed sums
        second = (s2[0, 0] - 2 * mean * s1[0, 0] + mean**2 * s0[0, 0]) / std**2
        if s0.shape[0] > 1:
            second = second + 2 * c * (s1[0, 1] - mean * s0[0, 1]) / std + c**2 * s0[1, 1]
        return float(second / self.n - np.sum(self.policy_gradient() ** 2))


class _PairTerms(torch.nn.Module):
    """log pi(a|s) (and the entropy H(pi(.|s))) per state as one module's output, so that
    ``torch.func`` can differentiate both with respect to the policy's parameters."""

    def __init__(self, policy: Policy, entropy: bool) -> None:
        super().__init__()
        assert isinstance(policy, torch.nn.Module)  # every Policy is a module
        self.policy = policy
        self.entropy = entropy

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        dist = self.policy.dist(obs)
        terms = [self.policy.log_prob(dist, actions)]
        if self.entropy:
            terms.append(self.policy.entropy(dist))
        return torch.stack(terms, -1)


#: Floats of per-pair gradients held at once by :func:`per_pair_gram` (16 MB). On Hopper
#: (5.6K policy parameters) 2^21 .. 2^23 all cost about 40-45 us per pair; 2^25 costs ~60
#: and its peak memory is 500 MB higher.
PER_PAIR_FLOATS = 2**22


def per_pair_gram(policy: Policy, batch: Batch, entropy: bool = False,
                  max_floats: int = PER_PAIR_FLOATS) -> torch.Tensor:
    """Per pair i, the Gram matrix of the gradients of log pi(a_i|s_i) (and of
    H(pi(.|s_i)) with ``entropy``) with respect to the policy's parameters: shape
    (n, m, m) with m = 1 or 2, in float64. Per-pair gradients come from ``torch.func``
    (vmap of jacrev; no Python loop over pairs), in chunks of at most ``max_floats``
    numbers, so memory is bounded whatever the batch size."""
    terms = _PairTerms(policy, entropy)
    params = {k: v.detach() for k, v in terms.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    m = 2 if entropy else 1

    def terms_one(p: dict[str, torch.Tensor], obs: torch.Tensor, act: torch.Tensor
                  ) -> torch.Tensor:
        return functional_call(terms, p, (obs[None], act[None]))[0]

    per_pair = vmap(jacrev(terms_one), in_dims=(None, 0, 0))
    chunk = max(1, max_floats // (m * n_params))
    out = []
    for start in range(0, len(batch), chunk):
        jac = per_pair(params, batch.obs[start:start + chunk],
                       batch.actions[start:start + chunk])
        flat = torch.cat([g.reshape(g.shape[0], m, -1) for g in jac.values()], -1)
        out.append(torch.einsum("imp,inp->imn", flat, flat).double())
    return torch.cat(out)


def estimate(agent: Agent, n_pairs: int, seed: int, per_sample: bool = False,
             max_envs: int = 64, entropy_bonus: bool = True,
             progress: Callable[[int], object] | None = None) -> GradientAccumulator:
    """One gradient estimate from ``n_pairs`` fresh pairs (streamed); ``progress(pairs)``
    is called after each chunk."""
    acc = GradientAccumulator(agent, per_sample=per_sample, entropy_bonus=entropy_bonus)
    for batch in batch_chunks(agent, n_pairs, seed, max_envs=max_envs):
        acc.add(batch)
        if progress is not None:
            progress(len(batch))
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


def gradient_probe(agent: Agent, sizes: Iterable[int] = DEFAULT_SIZES,
                   k: int = 10, true_pairs: int = 1_000_000, seed: int = 0,
                   progress: bool = True, reference: dict[str, np.ndarray] | None = None,
                   entropy_bonus: bool = True) -> dict:
    """Probes 1-2: gradient variance and convergence at each sample size (see module doc).

    Returns a JSON-ready dict with the settings, and per size and network (policy, value):
    mean pairwise cosine, mean cosine to the true gradient, covariance trace and mean
    norm of the K estimates, each with a bootstrap 95% CI over the K estimates.
    ``reference`` (e.g. the exact expected gradient of a tabular MDP, by network name)
    adds ``cosine_to_reference`` per size and for the true gradient. The policy's
    gradient includes the entropy bonus when the config has one (``ent_coef`` > 0);
    ``entropy_bonus=False`` measures the surrogate's gradient alone.
    """
    sizes = sorted(int(n) for n in sizes)
    if k < 2:
        raise ProbeError("k must be at least 2 to compare estimates.")
    if true_pairs < 10 * max(sizes):
        raise ProbeError(f"true_pairs ({true_pairs}) should be at least 10x the largest sample "
                         f"size ({max(sizes)}) for a meaningful 'true' gradient.")
    total = true_pairs + k * sum(sizes)
    bar = tqdm(total=total, unit="pair", desc="gradient probe", disable=not progress)
    true_acc = estimate(agent, true_pairs, seed=_seed(seed, -1, 0), per_sample=True,
                        entropy_bonus=entropy_bonus, progress=bar.update)
    true = {"policy": true_acc.policy_gradient(), "value": true_acc.value_gradient()}
    cfg = agent.config
    ent_coef = true_acc.ent_coef
    result: dict = {
        "settings": {"sizes": sizes, "k": k, "true_pairs": true_pairs, "seed": seed,
                     "few_samples_note": few_samples_note(k, "estimates per size"),
                     "adv_norm": cfg.adv_norm, "env_id": cfg.env_id,
                     "horizon": cfg.steps_per_env, "ent_coef": ent_coef,
                     "objective": OBJECTIVE_ENTROPY if ent_coef > 0 else OBJECTIVE_SURROGATE},
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
            acc = estimate(agent, n, seed=_seed(seed, i, j), entropy_bonus=entropy_bonus,
                           progress=bar.update)
            ests["policy"].append(acc.policy_gradient())
            ests["value"].append(acc.value_gradient())
        for net in ("policy", "value"):
            row = _stats(np.stack(ests[net]), true[net], seed)
            if reference is not None and net in reference:
                row["cosine_to_reference"] = _cos_to(reference[net], np.stack(ests[net]), seed)
            result[net].append({"n": n, **row})
    bar.close()
    return result


#: The policy objective whose gradient the probe estimates (``settings.objective``).
OBJECTIVE_SURROGATE = "surrogate"
OBJECTIVE_ENTROPY = "surrogate + ent_coef * entropy"


def _seed(seed: int, size_index: int, j: int) -> int:
    """Env seeds of distinct estimates never overlap (each uses at most 1000 env seeds)."""
    return (seed + 1) * 10**8 + (size_index + 1) * 10**6 + j * 1000


def _check(settings: ProbeSettings, cfg: Config) -> None:
    if settings.true_pairs < 10 * max(settings.sizes):
        raise ProbeError(f"--true-pairs {settings.true_pairs} is too small for the grid: the "
                         f"'true' gradient needs at least 10x the largest size "
                         f"({max(settings.sizes)}).")


#: What the result's top-level keys hold.
SCHEMA = {"settings": "sizes, k, true_pairs, seed, adv_norm, env_id, horizon, ent_coef, "
                      "objective (the policy objective differentiated)",
          "true": "norms of the 'true' policy and value gradients, per-pair variance",
          "policy": "per size n: pairwise_cosine, covariance_trace, cosine_to_true, "
                    "mean_norm (each mean with a bootstrap CI)",
          "value": "the same for the value net's gradient"}


def _headline(result: dict) -> str:
    row = result["policy"][-1]
    return (f"gradients: at {row['n']} pairs, pairwise cosine {interval(row['pairwise_cosine'])}"
            f", cosine to the 'true' gradient {interval(row['cosine_to_true'])}")


def _nearest(rows: list[dict], n: float) -> dict:
    return min(rows, key=lambda r: abs(math.log(max(r["n"], 1)) - math.log(max(n, 1))))


def _reading(r: dict) -> str:
    horizon = (r.get("settings") or {}).get("horizon", 2048)
    row = _nearest(r["policy"], horizon)
    pc, ct = row["pairwise_cosine"], row["cosine_to_true"]
    verdict = ("agree well" if pc["mean"] > 0.5 else "agree only loosely"
               if pc["mean"] > 0.1 else "barely agree")
    settings = r.get("settings") or {}
    note = settings.get("few_samples_note")
    return (f"At {row['n']:,} state-action pairs (about one training batch) independent "
            f"policy-gradient estimates {verdict} (mean pairwise cosine "
            f"{fmt(pc['mean'], 2)}) and point {fmt(ct['mean'], 2)} of the way (cosine) "
            "towards the 'true' gradient." + (f" Its intervals: {note}." if note else ""))


def _table(r: dict) -> str:
    """Every size of both networks, with the sample counts behind each number: the pairs
    per estimate, the K estimates per size (intervals over fewer than
    :data:`pgscope.seed_statistics.FEW_SAMPLES` marked ``!``) and the 'true' gradient's
    pairs."""
    settings = r.get("settings") or {}
    k = settings.get("k", "?")
    mark = "!" if settings.get("few_samples_note") else ""
    rows = []
    for net in ("policy", "value"):
        for row in r.get(net, []):
            rows.append([net, row["n"], f"{k}{mark}",
                         interval_text(row.get("pairwise_cosine")),
                         interval_text(row.get("cosine_to_true")),
                         interval_text(row.get("covariance_trace"))])
    return table(["net", "pairs per estimate", "estimates (K)", "mean pairwise cosine",
                  f"cosine to 'true' gradient ({settings.get('true_pairs', '?')} pairs)",
                  "trace of covariance"], rows, (1,))


@probe("gradients", order=10, settings=("sizes", "k", "true_pairs"), plot="plot_gradients",
       headline=_headline, schema=SCHEMA, check=_check, reading=_reading, table=_table)
def _compute(p: ProbeInput) -> dict:
    """K independent estimates of the algorithm's own gradient at each sample size:
    pairwise cosine, covariance trace, cosine to a 'true' gradient."""
    s = p.settings
    return gradient_probe(p.agent, s.sizes, s.k, s.true_pairs, p.seed, p.progress)
