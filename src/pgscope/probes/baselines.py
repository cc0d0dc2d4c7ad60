"""Probe 4 of "A Closer Look at Deep Policy Gradients": the value network as a baseline
(docs/design.md section 3).

Gradient variance (as in probe 1) with GAE advantages computed from three value functions
on the *same* fresh samples (a paired comparison):

* ``agent``: the agent's own value net (what training uses);
* ``true``: a fresh network fit to Monte Carlo returns of the current policy on a large
  sample (``fit_pairs``, default 5e5); returns count as true by the rule of probe 3
  (:mod:`pgscope.probes.values`), i.e. only where no cut falls inside the effective horizon;
* ``zero``: no baseline.

Reports, per sample size and baseline: mean pairwise cosine and covariance trace of the K
estimates with bootstrap CIs, and the fitted value net's error against its held-out MC
returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.errors import ProbeError
from pgscope.networks import ValueNet
from pgscope.probes import ProbeInput, interval, probe
from pgscope.probes.bootstrap import pairwise_summary
from pgscope.probes.gradients import GradientAccumulator, _seed
from pgscope.probes.sampling import batch_chunks
from pgscope.probes.values import check_horizon, true_return_segments

BASELINES = ("agent", "true", "zero")


def monte_carlo_dataset(agent: Agent, n_pairs: int, seed: int, horizon_tol: float = 0.01
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(observations, true discounted returns) of fresh rollouts, in the value net's units,
    keeping only states whose return counts as true (probe 3's rule)."""
    parts = list(true_return_segments(agent, n_pairs, seed + 13, horizon_tol))
    obs = torch.cat([p.batch.obs[torch.from_numpy(p.true)] for p in parts])
    returns = torch.cat([torch.from_numpy(p.G[p.true]).float() for p in parts])
    return obs, returns


def fit_true_value(agent: Agent, obs: torch.Tensor, returns: torch.Tensor, seed: int,
                   epochs: int = 30, batch_size: int = 256, lr: float = 1e-3
                   ) -> tuple[ValueNet, dict[str, float]]:
    """A fresh value net (the agent's architecture) regressed on MC returns; 10% of the
    data is held out to report its relative error."""
    if len(obs) < 20:
        raise ProbeError(f"only {len(obs)} states have true returns; raise --fit-pairs.")
    cfg = agent.config
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # never touch the caller's (training's) RNG
        torch.manual_seed(seed)
        net = ValueNet(obs.shape[1], cfg.hidden, cfg.activation, cfg.ortho_init)
    perm = torch.randperm(len(obs), generator=gen)
    n_val = max(1, len(obs) // 10)
    val, train = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=gen).split(batch_size):
            i = train[idx]
            loss = (net(obs[i]) - returns[i]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        err = (net(obs[val]) - returns[val]).abs()
        floor = returns[val].abs().clamp_min(1e-3)
    return net, {"heldout_relative_error": float((err / floor).mean()),
                 "heldout_mean_abs_error_ratio": float(err.mean() / returns[val].abs().mean()),
                 "states": int(len(obs))}


def baseline_probe(agent: Agent, sizes: Iterable[int] = (100, 1000, 10_000), k: int = 10,
                   fit_pairs: int = 500_000, seed: int = 0, progress: bool = True) -> dict:
    """Probe 4 (see module doc). Returns a JSON-ready dict."""
    sizes = sorted(int(n) for n in sizes)
    cfg = agent.config
    obs, returns = monte_carlo_dataset(agent, fit_pairs, seed)
    true_net, fit = fit_true_value(agent, obs, returns, seed)
    value_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "agent": agent.value_net,
        "true": true_net,
        "zero": lambda o: torch.zeros(o.shape[0]),
    }
    bar = tqdm(total=k * sum(sizes), unit="pair", desc="baseline probe", disable=not progress)
    result: dict = {"settings": {"sizes": sizes, "k": k, "fit_pairs": fit_pairs, "seed": seed,
                                 "env_id": cfg.env_id, "adv_norm": cfg.adv_norm},
                    "true_value_fit": fit, "rows": []}
    for i, n in enumerate(sizes):
        ests: dict[str, list[np.ndarray]] = {b: [] for b in BASELINES}
        for j in range(k):
            accs = {b: GradientAccumulator(agent) for b in BASELINES}
            for batch in batch_chunks(agent, n, seed=_seed(seed + 500, i, j), exact=False):
                idx = batch.head_index(min(n - accs["agent"].n, len(batch)))
                for b, fn in value_fns.items():
                    adv = batch.recompute_advantages(fn, cfg.gamma, cfg.gae_lambda)
                    accs[b].add(batch.select(idx), advantages=adv[idx])
            for b in BASELINES:
                ests[b].append(accs[b].policy_gradient())
            bar.update(n)
        row: dict = {"n": n}
        for b in BASELINES:
            row[b] = pairwise_summary(np.stack(ests[b]), seed)
        result["rows"].append(row)
    bar.close()
    return result


#: What the result's top-level keys hold.
SCHEMA = {"settings": "sizes, k, fit_pairs, seed, env_id, adv_norm",
          "true_value_fit": "held-out error of the value net fit to MC returns",
          "rows": "per size n and baseline (agent, true, zero): pairwise_cosine and "
                  "covariance_trace with bootstrap CIs"}


def _headline(result: dict) -> str:
    row = result["rows"][-1]
    parts = [f"{name} {interval(row[name]['pairwise_cosine'])}"
             for name in BASELINES if "pairwise_cosine" in row[name]]
    return f"baselines: at {row['n']} pairs, pairwise cosine: " + ", ".join(parts)


@probe("baselines", order=30, settings=("sizes", "k", "fit_pairs"), plot="plot_baselines",
       headline=_headline, schema=SCHEMA, check=check_horizon)
def _compute(p: ProbeInput) -> dict:
    """Gradient variance with advantages from the agent's value net, a 'true' value net
    fit to Monte Carlo returns, and no baseline, on the same samples."""
    s = p.settings
    return baseline_probe(p.agent, s.sizes, s.k, s.fit_pairs, p.seed, p.progress)
