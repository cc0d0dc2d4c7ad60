"""pgscope: PPO and TRPO with every implementation detail as a switch, under a microscope.

Public API::

    from pgscope import make_config, train, load_agent
    cfg = make_config("ppo", "Hopper-v5", {"total_steps": 100_000, "seed": 1})
    run_dir = train(cfg, "runs/hopper-ppo", callbacks=[])   # pgscope.Callback subclasses
    resume(run_dir, total_steps=200_000)                    # continue (or extend) a run
    train_batch([cfg, replace(cfg, seed=2)], ["runs/s1", "runs/s2"])  # seeds together
    agent = load_agent(run_dir)

    df = load_study("runs/my-study")   # tidy DataFrame: one row per run and iteration

The layers, each a module or package of its own (docs/architecture.md):
``envs`` (environments) -> ``rollout`` (sampling, GAE) -> ``algos`` (update rules, a
registry) -> ``train`` (the loop; events in ``callbacks``, subscribers in ``sinks``) and
``run`` (run directories, checkpoints) -> ``probes`` (diagnostics, a registry) ->
``seed_statistics`` and ``study`` (many seeds) -> ``cli``.

``import pgscope`` is light (it imports neither torch nor gymnasium): the names that need
them load on first use, and so do the components that register themselves with the config
and the training sinks (:func:`load_components`).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pgscope.callbacks import Callback
from pgscope.config import PRESETS, Config, make_config, parse_overrides, register_presets
from pgscope.errors import PgscopeError

if TYPE_CHECKING:
    from pgscope.agent import Agent
    from pgscope.run import RunDir, load_agent
    from pgscope.study.analysis import load_study
    from pgscope.train import resume, train, train_batch

__version__ = "0.1.0"

#: The modules that register themselves with the config and the training sinks when they
#: are imported, in the order they register: the probe schedule (the check of the
#: ``probe_*`` keys, the scheduled-probes sink), the evaluation during training (its sink,
#: before the metrics file) and the algorithms (their presets and checks).
COMPONENTS = ("pgscope.probes.schedule", "pgscope.periodic_eval", "pgscope.algos")

#: The public names whose modules import torch, gymnasium or pandas: loaded on first use.
_LAZY = {"Agent": "pgscope.agent", "RunDir": "pgscope.run", "load_agent": "pgscope.run",
         "load_study": "pgscope.study.analysis", "resume": "pgscope.train",
         "train": "pgscope.train", "train_batch": "pgscope.train"}


def load_components() -> None:
    """Import :data:`COMPONENTS` (idempotent). ``import pgscope`` imports none of them, so
    that the command line starts quickly; they load the first time the config's presets
    are read (every :func:`make_config` and validation), a name of :data:`_LAZY` is used,
    or a ``pgscope`` command runs."""
    for name in COMPONENTS:
        importlib.import_module(name)


def _component_presets() -> Mapping[str, dict[str, Any]]:
    """The config's first preset source: the algorithms' presets, after importing the
    components (the algorithm registry then registers its own source, which agrees)."""
    load_components()
    from pgscope.algos import presets

    return presets()


register_presets(_component_presets)


def __getattr__(name: str) -> Any:
    """The names of :data:`_LAZY`, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'pgscope' has no attribute '{name}'")
    load_components()
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """The package's module type. Importing a submodule binds it as an attribute of its
    package, so importing :mod:`pgscope.train` would hide the function ``pgscope.train``;
    a name of :data:`_LAZY` keeps its public object instead (the module stays in
    ``sys.modules``: ``importlib.import_module("pgscope.train")``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Agent",
    "Callback",
    "load_study",
    "Config",
    "PRESETS",
    "PgscopeError",
    "RunDir",
    "load_agent",
    "make_config",
    "parse_overrides",
    "resume",
    "train",
    "train_batch",
    "__version__",
    "load_components",
]
