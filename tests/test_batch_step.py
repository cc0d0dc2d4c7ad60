"""LocomotionBatch steps K MuJoCo envs at once with exactly the results of their own step."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from pgscope.envs.batch_step import LocomotionBatch

K = 4

CASES = [
    ("Hopper-v5", {"max_episode_steps": 150}),
    # a narrow healthy state range, so that the state check ends episodes too, and the x
    # position kept in the observation
    ("Hopper-v5", {"healthy_state_range": (-2.0, 2.0),
                   "exclude_current_positions_from_observation": False}),
    ("Walker2d-v5", {"max_episode_steps": 150}),
    ("Walker2d-v5", {"terminate_when_unhealthy": False, "max_episode_steps": 100}),
    ("HalfCheetah-v5", {"max_episode_steps": 120, "ctrl_cost_weight": 0.3}),
]


def _pair(env_id: str, kwargs: dict[str, Any]) -> tuple[list[gym.Env], list[gym.Env]]:
    """Two identical sets of K envs, reset with the same seeds and stepped twice (each
    env's first two steps run the checker's checks in its own step)."""
    sets = []
    for _ in range(2):
        envs = [gym.make(env_id, **kwargs) for _ in range(K)]
        for i, env in enumerate(envs):
            env.reset(seed=10 + i)
            for _ in range(2):
                env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        sets.append(envs)
    return sets[0], sets[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("env_id", "kwargs"), CASES)
def test_batch_step_equals_each_env_step(env_id: str, kwargs: dict[str, Any],
                                         dtype: type) -> None:
    own, batched = _pair(env_id, kwargs)
    batch = LocomotionBatch.make(batched)
    assert batch is not None and batch.ready()
    rng = np.random.default_rng(0)
    shape = own[0].action_space.shape
    ended = {"terminated": 0, "truncated": 0}
    for t in range(400):
        actions = rng.uniform(-1.5, 1.5, (K, *shape)).astype(dtype)  # some out of bounds
        rows = [k for k in range(K) if (t + k) % 7]  # a different env sits out each step
        obs, reward, terminated, truncated, errors = batch.step(actions, rows)
        assert errors == {}
        for r, k in enumerate(rows):
            o, rew, term, trunc, _ = own[k].step(actions[k])
            np.testing.assert_array_equal(obs[r], o)
            assert obs[r].dtype == o.dtype
            assert reward[r] == rew and type(rew)(reward[r]) == rew
            assert (terminated[r], truncated[r]) == (term, trunc)
            ended["terminated"] += bool(term)
            ended["truncated"] += bool(trunc)
            if term or trunc:
                o1, _ = own[k].reset()
                o2, _ = batched[k].reset()
                np.testing.assert_array_equal(o1, o2)
    for a, b in zip(own, batched, strict=True):
        np.testing.assert_array_equal(a.unwrapped.data.qpos, b.unwrapped.data.qpos)
        assert a._elapsed_steps == b._elapsed_steps
    if env_id == "HalfCheetah-v5" or kwargs.get("terminate_when_unhealthy") is False:
        assert ended["terminated"] == 0
    else:
        assert ended["terminated"] > 0
    if "max_episode_steps" in kwargs and kwargs["max_episode_steps"] < 120:
        assert ended["truncated"] > 0


class _Subclass(gym.envs.mujoco.hopper_v5.HopperEnv):  # type: ignore[misc]
    pass


def test_only_known_envs_with_default_wrappers_and_settings_are_batched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hoppers = [gym.make("Hopper-v5") for _ in range(2)]
    assert LocomotionBatch.make(hoppers) is not None
    assert not LocomotionBatch.make(hoppers).ready()  # not reset yet
    for env in hoppers:
        env.reset(seed=0)
        for _ in range(2):
            assert not LocomotionBatch.make(hoppers).ready()  # the checker's steps
            env.step(env.action_space.sample())
    assert LocomotionBatch.make(hoppers).ready()
    assert LocomotionBatch.make([gym.make("Hopper-v4")]) is None
    assert LocomotionBatch.make([gym.make("Ant-v5")]) is None
    assert LocomotionBatch.make([gym.wrappers.ClipAction(gym.make("Hopper-v5"))]) is None
    assert LocomotionBatch.make([gym.make("Hopper-v5", render_mode="rgb_array")]) is None
    assert LocomotionBatch.make([gym.make("Hopper-v5", disable_env_checker=True)]) is None
    sub = gym.wrappers.TimeLimit(gym.wrappers.OrderEnforcing(
        gym.wrappers.PassiveEnvChecker(_Subclass())), 1000)
    assert LocomotionBatch.make([sub]) is None
    assert LocomotionBatch.make([hoppers[0], gym.make("Walker2d-v5")]) is None
    assert LocomotionBatch.make([hoppers[0], gym.make("Hopper-v5", ctrl_cost_weight=0.1)]
                                ) is None
    with pytest.raises(TypeError, match="same settings"):
        LocomotionBatch([hoppers[0], gym.make("Hopper-v5", ctrl_cost_weight=0.1)])
    monkeypatch.setenv("PGSCOPE_BATCH_STEP", "0")
    assert LocomotionBatch.make(hoppers) is None
