"""The rollout as a single run took it before the engine stepped seeds in lockstep: one
seed, one env step at a time through gymnasium's ``SyncVectorEnv.step``, the
preprocessing of :class:`pgscope.rollout.Preprocessor` called per step. The reference
that :func:`pgscope.engine.rollout.collect_lockstep` must equal bit for bit for each seed
(tests/test_batched_rollout.py); written as plain functions of a ``RolloutCollector``."""

from __future__ import annotations

import numpy as np
import torch

from pgscope.networks import Policy, ValueNet
from pgscope.optimizations import clip_actions
from pgscope.rollout import (
    Batch,
    FinishedEpisodes,
    RolloutBuffers,
    RolloutCollector,
    check_finite_env_output,
)


@torch.no_grad()
def reference_collect(self: RolloutCollector, policy: Policy, value_net: ValueNet
                      ) -> tuple[Batch, FinishedEpisodes]:
    """One rollout of ``steps_per_env`` steps of every env of the collector ``self``,
    one env step of one seed at a time through the vector env's own ``step``."""
    buffers = self.start_rollout()
    sample = policy.numpy_sampler()
    for t in range(self.cfg.steps_per_env):
        step(self, buffers, t, sample(observe(self, buffers, t), self.rng))
    return self.finish_rollout(buffers, policy, value_net)

def observe(self: RolloutCollector, buffers: RolloutBuffers, t: int) -> np.ndarray:
    """The preprocessed observation of step ``t`` (statistics updated), stored."""
    buffers.obs[t] = self.pre.obs(self.raw_obs, update=True)
    return buffers.obs[t]

def step(self: RolloutCollector, buffers: RolloutBuffers, t: int, action: np.ndarray) -> None:
    """Step the envs with the sampled ``action`` of step ``t`` and store the outcome."""
    cfg, obs, next_obs, done = self.cfg, buffers.obs, buffers.next_obs, buffers.done
    buffers.actions[t] = action
    env_action = action if self.discrete else clip_actions(
        action, self.low, self.high, cfg.action_clip)
    self.raw_obs, r, term, trunc, info = self.envs.step(env_action)
    self.steps_taken += 1
    check_finite_env_output(r, "reward", self.steps_taken)
    check_finite_env_output(self.raw_obs, "observation", self.steps_taken)
    ended = term | trunc
    buffers.rewards[t] = self.pre.reward(np.asarray(r), ended)
    buffers.terminated[t], done[t] = term, ended
    self.ep_return += r
    self.ep_length += 1
    for i in np.flatnonzero(ended):
        buffers.episodes.returns.append(float(self.ep_return[i]))
        buffers.episodes.lengths.append(int(self.ep_length[i]))
        self.ep_return[i], self.ep_length[i] = 0.0, 0
        if trunc[i]:  # bootstrap from the true final state, not the reset one
            check_finite_env_output(info["final_obs"][i], "observation",
                                    self.steps_taken)
            next_obs[t, i] = self.pre.obs(info["final_obs"][i][None], update=False)[0]
    if t > 0:
        still = ~done[t - 1].astype(bool)
        next_obs[t - 1, still] = obs[t, still]

