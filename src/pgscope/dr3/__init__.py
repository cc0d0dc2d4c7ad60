"""The offline DR3 experiment: offline SARSA vs offline TD vs TD + DR3 (docs/dr3.md).

Kumar, Agarwal, Ma, Courville, Tucker and Levine (2021, "DR3: Value-Based Deep RL Requires
Explicit Regularization") observed that a Q-network trained with bootstrapped targets makes
the penultimate features of a state-action pair and of its backup pair co-adapt: the dot
product ``phi(s, a) . phi(s', a')`` grows. Their simplest demonstration evaluates a fixed
behaviour policy offline in two ways:

- *offline SARSA*: the backup uses the dataset's own next action ``a'``;
- *offline TD*: the backup samples a fresh ``a' ~ pi(.|s')`` from the behaviour policy;

and DR3 adds ``c * mean(phi(s, a) . phi(s', a'))`` (features of the online network at the
backup pair) to the TD loss.

The pieces:

- :mod:`pgscope.dr3.dataset`: transitions of a trained checkpoint's stochastic policy with
  its frozen observation statistics, and a Monte Carlo reference ``Q^pi(s, a)`` on held-out
  episodes (exact MuJoCo state restores, :mod:`pgscope.envs.state`);
- :mod:`pgscope.dr3.trainer`: every (variant, seed) member of an experiment trained as one
  batched model (stacked weights, batched matmuls, one Adam), resumable, with per-member
  JSONL logs;
- :mod:`pgscope.dr3.summary`: the table with bootstrap CIs over seeds and the plots;
- :mod:`pgscope.dr3.commands`: ``pgscope dr3 dataset | train | summary``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgscope.dr3.dataset import OfflineDataset, collect_dataset, load_dataset, make_dataset
    from pgscope.dr3.trainer import TrainSettings, Variant, parse_variants, train_offline

#: The names this package exports, by module: imported on first use (PEP 562), so that
#: the command line reaches :mod:`pgscope.dr3.commands` without importing torch.
_EXPORTS = {"OfflineDataset": "dataset", "collect_dataset": "dataset",
            "load_dataset": "dataset", "make_dataset": "dataset", "TrainSettings": "trainer",
            "Variant": "trainer", "parse_variants": "trainer", "train_offline": "trainer"}


def __getattr__(name: str) -> Any:
    """A name of :data:`_EXPORTS`, imported from its module when first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pgscope.dr3' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value

__all__ = ["OfflineDataset", "TrainSettings", "Variant", "collect_dataset", "load_dataset",
           "make_dataset",
           "parse_variants", "train_offline"]
