"""What the batched updates share: the seeds' networks as stacks next to their own
modules, the seeds' batches stacked, per-seed minibatches and phase statistics, and the
registry of batched updates (one per algorithm the engine supports)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import torch

from pgscope.algos import algorithm
from pgscope.algos.common import PhaseRecorder, minibatches
from pgscope.batched.adam import MaskedAdam
from pgscope.batched.stacked import SeedBatched, Stack
from pgscope.config import Config
from pgscope.networks import Policy, ValueNet
from pgscope.rollout import Batch


class SeedNets:
    """The seeds' policies and value nets: each seed's own modules and ``torch.optim.Adam``
    (what rollouts, metrics, callbacks and checkpoints use, exactly as in a single run)
    and the same parameters stacked, with a :class:`MaskedAdam` over the stacks (what the
    batched update trains). Built from the modules and optimizers (fresh or restored from
    checkpoints); after an update, :meth:`store` writes the stacks back into them."""

    def __init__(self, cfg: Config, policies: Sequence[Policy], value_nets: Sequence[ValueNet],
                 optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.cfg = cfg
        self.policies, self.value_nets = list(policies), list(value_nets)
        self.optimizers = list(optimizers)
        self.policy = Stack(self.policies)  # type: ignore[arg-type]
        self.value = Stack(self.value_nets)
        groups = {"value": list(self.value.parameters())}
        if algorithm(cfg.algo).policy_optimizer:
            groups = {"policy": list(self.policy.parameters()), **groups}
        self.adam = MaskedAdam(groups, {"value": cfg.value_lr, "policy": cfg.policy_lr},
                               eps=cfg.adam_eps)
        for i, optimizer in enumerate(self.optimizers):
            self.adam.read_from(i, optimizer)

    def __len__(self) -> int:
        return len(self.policies)

    def store(self) -> None:
        """The stacks' parameters and Adam state into the seeds' modules and optimizers."""
        self.policy.write_to(self.policies)  # type: ignore[arg-type]
        self.value.write_to(self.value_nets)
        for i, optimizer in enumerate(self.optimizers):
            self.adam.write_to(i, optimizer)

    def set_learning_rates(self, optimizer: torch.optim.Optimizer) -> None:
        """Each group's learning rate as ``optimizer`` (any seed's: same config, same
        iteration) holds it."""
        for group in optimizer.param_groups:
            self.adam.groups[group["name"]].lr = group["lr"]

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the seeds at positions ``keep``."""
        self.policies = [self.policies[i] for i in keep]
        self.value_nets = [self.value_nets[i] for i in keep]
        self.optimizers = [self.optimizers[i] for i in keep]
        self.policy.select(keep)
        self.value.select(keep)
        self.adam.select(keep, {"policy": list(self.policy.parameters()),
                                "value": list(self.value.parameters())})


class StackedBatch(NamedTuple):
    """The seeds' batches of one iteration stacked: every tensor ``[N, pairs, ...]``."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    next_obs: torch.Tensor  # for value_dr3_coef: each state's successor ...
    valid: torch.Tensor  # ... and whether no episode end lies between them (not done)

    @staticmethod
    def stack(batches: Sequence[Batch]) -> StackedBatch:
        names = ("obs", "actions", "logp", "values", "advantages", "returns", "next_obs")
        stacked = {k: torch.stack([getattr(b, k) for b in batches]) for k in names}
        return StackedBatch(**stacked, valid=torch.stack([~b.done for b in batches]))

    @property
    def pairs(self) -> int:
        return self.obs.shape[1]

    def select(self, idx: torch.Tensor) -> StackedBatch:
        """Seed i's pairs ``idx[i]`` for every seed (``idx``: ``[N, m]``)."""
        rows = torch.arange(idx.shape[0]).unsqueeze(1)
        return StackedBatch(*(t[rows, idx] for t in self))


def seed_minibatches(batch: StackedBatch, cfg: Config, generators: Sequence[torch.Generator],
                     active: torch.Tensor) -> Iterator[StackedBatch]:
    """One epoch's minibatches ``[N, m, ...]``: seed i's pairs in row i, drawn from its own
    generator as :func:`pgscope.algos.common.minibatches` draws them, for the seeds in
    ``active``; the others draw nothing (their rows are placeholders their masked step
    ignores). The epoch's pairs are gathered once, in minibatch order, and each
    minibatch is a slice of them."""
    n = batch.pairs
    placeholder = torch.tensor_split(torch.arange(n), cfg.minibatches)
    parts = [list(minibatches(n, cfg, g)) if on else placeholder
             for g, on in zip(generators, active.tolist(), strict=True)]
    epoch = batch.select(torch.stack([torch.cat(list(p)) for p in parts]))
    start = 0
    for idx in parts[0]:
        yield StackedBatch(*(t[:, start:start + len(idx)] for t in epoch))
        start += len(idx)


def seed_mean_kl(policy: SeedBatched, old_policy: SeedBatched, obs: torch.Tensor
                 ) -> torch.Tensor:
    """Each seed's mean KL(old || new) on its states ``obs[i]``: ``[N]``; no gradient
    flows into ``old_policy``."""
    with torch.no_grad():
        old_dist = old_policy.dist(obs)
    result: torch.Tensor = policy.kl(old_dist, policy.dist(obs)).mean(-1)
    return result


class SeedPhases:
    """A :class:`pgscope.algos.common.PhaseRecorder` per seed, fed from stacked values
    (``[N]`` scalars, ``[N, m]`` ratios) for the seeds that took part in a step."""

    def __init__(self, n: int, clip_range: float) -> None:
        self.phases = [PhaseRecorder(clip_range) for _ in range(n)]

    def record(self, active: torch.Tensor, ratio: torch.Tensor | None = None,
               **values: torch.Tensor) -> None:
        for i in torch.nonzero(active).flatten().tolist():
            if ratio is not None:
                self.phases[i].ratios(ratio[i])
            self.phases[i].mean(**{k: v[i] for k, v in values.items()})

    def results(self) -> list[dict[str, float]]:
        return [phase.result() for phase in self.phases]


class BatchedUpdateFn(Protocol):
    """One iteration's update of every seed: ``nets`` trained on the seeds' ``batches``
    with their own ``generators``, algorithm ``states`` and held-out states; returns each
    seed's metrics, the same keys and meanings as the algorithm's single-run update."""

    def __call__(self, cfg: Config, nets: SeedNets, batches: Sequence[Batch],
                 generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
                 heldout_obs: Sequence[torch.Tensor | None]) -> list[dict[str, float]]: ...


#: The batched update of each algorithm the engine supports, by algorithm name.
BATCHED_UPDATES: dict[str, BatchedUpdateFn] = {}
