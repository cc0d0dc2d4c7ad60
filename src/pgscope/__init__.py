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
"""

from typing import Any

__version__ = "0.1.0"

# the probes register the check of the probe_* config keys and the scheduled-probes sink
import pgscope.probes  # noqa: E402, F401, I001
from pgscope.agent import Agent  # noqa: E402
from pgscope.callbacks import Callback  # noqa: E402
from pgscope.config import PRESETS, Config, make_config, parse_overrides  # noqa: E402
from pgscope.errors import PgscopeError  # noqa: E402
from pgscope.run import RunDir, load_agent  # noqa: E402
from pgscope.train import resume, train, train_batch  # noqa: E402


def __getattr__(name: str) -> Any:  # load_study imports pandas: only when it is asked for
    if name == "load_study":
        from pgscope.study.analysis import load_study

        return load_study
    raise AttributeError(f"module 'pgscope' has no attribute '{name}'")


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
]
