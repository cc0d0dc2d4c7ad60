"""The gradient probe's estimator against autograd written out here: the algorithm's
objective with its entropy bonus, the per-pair variance against a loop over pairs, the
memory-bounded per-pair chunks and the default grid (docs/design.md section 3)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from pgscope import make_config
from pgscope.agent import build_agent
from pgscope.envs.tabular import ENV_ID
from pgscope.probes import DEFAULT_SIZES, ProbeSettings
from pgscope.probes.gradients import (
    OBJECTIVE_ENTROPY,
    OBJECTIVE_SURROGATE,
    GradientAccumulator,
    estimate,
    gradient_probe,
    per_pair_gram,
)
from pgscope.probes.sampling import sample_batch

SMALL = dict(steps_per_iter=64, num_envs=1, minibatches=1, hidden=(8, 8))


def _agent(env_id: str, **overrides):
    cfg = make_config("ppo", env_id, {**SMALL, **overrides})
    env = gym.make(env_id)
    try:
        torch.manual_seed(0)
        agent = build_agent(cfg, env.observation_space, env.action_space)
    finally:
        env.close()
    with torch.no_grad():  # a policy whose entropy depends on the state and its log-std
        if not agent.policy.discrete:
            agent.policy.log_std.copy_(torch.linspace(-0.5, 0.3, len(agent.policy.log_std)))
    return agent


def _objective_gradient(agent, batch, ent_coef: float) -> torch.Tensor:
    """Autograd of the algorithm's objective at theta_old, written out: the surrogate
    mean(r A_hat) (r = 1 in value, advantages normalized as in training) plus ent_coef x
    the mean entropy."""
    policy = agent.policy
    dist = policy.dist(batch.obs)
    logp = policy.log_prob(dist, batch.actions)
    ratio = (logp - logp.detach()).exp()
    adv = batch.advantages.double()
    if agent.config.adv_norm:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    objective = (ratio.double() * adv).mean() + ent_coef * policy.entropy(dist).double().mean()
    grads = torch.autograd.grad(objective, list(policy.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_estimate_is_the_gradient_of_surrogate_plus_entropy_bonus(env_id, ent_coef):
    agent = _agent(env_id, ent_coef=ent_coef)
    batch = sample_batch(agent, 300, seed=4, max_envs=3)
    # the same pairs, streamed in 3 chunks of 100 (3 envs x 100 steps)
    est = estimate(agent, 300, seed=4, max_envs=3).policy_gradient()
    expected = _objective_gradient(agent, batch, ent_coef).numpy()
    np.testing.assert_allclose(est, expected, rtol=1e-4, atol=1e-6)
    if ent_coef > 0:  # the bonus matters, and entropy_bonus=False leaves it out
        surrogate = _objective_gradient(agent, batch, 0.0).numpy()
        assert np.linalg.norm(expected - surrogate) > 1e-3 * np.linalg.norm(surrogate)
        alone = estimate(agent, 300, seed=4, max_envs=3, entropy_bonus=False)
        np.testing.assert_allclose(alone.policy_gradient(), surrogate, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_per_pair_variance_equals_a_loop_over_pairs(env_id, ent_coef):
    agent = _agent(env_id, ent_coef=ent_coef)
    batch = sample_batch(agent, 120, seed=2, max_envs=2)
    acc = GradientAccumulator(agent, per_sample=True)
    for half in (torch.arange(60), torch.arange(60, 120)):  # streamed: normalized at the end
        acc.add(batch.select(half))
    policy, params = agent.policy, list(agent.policy.parameters())
    adv = batch.advantages.double()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    terms = []
    for i in range(len(batch)):
        dist = policy.dist(batch.obs[i:i + 1])
        term = (policy.log_prob(dist, batch.actions[i:i + 1]).double() * adv[i]
                + ent_coef * policy.entropy(dist).double()).sum()
        grads = torch.autograd.grad(term, params)
        terms.append(torch.cat([g.reshape(-1) for g in grads]))
    u = torch.stack(terms).numpy()
    np.testing.assert_allclose(acc.policy_gradient(), u.mean(0), rtol=1e-4, atol=1e-6)
    trace = np.trace(np.cov(u.T, bias=True))
    assert acc.per_sample_variance() == pytest.approx(trace, rel=1e-4)


def test_per_pair_chunks_bound_memory_and_change_nothing():
    agent = _agent("Pendulum-v1", ent_coef=0.1)
    batch = sample_batch(agent, 50, seed=1)
    n_params = sum(p.numel() for p in agent.policy.parameters())
    whole = per_pair_gram(agent.policy, batch, entropy=True)
    chunked = per_pair_gram(agent.policy, batch, entropy=True, max_floats=7 * 2 * n_params)
    assert whole.shape == (50, 2, 2)
    torch.testing.assert_close(chunked, whole)


def test_default_grid_has_the_papers_2048_and_settings_record_the_objective():
    assert 2048 in DEFAULT_SIZES and ProbeSettings().sizes == DEFAULT_SIZES
    assert gradient_probe.__defaults__[0] == DEFAULT_SIZES
    for ent_coef, objective in ((0.0, OBJECTIVE_SURROGATE), (0.01, OBJECTIVE_ENTROPY)):
        agent = _agent(ENV_ID, ent_coef=ent_coef)
        result = gradient_probe(agent, sizes=(8, 16), k=2, true_pairs=160, progress=False)
        assert result["settings"]["objective"] == objective
        assert result["settings"]["ent_coef"] == ent_coef
        assert [row["n"] for row in result["policy"]] == [8, 16]
