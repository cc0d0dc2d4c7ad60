"""Fresh samples from a frozen agent, drawn exactly as in training.

A sample of N state-action pairs is made of rollout segments of the training horizon
(``steps_per_env`` steps per env, the length of one training rollout of one env), run in
parallel across many envs with one batched policy forward per step. Advantages come from
the agent's own value net and GAE, with the same truncation/termination rules, reward
scaling and observation normalization as training (statistics frozen: the agent is never
changed). Independent samples use independent env seeds and sampling streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

from pgscope.agent import Agent
from pgscope.engine.rollout import collect_one
from pgscope.envs import make_vector_env
from pgscope.rollout import Batch, RolloutCollector

#: Upper bound on parallel envs per chunk (memory and per-step cost stay bounded).
MAX_ENVS = 64


def batch_chunks(agent: Agent, n_pairs: int, seed: int, max_envs: int = MAX_ENVS,
                 horizon: int | None = None, exact: bool = True) -> Iterator[Batch]:
    """Yield batches that together hold exactly ``n_pairs`` fresh pairs (with ``exact``
    False: whole chunks, time-major, at least ``n_pairs`` pairs in all).

    Each chunk runs up to ``max_envs`` envs for ``horizon`` steps (default: the agent's
    training horizon, ``steps_per_env``); a sample smaller than one horizon is a single
    segment of ``n_pairs`` steps. Chunks continue the same envs, so later segments start
    mid-episode, as training rollouts do.
    """
    cfg = agent.config
    horizon = min(horizon or cfg.steps_per_env, n_pairs)
    segments = math.ceil(n_pairs / horizon)
    n_envs = min(max_envs, segments)
    probe_cfg = replace(cfg, num_envs=n_envs, steps_per_iter=n_envs * horizon)
    envs = make_vector_env(cfg.env_id, n_envs)
    try:
        pre = agent.preprocessor.with_frozen_statistics(n_envs)
        collector = RolloutCollector(probe_cfg, envs, pre, seed=seed)
        remaining = n_pairs
        while remaining > 0:
            batch, _ = collect_one(collector, agent.policy, agent.value_net)
            take = min(remaining, len(batch))
            remaining -= take
            whole = take == len(batch) or not exact
            yield batch if whole else batch.select(batch.head_index(take))
    finally:
        envs.close()


def sample_batch(agent: Agent, n_pairs: int, seed: int, **kwargs) -> Batch:
    """All ``n_pairs`` fresh pairs in one batch (use :func:`batch_chunks` to stream)."""
    parts = list(batch_chunks(agent, n_pairs, seed, **kwargs))
    return parts[0] if len(parts) == 1 else Batch.concat(parts)  # one part keeps its layout
