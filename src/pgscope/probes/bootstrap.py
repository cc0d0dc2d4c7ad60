"""Bootstrap summaries of repeated probe estimates: cosine matrices, pairwise means,
covariance traces and percentile-bootstrap intervals over the K estimates of a probe.

(Statistics across training seeds, for comparing configurations, are in
:mod:`pgscope.seed_statistics`.)"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pgscope.seed_statistics import percentile_interval


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities of the rows of ``vectors`` (K x P)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-30)
    return unit @ unit.T


def mean_pairwise(matrix: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Mean of ``matrix[i, j]`` over pairs a < b of ``idx`` with distinct original indices
    (so a bootstrap resample never pairs an estimate with itself)."""
    idx = np.arange(matrix.shape[0]) if idx is None else idx
    a, b = np.triu_indices(len(idx), k=1)
    keep = idx[a] != idx[b]
    if not keep.any():
        return float("nan")
    return float(matrix[idx[a][keep], idx[b][keep]].mean())


def covariance_trace(vectors: np.ndarray) -> float:
    """Trace of the empirical (unbiased) covariance of the rows of ``vectors``."""
    centered = vectors - vectors.mean(axis=0, keepdims=True)
    return float((centered**2).sum() / max(len(vectors) - 1, 1))


def half_sq_distances(vectors: np.ndarray) -> np.ndarray:
    """``||v_i - v_j||^2 / 2`` for all pairs: its mean over pairs i < j equals
    :func:`covariance_trace` (a U-statistic), which lets a bootstrap leave out
    self-pairs as :func:`mean_pairwise` does, instead of shrinking the trace with the
    duplicates of a resample."""
    sq = (vectors**2).sum(axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T, 0.0) / 2


def pairwise_summary(vectors: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """Mean pairwise cosine and covariance trace of K repeated estimates, each with a
    bootstrap 95% CI over the estimates (self-pairs of a resample excluded)."""
    k = len(vectors)
    cos, dist = cosine_matrix(vectors), half_sq_distances(vectors)
    return {
        "pairwise_cosine": summarize(mean_pairwise(cos), bootstrap_ci(
            lambda i: mean_pairwise(cos, i), k, seed=seed)),
        "covariance_trace": summarize(mean_pairwise(dist), bootstrap_ci(
            lambda i: mean_pairwise(dist, i), k, seed=seed)),
    }


def bootstrap_ci(statistic: Callable[[np.ndarray], float], k: int, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over resamples (with
    replacement) of ``k`` repeated estimates; reproducible for a given ``seed``."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, k, size=k)) for _ in range(n_boot)])
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return percentile_interval(values, level)


def summarize(point: float, ci: tuple[float, float]) -> dict[str, float]:
    return {"mean": point, "ci_low": ci[0], "ci_high": ci[1]}
