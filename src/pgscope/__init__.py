"""pgscope: PPO and TRPO with every implementation detail as a switch, under a microscope.

Public API::

    from pgscope import make_config, train, load_agent
    cfg = make_config("ppo", "Hopper-v5", {"total_steps": 100_000, "seed": 1})
    run_dir = train(cfg, "runs/hopper-ppo")
    agent = load_agent(run_dir)

    df = load_study("runs/my-study")   # tidy DataFrame: one row per run and iteration
"""

__version__ = "0.1.0"

from pgscope.agent import Agent  # noqa: E402
from pgscope.config import PRESETS, Config, make_config, parse_overrides  # noqa: E402
from pgscope.errors import PgscopeError  # noqa: E402
from pgscope.run import RunDir, load_agent  # noqa: E402
from pgscope.train import train  # noqa: E402


def __getattr__(name: str):  # load_study imports pandas: only when it is asked for
    if name == "load_study":
        from pgscope.study.analysis import load_study

        return load_study
    raise AttributeError(f"module 'pgscope' has no attribute '{name}'")


__all__ = [
    "Agent",
    "load_study",
    "Config",
    "PRESETS",
    "PgscopeError",
    "RunDir",
    "load_agent",
    "make_config",
    "parse_overrides",
    "train",
    "__version__",
]
