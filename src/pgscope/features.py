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
FEATURE_KEYS = ("feature_dot", "feature_cosine", "feature_norm", "feature_srank",
                "feature_srank_rows")

#: The most rows of the fixed evaluation set that ``feature_srank`` is measured on, on-policy
#: (states of a run's first batch, :class:`pgscope.sinks.CriticFeatures`) and offline
#: (dataset pairs, :mod:`pgscope.dr3.trainer`): min(available, this), the count logged as
#: ``feature_srank_rows``. Fixed, so the srank does not depend on the training batch size.
SRANK_EVAL_ROWS = 2048

#: The forms of the DR3 term's per-pair value (:func:`dr3_pair_values`); the first is the
#: default of config key ``value_dr3_form``.
DR3_FORMS = ("abs", "signed")


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


def dr3_pairs(terminated: torch.Tensor) -> torch.Tensor:
    """Which transitions enter the DR3 term: those whose next state is not terminal.

    The term penalizes ``phi(s) . phi(s')`` for the pairs a TD target bootstraps across
    (Kumar et al. 2021 derive it from the ``gamma Q(s', a')`` part of the target); after a
    termination the target is the reward alone, so that pair is left out. A time-limit
    truncation is not terminal: the target bootstraps from the true final state, and the
    pair stays in. One rule for the on-policy term (:class:`pgscope.engine.nets.StackedBatch`)
    and the offline one (:mod:`pgscope.dr3.trainer`). ``terminated``: bool, any shape."""
    return ~terminated.bool()


def dr3_pair_values(phi: torch.Tensor, phi_next: torch.Tensor,
                    form: str = "abs") -> torch.Tensor:
    """The DR3 term's value of each pair: ``|phi(s) . phi(s')|`` (``form="abs"``, as the
    authors' released DR3 agent computes it) or the signed ``phi(s) . phi(s')``
    (``"signed"``, the paper's formula as printed). The two agree wherever the features
    are non-negative (ReLU features, as in the paper's experiments and the offline
    experiment's Q-network); with tanh features a dot product can be negative, and
    minimizing the signed form rewards features of consecutive states that point in
    opposite directions. ``(..., d) -> (...)``, gradient kept."""
    dots = feature_dot(phi, phi_next)
    if form == "abs":
        return dots.abs()
    if form == "signed":
        return dots
    raise ValueError(f"DR3 form must be one of {', '.join(DR3_FORMS)}, got {form!r}")


def dr3_mean(phi: torch.Tensor, phi_next: torch.Tensor, pairs: torch.Tensor,
             form: str = "abs") -> torch.Tensor:
    """The mean of :func:`dr3_pair_values` over the pairs with ``pairs[..., i]`` (the last,
    sample dim; ``(..., n, d) -> (...)``), 0 where there is none. Only the selected pairs
    enter (a masked mean), so each leading index (a seed, a member) gets its own."""
    values = dr3_pair_values(phi, phi_next, form)
    weight = pairs.to(values.dtype)
    return (values * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)


@torch.no_grad()
def feature_metrics(value_net: ValueNet, obs: torch.Tensor, next_obs: torch.Tensor,
                    valid: torch.Tensor, delta: float = 0.01,
                    eval_obs: torch.Tensor | None = None) -> dict[str, float]:
    """The critic-feature metrics (:data:`FEATURE_KEYS`) of a batch: ``feature_dot`` and
    ``feature_cosine``, means over the pairs ``(obs[i], next_obs[i])`` with ``valid[i]``
    (NaN when there is none); ``feature_norm``, the mean ``|phi(s)|`` over every state of
    ``obs``; ``feature_srank``, :func:`srank` of the feature matrix of ``eval_obs`` (a fixed
    evaluation set, so that it does not depend on the batch; ``obs`` itself when None) and
    ``feature_srank_rows``, its row count (the srank cannot exceed it)."""
    phi = value_net.features(obs)
    phi_next = value_net.features(next_obs[valid])
    pairs = phi[valid]
    ranked = phi if eval_obs is None else value_net.features(eval_obs)
    nan = math.nan
    return {
        "feature_dot": float(feature_dot(pairs, phi_next).mean()) if len(pairs) else nan,
        "feature_cosine": float(feature_cosine(pairs, phi_next).mean()) if len(pairs) else nan,
        "feature_norm": float(feature_norm(phi).mean()),
        "feature_srank": srank(ranked, delta),
        "feature_srank_rows": len(ranked),
    }
