"""``pgscope evaluate``: the mean return of a checkpoint's policy over fresh episodes, with
a percentile-bootstrap confidence interval over episodes, and optionally a video.

The agent is loaded with :func:`pgscope.load_agent`; its observation statistics are frozen
(``Agent.act`` never updates them), so evaluating never changes the agent. Actions are
clipped to the action bounds when the run clipped them in training (``action_clip``).
Episodes start from ``env.reset(seed=seed + i)``, so an evaluation is reproducible.

Videos are rendered offscreen (``render_mode="rgb_array"``). MuJoCo envs need an OpenGL
backend: ``MUJOCO_GL=egl`` (the default set here; Debian packages libegl1, libegl-mesa0
and libgl1-mesa-dri give a software EGL without a GPU) or ``MUJOCO_GL=osmesa``
(libosmesa6). ``.mp4`` is written with imageio-ffmpeg, ``.gif`` with imageio.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from pgscope.errors import PgscopeError
from pgscope.seed_statistics import FEW_SAMPLES, few_samples_note

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
    space = env.action_space
    bounded = hasattr(space, "low") and cfg.action_clip
    rng = np.random.default_rng([seed, 0xE7A1])
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

    returns, lengths, cut = [], [], 0
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            record = video is not None and video_error is None and i < video_episodes
            if record:
                record = grab()
            total, steps, done = 0.0, 0, False
            while not done:
                action = agent.act(np.asarray(obs)[None], deterministic=deterministic,
                                   rng=rng)[0]
                if bounded:
                    action = np.clip(action, space.low, space.high)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                steps += 1
                done = terminated or truncated
                if steps >= MAX_EPISODE_STEPS and not done:
                    done, cut = True, cut + 1
                if record and steps % every == 0 and len(frames) < MAX_VIDEO_FRAMES:
                    record = grab()
            returns.append(total)
            lengths.append(steps)
    finally:
        env.close()
    x = np.array(returns)
    low, high = bootstrap_ci(x, level=level, seed=seed)
    ckpt_iteration = checkpoint
    if ckpt_iteration is None:
        from pgscope.run import load_checkpoint, resolve_checkpoint

        ckpt_iteration = int(load_checkpoint(resolve_checkpoint(Path(run_dir)))["iteration"])
    result: dict[str, Any] = dict(
        run=str(run_dir), env_id=cfg.env_id, preset=cfg.preset, checkpoint=ckpt_iteration,
        episodes=episodes, deterministic=deterministic, seed=seed, level=level,
        mean_return=float(x.mean()), ci_low=low, ci_high=high,
        std_return=float(x.std(ddof=1)) if len(x) > 1 else math.nan,
        returns=[float(r) for r in returns], lengths=lengths, episodes_cut=cut,
        ci_few_samples=few_samples_note(episodes, "episodes"))
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
