"""Probe 3 of "A Closer Look at Deep Policy Gradients": how well does the value network
predict values? (SPEC.md section 3)

On fresh held-out rollouts (collected as in training, statistics frozen), compare the
agent's V(s) with

* the targets it is trained on, ``V_old(s) + A_GAE(s)``, and
* the true discounted return-to-go ``G_t`` of the same rollouts, in the value net's own
  units (rewards after the agent's reward scaling/clipping).

A return-to-go is only *true* if nothing cuts it: an episode that terminates gives it
exactly; a time-limit truncation or the end of a rollout segment cuts it. A state whose
return is cut fewer than ``H`` steps after it, where ``gamma^H <= horizon_tol`` (the
effective horizon; H = 459 for gamma = 0.99 and tol = 0.01), is **excluded**, and the
probe reports how many were. Past H steps the missing tail weighs at most ``gamma^H`` of
the future, so the remaining states count as true returns.

Errors are real relative errors, mean ``|V - G| / |G|`` over states with ``|G|`` above a
floor (``min_abs_return``), plus the scale-free ratio ``mean|V - G| / mean|G|`` and the
explained variance. CIs bootstrap over rollout segments (one env's column of a chunk),
since states within a segment are correlated.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.probes.sampling import batch_chunks
from pgscope.probes.stats import summarize


def effective_horizon(gamma: float, tol: float) -> int:
    """Smallest H with gamma^H <= tol."""
    return 1 if gamma <= tol else math.ceil(math.log(tol) / math.log(gamma))


def returns_to_go(rewards: np.ndarray, terminated: np.ndarray, done: np.ndarray,
                  gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Discounted return-to-go for arrays of shape (T, num_envs), and for each state the
    number of rewards it includes before a cut (``inf`` when its episode terminated
    inside the segment, so the return is exact)."""
    T, N = rewards.shape
    G = np.zeros((T, N))
    known = np.zeros((T, N))
    running = np.zeros(N)
    steps = np.zeros(N)
    for t in reversed(range(T)):
        if t == T - 1:  # the segment ends: the future after it is cut unless terminated
            steps = np.where(terminated[t], np.inf, 0.0)
            running = np.zeros(N)
        else:
            ended = done[t]
            running = np.where(ended, 0.0, running)
            steps = np.where(terminated[t], np.inf, np.where(ended, 0.0, steps))
        running = rewards[t] + gamma * running
        steps = steps + 1
        G[t], known[t] = running, steps
    return G, known


def _errors(v: np.ndarray, target: np.ndarray, floor: float) -> dict[str, float]:
    mask = np.abs(target) > floor
    rel = float(np.mean(np.abs(v[mask] - target[mask]) / np.abs(target[mask]))) \
        if mask.any() else float("nan")
    ratio = float(np.mean(np.abs(v - target)) / max(np.mean(np.abs(target)), 1e-12))
    var = float(np.var(target))
    ev = 1.0 - float(np.var(target - v)) / var if var > 0 else float("nan")
    return {"relative_error": rel, "mean_abs_error_ratio": ratio, "explained_variance": ev}


def value_probe(agent: Agent, n_pairs: int = 100_000, seed: int = 0,
                horizon_tol: float = 0.01, min_abs_return: float = 1e-3,
                n_boot: int = 1000, progress: bool = True) -> dict:
    """Probe 3 (see module doc). Returns a JSON-ready dict."""
    cfg = agent.config
    H = effective_horizon(cfg.gamma, horizon_tol)
    v_all, tgt_all, g_all, ok_all, seg_all = [], [], [], [], []
    bar = tqdm(total=n_pairs, unit="pair", desc="value probe", disable=not progress)
    seg_base = 0
    for batch in batch_chunks(agent, n_pairs, seed=(seed + 7) * 10**8, exact=False):
        n_envs = batch.obs.shape[0] // min(cfg.steps_per_env, n_pairs)
        shape = (len(batch) // n_envs, n_envs)
        G, known = returns_to_go(batch.rewards.numpy().reshape(shape),
                                 batch.terminated.numpy().reshape(shape),
                                 batch.done.numpy().reshape(shape), cfg.gamma)
        v_all.append(batch.values.numpy())  # V(s) of the frozen agent (pre-update values)
        tgt_all.append(batch.returns.numpy())
        g_all.append(G.reshape(-1))
        ok_all.append(known.reshape(-1) >= H)
        seg_all.append(np.tile(np.arange(n_envs), shape[0]) + seg_base)
        seg_base += n_envs
        bar.update(len(batch))
    bar.close()
    v, tgt, G = (np.concatenate(x).astype(np.float64) for x in (v_all, tgt_all, g_all))
    ok, seg = np.concatenate(ok_all), np.concatenate(seg_all)

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
    return {
        "settings": {"n_pairs": int(len(v)), "seed": seed, "gamma": cfg.gamma,
                     "gae_lambda": cfg.gae_lambda, "effective_horizon": H,
                     "horizon_tol": horizon_tol, "min_abs_return": min_abs_return,
                     "segment_length": int(min(cfg.steps_per_env, n_pairs)),
                     "reward_units": "scaled" if cfg.reward_scale else "raw",
                     "env_id": cfg.env_id},
        "states": int(len(v)),
        "states_with_true_return": int(ok.sum()),
        "states_excluded_cut_within_horizon": int((~ok).sum()),
        "vs_gae_targets": vs_targets,
        "vs_true_returns": vs_true,
        "value_mean": float(v.mean()),
        "true_return_mean": float(G[ok].mean()) if ok.any() else float("nan"),
    }
