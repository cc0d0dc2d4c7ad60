"""The offline dataset of the DR3 experiment and its Monte Carlo Q reference.

A dataset is a directory::

    dataset.json   metadata: checkpoint, iteration, env, seed, transitions, gamma, the
                   reference's settings, pgscope version
    dataset.pt     tensors (``torch.load(..., weights_only=True)``)

**Transitions.** The checkpoint's *stochastic* policy (the behaviour policy ``pi``) runs in
one env for ``transitions`` steps, observations preprocessed with the run's frozen
statistics (as the policy saw them in training). Per transition ``t``: ``obs`` and
``obs_raw``, ``action`` (what the env received: clipped to the bounds when the run clipped
them), ``reward`` (the env's raw reward), ``next_obs`` / ``next_obs_raw`` (the true next
observation; at a time-limit truncation the final one, not the reset one),
``terminated``, ``truncated`` (both true for a termination on the time limit's last step:
termination wins, the backup stops), ``episode`` and ``step`` (index within the episode), and
``next_action``: the dataset's own ``a'`` (the action taken at ``t + 1``) while the
episode goes on in the dataset; where it does not (termination, truncation, the end of
the dataset) a sample of ``pi(.|s')`` drawn at collection, flagged in
``next_action_sampled``. So that offline TD can draw a fresh ``a' ~ pi(.|s')`` at every
gradient step without running the policy network, the behaviour policy at every ``s'`` is
stored: the Gaussian's mean ``next_mean`` and its state-independent ``std`` (plus the
clip bounds ``low``/``high`` when the run clipped actions), or the categorical
``next_logits``.

**Reference.** ``heldout_episodes`` separate episodes (other env seeds) of the same policy.
Along each, every ``reference_stride``-th state ``s_t`` (``t = 0, stride, 2 stride, ...``)
with the action ``a_t`` the episode took is a reference pair; its
``Q^pi(s_t, a_t)`` is the mean discounted return of ``reference_rollouts`` rollouts that
restore the env's exact state at ``s_t`` (:func:`pgscope.envs.state.env_state`; MuJoCo's
full integration state), take ``a_t`` and then follow ``pi``.

*Truncation rule.* The Q-network learns the infinite-horizon ``Q^pi`` (a time limit does
not terminate), so each reference rollout runs ``horizon`` steps from ``(s_t, a_t)``
(default: the env's time limit, 1000 for Hopper), counted from ``s_t``, whatever ``t``
was: the env's own time limit is not applied, only termination ends a rollout earlier.
What this drops is at most ``gamma^horizon * max|r| / (1 - gamma)``
(``0.99^1000 = 4.3e-5`` times ``max|r| / (1 - gamma)``), recorded as
``reference_tail_bound``. Envs without a time limit use 1000 unless told.
The held-out episodes' own discounted returns from their start are kept too
(``heldout_returns``; they are cut at the time limit, unlike the rollouts).
"""

from __future__ import annotations

import datetime
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from pgscope.errors import PgscopeError

DATA_FILE = "dataset.pt"
META_FILE = "dataset.json"
FORMAT = "pgscope-dr3-dataset"


class OfflineError(PgscopeError):
    """Bad input to the offline DR3 experiment (dataset, variants, settings)."""


@dataclass
class OfflineDataset:
    """A loaded dataset: ``tensors`` (see the module doc) and its ``meta``data."""

    tensors: dict[str, Any]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.tensors["reward"].shape[0])

    @property
    def discrete(self) -> bool:
        return bool(self.meta["discrete"])

    @property
    def gamma(self) -> float:
        return float(self.meta["gamma"])

    @property
    def reference(self) -> dict[str, torch.Tensor]:
        ref: dict[str, torch.Tensor] = self.tensors["reference"]
        return ref


class BehaviourPolicy:
    """``pi(.|s)`` of a loaded agent as the dataset sees it: preprocessing with frozen
    statistics, a stochastic sample, and the action the env receives."""

    def __init__(self, agent: Any, action_space: gym.Space[Any]) -> None:
        self.agent = agent
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.sample_raw = agent.policy.numpy_sampler()
        self.clip = (not self.discrete and bool(agent.config.action_clip))
        self.low = getattr(action_space, "low", None)
        self.high = getattr(action_space, "high", None)

    def preprocess(self, raw_obs: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.agent.preprocessor.obs(np.asarray(raw_obs), update=False)
        return out

    def env_action(self, action: np.ndarray) -> np.ndarray:
        """What the env receives (clipped when the run clipped its actions)."""
        if self.clip:
            return np.clip(action, self.low, self.high)
        return action

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Env actions ``a ~ pi(.|s)`` for a batch of preprocessed observations."""
        return self.env_action(self.sample_raw(obs, rng))

    @torch.no_grad()
    def describe(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The policy at every row of ``obs`` (preprocessed): what TD samples from."""
        dist = self.agent.policy.dist(obs)
        if self.discrete:
            return {"next_logits": dist.logits.float()}
        out = {"next_mean": dist.mean.float(), "std": dist.stddev[0].float()}
        if self.clip:
            out["low"] = torch.as_tensor(self.low, dtype=torch.float32)
            out["high"] = torch.as_tensor(self.high, dtype=torch.float32)
        return out


def _step(env: gym.Env[Any, Any], action: np.ndarray, discrete: bool
          ) -> tuple[np.ndarray, float, bool, bool]:
    obs, reward, terminated, truncated, _ = env.step(int(action) if discrete else action)
    return np.asarray(obs), float(reward), bool(terminated), bool(truncated)


def collect_transitions(policy: BehaviourPolicy, env_id: str, n: int, seed: int,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """``n`` transitions of ``policy`` in ``env_id`` (module doc: the fields)."""
    from pgscope.envs import make_env

    env = make_env(env_id)
    rng = np.random.default_rng(seed)
    obs_dim = int(np.prod(env.observation_space.shape or ()))
    act_shape = () if policy.discrete else tuple(env.action_space.shape or ())
    obs_raw = np.zeros((n, obs_dim), np.float64)
    next_raw = np.zeros((n, obs_dim), np.float64)
    actions = np.zeros((n, *act_shape), np.int64 if policy.discrete else np.float32)
    rewards = np.zeros(n, np.float64)
    terminated = np.zeros(n, bool)
    truncated = np.zeros(n, bool)
    episode = np.zeros(n, np.int64)
    step = np.zeros(n, np.int64)
    raw, _ = env.reset(seed=seed)
    ep, t_ep = 0, 0
    try:
        for t in tqdm(range(n), desc="dataset", unit="step", disable=not progress,
                      mininterval=1.0):
            obs_raw[t] = raw
            action = policy.sample(policy.preprocess(raw[None]), rng)[0]
            actions[t] = action
            nxt, rewards[t], terminated[t], truncated[t] = _step(env, action, policy.discrete)
            next_raw[t], episode[t], step[t] = nxt, ep, t_ep
            t_ep += 1
            if terminated[t] or truncated[t]:
                raw, _ = env.reset()
                ep, t_ep = ep + 1, 0
            else:
                raw = nxt
    finally:
        env.close()
    obs = policy.preprocess(obs_raw)
    next_obs = policy.preprocess(next_raw)
    # a' of the dataset where the episode continues in it; else a sample of pi(.|s')
    continues = np.zeros(n, bool)
    continues[:-1] = ~(terminated[:-1] | truncated[:-1])
    next_action = np.empty_like(actions)
    next_action[:-1] = actions[1:]
    sampled = ~continues
    next_action[sampled] = policy.sample(next_obs[sampled], rng)
    return {
        "obs": torch.from_numpy(obs), "obs_raw": torch.from_numpy(obs_raw.astype(np.float32)),
        "action": torch.from_numpy(actions), "reward": torch.from_numpy(rewards.astype(np.float32)),
        "next_obs": torch.from_numpy(next_obs),
        "next_obs_raw": torch.from_numpy(next_raw.astype(np.float32)),
        "next_action": torch.from_numpy(next_action),
        "next_action_sampled": torch.from_numpy(sampled),
        "terminated": torch.from_numpy(terminated), "truncated": torch.from_numpy(truncated),
        "episode": torch.from_numpy(episode), "step": torch.from_numpy(step),
        **policy.describe(torch.from_numpy(next_obs)),
    }


def _rollout_returns(envs: list[gym.Env[Any, Any]], policy: BehaviourPolicy,
                     action: np.ndarray, gamma: float, horizon: int,
                     rng: np.random.Generator) -> list[float]:
    """Discounted returns of taking ``action`` in each env's current state, then following
    ``policy``, for at most ``horizon`` steps or until termination (the env's own time
    limit is bypassed: the module doc's truncation rule). The envs step side by side, the
    policy sampling for all of them at once."""
    totals = np.zeros(len(envs))
    alive = list(range(len(envs)))
    actions = np.stack([action] * len(envs))
    discount = 1.0
    for _ in range(horizon):
        next_obs, still = [], []
        for i in alive:
            obs, reward, terminated, _, _ = envs[i].unwrapped.step(
                int(actions[i]) if policy.discrete else actions[i])
            totals[i] += discount * float(reward)
            if not terminated:
                still.append(i)
                next_obs.append(np.asarray(obs))
        discount *= gamma
        alive = still
        if not alive:
            break
        actions[alive] = policy.sample(policy.preprocess(np.stack(next_obs)), rng)
    return totals.tolist()


def monte_carlo_reference(policy: BehaviourPolicy, env_id: str, *, episodes: int, stride: int,
                          rollouts: int, gamma: float, horizon: int, seed: int,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """The Q reference of the module doc: ``obs`` (preprocessed), ``action``, ``q`` (mean
    of the rollouts' discounted returns), ``q_se`` (its standard error), ``episode``,
    ``step``, and per held-out episode ``heldout_returns`` (discounted from its start, cut
    at the time limit) and ``heldout_lengths``."""
    from pgscope.envs import make_env
    from pgscope.envs.state import env_state, savable, set_env_state

    env, twins = make_env(env_id), [make_env(env_id) for _ in range(rollouts)]
    if not savable(env):
        raise OfflineError(f"env '{env_id}' cannot be saved exactly (pgscope.envs.state), so "
                           "the Monte Carlo Q reference cannot restore its states; use a "
                           "MuJoCo or classic-control env.")
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("obs", "action", "q", "q_se", "episode",
                                                   "step")}
    returns, lengths = [], []
    bar = tqdm(total=episodes, desc="Q reference", unit="episode", disable=not progress)
    try:
        for k in range(episodes):
            raw, _ = env.reset(seed=seed + k)
            for twin in twins:
                twin.reset(seed=seed + k)
            t, ret, done = 0, 0.0, False
            while not done:
                obs = policy.preprocess(np.asarray(raw)[None])
                action = policy.sample(obs, rng)[0]
                if t % stride == 0:
                    snapshot = env_state(env)
                    assert snapshot is not None
                    for twin in twins:
                        set_env_state(twin, snapshot)
                        # fresh env randomness per rollout (the snapshot restores the RNG)
                        twin.unwrapped.np_random = np.random.default_rng(
                            int(rng.integers(2**63)))
                    values = _rollout_returns(twins, policy, action, gamma, horizon, rng)
                    rows["obs"].append(obs[0])
                    rows["action"].append(action)
                    rows["q"].append(float(np.mean(values)))
                    rows["q_se"].append(float(np.std(values, ddof=1) / math.sqrt(rollouts))
                                        if rollouts > 1 else float("nan"))
                    rows["episode"].append(k)
                    rows["step"].append(t)
                raw, reward, terminated, truncated = _step(env, action, policy.discrete)
                ret += gamma ** t * reward
                t += 1
                done = terminated or truncated
            returns.append(ret)
            lengths.append(t)
            bar.update()
    finally:
        bar.close()
        env.close()
        for twin in twins:
            twin.close()
    return {"obs": torch.from_numpy(np.stack(rows["obs"])),
            "action": torch.from_numpy(np.stack(rows["action"])),
            **{key: torch.tensor(rows[key], dtype=torch.float64) for key in ("q", "q_se")},
            **{key: torch.tensor(rows[key], dtype=torch.int64) for key in ("episode", "step")},
            "heldout_returns": torch.tensor(returns, dtype=torch.float64),
            "heldout_lengths": torch.tensor(lengths, dtype=torch.int64)}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OfflineError(f"--out '{out}' is a file; a dataset is a directory.")
    if (out / META_FILE).exists():
        raise OfflineError(f"'{out}' already holds a dataset; choose another --out (or "
                           "delete it).")


def _check_settings(transitions: int, gamma: float, heldout_episodes: int,
                    reference_stride: int, reference_rollouts: int,
                    horizon: int | None) -> None:
    for name, value, low in (("--transitions", transitions, 2),
                             ("--heldout-episodes", heldout_episodes, 1),
                             ("--reference-stride", reference_stride, 1),
                             ("--reference-rollouts", reference_rollouts, 1)):
        if value < low:
            raise OfflineError(f"{name} must be at least {low}, got {value}.")
    if not 0.0 < gamma < 1.0:
        raise OfflineError(f"--gamma must lie in (0, 1), got {gamma}.")
    if horizon is not None and horizon < 1:
        raise OfflineError(f"--horizon must be at least 1, got {horizon}.")


def make_dataset(agent: Any, *, transitions: int = 200_000, seed: int = 0,
                 gamma: float = 0.99, heldout_episodes: int = 20, reference_stride: int = 100,
                 reference_rollouts: int = 5, horizon: int | None = None,
                 progress: bool = True) -> OfflineDataset:
    """The dataset of the module doc for a loaded ``agent`` (its ``config.env_id``), in
    memory: transitions, the behaviour policy at every ``s'`` and the Q reference."""
    from pgscope import __version__
    from pgscope.envs import make_env

    _check_settings(transitions, gamma, heldout_episodes, reference_stride,
                    reference_rollouts, horizon)
    env_id = agent.config.env_id
    probe_env = make_env(env_id)
    try:
        policy = BehaviourPolicy(agent, probe_env.action_space)
        limit = probe_env.spec.max_episode_steps if probe_env.spec is not None else None
    finally:
        probe_env.close()
    horizon = horizon or limit or 1000
    tensors: dict[str, Any] = dict(collect_transitions(policy, env_id, transitions, seed,
                                                       progress))
    reference = monte_carlo_reference(
        policy, env_id, episodes=heldout_episodes, stride=reference_stride,
        rollouts=reference_rollouts, gamma=gamma, horizon=horizon, seed=seed + 1_000_003,
        progress=progress)
    tensors["reference"] = reference
    r_max = float(tensors["reward"].abs().max())
    meta = {
        "format": FORMAT, "pgscope_version": __version__, "env_id": env_id, "seed": seed,
        "transitions": transitions, "episodes": int(tensors["episode"][-1]) + 1,
        "discrete": policy.discrete, "action_clip": policy.clip, "gamma": gamma,
        "obs_dim": int(tensors["obs"].shape[1]),
        "action_dim": (int(tensors["next_logits"].shape[1]) if policy.discrete
                       else int(tensors["action"].shape[1])),
        "reference": {"episodes": heldout_episodes, "stride": reference_stride,
                      "rollouts": reference_rollouts, "horizon": horizon,
                      "pairs": int(reference["q"].shape[0]),
                      "tail_bound": gamma ** horizon * r_max / (1 - gamma),
                      "seed": seed + 1_000_003},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
    }
    return OfflineDataset(tensors, meta)


def collect_dataset(run_dir: str | Path, out: str | Path, *, transitions: int = 200_000,
                    checkpoint: int | None = None, seed: int = 0, gamma: float = 0.99,
                    heldout_episodes: int = 20, reference_stride: int = 100,
                    reference_rollouts: int = 5, horizon: int | None = None,
                    progress: bool = True) -> Path:
    """Collect a dataset from a run's checkpoint (latest, or the one kept at
    ``checkpoint``) into the directory ``out``: :func:`make_dataset`, with the checkpoint
    recorded in the metadata. Every input is checked before anything runs."""
    from pgscope.run import load_agent, load_checkpoint, resolve_checkpoint

    out = Path(out)
    _check_settings(transitions, gamma, heldout_episodes, reference_stride,
                    reference_rollouts, horizon)
    _check_out(out)
    ckpt_path = resolve_checkpoint(Path(run_dir), checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    agent = load_agent(run_dir, checkpoint)
    data = make_dataset(agent, transitions=transitions, seed=seed, gamma=gamma,
                        heldout_episodes=heldout_episodes, reference_stride=reference_stride,
                        reference_rollouts=reference_rollouts, horizon=horizon,
                        progress=progress)
    data.meta.update({"run": str(run_dir), "checkpoint_file": str(ckpt_path),
                      "iteration": int(ckpt["iteration"]), "env_steps": int(ckpt["env_steps"])})
    save_dataset(data, out)
    return out


def save_dataset(data: OfflineDataset, out: str | Path) -> None:
    """Write ``data`` into the directory ``out`` (tensors first, metadata last: a
    directory with metadata holds a complete dataset)."""
    from pgscope.run import atomic_write_bytes, atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(data.tensors, buffer)
    atomic_write_bytes(out / DATA_FILE, buffer.getvalue())
    atomic_write_json(out / META_FILE, data.meta)


def load_dataset(path: str | Path) -> OfflineDataset:
    """A dataset directory written by :func:`collect_dataset` (``weights_only=True``)."""
    path = Path(path)
    if not (path / META_FILE).exists() or not (path / DATA_FILE).exists():
        raise OfflineError(f"'{path}' is not a DR3 dataset directory (no {META_FILE} and "
                           f"{DATA_FILE}); make one with 'pgscope dr3 dataset RUN --out DIR'.")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise OfflineError(f"'{path / META_FILE}' is not a DR3 dataset's metadata.")
    try:
        tensors = torch.load(path / DATA_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        raise OfflineError(f"'{path / DATA_FILE}' is corrupt or unsafe "
                           f"({type(exc).__name__}).") from None
    return OfflineDataset(tensors, meta)
