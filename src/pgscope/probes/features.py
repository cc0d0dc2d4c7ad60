"""Probe 7: do the critic's features co-adapt? (Kumar et al. 2021, "DR3"; docs/dr3.md)

On fresh rollouts of the checkpoint's policy (collected as in training, statistics frozen,
so every observation is preprocessed exactly as the value net sees it), take the value
net's penultimate features phi(s) (:meth:`pgscope.networks.ValueNet.features`) and report

* ``feature_dot``: the mean of phi(s_t) . phi(s_t+1) over consecutive pairs within an
  episode; a pair whose step ended the episode (termination or time-limit truncation) is
  excluded, the pair across a rollout-segment boundary is kept (its s_t+1 is the real next
  state);
* ``feature_cosine``: the mean cosine of the same pairs;
* ``feature_norm``: the mean |phi(s)| over the sampled states;
* ``srank``: the effective rank srank_delta (delta = 0.01) of the sampled states' feature
  matrix (:func:`pgscope.features.srank`),

each with a 95% percentile-bootstrap CI over rollout segments (one env's column of a
chunk; states within a segment are correlated). The bootstrap's srank takes the singular
values of each resample as the square roots of the eigenvalues of its Gram matrix
Phi^T Phi, the count-weighted sum of the segments' Gram matrices, so a resample costs one
d x d eigendecomposition rather than an SVD of the whole sample. When the run logged the
per-iteration feature metrics (``features_every``), their series up to the checkpoint is
included (``over_training``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pgscope.agent import Agent
from pgscope.config import Config
from pgscope.errors import ProbeError
from pgscope.features import (
    FEATURE_KEYS,
    feature_cosine,
    feature_dot,
    feature_norm,
    srank,
    srank_from_singular_values,
)
from pgscope.html_format import fmt, interval_text, table
from pgscope.probes import ProbeInput, ProbeSettings, interval, probe
from pgscope.probes.bootstrap import summarize
from pgscope.probes.sampling import batch_chunks
from pgscope.run import RunDir

#: Bins of the per-pair dot-product and cosine histograms in the result.
HISTOGRAM_BINS = 40


def features_probe(agent: Agent, n_states: int, seed: int, *, delta: float = 0.01,
                   n_boot: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Probe 7 (see the module doc) on at least ``n_states`` fresh states (whole rollout
    chunks); returns the JSON-ready result but ``over_training``."""
    if n_states < 2:
        raise ProbeError(f"the features probe needs at least 2 states, got {n_states}.")
    net = agent.value_net
    phis, dots, cosines, seg_of_pair, seg_of_state = [], [], [], [], []
    grams = []  # per segment: its states' Gram matrix phi^T phi (d x d)
    excluded, offset = 0, 0
    chunks = batch_chunks(agent, n_states, seed + 13, exact=False)
    bar = tqdm(total=n_states, unit="state", desc="features probe", disable=not progress,
               leave=False)
    with torch.no_grad():
        for batch in chunks:
            segment = offset + np.arange(len(batch)) % batch.num_envs  # time-major layout
            offset += batch.num_envs
            valid = ~batch.done
            phi = net.features(batch.obs).double()
            phi_next = net.features(batch.next_obs[valid]).double()
            phis.append(phi)
            columns = phi.reshape(-1, batch.num_envs, phi.shape[1])
            grams.append(torch.einsum("tni,tnj->nij", columns, columns))
            dots.append(feature_dot(phi[valid], phi_next).numpy())
            cosines.append(feature_cosine(phi[valid], phi_next).numpy())
            seg_of_pair.append(segment[valid.numpy()])
            seg_of_state.append(segment)
            excluded += int(batch.done.sum())
            bar.update(len(batch))
    bar.close()
    phi_all = torch.cat(phis)
    dot, cos = np.concatenate(dots), np.concatenate(cosines)
    norm = feature_norm(phi_all).numpy()
    pair_seg, state_seg = np.concatenate(seg_of_pair), np.concatenate(seg_of_state)
    n_seg = offset

    # per-segment sums: a resample's mean is (counts @ sums) / (counts @ sizes)
    def sums(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
        return np.bincount(seg, weights=values, minlength=n_seg)

    pairs_per_seg = np.bincount(pair_seg, minlength=n_seg).astype(np.float64)
    states_per_seg = np.bincount(state_seg, minlength=n_seg).astype(np.float64)
    dot_sum, cos_sum = sums(dot, pair_seg), sums(cos, pair_seg)
    norm_sum = sums(norm, state_seg)
    d = phi_all.shape[1]
    gram_of_seg = torch.cat(grams)

    def ratio(num: np.ndarray, den: np.ndarray, counts: np.ndarray) -> float:
        total = counts @ den
        return float(counts @ num / total) if total > 0 else math.nan

    def resample_srank(counts: np.ndarray) -> float:
        gram = torch.einsum("s,sij->ij", torch.from_numpy(counts), gram_of_seg)
        sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
        return float(srank_from_singular_values(sigma, delta))

    statistics: dict[str, Callable[[np.ndarray], float]] = {
        "feature_dot": lambda c: ratio(dot_sum, pairs_per_seg, c),
        "feature_cosine": lambda c: ratio(cos_sum, pairs_per_seg, c),
        "feature_norm": lambda c: ratio(norm_sum, states_per_seg, c),
        "srank": resample_srank,
    }
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in statistics}
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, n_seg, n_seg), minlength=n_seg).astype(np.float64)
        for key, statistic in statistics.items():
            boots[key].append(statistic(counts))
    ones = np.ones(n_seg)
    points = {key: statistic(ones) for key, statistic in statistics.items()}
    points["srank"] = float(srank(phi_all, delta))  # the SVD itself, not the Gram route

    sigma = torch.linalg.svdvals(phi_all)
    return {
        "settings": {"n_states": int(len(phi_all)), "seed": seed, "delta": delta,
                     "n_boot": n_boot, "env_id": agent.config.env_id,
                     "feature_dim": int(d), "bootstrap_unit": "rollout segment"},
        "states": int(len(phi_all)),
        "pairs": int(len(dot)),
        "pairs_excluded_episode_end": excluded,
        "segments": int(n_seg),
        **{key: summarize(points[key], _ci(boots[key])) for key in statistics},
        "singular_values": [float(s) for s in sigma],
        "dot_histogram": _histogram(dot),
        "cosine_histogram": _histogram(cos, (-1.0, 1.0)),
    }


def _ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))


def _histogram(values: np.ndarray, bounds: tuple[float, float] | None = None
               ) -> dict[str, list[float]]:
    if len(values) == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=bounds)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def over_training(run_dir: Path, checkpoint_iteration: int | None) -> dict[str, list[Any]]:
    """The run's per-iteration feature metrics (``features_every``) up to the checkpoint's
    iteration: ``iteration``, ``env_steps`` and each of :data:`FEATURE_KEYS` (empty when
    the run logged none)."""
    records = [r for r in RunDir(run_dir).read_metrics()
               if "feature_dot" in r and (checkpoint_iteration is None
                                          or r["iteration"] <= checkpoint_iteration)]
    keys = ("iteration", "env_steps", *FEATURE_KEYS)
    return {k: [r.get(k) for r in records] for k in keys}


def check(settings: ProbeSettings, cfg: Config) -> None:
    """At least two states (an effective rank needs a matrix)."""
    if settings.value_pairs < 2:
        raise ProbeError(f"the features probe needs --pairs >= 2 states, got "
                         f"{settings.value_pairs}.")


#: What the result's top-level keys hold.
SCHEMA = {"settings": "n_states, delta, n_boot, feature_dim, env_id, bootstrap_unit",
          "feature_dot, feature_cosine": "mean phi(s) . phi(s') and cosine over within-episode "
                                         "consecutive pairs, with a bootstrap CI over "
                                         "segments",
          "feature_norm": "mean |phi(s)| over the states, with its CI",
          "srank": "effective rank srank_delta of the states' feature matrix, with its CI",
          "states, pairs, pairs_excluded_episode_end, segments": "counts",
          "singular_values": "of the states' feature matrix, largest first",
          "dot_histogram, cosine_histogram": "edges and counts of the per-pair values",
          "over_training": "the run's per-iteration feature_* metrics up to the checkpoint"}


def _headline(result: dict[str, Any]) -> str:
    return (f"features: phi(s).phi(s') {interval(result['feature_dot'])}, cosine "
            f"{interval(result['feature_cosine'])}, |phi| {interval(result['feature_norm'])}, "
            f"srank {interval(result['srank'])} of {result['settings']['feature_dim']}")


def _plot(result: dict[str, Any], path: Path) -> None:
    from pgscope.probes.plots import plt  # the Agg backend

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    sigma = np.asarray(result["singular_values"])
    share = np.cumsum(sigma) / max(sigma.sum(), 1e-300)
    k = np.arange(1, len(sigma) + 1)
    delta = result["settings"]["delta"]
    ax = axes[0]
    ax.plot(k, share, "o-", ms=3)
    ax.axhline(1 - delta, color="grey", ls=":", label=f"1 - delta = {1 - delta:g}")
    ax.axvline(result["srank"]["mean"], color="C3", ls="--",
               label=f"srank = {result['srank']['mean']:.0f}")
    ax.set_xlabel("k (singular directions)")
    ax.set_ylabel("share of the singular-value sum")
    ax.set_title("cumulative singular values of phi")
    ax.legend(fontsize=8)
    ax, hist = axes[1], result["dot_histogram"]
    if hist["counts"]:
        edges = np.asarray(hist["edges"])
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", alpha=0.7)
    ax.axvline(result["feature_dot"]["mean"], color="C3", ls="--", label="mean")
    ax.set_xlabel("phi(s) . phi(s')")
    ax.set_ylabel("pairs")
    ax.set_title(f"consecutive pairs (cosine {interval(result['feature_cosine'])})")
    ax.legend(fontsize=8)
    ax = axes[2]
    series = result.get("over_training") or {}
    if series.get("iteration"):
        x = series["env_steps"]
        ax.plot(x, [np.nan if v is None else v for v in series["feature_dot"]], color="C0",
                label="feature_dot")
        ax.set_ylabel("mean phi(s) . phi(s')", color="C0")
        twin = ax.twinx()
        twin.plot(x, [np.nan if v is None else v for v in series["feature_srank"]],
                  color="C1", label="feature_srank")
        twin.set_ylabel("srank", color="C1")
        ax.set_xlabel("env steps")
        ax.set_title("over training (training batches)")
    else:
        ax.text(0.5, 0.5, "no per-iteration feature metrics\n(features_every = 0)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reading(r: dict[str, Any]) -> str:
    return (f"The value net's features of consecutive states have mean dot product "
            f"{fmt(r['feature_dot']['mean'], 3)} (cosine "
            f"{fmt(r['feature_cosine']['mean'], 2)}) and effective rank "
            f"{fmt(r['srank']['mean'], 3)} of {r['settings']['feature_dim']}: "
            "watch the dot product grow over training (DR3 co-adaptation).")


def _table(r: dict[str, Any]) -> str:
    rows = [[name, interval_text(r.get(key))] for key, name in (
        ("feature_dot", "phi(s) . phi(s')"), ("feature_cosine", "cosine"),
        ("feature_norm", "|phi(s)|"), ("srank", "effective rank (delta 0.01)"))]
    return table(["statistic", "value"], rows) + (
        f'<p class="note">{fmt(r.get("states"))} states, {fmt(r.get("pairs"))} consecutive '
        f'within-episode pairs ({fmt(r.get("pairs_excluded_episode_end"))} across an '
        f'episode end left out), intervals over {fmt(r.get("segments"))} rollout '
        "segments.</p>")


@probe("features", order=60, settings=("value_pairs",), plot=_plot, headline=_headline,
       schema=SCHEMA, check=check, reading=_reading, table=_table)
def _compute(p: ProbeInput) -> dict[str, Any]:
    """Critic feature co-adaptation (DR3): mean phi(s).phi(s') and cosine over consecutive
    within-episode pairs, mean feature norm and effective rank (srank) of the value net's
    penultimate features on fresh rollouts, with bootstrap CIs over rollout segments."""
    result = features_probe(p.agent, p.settings.value_pairs, p.seed, progress=p.progress)
    result["over_training"] = over_training(p.run_dir, p.checkpoint)
    return result
