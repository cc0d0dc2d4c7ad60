"""The algorithm layer: the update rules, one module each, registered by name.

An algorithm is an :class:`Algorithm` that its module registers with
:func:`register_algorithm` when it is imported: its name (the config key ``algo``), its
update function, the presets it owns, the metric keys it logs (each defined once in
:mod:`pgscope.metrics`), whether Adam trains its policy, the clip range its clip fractions
count against and its surrogate objective (which the landscape probe evaluates). Nothing
outside an algorithm's module branches on its name: the training loop, the optimizer, the
config's presets and validation, the metric registry and the probes all ask the registry.

Every module of this package is imported with the package, so adding an algorithm is one
new file here (see docs/architecture.md, "How to add an algorithm").
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pgscope.config import register_check, register_presets
from pgscope.engine.nets import SeedNets
from pgscope.errors import ConfigError
from pgscope.registry import Registry

if TYPE_CHECKING:
    import torch

    from pgscope.config import Config
    from pgscope.engine.nets import EpochCallback
    from pgscope.networks import Policy, ValueNet
    from pgscope.rollout import Batch

#: The range [1 - eps, 1 + eps] that clip fractions count against when an algorithm has no
#: clip of its own, so that every algorithm's clip fractions are comparable.
NOMINAL_CLIP_RANGE = 0.2


class UpdateFn(Protocol):
    """One iteration's update of N >= 1 seeds (one config), each on its own batch:
    ``nets`` holds the seeds' policies and value nets (stacked, with their Adam state;
    :class:`pgscope.engine.nets.SeedNets`), ``batches[i]``, ``generators[i]``,
    ``states[i]`` and ``heldout_obs[i]`` are seed i's batch, update generator, algorithm
    state (kept across iterations, saved in checkpoints) and previous iteration's states
    (for the held-out KL). Returns each seed's metrics (keys of :mod:`pgscope.metrics`).
    What it computes for seed i must not depend on N or on the other seeds (a single run
    is the batch of one); it leaves the seeds' own modules and optimizers updated
    (``nets.store()``)."""

    def __call__(self, cfg: Config, nets: SeedNets, batches: Sequence[Batch],
                 generators: Sequence[torch.Generator], states: Sequence[dict[str, float]],
                 heldout_obs: Sequence[torch.Tensor | None],
                 epoch_callback: EpochCallback | None = None) -> list[dict[str, float]]: ...


class SurrogateFn(Protocol):
    """The algorithm's own policy objective (to maximize) at the policy's current
    parameters on ``batch``, against ``old_policy`` (the data-collecting policy) and the
    algorithm ``state`` of that update."""

    def __call__(self, cfg: Config, policy: Policy, old_policy: Policy, batch: Batch,
                 state: Mapping[str, float]) -> float: ...


#: The KL an update is judged against when its algorithm or config sets no KL target of its
#: own (clipped PPO, A2C): the upper end of the typical targets 0.01 to 0.02 (design.md
#: section 5).
TYPICAL_KL_TARGET = 0.02


def typical_kl_target(config: Mapping[str, Any]) -> tuple[float, str]:
    """:data:`TYPICAL_KL_TARGET`, for algorithms without a KL target of their own."""
    return TYPICAL_KL_TARGET, "typical target (the run sets none)"


def nominal_clip_range(cfg: Config) -> float:
    """:data:`NOMINAL_CLIP_RANGE`, whatever the config (algorithms without a clip)."""
    return NOMINAL_CLIP_RANGE


#: The config keys every algorithm's update reads (the optimizer, minibatches, value fit).
COMMON_READS = ("algo", "adam_eps", "adv_norm", "epochs", "grad_clip", "lr_anneal",
                "max_grad_norm", "minibatches", "steps_per_iter", "total_steps",
                "value_clip", "value_clip_range", "value_dr3_coef", "value_dr3_form",
                "value_lr")


@dataclass
class Algorithm:
    """An on-policy algorithm as the rest of pgscope sees it.

    ``presets`` maps preset names to the config values each sets (``algo`` is added; a
    value may be a :class:`pgscope.config.ByEnv`, resolved per env family; more presets
    can come from another module through :func:`add_presets`);
    ``logs`` lists the metric keys the algorithm's runs log besides the ones the training
    loop logs for every algorithm (``Metric.every_algorithm``); ``policy_optimizer`` says
    whether the policy is trained by the Adam optimizer (a parameter group ``policy``,
    whose learning rate is logged as ``lr``) or by the update itself; ``clip_range(cfg)``
    is the eps that ``clip_fraction`` and ``clip_fraction_after`` count against;
    ``check(cfg)`` may refuse settings the algorithm cannot run
    (:class:`pgscope.errors.ConfigError`); ``kl_target(config)`` is the KL per update the
    algorithm aims at under a config (a ``config.json`` dict) and its name: what the
    doctor's KL alarms and the report's KL panel both measure against (:func:`kl_target`);
    ``reads`` lists the config keys its optimizer, learning-rate schedule, update and
    surrogate read under some setting of the others (tests/test_algorithm_reads.py records
    the reads of each registered algorithm and compares): a key another algorithm reads
    and this one does not changes nothing in its runs (:func:`unread_keys`)."""

    name: str
    description: str
    update: UpdateFn
    surrogate: SurrogateFn
    presets: Mapping[str, Mapping[str, Any]]
    logs: tuple[str, ...]
    policy_optimizer: bool = True
    clip_range: Callable[[Config], float] = nominal_clip_range
    check: Callable[[Config], None] | None = None
    kl_target: Callable[[Mapping[str, Any]], tuple[float, str]] = typical_kl_target
    reads: tuple[str, ...] = ()


#: Every registered algorithm by name (the values of the config key ``algo``).
ALGORITHMS: Registry[Algorithm] = Registry("algorithm")


def register_algorithm(algo: Algorithm) -> Algorithm:
    """Register ``algo``: its logged keys must be defined in :mod:`pgscope.metrics` and
    its preset names must be new."""
    from pgscope.metrics import REGISTRY

    unknown = [key for key in algo.logs if key not in REGISTRY]
    if unknown:
        raise ValueError(f"algorithm '{algo.name}' logs keys the metric registry does not "
                         f"define: {', '.join(unknown)} (add them to pgscope.metrics).")
    taken = set(algo.presets) & set(presets())
    if taken:
        raise ValueError(f"algorithm '{algo.name}': preset(s) {', '.join(sorted(taken))} "
                         "already belong to another algorithm.")
    return ALGORITHMS.register(algo.name, algo)


def add_presets(name: str, new: Mapping[str, Mapping[str, Any]]) -> None:
    """Give the registered algorithm ``name`` more presets (e.g. a module of faithful
    reproductions of a paper, for several algorithms); their names must be new."""
    algo = algorithm(name)
    taken = set(new) & set(presets())
    if taken:
        raise ValueError(f"preset(s) {', '.join(sorted(taken))} already exist.")
    algo.presets = {**algo.presets, **new}


def algorithm(name: str) -> Algorithm:
    """The registered algorithm ``name`` (:class:`pgscope.registry.UnknownNameError`
    otherwise)."""
    return ALGORITHMS.get(name)


def presets() -> dict[str, dict[str, Any]]:
    """Every preset of every registered algorithm, in registration order; each preset's
    values include its ``algo``."""
    return {preset: {"algo": algo.name, **values}
            for algo in ALGORITHMS.values() for preset, values in algo.presets.items()}


def check_config(cfg: Config) -> None:
    """The algorithm registry's part of :func:`pgscope.config.validate`: ``algo`` names a
    registered algorithm, and that algorithm's own ``check`` accepts the config."""
    if cfg.algo not in ALGORITHMS:
        raise ConfigError(f"config key 'algo' must be one of {', '.join(ALGORITHMS)}; got "
                          f"'{cfg.algo}'.")
    check = algorithm(cfg.algo).check
    if check is not None:
        check(cfg)


# config.py imports nothing above it: the registry hands it its presets and its check
register_presets(presets)
register_check(check_config)


def _import_algorithm_modules() -> None:
    """Import every module of this package (in name order), so each registers itself."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_algorithm_modules()

def unread_keys(name: str) -> tuple[str, ...]:
    """The config keys that some registered algorithm reads (:attr:`Algorithm.reads`)
    and algorithm ``name`` does not: whatever their values, they change nothing in its
    runs (e.g. ``clip_eps`` for TRPO, ``max_kl`` for PPO). Sorted; () for an unknown name
    or an algorithm that declares no reads."""
    if name not in ALGORITHMS or not ALGORITHMS.get(name).reads:
        return ()
    every = {k for algo in ALGORITHMS.values() for k in algo.reads}
    return tuple(sorted(every - set(ALGORITHMS.get(name).reads)))


def kl_target(config: Mapping[str, Any]) -> tuple[float, str]:
    """The KL per update the run of ``config`` (a config dict, as ``config.json`` holds
    it) aims at, and where that number comes from: its algorithm's own definition
    (:attr:`Algorithm.kl_target`); :data:`TYPICAL_KL_TARGET` for an algorithm that is not
    registered here."""
    name = config.get("algo")
    if isinstance(name, str) and name in ALGORITHMS:
        return ALGORITHMS.get(name).kl_target(config)
    return typical_kl_target(config)


def update_one(cfg: Config, policy: Policy, value_net: ValueNet,
               optimizer: torch.optim.Optimizer, batch: Batch, generator: torch.Generator,
               state: dict[str, float], heldout_obs: torch.Tensor | None = None,
               epoch_callback: Callable[[int, Policy], None] | None = None
               ) -> dict[str, float]:
    """One update of a single agent (its modules and ``torch.optim.Adam``, e.g. loaded
    from a checkpoint) by ``cfg``'s algorithm, as the batch of one: the same code and the
    same numbers as that seed's update in training. The modules, ``optimizer`` and
    ``state`` are updated in place; returns the metrics. ``epoch_callback(epoch,
    old_policy)`` sees the agent's policy after each epoch."""
    nets = SeedNets(cfg, [policy], [value_net], [optimizer])
    each = None if epoch_callback is None else (
        lambda epoch, olds: epoch_callback(epoch, olds[0]))
    return algorithm(cfg.algo).update(cfg, nets, [batch], [generator], [state],
                                      [heldout_obs], each)[0]


__all__ = ["ALGORITHMS", "Algorithm", "COMMON_READS", "NOMINAL_CLIP_RANGE", "SurrogateFn",
           "TYPICAL_KL_TARGET", "UpdateFn", "add_presets", "algorithm", "kl_target",
           "nominal_clip_range", "presets", "register_algorithm", "typical_kl_target",
           "unread_keys", "update_one"]
