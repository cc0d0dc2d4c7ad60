"""``pgscope evaluate``: the mean return of a checkpoint's policy over fresh episodes, with
a percentile-bootstrap confidence interval over episodes, and optionally a video.

The agent is loaded with :func:`pgscope.load_agent`; its observation statistics are frozen
(the episodes are played by a copy of the agent with a frozen copy of its preprocessor),
so evaluating never changes the agent. Actions are clipped to the action bounds when the
run clipped them in training (``action_clip``). Episodes start from
``env.reset(seed=seed + i)``, so an evaluation is reproducible.

The evaluator is one piece, used by ``pgscope evaluate`` and by the evaluation during
training (:mod:`pgscope.periodic_eval`): :func:`play_episodes` plays the episodes with an
agent, :func:`summarize_returns` gives their mean and its bootstrap interval, and
:func:`evaluate_agent` does both for a live agent on a fresh env.

Videos are rendered offscreen (``render_mode="rgb_array"``). MuJoCo envs need an OpenGL
backend: ``MUJOCO_GL=egl`` (the default set here; Debian packages libegl1, libegl-mesa0
and libgl1-mesa-dri give a software EGL without a GPU) or ``MUJOCO_GL=osmesa``
(libosmesa6). ``.mp4`` is written with imageio-ffmpeg, ``.gif`` with imageio.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from pgscope.errors import PgscopeError
from pgscope.seed_statistics import FEW_SAMPLES, few_samples_note

if TYPE_CHECKING:
    from pgscope.agent import Agent

#: Longest episode an evaluation plays (env steps) when the env sets no time limit.
MAX_EPISODE_STEPS = 100_000
#: Frames per second of a written video, at most.
VIDEO_FPS = 30
#: Frames a video keeps at most (later frames are dropped, and the result says so).
MAX_VIDEO_FRAMES = 900


def bootstrap_ci(x: np.ndarray, level: float = 0.95, reps: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (resampling episodes)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _make_env(env_id: str, render: bool) -> Any:
    import gymnasium as gym

    kwargs: dict[str, Any] = {"render_mode": "rgb_array"} if render else {}
    try:
        return gym.make(env_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one clear message for any env failure
        raise PgscopeError(f"cannot make env '{env_id}'"
                           f"{' for rendering' if render else ''}: {exc}") from None


def _write_video(frames: list[np.ndarray], path: Path, fps: int) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    images: list[Any] = list(frames)
    if suffix == ".gif":
        imageio.mimwrite(path, images, duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        imageio.mimwrite(path, images, fps=fps, codec="libx264", quality=6,
                         macro_block_size=16)
    else:
        raise PgscopeError(f"video (--video) '{path}': write a .mp4 or a .gif file.")


@dataclass
class PlayedEpisodes:
    """The episodes an evaluation played: their undiscounted returns in the env's own
    reward units, their lengths, and how many were cut at :data:`MAX_EPISODE_STEPS`."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    cut: int = 0


#: ``watch(episode, step)`` of :func:`play_episodes`: called after an episode's reset
#: (``step`` 0) and after each of its steps, until it returns False for that episode.
Watch = Callable[[int, int], bool]


def frozen_copy(agent: Agent) -> Agent:
    """``agent`` (the same networks) with a frozen copy of its preprocessor: acting with
    it never changes the agent's observation or reward statistics."""
    return dataclasses.replace(agent,
                               preprocessor=agent.preprocessor.with_frozen_statistics(1))


def play_episodes(agent: Agent, env: Any, episodes: int, *, deterministic: bool = True,
                  seed: int = 0, watch: Watch | None = None) -> PlayedEpisodes:
    """Play ``episodes`` episodes on ``env`` with a :func:`frozen_copy` of ``agent``:
    episode ``i`` starts from ``env.reset(seed=seed + i)``; actions are the policy's
    mean/mode (``deterministic``) or samples from a generator seeded with ``seed``, clipped
    to the action bounds when the run clipped them (``action_clip``). The agent is never
    changed, and no other random state (torch's, NumPy's global one) is drawn from."""
    player = frozen_copy(agent)
    space = env.action_space
    bounded = hasattr(space, "low") and agent.config.action_clip
    rng = np.random.default_rng([seed, 0xE7A1])
    out = PlayedEpisodes()
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        watching = watch is not None and watch(i, 0)
        total, steps, done = 0.0, 0, False
        while not done:
            action = player.act(np.asarray(obs)[None], deterministic=deterministic,
                                rng=rng)[0]
            if bounded:
                action = np.clip(action, space.low, space.high)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            done = terminated or truncated
            if steps >= MAX_EPISODE_STEPS and not done:
                done, out.cut = True, out.cut + 1
            if watching:
                assert watch is not None
                watching = watch(i, steps)
        out.returns.append(total)
        out.lengths.append(steps)
    return out


def summarize_returns(returns: list[float], level: float = 0.95, seed: int = 0
                      ) -> dict[str, Any]:
    """The mean of ``returns`` with its percentile-bootstrap interval over episodes
    (:func:`bootstrap_ci`, resampled with ``seed``), their std, and the note that flags an
    interval over fewer than :data:`pgscope.seed_statistics.FEW_SAMPLES` episodes (None
    otherwise)."""
    x = np.asarray(returns, dtype=np.float64)
    low, high = bootstrap_ci(x, level=level, seed=seed)
    return dict(mean_return=float(x.mean()), ci_low=low, ci_high=high,
                std_return=float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                ci_few_samples=few_samples_note(len(x), "episodes"))


def _summary(played: PlayedEpisodes, deterministic: bool, seed: int, level: float
             ) -> dict[str, Any]:
    """The fields of an evaluation's result that do not name a run."""
    from pgscope.reliability import fixed_policy_reliability

    stats = summarize_returns(played.returns, level=level, seed=seed)
    note = stats.pop("ci_few_samples")
    return dict(episodes=len(played.returns), deterministic=deterministic, seed=seed,
                level=level, **stats, returns=[float(r) for r in played.returns],
                lengths=played.lengths, episodes_cut=played.cut, ci_few_samples=note,
                reliability=fixed_policy_reliability(played.returns, level=level, seed=seed))


def evaluate_agent(agent: Agent, episodes: int = 10, deterministic: bool = True,
                   seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Evaluate a live ``agent`` as :func:`evaluate` evaluates a checkpoint: ``episodes``
    episodes (:func:`play_episodes`) on a fresh env of its config's ``env_id``, their mean
    return, bootstrap interval (``level``), std, returns, lengths and the few-samples note.
    The same agent saved as a checkpoint gives the same numbers from :func:`evaluate`."""
    if episodes < 1:
        raise PgscopeError(f"episodes must be at least 1, got {episodes}.")
    env = _make_env(agent.config.env_id, render=False)
    try:
        played = play_episodes(agent, env, episodes, deterministic=deterministic, seed=seed)
    finally:
        env.close()
    return _summary(played, deterministic, seed, level)


def evaluate(run_dir: str | Path, checkpoint: int | None = None, episodes: int = 10,
             deterministic: bool = True, seed: int = 0, video: str | Path | None = None,
             video_episodes: int = 1, level: float = 0.95) -> dict[str, Any]:
    """Play ``episodes`` episodes with a run's policy (``checkpoint``: a kept iteration,
    default the latest; ``deterministic``: the policy's mean/mode, the default as for
    :meth:`pgscope.agent.Agent.act`, or sampled actions) and return the returns, their
    mean and a bootstrap CI; with
    ``video``, the first ``video_episodes`` episodes are rendered into that file."""
    from pgscope import load_agent

    if episodes < 1:
        raise PgscopeError(f"episodes (--episodes) must be at least 1, got {episodes}.")
    if video is not None and video_episodes < 1:
        raise PgscopeError(f"video_episodes (--video-episodes) must be at least 1, got "
                           f"{video_episodes}.")
    if video is not None and Path(video).suffix.lower() not in (".mp4", ".gif"):
        raise PgscopeError(f"video (--video) '{video}': write a .mp4 or a .gif file.")
    if video is not None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo creates a GL context
    agent = load_agent(run_dir, checkpoint)
    cfg = agent.config
    env = _make_env(cfg.env_id, render=video is not None)
    fps = min(VIDEO_FPS, int(env.metadata.get("render_fps") or VIDEO_FPS))
    every = max(1, round((env.metadata.get("render_fps") or fps) / fps))
    frames: list[np.ndarray] = []
    video_error: str | None = None

    def grab() -> bool:
        """Add a frame; False (and ``video_error`` set) when the env cannot render for
        want of an optional dependency: the evaluation goes on without a video."""
        nonlocal video_error
        try:
            frames.append(np.asarray(env.render()))
        except gym.error.DependencyNotInstalled as exc:
            video_error = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def record(episode: int, step: int) -> bool:
        """The first ``video_episodes`` episodes: a frame at the reset and every
        ``every``-th step, up to :data:`MAX_VIDEO_FRAMES`."""
        if video_error is not None or episode >= video_episodes:
            return False
        if step and (step % every or len(frames) >= MAX_VIDEO_FRAMES):
            return True
        return grab()

    try:
        played = play_episodes(agent, env, episodes, deterministic=deterministic, seed=seed,
                               watch=record if video is not None else None)
    finally:
        env.close()
    ckpt_iteration = checkpoint
    if ckpt_iteration is None:
        from pgscope.run import load_checkpoint, resolve_checkpoint

        ckpt_iteration = int(load_checkpoint(resolve_checkpoint(Path(run_dir)))["iteration"])
    result: dict[str, Any] = dict(
        run=str(run_dir), env_id=cfg.env_id, preset=cfg.preset, checkpoint=ckpt_iteration,
        **_summary(played, deterministic, seed, level))
    if video is not None and video_error is not None:
        result["video_error"] = video_error
    elif video is not None:
        _write_video(frames, Path(video), fps)
        result.update(video=str(video), video_frames=len(frames), video_fps=fps,
                      video_truncated=len(frames) >= MAX_VIDEO_FRAMES)
    return result


def format_evaluation(r: dict[str, Any]) -> str:
    """What ``pgscope evaluate`` prints."""
    mode = "deterministic (mean action)" if r["deterministic"] else "stochastic (sampled)"
    lines = [f"{r['env_id']} {r['preset']} checkpoint {r['checkpoint']}: mean return "
             f"{r['mean_return']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
             f"({100 * r['level']:g}% bootstrap CI over {r['episodes']} episodes, {mode}, "
             f"seeds {r['seed']}..{r['seed'] + r['episodes'] - 1})",
             f"  returns: min {min(r['returns']):.2f}, max {max(r['returns']):.2f}; mean "
             f"length {np.mean(r['lengths']):.0f} steps"]
    rel = r.get("reliability")
    if rel:  # Chan et al. (2020) across rollouts of the fixed policy
        lines.append(f"  across episodes: dispersion (IQR, DF) {rel['DF']:.2f} "
                     f"[{rel['DF_low']:.2f}, {rel['DF_high']:.2f}], risk (CVaR of the worst "
                     f"{100 * rel['alpha']:g}%, RF) {rel['RF']:.2f} [{rel['RF_low']:.2f}, "
                     f"{rel['RF_high']:.2f}]")
    if r.get("ci_few_samples"):
        lines.append(f"  note: {r['ci_few_samples']}; use --episodes {FEW_SAMPLES} or more")
    if r["episodes_cut"]:
        lines.append(f"  {r['episodes_cut']} episode(s) cut at {MAX_EPISODE_STEPS} steps")
    if "video_error" in r:
        lines.append(f"  video: not written, the env cannot render here ({r['video_error']})")
    if "video" in r:
        lines.append(f"  video: {r['video']} ({r['video_frames']} frames at {r['video_fps']} "
                     "fps" + (", truncated" if r["video_truncated"] else "") + ")")
    return "\n".join(lines)
