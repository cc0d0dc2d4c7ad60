"""Evaluation during training (as stable-baselines3's ``EvalCallback``): every
``eval_every``-th iteration and at the last one, the policy just updated plays
``eval_episodes`` fresh episodes and the iteration's metrics line gets the ``eval_*`` keys
(``eval_return`` with its bootstrap interval ``eval_return_low``/``eval_return_high``,
``eval_episode_length``, ``eval_episodes``, ``eval_few_samples``, ``eval_seed``; defined in
:mod:`pgscope.metrics`).

The evaluation is :func:`pgscope.evaluate.evaluate_agent`, the evaluator of ``pgscope
evaluate``: on an env of its own (never the training envs), with a copy of the agent's
preprocessor whose statistics are frozen, actions the mean/mode (``eval_deterministic``,
the default) or sampled from a generator of its own, episodes seeded from
:func:`eval_seed` (the run's seed and the iteration). It draws from no random state that
training uses, so a run's training numbers are the same bits with evaluation on or off,
and a seed evaluates the same alone or in a batch. ``pgscope evaluate RUN --checkpoint I
--episodes N --seed S`` (``--stochastic`` when ``eval_deterministic`` is off) on the
checkpoint kept at iteration I prints the same numbers, S being the line's ``eval_seed``
(tests/test_periodic_eval.py).

It is a sink (:mod:`pgscope.sinks`) registered just before the metrics file, so the keys are
in the line when it is written; ``pgscope`` registers it on import, like the scheduled
probes. The keys only observe a run (not part of its identity, :data:`pgscope.config.
OBSERVES`). Evaluation time is not training time: it is in no timing key.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pgscope.callbacks import Callback, IterationEnd
from pgscope.config import Config
from pgscope.run import RunDir
from pgscope.sinks import register_sink

#: The confidence level of ``eval_return_low``/``eval_return_high`` (pgscope evaluate's).
EVAL_LEVEL = 0.95
#: Mixed into :func:`eval_seed` so that evaluation seeds are a stream of their own.
_EVAL_STREAM = 0xE7A1


def eval_due(cfg: Config, iteration: int) -> bool:
    """Whether the run evaluates after ``iteration`` (from 1): every ``eval_every``-th
    iteration and the last planned one, when ``eval_every`` > 0."""
    return bool(cfg.eval_every) and iteration > 0 and (
        iteration % cfg.eval_every == 0 or iteration == cfg.num_iterations)


def eval_seed(cfg: Config, iteration: int) -> int:
    """The env seed of the first episode of the evaluation after ``iteration`` (episode
    ``i``: this + ``i``), drawn from the run's ``seed`` and the iteration (below 2**32)."""
    state = np.random.SeedSequence([_EVAL_STREAM, cfg.seed, iteration]).generate_state(1)
    return int(state[0])


def eval_metrics(result: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``eval_*`` keys of a metrics line from an evaluation's result
    (:func:`pgscope.evaluate.evaluate_agent`); NaN/Inf are written as null."""

    def finite(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    return dict(eval_return=finite(result["mean_return"]),
                eval_return_low=finite(result["ci_low"]),
                eval_return_high=finite(result["ci_high"]),
                eval_episode_length=float(np.mean(result["lengths"])),
                eval_episodes=int(result["episodes"]),
                eval_few_samples=result["ci_few_samples"] is not None,
                eval_seed=seed)


class PeriodicEval(Callback):
    """Adds the ``eval_*`` keys to the metrics line of every iteration that
    :func:`eval_due` names. Reads the agent, changes nothing."""

    def on_iteration_end(self, event: IterationEnd) -> None:
        cfg = event.config
        if not eval_due(cfg, event.iteration):
            return
        from pgscope.evaluate import evaluate_agent  # scipy: only when a run evaluates

        seed = eval_seed(cfg, event.iteration)
        result = evaluate_agent(event.agent, episodes=cfg.eval_episodes,
                                deterministic=cfg.eval_deterministic, seed=seed,
                                level=EVAL_LEVEL)
        event.metrics.update(eval_metrics(result, seed))


def _factory(cfg: Config, run: RunDir, progress: bool) -> Callback | None:
    return PeriodicEval() if cfg.eval_every else None


register_sink("periodic-eval", _factory, before="metrics-file")

__all__ = ["EVAL_LEVEL", "PeriodicEval", "eval_due", "eval_metrics", "eval_seed"]
