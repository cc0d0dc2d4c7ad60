"""Probe 3 of "A Closer Look at Deep Policy Gradients": how well does the value network
predict values? (docs/design.md section 3)

On fresh held-out rollouts (collected as in training, statistics frozen), compare the
agent's V(s) with

* the targets it is trained on, ``V_old(s) + A_GAE(s)``, computed as training computes
  them: GAE over a rollout of ``steps_per_env`` steps whose trace stops at the rollout end
  and bootstraps from V there;
* the true discounted return-to-go ``G_t`` of the same rollouts, in the value net's own
  units (rewards after the agent's reward scaling/clipping), by two definitions reported
  side by side (:data:`DEFINITIONS`):

  - ``vs_cut_returns`` (the paper's): ``G_t`` summed to the end of the episode or of the
    rollout, whichever comes first. Every state counts, including those whose return the
    rollout end or a time limit cut short, so the "true" returns of late states are
    partial sums and the error is inflated by the cuts (for positive rewards V looks too
    high);
  - ``vs_true_returns`` (pgscope's, the truncation rule below): only states whose return
    nothing cuts within the effective horizon count.

A return-to-go is only *true* if nothing cuts it. Two things can: the end of a rollout
segment and a time-limit truncation. Whether a state's return is counted must not depend
on what happens after it (keeping only states whose episode happened to terminate in time
would bias the "true" returns towards short, usually bad, futures), so the rule uses only
the present: with ``H`` the effective horizon (``gamma^H <= horizon_tol``; H = 459 for
gamma = 0.99 and tol = 0.01), a state counts if its segment goes on for at least ``H`` more
steps and, for an env with a time limit ``L``, if ``L - elapsed >= H``. Past ``H`` steps the
missing tail weighs at most ``gamma^H`` of the future. States that fail the rule are
**excluded** from the true-return comparison, and the probe reports how many.

To have that lookahead, each segment runs ``steps_per_env + H`` steps from a reset and the
first ``steps_per_env`` states are kept; the cut returns and the GAE targets use those
first ``steps_per_env`` steps only, as a training rollout would. Starting from resets
weights early-episode states more than training's continuing rollouts do.

Errors are real relative errors, mean ``|V - G| / |G|`` over states with ``|G|`` above a
floor (``min_abs_return``), plus the scale-free ratio ``mean|V - G| / mean|G|``, the
explained variance and the signed ``mean_error`` ``mean(V - G)``. CIs bootstrap over
rollout segments (one env's column of a chunk), since states within a segment are
correlated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.config import Config
from pgscope.envs import make_env
from pgscope.errors import ProbeError
from pgscope.html_format import fmt, interval_text, table
from pgscope.probes import ProbeInput, ProbeSettings, interval, probe
from pgscope.probes.bootstrap import summarize
from pgscope.probes.sampling import sample_batch
from pgscope.rollout import Batch


def effective_horizon(gamma: float, tol: float) -> int:
    """Smallest H with gamma^H <= tol."""
    return 1 if gamma <= tol else math.ceil(math.log(tol) / math.log(gamma))


def returns_to_go(rewards: np.ndarray, done: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return-to-go for arrays of shape (T, num_envs), summed up to the end of
    the episode or of the segment, whichever comes first."""
    G = np.zeros(rewards.shape)
    running = np.zeros(rewards.shape[1])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running * (1.0 - done[t])
        G[t] = running
    return G


def elapsed_steps(done: np.ndarray) -> np.ndarray:
    """Steps since the episode began, for segments that start at a reset."""
    elapsed = np.zeros(done.shape)
    for t in range(1, done.shape[0]):
        elapsed[t] = np.where(done[t - 1], 0.0, elapsed[t - 1] + 1)
    return elapsed


#: The value error's targets, one key of the result each: whose definition it is and what
#: it measures (recorded in the result's settings).
DEFINITIONS = {
    "vs_gae_targets": "the paper's and pgscope's: V_old + A_GAE as training computes them "
                      "(GAE over the steps_per_env-step rollout, bootstrapped from V at its "
                      "end)",
    "vs_true_returns": "pgscope's: the discounted return-to-go over the rollout and H more "
                       "steps; states whose return the segment end or a time limit could "
                       "cut within the effective horizon H are excluded (counted)",
    "vs_cut_returns": "the paper's: the discounted return-to-go summed to the end of the "
                      "episode or of the steps_per_env-step rollout, whichever comes first; "
                      "every state counts, returns cut by the rollout end or a time limit "
                      "included",
}


def _errors(v: np.ndarray, target: np.ndarray, floor: float) -> dict[str, float]:
    if len(v) == 0:
        return dict.fromkeys(("relative_error", "mean_abs_error_ratio", "explained_variance",
                              "mean_error"), float("nan"))
    mask = np.abs(target) > floor
    rel = float(np.mean(np.abs(v[mask] - target[mask]) / np.abs(target[mask]))) \
        if mask.any() else float("nan")
    ratio = float(np.mean(np.abs(v - target)) / max(np.mean(np.abs(target)), 1e-12))
    var = float(np.var(target))
    ev = 1.0 - float(np.var(target - v)) / var if var > 0 else float("nan")
    return {"relative_error": rel, "mean_abs_error_ratio": ratio, "explained_variance": ev,
            "mean_error": float(np.mean(v - target))}


@dataclass
class Segments:
    """One chunk of fresh segments: the first ``keep`` steps of each (time-major, flat,
    ``batch.num_envs`` columns), their discounted returns-to-go ``G`` over the whole
    segment, whether each counts as a true return (the truncation rule), and ``G_cut``,
    the returns-to-go cut at the end of the ``keep`` steps (the paper's)."""

    batch: Batch
    G: np.ndarray
    true: np.ndarray
    G_cut: np.ndarray
    n_envs: int
    keep: int
    time_limit: int | None


def check_time_limit(env_id: str, H: int) -> int | None:
    """The env's time limit, or None. A limit shorter than the effective horizon ``H``
    leaves no state whose return-to-go is observable in full (every one is cut inside the
    horizon), so the probe refuses with :class:`ProbeError` before sampling anything."""
    env = make_env(env_id)
    limit = env.spec.max_episode_steps if env.spec is not None else None
    env.close()
    if limit is not None and limit < H:
        raise ProbeError(
            f"env '{env_id}' has a time limit of {limit} steps, shorter than the effective "
            f"horizon H = {H} (gamma^H <= horizon_tol): no true discounted return can be "
            "observed in full, so the value and baseline probes cannot be computed; use a "
            "larger horizon_tol (shorter H) or an env with a longer limit.")
    return limit


def true_return_segments(agent: Agent, n_pairs: int, seed: int, horizon_tol: float = 0.01,
                         progress_desc: str | None = None) -> Iterator[Segments]:
    """Fresh segments of ``steps_per_env + H`` steps from resets, keeping the first
    ``steps_per_env`` states of each, until ``n_pairs`` states are kept (module doc)."""
    cfg = agent.config
    H = effective_horizon(cfg.gamma, horizon_tol)
    keep = min(cfg.steps_per_env, n_pairs)
    limit = check_time_limit(cfg.env_id, H)
    n_envs = min(64, math.ceil(n_pairs / keep))
    shape = (keep + H, n_envs)
    chunks = math.ceil(n_pairs / (keep * n_envs))
    # whole chunks: the pairs drawn, at least n_pairs (the bar counts what is drawn)
    bar = tqdm(total=chunks * keep * n_envs, unit="pair", desc=progress_desc,
               disable=progress_desc is None)
    for chunk in range(chunks):
        batch = sample_batch(agent, shape[0] * n_envs, seed=seed * 10**8 + chunk * 1000,
                             horizon=shape[0], max_envs=n_envs)
        done = batch.done.numpy().reshape(shape)
        rewards = batch.rewards.numpy().reshape(shape)
        G = returns_to_go(rewards, done, cfg.gamma)
        G_cut = returns_to_go(rewards[:keep], done[:keep], cfg.gamma)
        ok = np.ones(shape, dtype=bool)
        if limit is not None:
            ok &= (limit - elapsed_steps(done)) >= H
        # time-major: the first rows, still in the (steps, envs) layout
        kept = replace(batch.select(torch.arange(keep * n_envs)), num_envs=n_envs)
        yield Segments(kept, G[:keep].reshape(-1), ok[:keep].reshape(-1), G_cut.reshape(-1),
                       n_envs, keep, limit)
        bar.update(keep * n_envs)
    bar.close()


def value_probe(agent: Agent, n_pairs: int = 100_000, seed: int = 0,
                horizon_tol: float = 0.01, min_abs_return: float = 1e-3,
                n_boot: int = 1000, progress: bool = True) -> dict:
    """Probe 3 (see module doc). Returns a JSON-ready dict."""
    cfg = agent.config
    H = effective_horizon(cfg.gamma, horizon_tol)
    parts = list(true_return_segments(agent, n_pairs, seed + 7, horizon_tol,
                                      "value probe" if progress else None))
    v = np.concatenate([p.batch.values.numpy() for p in parts]).astype(np.float64)
    tgt = np.concatenate([training_targets(p.batch, agent) for p in parts])
    G = np.concatenate([p.G for p in parts])
    G_cut = np.concatenate([p.G_cut for p in parts])
    ok = np.concatenate([p.true for p in parts])
    seg = np.concatenate([np.tile(np.arange(p.n_envs), p.keep) + i * p.n_envs
                          for i, p in enumerate(parts)])
    keep, limit = parts[0].keep, parts[0].time_limit

    segments = np.unique(seg)
    by_seg = [np.flatnonzero(seg == s) for s in segments]
    rng = np.random.default_rng(seed)

    def with_ci(fn) -> dict[str, dict[str, float]]:
        point = fn(np.arange(len(v)))
        boots = [fn(np.concatenate([by_seg[i] for i in rng.integers(0, len(by_seg),
                                                                     len(by_seg))]))
                 for _ in range(n_boot)]
        out = {}
        for key, value in point.items():
            vals = np.array([b[key] for b in boots])
            vals = vals[np.isfinite(vals)]
            ci = (float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))) \
                if len(vals) else (float("nan"), float("nan"))
            out[key] = summarize(value, ci)
        return out

    vs_targets = with_ci(lambda i: _errors(v[i], tgt[i], min_abs_return))
    vs_true = with_ci(lambda i: _errors(v[i][ok[i]], G[i][ok[i]], min_abs_return))
    vs_cut = with_ci(lambda i: _errors(v[i], G_cut[i], min_abs_return))
    return {
        "settings": {"n_pairs": int(len(v)), "seed": seed, "gamma": cfg.gamma,
                     "gae_lambda": cfg.gae_lambda, "effective_horizon": H,
                     "horizon_tol": horizon_tol, "min_abs_return": min_abs_return,
                     "states_kept_per_segment": keep, "segment_length": keep + H,
                     "time_limit": limit,
                     "reward_units": "scaled" if cfg.reward_scale else "raw",
                     "env_id": cfg.env_id, "definitions": DEFINITIONS},
        "states": int(len(v)),
        "states_with_true_return": int(ok.sum()),
        "states_excluded_cut_within_horizon": int((~ok).sum()),
        "vs_gae_targets": vs_targets,
        "vs_true_returns": vs_true,
        "vs_cut_returns": vs_cut,
        "value_mean": float(v.mean()),
        "true_return_mean": float(G[ok].mean()) if ok.any() else float("nan"),
        "cut_return_mean": float(G_cut.mean()),
    }


def training_targets(batch: Batch, agent: Agent) -> np.ndarray:
    """``V_old + A_GAE`` of a time-major batch of rollout segments, as training computes
    them: GAE over each segment with the agent's value net, the trace stopping at the
    segment's end and bootstrapping from V of the next observation there."""
    cfg = agent.config
    adv = batch.recompute_advantages(agent.value_net, cfg.gamma, cfg.gae_lambda)
    return (adv.double() + batch.values.double()).numpy()


def check_horizon(settings: ProbeSettings, cfg: Config) -> None:
    """True returns need a time limit of at least the effective horizon (also the
    baselines probe's check)."""
    check_time_limit(cfg.env_id, effective_horizon(cfg.gamma, 0.01))


#: What the result's top-level keys hold.
SCHEMA = {"settings": "n_pairs, gamma, gae_lambda, effective_horizon, the exclusion rule, "
                      "definitions (whose definition each vs_* key follows)",
          "vs_gae_targets": "relative_error, mean_abs_error_ratio, explained_variance, "
                            "mean_error (each mean with a bootstrap CI over segments)",
          "vs_true_returns": "the same against true discounted returns (pgscope's "
                             "truncation rule)",
          "vs_cut_returns": "the same against returns cut at the rollout end or a time limit "
                            "(the paper's definition)",
          "states, states_with_true_return, states_excluded_cut_within_horizon": "counts",
          "value_mean, true_return_mean, cut_return_mean": "means"}


def _headline(result: dict) -> str:
    states, kept = result.get("states"), result.get("states_with_true_return")
    line = (f"values: relative error vs GAE targets "
            f"{interval(result['vs_gae_targets']['relative_error'])} ({states} states), vs "
            f"true returns {interval(result['vs_true_returns']['relative_error'])} ({kept} "
            f"of the {states} states: those with a true return inside the effective horizon")
    line += ")" if states is None or kept is None else f"; {states - kept} excluded)"
    if "vs_cut_returns" in result:
        line += (f", vs cut returns (the paper's) "
                 f"{interval(result['vs_cut_returns']['relative_error'])} ({states} states)")
    return line


def _reading(r: dict) -> str:
    g = r["vs_gae_targets"]["relative_error"]["mean"]
    t = r["vs_true_returns"]["relative_error"]["mean"]
    return (f"The value net errs by {100 * g:.1f}% (relative) against the GAE targets "
            f"it is trained on and by {100 * t:.1f}% against true returns"
            + (": it fits its targets better than it predicts returns." if t > g else
               "."))


def _table(r: dict) -> str:
    rows = [[name, interval_text(r[key].get("relative_error")),
             interval_text(r[key].get("mean_abs_error_ratio")),
             interval_text(r[key].get("explained_variance"))]
            for key, name in (("vs_gae_targets", "vs GAE targets"),
                              ("vs_true_returns", "vs true returns (pgscope)"),
                              ("vs_cut_returns", "vs cut returns (the paper's)"))
            if key in r]
    return table(["against", "relative error |V - y| / |y|", "mean |V - y| / mean |y|",
                  "explained variance"], rows) + (
        f'<p class="note">{fmt(r.get("states"))} states, '
        f'{fmt(r.get("states_with_true_return"))} with a true return inside the '
        "effective horizon.</p>")


@probe("values", order=20, settings=("value_pairs",), plot="plot_values",
       headline=_headline, schema=SCHEMA, check=check_horizon, reading=_reading,
       table=_table)
def _compute(p: ProbeInput) -> dict:
    """Relative error of V against its GAE targets and against true discounted returns
    on fresh rollouts (pgscope's truncation rule and the paper's cut returns, side by
    side)."""
    return value_probe(p.agent, p.settings.value_pairs, p.seed, progress=p.progress)
