"""GAE against hand-computed cases: termination, truncation, a rollout cut mid-episode,
several envs; and the rollout collector's bookkeeping of next states on a real env."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from pgscope.agent import build_agent
from pgscope.config import make_config
from pgscope.engine.rollout import collect_one
from pgscope.rollout import Preprocessor, RolloutCollector, gae

G, L = 0.9, 0.5


def test_single_step_termination_has_no_bootstrap():
    adv = gae(np.array([[1.0]]), np.array([[0.3]]), np.array([[100.0]]),
              terminated=np.array([[1.0]]), done=np.array([[1.0]]), gamma=G, lam=L)
    assert adv[0, 0] == pytest.approx(1.0 - 0.3)


def test_truncation_bootstraps_from_final_state():
    # V(s_final) = 2.0 must be used: delta = r + gamma * 2.0 - V(s)
    adv = gae(np.array([[1.0]]), np.array([[0.3]]), np.array([[2.0]]),
              terminated=np.array([[0.0]]), done=np.array([[1.0]]), gamma=G, lam=L)
    assert adv[0, 0] == pytest.approx(1.0 + G * 2.0 - 0.3)


def test_three_steps_hand_computed_rollout_cut_mid_episode():
    # One env, three steps, the episode continues past the rollout: bootstrap V(s3) = 4.
    r = np.array([[1.0], [2.0], [3.0]])
    v = np.array([[0.5], [1.0], [1.5]])
    nv = np.array([[1.0], [1.5], [4.0]])  # V(s1), V(s2), V(s3)
    zero = np.zeros((3, 1))
    adv = gae(r, v, nv, zero, zero, G, L)
    d2 = 3.0 + G * 4.0 - 1.5
    d1 = 2.0 + G * 1.5 - 1.0
    d0 = 1.0 + G * 1.0 - 0.5
    a2 = d2
    a1 = d1 + G * L * a2
    a0 = d0 + G * L * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2])


def test_episode_boundary_stops_trace_and_two_envs_are_independent():
    # env 0: terminates at t=1, new episode at t=2 (cut by the rollout end, V(next)=10).
    # env 1: truncated at t=0 with V(final)=7, then continues.
    r = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    v = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    nv = np.array([[0.0, 7.0], [99.0, 0.0], [10.0, 5.0]])
    term = np.array([[0, 0], [1, 0], [0, 0]], dtype=float)
    trunc = np.array([[0, 1], [0, 0], [0, 0]], dtype=float)
    adv = gae(r, v, nv, term, np.maximum(term, trunc), G, L)
    # env 0
    e0_2 = 1.0 + G * 10.0
    e0_1 = 1.0  # terminal: no bootstrap, trace stops
    e0_0 = (1.0 + G * 0.0) + G * L * e0_1
    np.testing.assert_allclose(adv[:, 0], [e0_0, e0_1, e0_2])
    # env 1
    e1_2 = 1.0 + G * 5.0
    e1_1 = (1.0 + G * 0.0) + G * L * e1_2
    e1_0 = 1.0 + G * 7.0  # truncated: bootstrap from final state, trace stops
    np.testing.assert_allclose(adv[:, 1], [e1_0, e1_1, e1_2])


def test_lambda_one_gives_discounted_returns_minus_value():
    r = np.array([[1.0], [1.0], [1.0], [1.0]])
    v = np.array([[0.2], [0.4], [0.1], [0.3]])
    nv = np.array([[0.4], [0.1], [0.3], [0.0]])
    term = np.array([[0], [0], [0], [1]], dtype=float)
    adv = gae(r, v, nv, term, term, gamma=G, lam=1.0)
    mc = np.array([1 + G + G**2 + G**3, 1 + G + G**2, 1 + G, 1.0])
    np.testing.assert_allclose(adv[:, 0] + v[:, 0], mc)


class _Counter(gym.Env):
    """obs = [t]; terminates when t reaches 3 if terminate else truncated by a time limit."""

    def __init__(self, terminate: bool):
        self.observation_space = gym.spaces.Box(-100, 100, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.terminate = terminate
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, self.terminate and self.t == 3, False, {}


@pytest.mark.parametrize("terminate,k", [(True, 1.0), (False, 1.0), (False, 100.0)])
def test_collector_uses_final_obs_at_truncation_and_next_obs_across_boundary(terminate, k):
    """k is the reward multiplier: the learner's rewards are k x 1, the logged return 3."""
    env_id = f"pgscope-test/Counter{'Term' if terminate else 'Trunc'}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda: _Counter(terminate),
                     max_episode_steps=None if terminate else 3)
    cfg = make_config("ppo-m", env_id, dict(steps_per_iter=5, num_envs=1, minibatches=1,
                                             gamma=G, gae_lambda=L, reward_multiplier=k))
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    # A value net that reads the state: V(s) = 10 * s
    for p in agent.value_net.parameters():
        torch.nn.init.zeros_(p)
    value = lambda obs: 10.0 * obs[..., 0]  # noqa: E731
    agent.value_net.forward = value  # type: ignore[method-assign]
    collector = RolloutCollector(cfg, envs, Preprocessor(cfg, (1,)), seed=0)
    batch, stats = collect_one(collector, agent.policy, agent.value_net)
    np.testing.assert_allclose(batch.obs[:, 0].numpy(), [0, 1, 2, 0, 1])
    # Episode: states 0,1,2 then end (terminal or truncated at s=3); then 0,1 and the
    # rollout ends with next state 2.
    v = 10.0 * np.array([0, 1, 2, 0, 1])
    nv = 10.0 * np.array([1, 2, 3, 1, 2])
    term = np.array([0, 0, 1 if terminate else 0, 0, 0], float)
    done = np.array([0, 0, 1, 0, 0], float)
    np.testing.assert_allclose(batch.rewards.numpy(), k)
    expected = gae(k * np.ones((5, 1)), v[:, None], nv[:, None], term[:, None], done[:, None], G, L)
    np.testing.assert_allclose(batch.advantages.numpy(), expected[:, 0], rtol=1e-6)
    np.testing.assert_allclose(batch.returns.numpy(), expected[:, 0] + v, rtol=1e-6)
    assert stats.returns == [3.0] and stats.lengths == [3]
    if not terminate:  # truncated: the bootstrap V(s_final = 3) = 30 enters the advantage
        assert batch.advantages[2].item() == pytest.approx(k + G * 30.0 - 20.0)
    else:
        assert batch.advantages[2].item() == pytest.approx(k - 20.0)
