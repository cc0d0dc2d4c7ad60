"""Built-in studies (``pgscope study run --preset NAME [--quick]``).

Each preset is the TOML-shaped dict a user could have written, in a full size (the papers'
budgets, for a cluster) and a ``--quick`` size that finishes in minutes on 2 cores; quick
sizes show the machinery and the size of seed noise, not the papers' conclusions.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

from pgscope.algos.paper import STEPS_PER_ITER, TRAIN_STEPS
from pgscope.errors import ConfigError
from pgscope.study.spec import StudySpec, parse_spec

MUJOCO3 = ["Hopper-v5", "Walker2d-v5", "Humanoid-v5"]
_FAILURE = {"Hopper-v5": 1000.0, "Walker2d-v5": 1000.0, "Humanoid-v5": 500.0}


def _score(quick: bool, failures: bool = False) -> dict[str, Any]:
    """Final scores over the last 20% of iterations of a quick study (10% of a full one);
    with ``failures``, the full MuJoCo studies' failure thresholds."""
    score: dict[str, Any] = dict(last_fraction=0.2 if quick else 0.1)
    if failures:
        score["failure_threshold"] = {} if quick else _FAILURE
    return score


def _step_size_sweeps(points: int) -> list[dict[str, Any]]:
    """PPO's policy_lr over 1e-4 .. 1e-2 and TRPO's max_kl over 0.003 .. 0.3, each with
    ``points`` log-spaced values (Hopper's defaults, 3e-4 and 0.13, lie inside)."""
    return [dict(label="ppo", preset="ppo",
                 sweep=dict(policy_lr=dict(log=[1e-4, 1e-2], points=points))),
            dict(label="trpo", preset="trpo",
                 sweep=dict(max_kl=dict(log=[0.003, 0.3], points=points)))]


#: Each built-in study; ``(quick, full)`` pairs where the two sizes differ.
_STUDIES: dict[str, dict[str, Any]] = {
    # Engstrom et al. (2020): PPO, PPO-M, TRPO, TRPO+ on three MuJoCo tasks
    "implementation-matters": dict(
        description="PPO vs PPO-M vs TRPO vs TRPO+ (Engstrom et al., 'Implementation "
                    "Matters in Deep Policy Gradients', 2020)",
        envs=(MUJOCO3, MUJOCO3), seeds=(2, 10), total_steps=(10_240, 1_000_000),
        configs=[dict(label=p, preset=p) for p in ("ppo", "ppo-m", "trpo", "trpo+")],
        failures=True, statistics=dict(baseline="ppo", compare="all")),
    # the same comparison with the authors' own configurations (pgscope.algos.paper), their
    # budget (488 iterations of 2,048 steps: the papers' "1M steps") and their score
    "implementation-matters-hopper": dict(
        description="The authors' PPO, PPO-M, TRPO and TRPO+ configurations on Hopper as "
                    "their code ran them, scored by mean return over the last 10 "
                    "iterations (rule last-10; their code's own rule is engstrom-code, "
                    "the last 5: pgscope study summary --score engstrom-code; published: "
                    "docs/design.md section 4.3)",
        envs=(["Hopper-v5"], ["Hopper-v5"]), seeds=(2, 10),
        total_steps=(5 * STEPS_PER_ITER, TRAIN_STEPS * STEPS_PER_ITER),
        configs=[dict(label=p, preset=p)
                 for p in ("ppo-paper", "ppo-m-paper", "trpo-paper", "trpo+-paper")],
        score="paper", statistics=dict(baseline="ppo-paper", compare="all")),
    # the 2^4 factorial of Engstrom et al. over four of PPO's optimizations
    "code-level-ablation": dict(
        description="2^4 factorial over value clipping, reward scaling, orthogonal init and "
                    "Adam lr annealing on top of PPO ('Implementation Matters', section 3)",
        envs=(["Hopper-v5"], MUJOCO3), seeds=(3, 10), total_steps=(20_480, 1_000_000),
        factorial=dict(base="ppo", factors=dict(value_clip=[True, False],
                                                reward_scale=[True, False],
                                                ortho_init=[True, False],
                                                lr_anneal=[True, False])),
        failures=True, statistics=dict(compare="baseline")),
    # Henderson et al. (2018): rewards multiplied by 0.01 ... 100, with and without PPO's
    # reward scaling (which should make the multiplier irrelevant)
    "reward-scale": dict(
        description="Rewards multiplied by 0.01..100 (Henderson et al., 'Deep RL that "
                    "Matters', 2018), with PPO's reward scaling on and off",
        envs=(["Hopper-v5"], ["Hopper-v5", "Walker2d-v5"]), seeds=(2, 10),
        total_steps=(20_480, 1_000_000),
        factorial=dict(base="ppo", factors=dict(reward_scale=[True, False],
                                                reward_multiplier=[0.01, 0.1, 1.0, 10.0,
                                                                   100.0])),
        statistics=dict(baseline="ppo+rs.rm=1", compare="baseline")),
    # Henderson et al. (2018): one config, many seeds, split into two groups at random
    "seed-lottery": dict(
        description="One config, seeds split into two groups at random: how often do seeds "
                    "alone give a 'significant' difference? (Henderson et al., 2018)",
        envs=(["Hopper-v5"], ["Hopper-v5"]), seeds=(10, 20), total_steps=(40_960, 1_000_000),
        configs=[dict(label="ppo", preset="ppo")],
        statistics=dict(lottery_splits=1000)),
    # hyperparameter sensitivity: each algorithm's step-size knob over the same two decades
    # (five half-decade points), so that the widths of the near-best regions compare
    "step-size-sensitivity": dict(
        description="Sensitivity of PPO to its learning rate (policy_lr) and of TRPO to its "
                    "KL limit (max_kl) on Hopper: the score curve over two decades of each, "
                    "the best value and the width of the near-best region (docs/studies/"
                    "step-size-sensitivity/README.md)",
        envs=(["Hopper-v5"], ["Hopper-v5"]), seeds=(2, 3), total_steps=(4_096, 204_800),
        configs=(_step_size_sweeps(3), _step_size_sweeps(5)),
        score=(dict(last_fraction=0.2), dict(last_fraction=0.1,
                                             failure_threshold={"Hopper-v5": 500.0})),
        # every point against PPO's point nearest its Hopper default (3e-4; quick: 1e-3)
        statistics=(dict(baseline="ppo.policy_lr=0.001", sensitivity_fraction=0.1),
                    dict(baseline="ppo.policy_lr=0.000316228", sensitivity_fraction=0.1))),
}


def study_dict(name: str, quick: bool) -> dict[str, Any]:
    """The TOML-shaped dict of built-in study ``name`` in its quick or full size."""
    study = _STUDIES[name]
    size = 0 if quick else 1
    out: dict[str, Any] = dict(name=name + ("-quick" if quick else ""),
                               description=study["description"],
                               envs=list(study["envs"][size]), seeds=study["seeds"][size],
                               total_steps=study["total_steps"][size])
    out.update({key: study[key][size] if isinstance(study[key], tuple) else study[key]
                for key in ("configs", "factorial") if key in study})
    score = study.get("score") or _score(quick, study.get("failures", False))
    out.update(score=score[size] if isinstance(score, tuple) else score,
               statistics=dict(study["statistics"][size] if isinstance(
                   study["statistics"], tuple) else study["statistics"]))
    return out


#: name -> ``f(quick)``: the built-in study's dict (see :func:`study_dict`).
BUILTIN_STUDIES = {name: functools.partial(study_dict, name) for name in _STUDIES}


def builtin_study(name: str, quick: bool = False) -> StudySpec:
    """The built-in study ``name`` (see :data:`BUILTIN_STUDIES`)."""
    if name not in BUILTIN_STUDIES:
        close = difflib.get_close_matches(name, list(BUILTIN_STUDIES), n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown study preset '{name}'.{hint} Built-in studies: "
                          f"{', '.join(BUILTIN_STUDIES)}.")
    return parse_spec(BUILTIN_STUDIES[name](quick), source=f"study preset '{name}'")
