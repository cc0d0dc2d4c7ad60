"""The per-step work of N seeds' rollouts as array operations over a stacked seed axis.

:class:`pgscope.rollout.RolloutCollector` does one env step of one seed: step its vector
env, check the outcome is finite, scale the reward, keep the episode returns, normalize the
next observation. The engine's rollout does the same for N seeds at once on arrays of
shape ``[seeds, envs, ...]``, each piece here bit-identical per seed to the single
collector's (tests/test_batched_rollout.py):

- :class:`StackedRunningMeanStd`: N :class:`pgscope.optimizations.RunningMeanStd` updated
  at once (the batch mean and variance reduce over each seed's own envs, in the same order);
- :class:`StackedPreprocessor`: N :class:`pgscope.rollout.Preprocessor`, observation
  normalization and clipping, reward multiplier, scaling and clipping;
- :func:`step_envs`: every seed's envs stepped with the same-step autoreset of gymnasium's
  ``SyncVectorEnv`` (the env calls and random numbers it makes), without its per-call
  batching of spaces and infos, and for gymnasium's MuJoCo locomotion envs all of them in
  one :class:`pgscope.envs.batch_step.LocomotionBatch` step;
- :func:`first_non_finite`: the single collector's :class:`NonFiniteEnvError` of each seed
  whose env returned a NaN or infinite value;
- :class:`StackedEpisodes`: the running episode returns and lengths.

Each piece reads its state from the seeds' own objects and writes it back
(``write_back``), so at the end of a rollout every collector and preprocessor holds exactly
the state its single run would hold (checkpoints, probes and resume read it there).
"""

from __future__ import annotations

from collections.abc import Container, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from pgscope.envs.batch_step import LocomotionBatch
from pgscope.optimizations import (
    RunningMeanStd,
    clip_actions,
    clip_observations,
    clip_rewards,
    combine_moments,
    multiply_rewards,
)
from pgscope.rollout import (
    FinishedEpisodes,
    NonFiniteEnvError,
    Preprocessor,
    RolloutCollector,
    check_finite_env_output,
)

__all__ = ["StackedEpisodes", "StackedPreprocessor", "StackedRunningMeanStd",
           "clip_stacked_actions", "first_non_finite", "step_envs"]


class StackedRunningMeanStd:
    """N :class:`RunningMeanStd` of one shape as one: ``mean`` and ``var`` are
    ``[N, 1, *shape]`` (the 1 broadcasts over a seed's envs), ``count`` is ``[N]``.

    :meth:`update` is Chan et al.'s parallel update of :meth:`RunningMeanStd.update`, term
    for term, on each seed's own batch ``x[i]``; elementwise operations are exact per
    element and the batch mean/variance reduce over each seed's envs as the single update
    reduces over its batch, so each seed's statistics are bit-identical to its own."""

    def __init__(self, stats: Sequence[RunningMeanStd]) -> None:
        self.stats = list(stats)
        self.mean = np.stack([np.asarray(s.mean, dtype=np.float64)[None] for s in stats])
        self.var = np.stack([np.asarray(s.var, dtype=np.float64)[None] for s in stats])
        self.count = np.array([s.count for s in stats], dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Update seed ``i``'s statistics with the batch ``x[i]`` (``x``: ``[N, n, ...]``)."""
        n = x.shape[1]
        if n == 1:
            batch_mean, batch_var = x, 0.0
        else:
            batch_mean, batch_var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
        count = self.count.reshape(-1, *(1,) * (self.mean.ndim - 1))
        self.mean, self.var, total = combine_moments(self.mean, self.var, count, batch_mean,
                                                     batch_var, n)
        self.count = total.reshape(-1)

    def write_back(self, seeds: Sequence[int] | None = None) -> None:
        """Store the statistics in the seeds' own :class:`RunningMeanStd` (all by default)."""
        for i in range(len(self.stats)) if seeds is None else seeds:
            stats = self.stats[i]
            stats.mean = self.mean[i, 0].copy()
            stats.var = self.var[i, 0].copy()
            stats.count = float(self.count[i])


class StackedPreprocessor:
    """N seeds' :class:`Preprocessor` (one config) applied to stacked ``[N, envs, ...]``
    arrays: the same operations in the same order as :meth:`Preprocessor.obs` and
    :meth:`Preprocessor.reward`, bit-identical per seed."""

    def __init__(self, pres: Sequence[Preprocessor]) -> None:
        def switches(pre: Preprocessor) -> tuple[object, ...]:
            return (pre.obs_norm is None, pre.obs_clip, pre.reward_scaler is None,
                    pre.reward_clip, pre.cfg.reward_multiplier, pre.cfg.gamma,
                    pre.cfg.num_envs, pre.statistics_frozen)

        first = pres[0]
        if any(switches(pre) != switches(first) for pre in pres[1:]):
            raise ValueError("the preprocessors of a stacked rollout must be switched "
                             "alike (one config, differing only in seed)")
        self.pres = list(pres)
        self.update_statistics = not first.statistics_frozen
        self.obs_clip = first.obs_clip
        self.reward_clip = first.reward_clip
        self.reward_multiplier = first.cfg.reward_multiplier
        self.obs_stats = obs_stats = None if first.obs_norm is None else StackedRunningMeanStd(
            [p.obs_norm.rms for p in pres if p.obs_norm is not None])
        self.obs_epsilon = 0.0 if first.obs_norm is None else first.obs_norm.epsilon
        scalers = [p.reward_scaler for p in pres if p.reward_scaler is not None]
        self.reward_stats = StackedRunningMeanStd([s.rms for s in scalers]) if scalers else None
        self.gamma = scalers[0].gamma if scalers else 0.0
        self.reward_epsilon = scalers[0].epsilon if scalers else 0.0
        self.ret = np.stack([s.ret for s in scalers]) if scalers else None
        # sqrt(var + epsilon) of ObsNormalizer.__call__, computed once per update
        self._obs_scale = np.ones(()) if obs_stats is None else np.sqrt(
            obs_stats.var + self.obs_epsilon)

    def obs(self, raw: np.ndarray, update: bool) -> np.ndarray:
        """:meth:`Preprocessor.obs` of every seed: ``raw`` ``[N, envs, ...]`` -> float32."""
        out = raw.astype(np.float64)
        stats = self.obs_stats
        if stats is not None:
            if update and self.update_statistics:
                stats.update(out)
                self._obs_scale = np.sqrt(stats.var + self.obs_epsilon)
            out = (out - stats.mean) / self._obs_scale
        return clip_observations(out, self.obs_clip).astype(np.float32)

    def obs_of(self, seed: int, raw: np.ndarray) -> np.ndarray:
        """Seed ``seed``'s :meth:`Preprocessor.obs` of ``raw`` ``[k, ...]`` without an
        update (the final observation of a truncated episode)."""
        out = raw.astype(np.float64)
        if self.obs_stats is not None:
            out = (out - self.obs_stats.mean[seed]) / self._obs_scale[seed]
        return clip_observations(out, self.obs_clip).astype(np.float32)

    def reward(self, raw: np.ndarray, done: np.ndarray) -> np.ndarray:
        """:meth:`Preprocessor.reward` of every seed: ``raw``, ``done`` ``[N, envs]``."""
        out = multiply_rewards(raw.astype(np.float64), self.reward_multiplier)
        stats = self.reward_stats
        if stats is not None and self.ret is not None:  # RewardScaler.__call__
            self.ret = self.ret * self.gamma + out
            if self.update_statistics:
                stats.update(self.ret)
            out = out / np.sqrt(stats.var + self.reward_epsilon)
            self.ret[done] = 0.0
        return clip_rewards(out, self.reward_clip)

    def write_back(self, seeds: Sequence[int] | None = None) -> None:
        """Store the statistics in the seeds' own preprocessors (all by default)."""
        if self.obs_stats is not None:
            self.obs_stats.write_back(seeds)
        if self.reward_stats is not None and self.ret is not None:
            self.reward_stats.write_back(seeds)
            for i in range(len(self.pres)) if seeds is None else seeds:
                scaler = self.pres[i].reward_scaler
                assert scaler is not None
                scaler.ret = self.ret[i].copy()


def clip_stacked_actions(actions: np.ndarray, collector: RolloutCollector) -> np.ndarray:
    """:func:`pgscope.optimizations.clip_actions` of every seed's ``[N, envs, act]``
    actions (the seeds share one action space and config)."""
    return clip_actions(actions, collector.low, collector.high, collector.cfg.action_clip)


def can_step_directly(envs: object) -> bool:
    """Whether :func:`step_envs` steps ``envs`` as its own ``step`` would: a gymnasium
    ``SyncVectorEnv`` with same-step autoreset (what :func:`pgscope.envs.make_vector_env`
    makes)."""
    return type(envs) is SyncVectorEnv and envs.autoreset_mode == AutoresetMode.SAME_STEP


def step_envs(vector_envs: Sequence[SyncVectorEnv], actions: np.ndarray,
              skip: Container[int] = frozenset(), batch: LocomotionBatch | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                         dict[tuple[int, int], np.ndarray], dict[int, Exception]]:
    """Step env ``j`` of seed ``i`` with ``actions[i, j]`` for every seed not in ``skip``,
    exactly as each seed's ``SyncVectorEnv.step`` (same-step autoreset) does: an env whose
    episode ends is reset at once, without a seed, and its last observation is kept.
    ``batch``: the same envs, seed-major (env ``j`` of seed ``i`` at ``i * envs + j``), as
    a :class:`pgscope.envs.batch_step.LocomotionBatch`; once it is ready the envs are
    stepped through it (the same results, without each env's per-step overhead).

    Returns the observations ``[N, envs, ...]`` (the observation space's dtype; reset ones
    where episodes ended), rewards (float64), terminated and truncated ``[N, envs]``, the
    final observations ``{(i, j): obs}`` of the episodes that ended, and ``{i: exception}``
    for the seeds whose env raised (their rows are zeros; stepped one by one, their envs
    stop at that env, as the vector env's ``step`` does; through ``batch`` the seed's
    other envs have stepped). Skipped seeds' rows are zeros too. Infos other than the
    final observation are not gathered (the rollout reads none)."""
    first = vector_envs[0]
    n, m = len(vector_envs), first.num_envs
    space = first.single_observation_space
    obs = np.zeros((n, m, *(space.shape or ())), dtype=space.dtype)
    rewards = np.zeros((n, m), dtype=np.float64)
    terminated = np.zeros((n, m), dtype=np.bool_)
    truncated = np.zeros((n, m), dtype=np.bool_)
    final: dict[tuple[int, int], np.ndarray] = {}
    failed: dict[int, Exception] = {}
    if batch is not None and batch.ready():
        rows = np.array([i * m + j for i in range(n) if i not in skip for j in range(m)],
                        dtype=np.int64)
        stepped = batch.step(actions.reshape(n * m, -1), rows.tolist())
        seed, col = np.divmod(rows, m)
        obs[seed, col], rewards[seed, col] = stepped[0], stepped[1]
        terminated[seed, col], truncated[seed, col], errors = stepped[2:]
        failed.update({k // m: exc for k, exc in errors.items()})
        for i in failed:
            obs[i], rewards[i], terminated[i], truncated[i] = 0, 0.0, False, False
        for i, j in zip(*np.nonzero(terminated | truncated), strict=True):
            final[int(i), int(j)] = obs[i, j].copy()
            obs[i, j], _ = vector_envs[i].envs[j].reset()
        return obs, rewards, terminated, truncated, final, failed
    for i, envs in enumerate(vector_envs):
        if i in skip:
            continue
        try:
            for j, env in enumerate(envs.envs):
                o, r, term, trunc, _ = env.step(actions[i, j])
                obs[i, j], rewards[i, j], terminated[i, j], truncated[i, j] = o, r, term, trunc
                if terminated[i, j] or truncated[i, j]:
                    final[i, j] = o
                    obs[i, j], _ = env.reset()
        except Exception as exc:  # noqa: BLE001 - the seed's own failure
            failed[i] = exc
            obs[i], rewards[i], terminated[i], truncated[i] = 0, 0.0, False, False
    return obs, rewards, terminated, truncated, final, failed


def first_non_finite(rewards: np.ndarray, obs: np.ndarray, steps_taken: Sequence[int],
                     skip: Container[int] = frozenset()
                     ) -> dict[int, NonFiniteEnvError]:
    """The :class:`NonFiniteEnvError` each seed's single collector raises for its stacked
    ``rewards`` ``[N, envs]`` and observations ``obs`` ``[N, envs, ...]`` (the reward is
    checked first), seeds in ``skip`` left out; one cheap check when all are finite."""
    if np.isfinite(rewards).all() and np.isfinite(obs).all():
        return {}
    errors: dict[int, NonFiniteEnvError] = {}
    for i in range(len(rewards)):
        if i in skip:
            continue
        try:
            check_finite_env_output(rewards[i], "reward", steps_taken[i])
            check_finite_env_output(obs[i], "observation", steps_taken[i])
        except NonFiniteEnvError as exc:
            errors[i] = exc
    return errors


class StackedEpisodes:
    """The running (raw, unscaled) episode returns and lengths of N seeds' envs,
    ``[N, envs]``, taken from and written back to their collectors."""

    def __init__(self, collectors: Sequence[RolloutCollector]) -> None:
        self.collectors = list(collectors)
        self.ep_return = np.stack([c.ep_return for c in collectors])
        self.ep_length = np.stack([c.ep_length for c in collectors])

    def step(self, rewards: np.ndarray, ended: np.ndarray,
             episodes: Sequence[FinishedEpisodes]) -> None:
        """Add a step's rewards; append the episodes that ended to each seed's
        ``episodes`` (in env order, as the single collector does) and restart them."""
        self.ep_return += rewards
        self.ep_length += 1
        if ended.any():
            for i, j in np.argwhere(ended):
                episodes[i].returns.append(float(self.ep_return[i, j]))
                episodes[i].lengths.append(int(self.ep_length[i, j]))
            self.ep_return[ended] = 0.0
            self.ep_length[ended] = 0

    def write_back(self, seeds: Sequence[int] | None = None) -> None:
        for i in range(len(self.collectors)) if seeds is None else seeds:
            self.collectors[i].ep_return = self.ep_return[i].copy()
            self.collectors[i].ep_length = self.ep_length[i].copy()
