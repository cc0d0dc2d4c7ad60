"""pgscope evaluate: mean return with a bootstrap CI over episodes from a checkpoint with its
frozen normalization, reproducible per seed; videos rendered offscreen (MuJoCo through
EGL: Debian's libegl1, libegl-mesa0, libgl1-mesa-dri, installed by 'make sysdeps') decode
and have frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pgscope import load_agent, make_config, train
from pgscope.cli import main
from pgscope.errors import PgscopeError
from pgscope.evaluate import bootstrap_ci, evaluate

TINY = dict(steps_per_iter=256, minibatches=4, epochs=2, hidden=(16,), checkpoint_every=2)


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "pendulum"
    cfg = make_config("ppo", "Pendulum-v1", {**TINY, "total_steps": 4 * 256, "seed": 3})
    return train(cfg, run, progress=False)


def _manual_returns(run, iteration, episodes, seed, deterministic):
    """The same episodes played by hand with the loaded agent (frozen statistics)."""
    import gymnasium as gym

    agent = load_agent(run, iteration)
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng([seed, 0xE7A1])
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            a = np.clip(agent.act(obs[None], deterministic=deterministic, rng=rng)[0],
                        env.action_space.low, env.action_space.high)
            obs, r, term, trunc, _ = env.step(a)
            total += float(r)
            done = term or trunc
        out.append(total)
    return out


@pytest.mark.parametrize("deterministic", [True, False])
def test_evaluate_matches_a_manual_rollout_of_the_checkpoint(pendulum_run, deterministic):
    res = evaluate(pendulum_run, checkpoint=2, episodes=3, deterministic=deterministic, seed=5)
    assert res["checkpoint"] == 2 and res["episodes"] == 3
    assert res["returns"] == pytest.approx(_manual_returns(pendulum_run, 2, 3, 5,
                                                           deterministic))
    assert res["lengths"] == [200, 200, 200]  # Pendulum's time limit
    assert res["ci_low"] <= res["mean_return"] <= res["ci_high"]
    assert res["mean_return"] == pytest.approx(np.mean(res["returns"]))
    again = evaluate(pendulum_run, checkpoint=2, episodes=3, deterministic=deterministic,
                     seed=5)
    assert again["returns"] == res["returns"]  # reproducible per seed


def test_evaluate_leaves_the_agent_unchanged(pendulum_run):
    before = load_agent(pendulum_run).preprocessor.state_dict()["obs_norm"]
    latest = evaluate(pendulum_run, episodes=2, seed=0)
    assert latest["checkpoint"] == 4  # the latest by default
    after = load_agent(pendulum_run).preprocessor.state_dict()["obs_norm"]
    for k in before:
        assert np.array_equal(np.asarray(before[k]), np.asarray(after[k]))


def test_bootstrap_ci_of_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, size=400)
    lo, hi = bootstrap_ci(x, seed=1)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.05)
    assert hi == pytest.approx(x.mean() + half, abs=0.05)
    assert bootstrap_ci(np.array([3.0])) == (3.0, 3.0)


def test_bad_arguments(pendulum_run, tmp_path):
    with pytest.raises(PgscopeError, match=r"^episodes \(--episodes\) must be at least 1, "
                                           "got 0"):  # the argument's name first (Python API)
        evaluate(pendulum_run, episodes=0)
    with pytest.raises(PgscopeError, match=r"\.mp4 or a \.gif"):
        evaluate(pendulum_run, episodes=1, video=tmp_path / "clip.avi")


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "hopper"
    cfg = make_config("ppo", "Hopper-v5", {**TINY, "total_steps": 256, "seed": 0})
    return train(cfg, run, progress=False)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_of_a_hopper_episode_decodes(hopper_run, tmp_path, suffix):
    import imageio.v2 as imageio

    clip = tmp_path / f"clip{suffix}"
    res = evaluate(hopper_run, episodes=1, deterministic=True, video=clip)
    assert clip.exists() and res["video_frames"] >= 2
    frames = [np.asarray(f) for f in imageio.mimread(clip, memtest=False)] \
        if suffix == ".gif" else [f for f in imageio.get_reader(clip)]  # no len(): inf
    assert len(frames) == res["video_frames"]
    assert frames[0].shape[:2] == (480, 480)
    assert np.asarray(frames[0]).std() > 5  # a rendered scene, not a blank frame
    # one frame per 4 env steps (125 fps rendered at ~30 fps), plus the reset frame
    assert res["video_frames"] == 1 + res["lengths"][0] // 4


def test_cli(pendulum_run, tmp_path, capsys):
    assert main(["evaluate", str(pendulum_run), "--episodes", "2", "--deterministic",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["episodes"] == 2 and out["deterministic"] is True
    assert main(["evaluate", str(pendulum_run), "--episodes", "2", "--checkpoint", "2"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint 2: mean return" in text and "bootstrap CI over 2 episodes" in text
    assert main(["evaluate", str(pendulum_run), "--checkpoint", "3"]) == 2  # not kept


def test_video_of_a_classic_control_episode(pendulum_run, tmp_path):
    """Pendulum renders through pygame, which the set-up installs (gymnasium's
    classic-control extra); the evaluation used to end in DependencyNotInstalled."""
    clip = tmp_path / "pendulum.gif"
    res = evaluate(pendulum_run, episodes=1, deterministic=True, video=clip)
    assert clip.exists() and res["video_frames"] >= 2 and "video_error" not in res


def test_a_missing_render_dependency_keeps_the_numbers_and_says_so_in_one_line(
        pendulum_run, tmp_path, monkeypatch, capsys):
    import gymnasium as gym

    from pgscope import evaluate as evaluate_mod

    real = evaluate_mod._make_env

    def make(env_id, render):
        env = real(env_id, render)

        def render_fails():
            raise gym.error.DependencyNotInstalled("pygame is not installed, run "
                                                   "`pip install gymnasium[classic-control]`")
        env.render = render_fails
        return env

    monkeypatch.setattr(evaluate_mod, "_make_env", make)
    want = evaluate(pendulum_run, episodes=3, deterministic=True, seed=5)
    got = evaluate(pendulum_run, episodes=3, deterministic=True, seed=5,
                   video=tmp_path / "v.mp4")
    assert got["returns"] == want["returns"] and "pygame" in got["video_error"]
    assert not (tmp_path / "v.mp4").exists()
    assert main(["evaluate", str(pendulum_run), "--episodes", "2", "--video",
                 str(tmp_path / "v.mp4")]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert "mean return" in lines[0]
    assert lines[-1].startswith("  video: not written") and "pygame" in lines[-1]


def test_an_interval_over_few_episodes_is_flagged(pendulum_run):
    """'evaluate --episodes 3' printed the min and max of 3 returns as a 95% CI."""
    from pgscope.evaluate import format_evaluation

    few = evaluate(pendulum_run, episodes=3, deterministic=True)
    assert "only 3 episodes" in few["ci_few_samples"]
    assert "note: only 3 episodes" in format_evaluation(few)
    many = evaluate(pendulum_run, episodes=10, deterministic=True)
    assert many["ci_few_samples"] is None and "note:" not in format_evaluation(many)


def test_evaluate_and_agent_act_agree_on_the_default_and_say_it(pendulum_run, capsys):
    """Agent.act defaulted to the mean action and evaluate to sampled actions."""
    import inspect

    from pgscope.agent import Agent

    assert inspect.signature(Agent.act).parameters["deterministic"].default is True
    assert inspect.signature(evaluate).parameters["deterministic"].default is True
    assert evaluate(pendulum_run, episodes=2)["deterministic"] is True
    assert main(["evaluate", str(pendulum_run), "--episodes", "2"]) == 0
    assert "deterministic (mean action)" in capsys.readouterr().out
    assert main(["evaluate", str(pendulum_run), "--episodes", "2", "--stochastic"]) == 0
    assert "stochastic (sampled)" in capsys.readouterr().out


def test_evaluate_reports_dispersion_and_risk_across_its_episodes(pendulum_run, capsys):
    """DF and RF of Chan et al. (2020) on the episode returns evaluate played: the IQR and
    the lower-tail CVaR of exactly those returns, by hand, with bootstrap intervals."""
    result = evaluate(pendulum_run, episodes=12, seed=3)
    x = np.asarray(result["returns"])
    rel = result["reliability"]
    q75, q25 = np.quantile(x, [0.75, 0.25])
    assert rel["DF"] == pytest.approx(q75 - q25)
    assert rel["RF"] == pytest.approx(x[x <= np.quantile(x, 0.05)].mean())  # the minimum
    assert rel["DF_low"] <= rel["DF"] <= rel["DF_high"] and rel["episodes"] == 12
    assert main(["evaluate", str(pendulum_run), "--episodes", "12", "--seed", "3"]) == 0
    assert f"dispersion (IQR, DF) {rel['DF']:.2f}" in capsys.readouterr().out
