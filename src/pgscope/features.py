"""Statistics of a critic's penultimate-layer features (docs/dr3.md, design section 3.7).

``phi`` is a feature matrix, one row per state (or state-action pair): the activations a
value or Q network feeds into its last linear layer (:meth:`pgscope.networks.ValueNet.features`).
``phi_next`` holds the features of the *next* states, row for row. Kumar et al. (2021, "DR3")
observed that bootstrapped training makes ``phi(s) . phi(s')`` grow (feature co-adaptation);
Kumar et al. (2020, "Implicit Under-Parameterization") measure the collapse of the features'
effective rank with :func:`srank`.

The per-pair functions accept any leading dimensions (``(..., d)``); :func:`srank` takes one
``(n, d)`` matrix. They are pure: no gradient is detached, so :func:`feature_dot` also serves
the DR3 regularizer (:func:`pgscope.optimizations.dr3_penalty`). This module sits below the
training loop and the probes, which both use it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pgscope.networks import ValueNet

#: The per-iteration metric keys of :func:`feature_metrics` (:mod:`pgscope.metrics`).
FEATURE_KEYS = ("feature_dot", "feature_cosine", "feature_norm", "feature_srank")


def _check_pair(phi: torch.Tensor, phi_next: torch.Tensor) -> None:
    if phi.shape != phi_next.shape:
        raise ValueError(f"phi and phi_next must have the same shape (one row per pair), "
                         f"got {tuple(phi.shape)} and {tuple(phi_next.shape)}")
    if phi.dim() < 1:
        raise ValueError("features need at least one dimension (the feature axis, last)")


def feature_dot(phi: torch.Tensor, phi_next: torch.Tensor) -> torch.Tensor:
    """Per-pair dot product ``phi(s) . phi(s') = sum_j phi_j(s) phi_j(s')``.

    ``phi``, ``phi_next``: ``(..., d)``, row i of ``phi_next`` the successor of row i of
    ``phi``; returns ``(...)``."""
    _check_pair(phi, phi_next)
    return (phi * phi_next).sum(-1)


def feature_cosine(phi: torch.Tensor, phi_next: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-pair cosine ``phi(s) . phi(s') / max(|phi(s)| |phi(s')|, eps)``
    (``torch.nn.functional.cosine_similarity``: 0 when a feature vector is zero)."""
    _check_pair(phi, phi_next)
    return F.cosine_similarity(phi, phi_next, dim=-1, eps=eps)


def feature_norm(phi: torch.Tensor) -> torch.Tensor:
    """Per-row Euclidean norm ``|phi(s)| = sqrt(sum_j phi_j(s)^2)``: ``(..., d) -> (...)``."""
    if phi.dim() < 1:
        raise ValueError("features need at least one dimension (the feature axis, last)")
    return torch.linalg.vector_norm(phi, dim=-1)


def srank(phi: torch.Tensor, delta: float = 0.01) -> int:
    """Effective rank ``srank_delta(Phi)`` (Kumar et al., 2020) of an ``(n, d)`` feature matrix.

    With the singular values ``sigma_1 >= ... >= sigma_min(n,d)`` of ``Phi``::

        srank_delta(Phi) = min { k : sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta }

    the number of singular directions that carry all but a fraction ``delta`` of the
    singular-value mass. Computed in float64 from ``torch.linalg.svdvals``; 0 for a zero
    matrix (no direction carries anything)."""
    if phi.dim() != 2:
        raise ValueError(f"srank takes one (n, d) feature matrix, got shape {tuple(phi.shape)}")
    return srank_from_singular_values(torch.linalg.svdvals(phi.detach().to(torch.float64)),
                                      delta)


def srank_from_singular_values(sigma: torch.Tensor, delta: float = 0.01) -> int:
    """:func:`srank` of a matrix with singular values ``sigma`` (any order): lets a caller
    that has them another way (e.g. the square roots of a Gram matrix's eigenvalues, as the
    features probe's bootstrap does) apply the same rule."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"srank's delta must lie in [0, 1), got {delta}")
    sigma = sigma.detach().to(torch.float64).flatten().sort(descending=True).values
    total = sigma.sum()
    if sigma.numel() == 0 or total <= 0:
        return 0
    share = sigma.cumsum(0) / total
    reached = share >= 1.0 - delta
    # the last share is exactly 1 only up to rounding: the full rank always qualifies
    reached[-1] = True
    return int(torch.nonzero(reached)[0, 0]) + 1


@torch.no_grad()
def feature_metrics(value_net: ValueNet, obs: torch.Tensor, next_obs: torch.Tensor,
                    valid: torch.Tensor, delta: float = 0.01) -> dict[str, float]:
    """The critic-feature metrics (:data:`FEATURE_KEYS`) of a batch: ``feature_dot`` and
    ``feature_cosine``, means over the pairs ``(obs[i], next_obs[i])`` with ``valid[i]``
    (NaN when there is none); ``feature_norm``, the mean ``|phi(s)|`` over every state of
    ``obs``; ``feature_srank``, :func:`srank` of the states' feature matrix."""
    phi = value_net.features(obs)
    phi_next = value_net.features(next_obs[valid])
    pairs = phi[valid]
    nan = math.nan
    return {
        "feature_dot": float(feature_dot(pairs, phi_next).mean()) if len(pairs) else nan,
        "feature_cosine": float(feature_cosine(pairs, phi_next).mean()) if len(pairs) else nan,
        "feature_norm": float(feature_norm(phi).mean()),
        "feature_srank": srank(phi, delta),
    }
