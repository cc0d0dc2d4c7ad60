"""Built-in studies (``pgscope study run --preset NAME [--quick]``).

Each preset is the TOML-shaped dict a user could have written, in a full size (the papers'
budgets, for a cluster) and a ``--quick`` size that finishes in minutes on 2 cores; quick
sizes show the machinery and the size of seed noise, not the papers' conclusions.
"""

from __future__ import annotations

import difflib
from typing import Any

from pgscope.errors import ConfigError
from pgscope.study.spec import StudySpec, parse_spec

MUJOCO3 = ["Hopper-v5", "Walker2d-v5", "Humanoid-v5"]
_FAILURE = {"Hopper-v5": 1000.0, "Walker2d-v5": 1000.0, "Humanoid-v5": 500.0}


def _implementation_matters(quick: bool) -> dict[str, Any]:
    """Engstrom et al. (2020): PPO, PPO-M, TRPO, TRPO+ on three MuJoCo tasks."""
    return dict(
        name="implementation-matters" + ("-quick" if quick else ""),
        description="PPO vs PPO-M vs TRPO vs TRPO+ (Engstrom et al., 'Implementation "
                    "Matters in Deep Policy Gradients', 2020)",
        envs=MUJOCO3, seeds=2 if quick else 10,
        total_steps=10_240 if quick else 1_000_000,
        configs=[dict(label=p, preset=p) for p in ("ppo", "ppo-m", "trpo", "trpo+")],
        score=dict(last_fraction=0.2 if quick else 0.1,
                   failure_threshold={} if quick else _FAILURE),
        statistics=dict(baseline="ppo", compare="all"),
    )


def _code_level_ablation(quick: bool) -> dict[str, Any]:
    """The 2^4 factorial of Engstrom et al. over four of PPO's optimizations."""
    return dict(
        name="code-level-ablation" + ("-quick" if quick else ""),
        description="2^4 factorial over value clipping, reward scaling, orthogonal init and "
                    "Adam lr annealing on top of PPO ('Implementation Matters', section 3)",
        envs=["Hopper-v5"] if quick else MUJOCO3, seeds=3 if quick else 10,
        total_steps=20_480 if quick else 1_000_000,
        factorial=dict(base="ppo", factors=dict(value_clip=[True, False],
                                                reward_scale=[True, False],
                                                ortho_init=[True, False],
                                                lr_anneal=[True, False])),
        score=dict(last_fraction=0.2 if quick else 0.1,
                   failure_threshold={} if quick else _FAILURE),
        statistics=dict(compare="baseline"),
    )


def _reward_scale(quick: bool) -> dict[str, Any]:
    """Henderson et al. (2018): rewards multiplied by 0.01 ... 100, with and without PPO's
    reward scaling (which should make the multiplier irrelevant)."""
    return dict(
        name="reward-scale" + ("-quick" if quick else ""),
        description="Rewards multiplied by 0.01..100 (Henderson et al., 'Deep RL that "
                    "Matters', 2018), with PPO's reward scaling on and off",
        envs=["Hopper-v5"] if quick else ["Hopper-v5", "Walker2d-v5"],
        seeds=2 if quick else 10, total_steps=20_480 if quick else 1_000_000,
        factorial=dict(base="ppo", factors=dict(reward_scale=[True, False],
                                                reward_multiplier=[0.01, 0.1, 1.0, 10.0,
                                                                   100.0])),
        score=dict(last_fraction=0.2 if quick else 0.1),
        statistics=dict(baseline="ppo+rs.rm=1", compare="baseline"),
    )


def _seed_lottery(quick: bool) -> dict[str, Any]:
    """Henderson et al. (2018): one config, many seeds, split into two groups at random."""
    return dict(
        name="seed-lottery" + ("-quick" if quick else ""),
        description="One config, seeds split into two groups at random: how often do seeds "
                    "alone give a 'significant' difference? (Henderson et al., 2018)",
        envs=["Hopper-v5"], seeds=10 if quick else 20,
        total_steps=40_960 if quick else 1_000_000,
        configs=[dict(label="ppo", preset="ppo")],
        score=dict(last_fraction=0.2 if quick else 0.1),
        statistics=dict(lottery_splits=1000),
    )


BUILTIN_STUDIES = {
    "implementation-matters": _implementation_matters,
    "code-level-ablation": _code_level_ablation,
    "reward-scale": _reward_scale,
    "seed-lottery": _seed_lottery,
}


def builtin_study(name: str, quick: bool = False) -> StudySpec:
    """The built-in study ``name`` (see :data:`BUILTIN_STUDIES`)."""
    if name not in BUILTIN_STUDIES:
        close = difflib.get_close_matches(name, list(BUILTIN_STUDIES), n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown study preset '{name}'.{hint} Built-in studies: "
                          f"{', '.join(BUILTIN_STUDIES)}.")
    return parse_spec(BUILTIN_STUDIES[name](quick), source=f"study preset '{name}'")
