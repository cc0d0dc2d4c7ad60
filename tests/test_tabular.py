"""The tabular MDP's exact answers (pgscope.envs.tabular) against independent computations:
Bellman iteration, Monte Carlo on the real env and on a fast NumPy simulator of the same
spec, pgscope's own GAE (also through the real RolloutCollector), autograd through the
exact return, and finite differences.

Monte Carlo checks allow 4 standard errors. Steps of one simulated env are correlated
(GAE traces overlap, visits cluster within episodes), so standard errors treat each env as
one independent cluster (the ratio estimator's delta-method SE), never steps as i.i.d.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch

from pgscope.agent import build_agent
from pgscope.config import make_config
from pgscope.engine.rollout import collect_one
from pgscope.envs import make_env, make_vector_env
from pgscope.envs.tabular import (
    ENV_ID,
    TabularEnv,
    TabularMDP,
    default_mdp,
    exact_expected_gradient,
    exact_q,
    exact_values,
    expected_gae_advantage,
    policy_matrix,
    stationary_distribution,
    value_vector,
)
from pgscope.networks import CategoricalPolicy
from pgscope.rollout import RolloutCollector, gae

MDP = default_mdp()
S, A = MDP.n_states, MDP.n_actions
GAMMA = 0.99
Z = 4.0  # standard errors allowed in Monte Carlo comparisons

Actor = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def random_policy(seed: int) -> np.ndarray:
    """A fixed, clearly non-uniform tabular policy ``pi[s, a]``."""
    logits = np.random.default_rng(seed).normal(0.0, 1.0, (S, A))
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


PI = random_policy(1)
# The policy's RNG when acting in a real env must not share the env's seed: gymnasium seeds
# env.np_random exactly like np.random.default_rng(seed), so equal seeds give both the SAME
# uniform stream, and actions then correlate with transitions (returns off by 10+ SE here).
POLICY_SEED = 12345


# --- a fast NumPy simulator of the spec (independent of TabularEnv) ---------------------
def draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Categorical draws: the index of the first cdf entry above ``u`` (row-wise)."""
    return np.minimum((u[..., None] >= cdf).sum(-1), cdf.shape[-1] - 1)


def tabular_actor(pi: np.ndarray) -> Actor:
    cdf = np.cumsum(pi, -1)
    return lambda s, rng: draw(cdf[s], rng.random(len(s)))


def network_actor(policy: CategoricalPolicy, obs: np.ndarray) -> Actor:
    """Samples through the policy's own rollout sampler on observations ``obs[s]``."""
    sample = policy.numpy_sampler()
    return lambda s, rng: sample(obs[s], rng)


def step_cdf(mdp: TabularMDP) -> np.ndarray:
    """``(S, A, S + 1)`` cdf over next states; index ``S`` is termination."""
    return np.cumsum(np.concatenate([mdp.P, mdp.termination[..., None]], -1), -1)


@dataclass
class Rollout:
    """``(T, n_envs)`` arrays; ``next_states`` is ``S`` after termination."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_states: np.ndarray
    terminated: np.ndarray


def simulate(mdp: TabularMDP, act: Actor, n_envs: int, n_steps: int,
             rng: np.random.Generator) -> Rollout:
    """Back-to-back episodes in ``n_envs`` independent envs (reset ``s ~ rho`` on
    termination), like pgscope's vector envs with autoreset."""
    cdf, rho_cdf = step_cdf(mdp), np.cumsum(mdp.rho)
    shape = (n_steps, n_envs)
    out = Rollout(*(np.zeros(shape, dtype=np.int64) for _ in range(2)), np.zeros(shape),
                  np.zeros(shape, dtype=np.int64), np.zeros(shape))
    s = draw(rho_cdf, rng.random(n_envs))
    for t in range(n_steps):
        a = act(s, rng)
        nxt = draw(cdf[s, a], rng.random(n_envs))
        term = nxt == mdp.n_states
        out.states[t], out.actions[t], out.rewards[t] = s, a, mdp.R[s, a]
        out.next_states[t], out.terminated[t] = nxt, term
        s = np.where(term, draw(rho_cdf, rng.random(n_envs)), nxt)
    return out


def episode_returns(mdp: TabularMDP, act: Actor, starts: np.ndarray, gamma: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Discounted returns of complete, independent episodes from the given start states."""
    cdf = step_cdf(mdp)
    s, ret, disc = starts.copy(), np.zeros(len(starts)), np.ones(len(starts))
    alive = np.arange(len(starts))
    while len(alive):
        a = act(s[alive], rng)
        ret[alive] += disc[alive] * mdp.R[s[alive], a]
        disc[alive] *= gamma
        nxt = draw(cdf[s[alive], a], rng.random(len(alive)))
        go_on = nxt < mdp.n_states
        s[alive[go_on]] = nxt[go_on]
        alive = alive[go_on]
    return ret


def rollout_gae(ro: Rollout, v_hat: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """pgscope's GAE on a simulated rollout (the last step bootstraps from v_hat[s_T])."""
    next_v = np.append(v_hat, 0.0)[ro.next_states]  # masked by `terminated` anyway
    return gae(ro.rewards, v_hat[ro.states], next_v, ro.terminated, ro.terminated, gamma, lam)


def grouped_mean_se(values: np.ndarray, groups: np.ndarray, n_groups: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group means of ``(T, n_envs)`` values, their cluster-robust standard errors
    (clusters = envs) and counts."""
    T, N = values.shape
    idx = (groups * N + np.arange(N)).ravel()
    size = n_groups * N
    sums = np.bincount(idx, weights=values.ravel(), minlength=size).reshape(n_groups, N)
    counts = np.bincount(idx, minlength=size).reshape(n_groups, N)
    total = counts.sum(1)
    mean = sums.sum(1) / np.maximum(total, 1)
    resid = sums - mean[:, None] * counts
    se = np.sqrt(N / (N - 1) * (resid**2).sum(1)) / np.maximum(total, 1)
    return mean, se, total


def assert_within_se(estimate: np.ndarray, se: np.ndarray, exact: np.ndarray) -> None:
    z = np.abs(estimate - exact) / se
    assert (z < Z).all(), f"z-scores {np.round(z, 2)}"


# --- the env ------------------------------------------------------------------------------
@pytest.mark.parametrize("maker", [gym.make, make_env])
def test_registered_env_is_one_hot_without_time_limit(maker):
    env = maker(ENV_ID)
    assert env.spec.max_episode_steps is None
    assert isinstance(env.unwrapped, TabularEnv)
    assert env.observation_space.shape == (S,) and env.action_space.n == A
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs.sum() == 1.0 and obs[info["state"]] == 1.0
    assert MDP.rho[info["state"]] > 0
    obs, _ = env.reset(options={"state": 4})
    np.testing.assert_array_equal(obs, np.eye(S, dtype=np.float32)[4])
    for _ in range(1000):
        s = int(obs.argmax())
        obs, r, terminated, truncated, info = env.step(1)
        assert r == MDP.R[s, 1] and not truncated and obs in env.observation_space
        if terminated:
            assert obs.sum() == 0.0
            break
        assert obs.sum() == 1.0 and obs[info["state"]] == 1.0
    assert terminated
    env.close()


def test_real_env_episode_lengths_match_the_spec():
    """Mean episode length of the real env = expected visits per episode,
    ``sum(rho^T (I - P_pi)^{-1})``, computed here directly."""
    env, rng = make_env(ENV_ID), np.random.default_rng(POLICY_SEED)
    act = tabular_actor(PI)
    env.reset(seed=0)
    lengths = []
    for _ in range(1500):
        obs, _ = env.reset()
        n, terminated = 0, False
        while not terminated:
            a = int(act(np.array([obs.argmax()]), rng)[0])
            obs, _, terminated, truncated, _ = env.step(a)
            n += 1
            assert not truncated
        lengths.append(n)
    P_pi = np.einsum("sa,sat->st", PI, MDP.P)
    expected = np.linalg.solve((np.eye(S) - P_pi).T, MDP.rho).sum()
    se = np.std(lengths) / np.sqrt(len(lengths))
    assert abs(np.mean(lengths) - expected) < Z * se


def test_default_mdp_has_meaningful_actions():
    term = MDP.termination
    assert (term >= 0.05).all() and (term <= 0.15).all()
    uniform = np.full((S, A), 1.0 / A)
    Q = exact_q(MDP, uniform, GAMMA)
    assert (Q.max(1) - Q.min(1) > 0.5).all()
    pi = uniform  # policy iteration to the optimal policy
    for _ in range(30):
        pi = np.eye(A)[exact_q(MDP, pi, GAMMA).argmax(1)]
    assert len(set(pi.argmax(1))) == A  # every action is optimal somewhere
    assert MDP.rho @ exact_values(MDP, pi, GAMMA) > MDP.rho @ exact_values(MDP, uniform, GAMMA)


def test_spec_validation():
    with pytest.raises(ValueError):
        TabularMDP(P=np.full((2, 1, 2), 0.6), R=np.zeros((2, 1)), rho=np.array([1.0, 0.0]))
    with pytest.raises(ValueError):
        TabularMDP(P=np.zeros((2, 1, 3)), R=np.zeros((2, 1)), rho=np.array([1.0, 0.0]))


# --- values -------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.9, GAMMA, 1.0])
def test_exact_values_equal_bellman_iteration(gamma):
    V = exact_values(MDP, PI, gamma)
    Q = exact_q(MDP, PI, gamma, V)
    v = np.zeros(S)
    for _ in range(2000):  # contraction factor <= gamma * 0.95 (termination >= 0.05)
        v = np.array([sum(PI[s, a] * (MDP.R[s, a] + gamma * MDP.P[s, a] @ v)
                          for a in range(A)) for s in range(S)])
    np.testing.assert_allclose(V, v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((PI * Q).sum(1), V, rtol=1e-10, atol=1e-12)


def test_exact_values_match_monte_carlo_returns():
    rng = np.random.default_rng(1)
    starts = np.repeat(np.arange(S), 20_000)
    returns = episode_returns(MDP, tabular_actor(PI), starts, GAMMA, rng).reshape(S, -1)
    se = returns.std(1, ddof=1) / np.sqrt(returns.shape[1])
    assert_within_se(returns.mean(1), se, exact_values(MDP, PI, GAMMA))


def test_exact_values_match_returns_of_the_real_env():
    """The gymnasium env (not the simulator) against the spec's exact values."""
    env, rng = make_env(ENV_ID), np.random.default_rng(POLICY_SEED)
    act = tabular_actor(PI)
    env.reset(seed=2)
    returns = np.zeros((S, 600))
    for s0 in range(S):
        for i in range(returns.shape[1]):
            obs, _ = env.reset(options={"state": s0})
            ret, disc, terminated = 0.0, 1.0, False
            while not terminated:
                a = int(act(np.array([obs.argmax()]), rng)[0])
                obs, r, terminated, _, _ = env.step(a)
                ret += disc * r
                disc *= GAMMA
            returns[s0, i] = ret
    se = returns.std(1, ddof=1) / np.sqrt(returns.shape[1])
    assert_within_se(returns.mean(1), se, exact_values(MDP, PI, GAMMA))


# --- stationary distribution ----------------------------------------------------------------
def test_stationary_distribution_matches_visit_frequencies():
    mu = stationary_distribution(MDP, PI)
    # the same distribution by another route: left eigenvector of the reset chain
    P_pi = np.einsum("sa,sat->st", PI, MDP.P)
    K = P_pi + (1.0 - P_pi.sum(1))[:, None] * MDP.rho[None, :]
    np.testing.assert_allclose(mu @ K, mu, atol=1e-12)
    assert mu.sum() == pytest.approx(1.0)
    # long back-to-back simulation: per-env visit fractions are independent across envs.
    # 100 burn-in steps drop the start from rho (the chain forgets it within an episode).
    ro = simulate(MDP, tabular_actor(PI), n_envs=200, n_steps=5100, rng=np.random.default_rng(3))
    states = ro.states[100:]
    counts = np.stack([np.bincount(states[:, i], minlength=S) for i in range(200)])
    frac = counts / states.shape[0]
    assert_within_se(frac.mean(0), frac.std(0, ddof=1) / np.sqrt(200), mu)


# --- expected GAE advantage -----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_advantage_lambda_one_is_q_minus_v_hat(seed):
    v_hat = np.random.default_rng(seed).normal(0.0, 3.0, S)
    Q = exact_q(MDP, PI, GAMMA)
    np.testing.assert_allclose(expected_gae_advantage(MDP, PI, v_hat, GAMMA, 1.0),
                               Q - v_hat[:, None], atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95])
def test_gae_advantage_with_true_values_is_q_minus_v(lam):
    V = exact_values(MDP, PI, GAMMA)
    np.testing.assert_allclose(expected_gae_advantage(MDP, PI, V, GAMMA, lam),
                               exact_q(MDP, PI, GAMMA, V) - V[:, None], atol=1e-10)


@pytest.fixture(scope="module")
def long_rollout() -> Rollout:
    return simulate(MDP, tabular_actor(PI), n_envs=2000, n_steps=600,
                    rng=np.random.default_rng(4))


# an imperfect critic, so that lambda matters
V_HAT = exact_values(MDP, PI, GAMMA) + np.random.default_rng(5).normal(0.0, 1.0, S)
CUT = 100  # the last steps of each env are dropped: their trace is cut by the rollout end


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95])
def test_gae_advantage_matches_monte_carlo_gae(long_rollout, lam):
    ro = long_rollout
    adv = rollout_gae(ro, V_HAT, GAMMA, lam)[:-CUT]
    pair = (ro.states * A + ro.actions)[:-CUT]
    mean, se, count = grouped_mean_se(adv, pair, S * A)
    assert count.min() > 5000
    exact = expected_gae_advantage(MDP, PI, V_HAT, GAMMA, lam).ravel()
    assert_within_se(mean, se, exact)
    if lam <= 0.5:  # the check has power: the answer differs from Q - v_hat by many SEs
        naive = (exact_q(MDP, PI, GAMMA) - V_HAT[:, None]).ravel()
        assert np.abs(naive - exact).max() > 20 * se.max()


def test_rollout_collector_advantages_match_expected_gae():
    """pgscope's own pipeline (vector env with autoreset, collector, GAE) on the real env,
    with a fresh agent's networks as policy and critic."""
    T, N = 512, 32
    cfg = make_config("ppo-m", ENV_ID, dict(num_envs=N, steps_per_iter=T * N, minibatches=1,
                                            gamma=GAMMA, gae_lambda=0.95))
    envs = make_vector_env(ENV_ID, N)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    batch, _ = collect_one(RolloutCollector(cfg, envs, agent.preprocessor, seed=0),
        agent.policy, agent.value_net)
    envs.close()
    states = batch.obs.numpy().argmax(-1).reshape(T, N)
    pair = states * A + batch.actions.numpy().reshape(T, N)
    adv = batch.advantages.numpy().astype(np.float64).reshape(T, N)
    mean, se, _ = grouped_mean_se(adv[:-CUT], pair[:-CUT], S * A)
    pi, v_hat = policy_matrix(agent.policy, MDP), value_vector(agent.value_net, MDP)
    assert_within_se(mean, se, expected_gae_advantage(MDP, pi, v_hat, GAMMA, 0.95).ravel())


# --- policies and gradients -----------------------------------------------------------------
def make_policy(seed: int, dtype: torch.dtype = torch.float32) -> CategoricalPolicy:
    """pgscope's categorical policy, output layer scaled up so that it is far from uniform
    (orthogonal init gives logits near 0)."""
    torch.manual_seed(seed)
    policy = CategoricalPolicy(S, A, (16,), "tanh", True).to(dtype)
    with torch.no_grad():
        policy.net[-1].weight.mul_(150.0)
    return policy


def obs_transform(x: np.ndarray) -> np.ndarray:
    """A stand-in for observation normalization."""
    return (x - 1.0 / S) / 0.4


def test_policy_matrix_evaluates_the_network():
    policy = make_policy(0)
    pi = policy_matrix(policy, MDP)
    assert pi.shape == (S, A) and np.allclose(pi.sum(1), 1.0)
    assert pi.min() < 0.2 < 0.5 < pi.max()  # far from uniform
    with torch.no_grad():
        for s in range(S):
            x = torch.as_tensor(obs_transform(np.eye(S)[s]), dtype=torch.float32)
            expected = torch.softmax(policy.net(x), -1).numpy()
            np.testing.assert_allclose(policy_matrix(policy, MDP, obs_transform)[s], expected,
                                       rtol=1e-5)


def flat_jacobian_of_log_pi(policy: CategoricalPolicy) -> torch.Tensor:
    """``d log pi(a|s) / d theta`` as an ``(S, A, n_params)`` tensor, via
    ``torch.autograd.functional.jacobian`` on the flat parameter vector."""
    names = [n for n, _ in policy.net.named_parameters()]
    params = list(policy.net.parameters())
    sizes = [p.numel() for p in params]
    obs = torch.eye(S, dtype=params[0].dtype)

    def log_pi(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        weights = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
        return torch.log_softmax(torch.func.functional_call(policy.net, weights, (obs,)), -1)

    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.jacobian(log_pi, flat0)


def exact_return(policy: CategoricalPolicy, gamma: float) -> torch.Tensor:
    """``J(theta) = rho^T (I - gamma P_pi)^{-1} r_pi``, differentiable in torch."""
    pi = policy.dist(torch.eye(S, dtype=torch.float64)).probs
    P, R = torch.from_numpy(MDP.P), torch.from_numpy(MDP.R)
    P_pi, r_pi = torch.einsum("sa,sat->st", pi, P), (pi * R).sum(-1)
    V = torch.linalg.solve(torch.eye(S, dtype=torch.float64) - gamma * P_pi, r_pi)
    return torch.from_numpy(MDP.rho) @ V


def test_exact_gradient_is_the_policy_gradient_theorem_up_to_state_weighting():
    gamma = 0.95
    policy = make_policy(1, torch.float64)
    params = list(policy.parameters())
    J = exact_return(policy, gamma)
    grad_J = torch.cat([g.reshape(-1) for g in torch.autograd.grad(J, params)])
    # autograd through the linear solve agrees with central finite differences
    flat0 = torch.nn.utils.parameters_to_vector(params).detach()
    for seed in range(3):
        d = torch.randn(flat0.shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        eps = 1e-5
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat0 + eps * d, params)
            j_plus = exact_return(policy, gamma)
            torch.nn.utils.vector_to_parameters(flat0 - eps * d, params)
            j_minus = exact_return(policy, gamma)
            torch.nn.utils.vector_to_parameters(flat0, params)
        assert ((j_plus - j_minus) / (2 * eps)).item() == pytest.approx(
            (grad_J @ d).item(), rel=1e-6)
    # policy-gradient theorem: grad J = sum_s d_gamma(s) sum_a pi Q grad log pi
    pi = policy_matrix(policy, MDP)
    Q = exact_q(MDP, pi, gamma)
    P_pi = np.einsum("sa,sat->st", pi, MDP.P)
    d_gamma = np.linalg.solve((np.eye(S) - gamma * P_pi).T, MDP.rho)
    jac = flat_jacobian_of_log_pi(policy).numpy()
    theorem = np.einsum("s,sa,sa,sap->p", d_gamma, pi, Q, jac)
    np.testing.assert_allclose(theorem, grad_J.numpy(), rtol=1e-8, atol=1e-12)
    # exact_expected_gradient with lam = 1, v_hat = 0: the same sum weighted by mu instead
    mu = stationary_distribution(MDP, pi)
    g = exact_expected_gradient(policy, MDP, gamma, 1.0, np.zeros(S))
    np.testing.assert_allclose(g.numpy(), np.einsum("s,sa,sa,sap->p", mu, pi, Q, jac),
                               rtol=1e-8, atol=1e-12)
    # ... and a state-dependent baseline changes nothing when lam = 1
    v_hat = np.random.default_rng(0).normal(0.0, 2.0, S)
    np.testing.assert_allclose(exact_expected_gradient(policy, MDP, gamma, 1.0, v_hat).numpy(),
                               g.numpy(), rtol=1e-8, atol=1e-12)


def test_exact_gradient_matches_monte_carlo_surrogate_gradient():
    """Average gradient of ``ratio * A`` over ~1M simulated steps (pgscope's GAE, the
    policy's own sampler, observations through ``obs_transform``)."""
    lam = 0.95
    policy = make_policy(2)
    obs = obs_transform(np.eye(S)).astype(np.float32)
    pi = policy_matrix(policy, MDP, obs_transform)
    v_hat = exact_values(MDP, pi, GAMMA) + np.random.default_rng(6).normal(0.0, 1.0, S)
    exact = exact_expected_gradient(policy, MDP, GAMMA, lam, v_hat, obs_transform)

    ro = simulate(MDP, network_actor(policy, obs), n_envs=2000, n_steps=700,
                  rng=np.random.default_rng(7))
    adv = rollout_gae(ro, v_hat, GAMMA, lam)[CUT:-CUT]  # burn-in and rollout-end cut dropped
    states, actions = ro.states[CUT:-CUT].ravel(), ro.actions[CUT:-CUT].ravel()
    x = torch.from_numpy(obs[states])
    a = torch.from_numpy(actions)
    logp = policy.log_prob(policy.dist(x), a)
    ratio = torch.exp(logp - logp.detach())
    surrogate = (ratio * torch.from_numpy(adv.ravel()).float()).mean()
    mc = torch.cat([g.reshape(-1) for g in torch.autograd.grad(surrogate, policy.parameters())])
    cosine = torch.nn.functional.cosine_similarity(mc, exact, dim=0).item()
    assert cosine > 0.99, cosine  # measured: 0.9999
    rel_err = ((mc - exact).norm() / exact.norm()).item()  # measured: 0.012 (noise ~0.014)
    assert rel_err < 0.03
    # the check has power: lam = 1 (no GAE bias; equal to v_hat = V) is 5.6% away
    unbiased = exact_expected_gradient(policy, MDP, GAMMA, 1.0, v_hat, obs_transform)
    assert rel_err < 0.5 * ((mc - unbiased).norm() / exact.norm()).item()
