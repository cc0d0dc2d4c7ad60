"""LocomotionBatch steps K MuJoCo envs at once with exactly the results of their own step."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
import pytest

from pgscope.envs.batch_step import KINDS, LocomotionBatch

K = 4
STEPS = 400

#: The envs that never terminate (no health check).
NEVER_TERMINATE = {"HalfCheetah-v5", "Swimmer-v5"}

CASES = [
    ("Hopper-v5", {"max_episode_steps": 150}),
    # a narrow healthy state range, so that the state check ends episodes too, and the x
    # position kept in the observation
    ("Hopper-v5", {"healthy_state_range": (-2.0, 2.0),
                   "exclude_current_positions_from_observation": False}),
    ("Walker2d-v5", {"max_episode_steps": 150}),
    ("Walker2d-v5", {"terminate_when_unhealthy": False, "max_episode_steps": 100}),
    ("HalfCheetah-v5", {"max_episode_steps": 120, "ctrl_cost_weight": 0.3}),
    ("Swimmer-v5", {"max_episode_steps": 100}),
    ("Swimmer-v5", {"exclude_current_positions_from_observation": False, "frame_skip": 2,
                    "ctrl_cost_weight": 0.2, "forward_reward_weight": 0.7}),
    # the default Ant rarely falls with random actions; a narrower z range ends episodes
    ("Ant-v5", {"max_episode_steps": 100}),
    ("Ant-v5", {"healthy_z_range": (0.3, 0.9), "max_episode_steps": 150}),
    # the main body by name, a narrow contact force range (clipping active), no contact
    # forces in the observation, the x, y position kept, no termination
    ("Ant-v5", {"main_body": "torso", "contact_force_range": (-0.05, 0.1),
                "include_cfrc_ext_in_observation": False,
                "exclude_current_positions_from_observation": False,
                "terminate_when_unhealthy": False, "contact_cost_weight": 0.1,
                "max_episode_steps": 100}),
    ("Humanoid-v5", {"max_episode_steps": 120}),
    # a contact cost range whose both ends clip (the default's upper end, 10, is rarely
    # reached by random actions), the x, y position kept, some observation parts left out
    ("Humanoid-v5", {"contact_cost_range": (0.01, 0.3),
                     "exclude_current_positions_from_observation": False,
                     "include_cinert_in_observation": False,
                     "include_qfrc_actuator_in_observation": False,
                     "healthy_z_range": (0.9, 1.8)}),
    ("Humanoid-v5", {"include_cvel_in_observation": False,
                     "include_cfrc_ext_in_observation": False,
                     "terminate_when_unhealthy": False, "healthy_reward": 2.0,
                     "forward_reward_weight": 2.0, "ctrl_cost_weight": 0.3,
                     "max_episode_steps": 100}),
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


def _physics(env: gym.Env) -> np.ndarray:
    """The env's whole MuJoCo integration state (time, qpos, qvel, act, warm start, ctrl,
    applied forces, mocap, ...) and the force quantities the envs observe."""
    model, data = env.unwrapped.model, env.unwrapped.data
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, state, spec)
    return np.concatenate([state, data.cfrc_ext.ravel(), data.cinert.ravel(),
                           data.cvel.ravel(), data.qfrc_actuator, data.xipos.ravel()])


def _same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


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
    for t in range(STEPS):
        actions = rng.uniform(-1.5, 1.5, (K, *shape)).astype(dtype)  # some out of bounds
        rows = [k for k in range(K) if (t + k) % 7]  # a different env sits out each step
        obs, reward, terminated, truncated, errors = batch.step(actions, rows)
        assert errors == {}
        assert obs.dtype == np.float64 and reward.dtype == np.float64
        for r, k in enumerate(rows):
            o, rew, term, trunc, _ = own[k].step(actions[k])
            assert _same_bits(obs[r], o), (t, k, np.flatnonzero(obs[r] != o))
            assert np.asarray(rew).dtype == np.float64
            assert _same_bits(reward[r], rew), (t, k, reward[r], rew)
            assert (terminated[r], truncated[r]) == (term, trunc)
            assert _same_bits(_physics(batched[k]), _physics(own[k])), (t, k)
            ended["terminated"] += bool(term)
            ended["truncated"] += bool(trunc)
            if term or trunc:
                o1, _ = own[k].reset()
                o2, _ = batched[k].reset()
                assert _same_bits(o1, o2)
    for a, b in zip(own, batched, strict=True):
        assert _same_bits(_physics(a), _physics(b))
        assert a._elapsed_steps == b._elapsed_steps
    if env_id in NEVER_TERMINATE or kwargs.get("terminate_when_unhealthy") is False:
        assert ended["terminated"] == 0
    else:
        assert ended["terminated"] > 0
    if kwargs.get("max_episode_steps", 1000) < 120:
        assert ended["truncated"] > 0


class _Subclass(gym.envs.mujoco.hopper_v5.HopperEnv):  # type: ignore[misc]
    pass


def test_only_known_envs_with_default_wrappers_and_settings_are_batched(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hoppers = [gym.make("Hopper-v5") for _ in range(2)]
    assert LocomotionBatch.make(hoppers) is not None
    assert not LocomotionBatch.make(hoppers).ready()  # not reset yet
    for env in hoppers:
        env.reset(seed=0)
        for _ in range(2):
            assert not LocomotionBatch.make(hoppers).ready()  # the checker's steps
            env.step(env.action_space.sample())
    assert LocomotionBatch.make(hoppers).ready()
    for env_id in ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Swimmer-v5", "Ant-v5",
                   "Humanoid-v5"):
        batch = LocomotionBatch.make([gym.make(env_id) for _ in range(2)])
        assert batch is not None and batch.kind is KINDS[type(gym.make(env_id).unwrapped)]
    assert LocomotionBatch.make([gym.make("Hopper-v4")]) is None
    assert LocomotionBatch.make([gym.make("Ant-v4")]) is None
    assert LocomotionBatch.make([gym.make("InvertedPendulum-v5")]) is None
    assert LocomotionBatch.make([gym.wrappers.ClipAction(gym.make("Hopper-v5"))]) is None
    assert LocomotionBatch.make([gym.make("Hopper-v5", render_mode="rgb_array")]) is None
    assert LocomotionBatch.make([gym.make("Humanoid-v5", render_mode="rgb_array")]) is None
    assert LocomotionBatch.make([gym.make("Hopper-v5", disable_env_checker=True)]) is None
    sub = gym.wrappers.TimeLimit(gym.wrappers.OrderEnforcing(
        gym.wrappers.PassiveEnvChecker(_Subclass())), 1000)
    assert LocomotionBatch.make([sub]) is None
    assert LocomotionBatch.make([hoppers[0], gym.make("Walker2d-v5")]) is None
    assert LocomotionBatch.make([gym.make("Ant-v5"), gym.make("Humanoid-v5")]) is None
    assert LocomotionBatch.make([hoppers[0], gym.make("Hopper-v5", ctrl_cost_weight=0.1)]
                                ) is None
    with pytest.raises(TypeError, match="same settings"):
        LocomotionBatch([hoppers[0], gym.make("Hopper-v5", ctrl_cost_weight=0.1)])
    # every setting a new kind's step reads must be shared
    for env_id, kwargs in [("Ant-v5", {"contact_force_range": (-2.0, 2.0)}),
                           ("Ant-v5", {"main_body": "torso"}),
                           ("Ant-v5", {"include_cfrc_ext_in_observation": False}),
                           ("Humanoid-v5", {"contact_cost_range": (0.0, 1.0)}),
                           ("Humanoid-v5", {"include_cinert_in_observation": False}),
                           ("Humanoid-v5", {"healthy_z_range": (0.9, 2.0)}),
                           ("Swimmer-v5", {"frame_skip": 2})]:
        assert LocomotionBatch.make([gym.make(env_id), gym.make(env_id, **kwargs)]) is None
    # options the kinds do not reproduce: a main body that is not a body, observation
    # switches that are not bools (the env tests them with ``is True``)
    assert LocomotionBatch.make([gym.make("Ant-v5", main_body="nobody")]) is None
    assert LocomotionBatch.make([gym.make("Ant-v5", main_body=99)]) is None
    assert LocomotionBatch.make([gym.make("Ant-v5", main_body=1.0)]) is None
    assert LocomotionBatch.make([gym.make("Humanoid-v5", include_cvel_in_observation=1)]
                                ) is None
    # the same class and settings on another model file
    xml = tmp_path / "hopper.xml"
    shutil.copy(Path(hoppers[0].unwrapped.fullpath), xml)
    other = gym.make("Hopper-v5", xml_file=str(xml))
    assert LocomotionBatch.make([other]) is not None
    assert LocomotionBatch.make([hoppers[0], other]) is None
    monkeypatch.setenv("PGSCOPE_BATCH_STEP", "0")
    assert LocomotionBatch.make(hoppers) is None


def test_batch_step_refuses_actions_of_the_wrong_size() -> None:
    envs = [gym.make("Swimmer-v5") for _ in range(2)]
    for env in envs:
        env.reset(seed=0)
        for _ in range(2):
            env.step(env.action_space.sample())
    batch = LocomotionBatch.make(envs)
    assert batch is not None and batch.ready()
    with pytest.raises(ValueError, match="Action dimension"):
        batch.step(np.zeros((2, 3), dtype=np.float32), [0, 1])


@pytest.mark.parametrize("env_id", ["Swimmer-v5", "Ant-v5", "Humanoid-v5"])
def test_engine_steps_the_new_kinds_as_their_own_step(env_id: str) -> None:
    """The engine's ``step_envs`` (same-step autoreset, final observations) gives the same
    bits through a batch as through each env's own step, for 2 seeds x 2 envs."""
    from pgscope.engine.lockstep import step_envs
    from pgscope.envs import make_vector_env

    runs = []
    for batched in (False, True):
        vector_envs = [make_vector_env(env_id, 2) for _ in range(2)]
        for i, envs in enumerate(vector_envs):
            envs.reset(seed=100 + i)
        batch = LocomotionBatch.make([e for v in vector_envs for e in v.envs])
        assert batch is not None
        rng = np.random.default_rng(1)
        shape = vector_envs[0].single_action_space.shape
        steps = []
        for t in range(150):
            actions = rng.uniform(-1, 1, (2, 2, *shape)).astype(np.float32)
            out = step_envs(vector_envs, actions, skip={t % 3} if t % 5 == 0 else set(),
                            batch=batch if batched else None)
            assert batch.ready() or t < 2
            steps.append(out)
        runs.append(steps)
    ended = 0
    for own, through_batch in zip(*runs, strict=True):
        for a, b in zip(own[:4], through_batch[:4], strict=True):
            assert _same_bits(a, b)
        assert own[4].keys() == through_batch[4].keys()
        assert all(_same_bits(own[4][key], through_batch[4][key]) for key in own[4])
        assert own[5] == through_batch[5] == {}
        ended += len(own[4])
    if env_id != "Swimmer-v5":
        assert ended > 0
