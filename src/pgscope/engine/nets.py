"""What every algorithm's update works on: the seeds' networks as stacks next to their
own modules (:class:`SeedNets`), the seeds' batches stacked (:class:`StackedBatch`),
per-seed minibatches, KLs and phase statistics. An update written over these serves a
batch of any size N >= 1 (a single run is the batch of one), and what it computes for a
seed does not depend on N or on the other seeds (docs/architecture.md, "One engine")."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from pgscope.config import Config
from pgscope.engine.adam import MaskedAdam
from pgscope.engine.stacked import SeedBatched, Stack
from pgscope.features import dr3_pairs
from pgscope.networks import Policy, ValueNet
from pgscope.rollout import Batch

#: ``epoch_callback(epoch, old_policies)``: called by an update after each pass of policy
#: steps over the batches (TRPO: once, after its step), with the seeds' own modules
#: holding the parameters reached so far and ``old_policies[i]`` seed i's data-collecting
#: policy; the trust-region probe watches an update through it.
EpochCallback = Callable[[int, Sequence[Policy]], None]


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
        # the groups the seeds' optimizers hold (make_optimizer: 'policy' only when Adam
        # trains the policy), with their learning rates, eps and betas
        groups = self.optimizers[0].param_groups
        stacks = {"policy": self.policy, "value": self.value}
        self.adam = MaskedAdam({g["name"]: stacks[g["name"]].flat_params for g in groups},
                               {g["name"]: g["lr"] for g in groups}, eps=groups[0]["eps"],
                               betas=groups[0]["betas"])
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

    def snapshot(self) -> list[Policy]:
        """Each seed's policy as it is now (theta_old at the start of an update)."""
        return [copy.deepcopy(p) for p in self.policies]

    def epoch_end(self, epoch: int, old_policies: Sequence[Policy],
                  callback: EpochCallback | None) -> None:
        """Hand ``callback`` the seeds' modules at the parameters reached after ``epoch``
        (stored into them first); nothing without a callback."""
        if callback is not None:
            self.store()
            callback(epoch, old_policies)

    def set_learning_rates(self, optimizer: torch.optim.Optimizer) -> None:
        """Each group's learning rate as ``optimizer`` (any seed's: same config, same
        iteration) holds it."""
        for group in optimizer.param_groups:
            if group["name"] in self.adam.groups:
                self.adam.groups[group["name"]].lr = group["lr"]

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the seeds at positions ``keep``."""
        self.policies = [self.policies[i] for i in keep]
        self.value_nets = [self.value_nets[i] for i in keep]
        self.optimizers = [self.optimizers[i] for i in keep]
        self.policy.select(keep)
        self.value.select(keep)
        self.adam.select(keep, {"policy": self.policy.flat_params,
                                "value": self.value.flat_params})


class StackedBatch(NamedTuple):
    """The seeds' batches of one iteration stacked: every tensor ``[N, pairs, ...]``."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    next_obs: torch.Tensor  # for value_dr3_coef: each state's successor ...
    valid: torch.Tensor  # ... and whether the pair enters the DR3 term (features.dr3_pairs)

    @staticmethod
    def stack(batches: Sequence[Batch]) -> StackedBatch:
        names = ("obs", "actions", "logp", "values", "advantages", "returns", "next_obs")
        stacked = {k: torch.stack([getattr(b, k) for b in batches]) for k in names}
        return StackedBatch(**stacked,
                            valid=torch.stack([dr3_pairs(b.terminated) for b in batches]))

    @property
    def pairs(self) -> int:
        return self.obs.shape[1]

    def select(self, idx: torch.Tensor) -> StackedBatch:
        """Seed i's pairs ``idx[i]`` for every seed (``idx``: ``[N, m]``)."""
        rows = torch.arange(idx.shape[0]).unsqueeze(1)
        return StackedBatch(*(t[rows, idx] for t in self))


def ratio_stats(ratio: torch.Tensor, clip_range: float, suffix: str = "") -> dict[str, float]:
    """Largest and smallest probability ratio and the fraction with ``|r - 1| > clip_range``
    (keys ``ratio_max``, ``ratio_min``, ``clip_fraction``, each followed by ``suffix``)."""
    return {
        f"ratio_max{suffix}": float(ratio.max()),
        f"ratio_min{suffix}": float(ratio.min()),
        f"clip_fraction{suffix}": float(((ratio - 1).abs() > clip_range).double().mean()),
    }


def first_ratio_deviation(ratio: torch.Tensor) -> dict[str, float]:
    """``ratio_first_minibatch_dev``: max |r - 1| at the update's first loss evaluation,
    where the policy has not moved yet, so it must be 0 (else the stored log-probabilities
    do not belong to the data-collecting policy)."""
    return {"ratio_first_minibatch_dev": float((ratio.detach() - 1).abs().max())}


class PhaseRecorder:
    """Accumulates statistics over a whole update phase (every minibatch of every epoch),
    never just the last minibatch: :meth:`mean` averages scalars such as losses and
    gradient norms, :meth:`ratios` pools the probability ratios of each minibatch, taken
    before that minibatch's step. Values are kept as tensors and reduced once at the end,
    so recording costs no per-minibatch synchronisation."""

    def __init__(self, clip_range: float) -> None:
        self.clip_range = clip_range
        self.ratio_list: list[torch.Tensor] = []
        self.values: dict[str, list[torch.Tensor | float]] = {}

    def ratios(self, ratio: torch.Tensor) -> None:
        self.ratio_list.append(ratio.detach())

    def mean(self, **values: torch.Tensor | float) -> None:
        for k, v in values.items():
            self.values.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else v)

    def result(self) -> dict[str, float]:
        """The mean of every :meth:`mean` key; with ratios recorded also ``ratio_max``,
        ``ratio_min``, ``clip_fraction`` of all of them and ``ratio_first_minibatch_dev``
        of the first."""
        out = {k: float(torch.as_tensor(v, dtype=torch.float64).mean())
               for k, v in self.values.items()}
        if self.ratio_list:
            out.update(ratio_stats(torch.cat(self.ratio_list), self.clip_range))
            out.update(first_ratio_deviation(self.ratio_list[0]))
        return out


def minibatches(n: int, cfg: Config, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch of one seed: a fresh permutation of its ``n`` pairs from
    its own ``generator``, split into ``cfg.minibatches``."""
    perm = torch.randperm(n, generator=generator)
    yield from torch.tensor_split(perm, cfg.minibatches)


def seed_minibatches(batch: StackedBatch, cfg: Config, generators: Sequence[torch.Generator],
                     active: torch.Tensor) -> Iterator[StackedBatch]:
    """One epoch's minibatches ``[N, m, ...]``: seed i's pairs in row i, drawn from its own
    generator as :func:`minibatches` draws them, for the seeds in
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
    """What a :class:`PhaseRecorder` per seed would record, fed from stacked values
    (``[N]`` scalars, ``[N, m]`` ratios) for the seeds that took part in a step
    (``active``). Each step is kept as it comes (no per-seed slicing while the update
    runs); :meth:`results` gives each seed the values of its own steps, in order, reduced
    exactly as its own :class:`PhaseRecorder` reduces them."""

    def __init__(self, n: int, clip_range: float) -> None:
        self.n, self.clip_range = n, clip_range
        self.active: list[torch.Tensor] = []
        self.ratios: list[torch.Tensor] = []
        self.values: dict[str, list[torch.Tensor]] = {}

    def record(self, active: torch.Tensor, ratio: torch.Tensor | None = None,
               **values: torch.Tensor) -> None:
        self.active.append(active.clone())
        if ratio is not None:
            self.ratios.append(ratio.detach())
        for k, v in values.items():
            self.values.setdefault(k, []).append(v.detach())

    def results(self) -> list[dict[str, float]]:
        phases = [PhaseRecorder(self.clip_range) for _ in range(self.n)]
        if not self.active:
            return [phase.result() for phase in phases]
        took_part = torch.stack(self.active)  # [steps, N]
        values = {k: torch.stack(v) for k, v in self.values.items()}  # [steps, N]
        for i, phase in enumerate(phases):
            steps = took_part[:, i]
            if self.ratios:  # minibatches may differ in size by a pair: not stacked
                phase.ratio_list.extend(r[i] for r, on in zip(self.ratios, steps.tolist(),
                                                              strict=True) if on)
            for k, v in values.items():
                phase.values[k] = list(v[steps, i])
        return [phase.result() for phase in phases]
