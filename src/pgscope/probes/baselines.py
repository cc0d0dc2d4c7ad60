"""Probe 4 of "A Closer Look at Deep Policy Gradients": the value network as a baseline
(docs/design.md section 3).

Gradient variance (as in probe 1) with advantages from several baselines on the *same*
fresh samples (a paired comparison); :data:`DEFINITIONS` says whose definition each is:

* ``agent``: GAE with the agent's own value net (what training uses);
* ``true``: GAE with a fresh network fit to Monte Carlo returns of the current policy on a
  large sample (``fit_pairs``; default 5e5 to stay affordable, the paper used 5e6, which
  works too: the data set is streamed chunk by chunk into one array, so memory is that
  array, ``fit_pairs x (obs_dim + 1)`` float32 values, plus one chunk, and a data set that
  would not fit in the available memory is refused before anything is sampled); returns
  count as true by the rule of probe 3 (:mod:`pgscope.probes.values`), i.e. only where no
  cut falls inside the effective horizon;
* ``zero``: the paper's "zero" value function, advantages replaced by the discounted
  returns-to-go ``G_t = sum_k gamma^k r_{t+k}``: the REINFORCE estimator, unbiased for the
  policy gradient. So that the end of a sample's rollout segment cuts no return, every
  segment runs ``H`` steps (the effective horizon, ``gamma^H <= 0.01``) beyond the steps
  it contributes; a return stops at termination, at a time limit (no value function is
  there to bootstrap from) or ``H`` steps past the segment;
* ``zero-gae``: GAE(gamma, lambda) with V = 0, i.e. lambda-discounted reward sums cut at
  the rollout end. This is what the probe called "zero" before; it is not the paper's
  estimator (for lambda < 1 it weighs near rewards more than the return does).

Each estimate of n pairs is made of rollout segments of ``min(steps_per_env, n)`` steps
that continue episodes from one segment to the next, as training's rollouts do; the GAE
baselines are computed over those steps exactly as training computes them (the trace
stops at the segment end and bootstraps from V there). With advantage normalization on
(as the agent trains), every advantage set is normalized over the sample, so ``zero``
then subtracts the sample mean of the returns. The estimates leave out any entropy bonus
(``ent_coef``), which does not depend on the baseline: they are the paper's policy-gradient
estimator ``mean_t grad log pi(a_t|s_t) A_t``.

Reports, per sample size and baseline: mean pairwise cosine and covariance trace of the K
estimates with bootstrap CIs, and the fitted value net's error against its held-out MC
returns.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.config import Config
from pgscope.envs import make_env
from pgscope.errors import ProbeError
from pgscope.html_format import fmt, interval_text, table
from pgscope.networks import ValueNet
from pgscope.probes import ProbeInput, ProbeSettings, interval, probe
from pgscope.probes.bootstrap import pairwise_summary
from pgscope.probes.gradients import GradientAccumulator, _seed
from pgscope.probes.sampling import MAX_ENVS, batch_chunks
from pgscope.probes.values import (
    check_horizon,
    effective_horizon,
    returns_to_go,
    true_return_segments,
)
from pgscope.rollout import Batch
from pgscope.seed_statistics import few_samples_note

BASELINES = ("agent", "true", "zero", "zero-gae")

#: Whose definition each baseline is (recorded in the result's settings).
DEFINITIONS = {
    "agent": "the paper's and pgscope's: GAE(gamma, lambda) with the agent's value net",
    "true": "the paper's and pgscope's: GAE(gamma, lambda) with a value net fit to Monte "
            "Carlo returns of the current policy (fit_pairs; the paper used 5e6)",
    "zero": "the paper's: advantages replaced by the discounted returns-to-go (REINFORCE, no "
            "baseline), each summed H steps past its rollout segment",
    "zero-gae": "GAE(gamma, lambda) with V = 0: lambda-discounted rewards cut at the rollout "
                "end (this probe's 'zero' before; not the paper's)",
}

#: The fit_pairs of the paper (Figure 4: 5e6 state-action pairs).
PAPER_FIT_PAIRS = 5_000_000


def _zero(obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(obs.shape[0])


def monte_carlo_dataset(agent: Agent, n_pairs: int, seed: int, horizon_tol: float = 0.01,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(observations, true discounted returns) of fresh rollouts, in the value net's units,
    keeping only states whose return counts as true (probe 3's rule). The chunks stream
    into one preallocated array, so memory is the data set plus one chunk."""
    obs: torch.Tensor | None = None
    returns = torch.empty(0)
    n = 0
    # chunks hold at most MAX_ENVS segments of steps_per_env states: one chunk of slack
    cap = n_pairs + min(agent.config.steps_per_env, n_pairs) * MAX_ENVS
    desc = "Monte Carlo returns" if progress else None
    for part in true_return_segments(agent, n_pairs, seed + 13, horizon_tol, desc):
        if obs is None:
            obs = torch.empty((cap, *part.batch.obs.shape[1:]), dtype=part.batch.obs.dtype)
            returns = torch.empty(cap)
        keep = torch.from_numpy(part.true)
        m = int(keep.sum())
        obs[n:n + m] = part.batch.obs[keep]
        returns[n:n + m] = torch.from_numpy(part.G[part.true])
        n += m
    assert obs is not None
    return obs[:n], returns[:n]


def fit_true_value(agent: Agent, obs: torch.Tensor, returns: torch.Tensor, seed: int,
                   epochs: int = 30, batch_size: int = 256, lr: float = 1e-3,
                   progress: bool = False) -> tuple[ValueNet, dict[str, float]]:
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
    for _ in tqdm(range(epochs), desc="fit true value", unit="epoch", disable=not progress):
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


def lookahead_chunks(agent: Agent, n_pairs: int, seed: int, horizon_tol: float = 0.01
                     ) -> Iterator[tuple[Batch, np.ndarray]]:
    """Fresh samples for one estimate of ``n_pairs`` pairs: yields ``(batch, returns)`` per
    chunk. ``batch`` holds the first ``keep = min(steps_per_env, n_pairs)`` steps of each
    rollout segment (time-major, ``batch.num_envs`` columns; at least ``n_pairs`` pairs in
    all chunks together); ``returns`` their discounted returns-to-go, summed over the whole
    segment of ``keep + H`` steps. Segments continue the same envs, so later ones start
    mid-episode, as training rollouts do."""
    cfg = agent.config
    keep = min(cfg.steps_per_env, n_pairs)
    length = keep + effective_horizon(cfg.gamma, horizon_tol)
    segments = math.ceil(n_pairs / keep)
    for batch in batch_chunks(agent, segments * length, seed, horizon=length, exact=False):
        n_envs = batch.num_envs
        shape = (length, n_envs)
        G = returns_to_go(batch.rewards.numpy().reshape(shape),
                          batch.done.numpy().reshape(shape), cfg.gamma)
        kept = replace(batch.select(torch.arange(keep * n_envs)), num_envs=n_envs)
        yield kept, G[:keep].reshape(-1)


def baseline_advantages(batch: Batch, returns: np.ndarray,
                        value_fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
                        gamma: float, lam: float) -> dict[str, torch.Tensor]:
    """The advantages of each baseline on one chunk of :func:`lookahead_chunks`: GAE with
    each of ``value_fns`` and with V = 0 (``zero-gae``) over the batch's segments, and the
    discounted returns (``zero``)."""
    adv = {name: batch.recompute_advantages(fn, gamma, lam) for name, fn in value_fns.items()}
    adv["zero"] = torch.from_numpy(returns).float()
    adv["zero-gae"] = batch.recompute_advantages(_zero, gamma, lam)
    return adv


def baseline_gradients(agent: Agent, n: int, seed: int,
                       value_fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
                       horizon_tol: float = 0.01) -> dict[str, np.ndarray]:
    """One policy-gradient estimate per baseline (``value_fns``' names, ``zero`` and
    ``zero-gae``), all from the same ``n`` fresh pairs: whole segments first, as
    :meth:`Batch.head_index` orders them; without the entropy bonus."""
    cfg = agent.config
    accs: dict[str, GradientAccumulator] = {}
    taken = 0
    for batch, G in lookahead_chunks(agent, n, seed, horizon_tol):
        idx = batch.head_index(min(n - taken, len(batch)))
        part = batch.select(idx)
        for name, adv in baseline_advantages(batch, G, value_fns, cfg.gamma,
                                             cfg.gae_lambda).items():
            acc = accs.setdefault(name, GradientAccumulator(agent, entropy_bonus=False))
            acc.add(part, advantages=adv[idx])
        taken += len(idx)
        if taken >= n:
            break
    return {name: acc.policy_gradient() for name, acc in accs.items()}


def baseline_probe(agent: Agent, sizes: Iterable[int] = (100, 1000, 10_000), k: int = 10,
                   fit_pairs: int = 500_000, seed: int = 0, progress: bool = True) -> dict:
    """Probe 4 (see module doc). Returns a JSON-ready dict."""
    sizes = sorted(int(n) for n in sizes)
    cfg = agent.config
    obs, returns = monte_carlo_dataset(agent, fit_pairs, seed, progress=progress)
    true_net, fit = fit_true_value(agent, obs, returns, seed, progress=progress)
    del obs, returns
    value_fns = {"agent": agent.value_net, "true": true_net}
    bar = tqdm(total=k * sum(sizes), unit="pair", desc="baseline probe", disable=not progress)
    result: dict = {"settings": {"sizes": sizes, "k": k, "fit_pairs": fit_pairs,
                                 "paper_fit_pairs": PAPER_FIT_PAIRS, "seed": seed,
                                 "env_id": cfg.env_id, "adv_norm": cfg.adv_norm,
                                 "effective_horizon": effective_horizon(cfg.gamma, 0.01),
                                 "definitions": DEFINITIONS},
                    "true_value_fit": fit, "rows": []}
    for i, n in enumerate(sizes):
        ests: dict[str, list[np.ndarray]] = {b: [] for b in BASELINES}
        for j in range(k):
            for name, g in baseline_gradients(agent, n, _seed(seed + 500, i, j),
                                              value_fns).items():
                ests[name].append(g)
            bar.update(n)
        row: dict = {"n": n}
        for b in BASELINES:
            row[b] = pairwise_summary(np.stack(ests[b]), seed)
        result["rows"].append(row)
    bar.close()
    return result


def dataset_bytes(fit_pairs: int, obs_dim: int, steps_per_env: int) -> int:
    """Memory of :func:`monte_carlo_dataset`'s array (float32 observations and returns, one
    chunk of slack)."""
    return (fit_pairs + min(steps_per_env, fit_pairs) * MAX_ENVS) * (obs_dim + 1) * 4


def available_memory() -> int | None:
    """Bytes of physical memory available now (None where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check(settings: ProbeSettings, cfg: Config) -> None:
    """True returns need a long enough time limit (probe 3's check), and the Monte Carlo
    data set of ``fit_pairs`` states must fit in half the available memory."""
    check_horizon(settings, cfg)
    env = make_env(cfg.env_id)
    obs_dim = int(np.prod(env.observation_space.shape or (1,)))
    env.close()
    need, free = dataset_bytes(settings.fit_pairs, obs_dim, cfg.steps_per_env), \
        available_memory()
    if free is not None and need > free / 2:
        raise ProbeError(
            f"--fit-pairs {settings.fit_pairs:,} needs about {need / 2**30:.1f} GiB for the "
            f"Monte Carlo data set ({obs_dim}-dimensional observations) but only "
            f"{free / 2**30:.1f} GiB of memory are available; use fewer fit pairs (the "
            f"paper used {PAPER_FIT_PAIRS:,}).")


#: What the result's top-level keys hold.
SCHEMA = {"settings": "sizes, k, fit_pairs, paper_fit_pairs, seed, env_id, adv_norm, "
                      "effective_horizon, definitions (whose definition each baseline is)",
          "true_value_fit": "held-out error of the value net fit to MC returns",
          "rows": "per size n and baseline (agent, true, zero, zero-gae): pairwise_cosine and "
                  "covariance_trace with bootstrap CIs"}


def _headline(result: dict) -> str:
    row = result["rows"][-1]
    parts = [f"{name} {interval(row[name]['pairwise_cosine'])}"
             for name in BASELINES if name in row and "pairwise_cosine" in row[name]]
    return f"baselines: at {row['n']} pairs, pairwise cosine: " + ", ".join(parts)


def _reading(r: dict) -> str:
    row = r["rows"][-1]
    a, tr, z = (row[k]["covariance_trace"]["mean"] for k in ("agent", "true", "zero"))
    if a >= z:
        return (f"At {row['n']:,} pairs the agent's value baseline does not reduce "
                f"gradient variance: {fmt(a, 3)} with it, {fmt(z, 3)} with no baseline "
                f"({fmt(tr, 3)} with the 'true' value function).")
    share = (z - a) / (z - tr) if z > tr else float("nan")
    return (f"At {row['n']:,} pairs the agent's value baseline cuts gradient variance "
            f"from {fmt(z, 3)} (no baseline) to {fmt(a, 3)}; the 'true' value function "
            f"reaches {fmt(tr, 3)}"
            + (f": the agent achieves {fmt(100 * share, 3)}% of that reduction."
               if math.isfinite(share) else "."))


def _table(r: dict) -> str:
    """Each size and baseline, with the samples behind each number: the pairs per
    estimate and the K estimates (``!``: fewer than
    :data:`pgscope.seed_statistics.FEW_SAMPLES`), and the pairs the 'true' value net was
    fit to."""
    settings = r.get("settings") or {}
    k = settings.get("k", "?")
    mark = "!" if isinstance(k, int) and few_samples_note(k) else ""
    rows = [[row["n"], f"{k}{mark}", name, interval_text(row[name].get("covariance_trace")),
             interval_text(row[name].get("pairwise_cosine"))]
            for row in r["rows"] for name in ("agent", "true", "zero", "zero-gae")
            if name in row]
    return table(["pairs per estimate", "estimates (K)", "baseline", "trace of covariance",
                  "mean pairwise cosine"], rows, (0,)) + (
        f'<p class="note">The true value net was fit to {fmt(settings.get("fit_pairs"))} '
        "pairs." + (f" ! {few_samples_note(k, 'estimates per size')}." if mark else "")
        + "</p>")


@probe("baselines", order=30, settings=("sizes", "k", "fit_pairs"), plot="plot_baselines",
       headline=_headline, schema=SCHEMA, check=_check, reading=_reading, table=_table)
def _compute(p: ProbeInput) -> dict:
    """Gradient variance with advantages from the agent's value net, a 'true' value net
    fit to Monte Carlo returns, and no baseline (discounted returns, the paper's; and GAE
    with V = 0), on the same samples."""
    s = p.settings
    return baseline_probe(p.agent, s.sizes, s.k, s.fit_pairs, p.seed, p.progress)
