"""The probes' two definitions where the paper's and pgscope's differ (docs/design.md
section 3), each against exact answers on tabular MDPs:

* value error: the paper's returns cut at the rollout end or a time limit, and pgscope's
  truncation rule, on deterministic chains where every return is known in closed form and
  on the stochastic default MDP through the expectations of finite-horizon dynamic
  programming;
* baselines: 'zero' (discounted returns, the paper's no-baseline estimator) against the
  exact policy gradient, 'zero-gae' (GAE with V = 0) against its own formula;
* landscape: env seeds disjoint across grid points and random directions, intervals over
  the directions that cover the exact return.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from pgscope.agent import Agent, build_agent
from pgscope.config import make_config
from pgscope.envs.tabular import (
    ENV_ID,
    TabularEnv,
    TabularMDP,
    default_mdp,
    exact_values,
    policy_matrix,
)
from pgscope.probes.values import effective_horizon, value_probe

GAMMA = 0.5  # effective horizon H = 7 at horizon_tol 0.01: short chains suffice
FLAT = dict(reward_scale=False, reward_clip=False, obs_norm=False, obs_clip=False,
            adv_norm=False, hidden=(8,), num_envs=1, minibatches=1)


class TableValue(torch.nn.Module):
    """A value net that returns ``V[s]`` for the one-hot observation of state ``s`` (and 0
    for the all-zero observation after termination)."""

    def __init__(self, values: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("v", torch.as_tensor(values, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float() @ self.v


def chain_mdp(n: int) -> TabularMDP:
    """A deterministic chain with one action: 0 -> 1 -> ... -> n-1 -> terminate, reward
    ``1 + i / 10`` in state ``i``. Every return is then a known number."""
    P = np.zeros((n, 1, n))
    for i in range(n - 1):
        P[i, 0, i + 1] = 1.0
    rho = np.zeros(n)
    rho[0] = 1.0
    return TabularMDP(P=P, R=(1.0 + np.arange(n) / 10.0)[:, None], rho=rho)


def register_chain(n: int, limit: int | None) -> str:
    env_id = f"pgscope-test/Chain{n}-L{limit}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda: TabularEnv(chain_mdp(n)),
                     max_episode_steps=limit, disable_env_checker=True)
    return env_id


def tabular_agent(env_id: str, **overrides) -> Agent:
    cfg = make_config("ppo", env_id, dict(FLAT, **overrides))
    env = gym.make(env_id)
    torch.manual_seed(0)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    env.close()
    return agent


def finite_horizon_values(mdp: TabularMDP, pi: np.ndarray, gamma: float, m: int
                          ) -> np.ndarray:
    """``V_m[s] = E[sum_{k < m} gamma^k r_k | s_0 = s]``: the value of a return cut after
    ``m`` steps (or at termination), by ``m`` Bellman backups from 0."""
    P_pi = np.einsum("sa,sat->st", pi, mdp.P)
    r_pi = (pi * mdp.R).sum(-1)
    v = np.zeros(mdp.n_states)
    for _ in range(m):
        v = r_pi + gamma * P_pi @ v
    return v


def state_distributions(mdp: TabularMDP, pi: np.ndarray, steps: int) -> np.ndarray:
    """``d[t, s]``: the probability of state ``s`` at step ``t`` of a rollout that starts at
    a reset and resets (``s ~ rho``) in the same step an episode terminates."""
    P_pi = np.einsum("sa,sat->st", pi, mdp.P)
    K = P_pi + (1.0 - P_pi.sum(1))[:, None] * mdp.rho[None, :]
    d = [mdp.rho]
    for _ in range(steps - 1):
        d.append(d[-1] @ K)
    return np.array(d)


# --- value error: the paper's cut returns and pgscope's truncation rule --------------------
@pytest.mark.parametrize("n, limit, keep", [(5, None, 13), (30, 12, 16)])
def test_value_error_definitions_on_a_deterministic_chain(n, limit, keep):
    """Rollouts of ``keep`` steps cut some returns (and a time limit of 12 steps cuts the
    30-state chain's episodes): the paper's error counts those partial sums as true
    returns, so even the exact value function has a large error; pgscope's rule leaves them
    out, and the exact value function errs only by the tail beyond H (gamma^H)."""
    mdp = chain_mdp(n)
    agent = tabular_agent(register_chain(n, limit), gamma=GAMMA, steps_per_iter=keep)
    pi = np.ones((n, 1))
    V = exact_values(mdp, pi, GAMMA)
    agent.value_net = TableValue(V)  # the true value function
    H = effective_horizon(GAMMA, 0.01)
    result = value_probe(agent, n_pairs=2 * keep, seed=0, n_boot=20, progress=False)

    # every step is known: state i = steps since the reset; an episode ends after
    # n steps (termination) or `limit` steps (truncation), and resets in the same step
    length = n if limit is None else min(n, limit)
    Vm = [finite_horizon_values(mdp, pi, GAMMA, m) for m in range(keep + H + 1)]
    paper, pgscope = [], []
    for t in range(keep):
        i = t % length
        to_end = length - i  # steps until the episode ends
        paper.append(abs(V[i] - Vm[min(to_end, keep - t)][i]) / Vm[min(to_end, keep - t)][i])
        if limit is None or limit - i >= H:  # pgscope's rule: no cut within H steps
            g = Vm[min(to_end, keep + H - t)][i]
            pgscope.append(abs(V[i] - g) / g)
    assert result["states"] == 2 * keep
    assert result["states_with_true_return"] == 2 * len(pgscope)
    cut = result["vs_cut_returns"]["relative_error"]["mean"]
    true = result["vs_true_returns"]["relative_error"]["mean"]
    assert cut == pytest.approx(np.mean(paper), rel=1e-5)
    assert true == pytest.approx(np.mean(pgscope), rel=1e-4, abs=1e-6)
    assert true < GAMMA**H  # ~0: only the tail beyond H is missing
    assert cut > 0.05  # the documented difference: cut returns count as true
    # the targets it is trained on: GAE(lambda) with the true V is exact except where the
    # rollout end bootstraps (exactly, since V is true) or a time limit truncates (same)
    assert result["vs_gae_targets"]["relative_error"]["mean"] < 1e-5
    assert result["settings"]["definitions"]["vs_cut_returns"].startswith("the paper's")
    assert result["settings"]["definitions"]["vs_true_returns"].startswith("pgscope's")


def positive_mdp() -> TabularMDP:
    """The default MDP with every reward raised by 1 (rewards in [0, 2]), so that values are
    large and a cut return is clearly smaller than the full one."""
    base = default_mdp()
    return TabularMDP(P=base.P, R=base.R + 1.0, rho=base.rho)


def test_signed_value_errors_match_finite_horizon_expectations():
    """On a stochastic MDP the signed error mean(V - G) of the exact value function has an
    exact expectation for both definitions: the mean over the kept steps t of
    ``sum_s d_t(s) (V(s) - V_m(s))``, with ``m`` the steps left before the cut
    (``keep - t`` for the paper's returns, ``keep + H - t`` for pgscope's). The probe's
    intervals cover both; the paper's excludes 0, pgscope's is ~0."""
    mdp, gamma, keep = positive_mdp(), 0.9, 32
    env_id = "pgscope-test/TabularPlus-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda: TabularEnv(positive_mdp()),
                     max_episode_steps=None, disable_env_checker=True)
    agent = tabular_agent(env_id, gamma=gamma, steps_per_iter=keep)
    pi = policy_matrix(agent.policy, mdp)
    V = exact_values(mdp, pi, gamma)
    agent.value_net = TableValue(V)
    H = effective_horizon(gamma, 0.01)
    result = value_probe(agent, n_pairs=64 * keep * 3, seed=1, n_boot=200, progress=False)

    d = state_distributions(mdp, pi, keep)
    expected = {
        "vs_cut_returns": np.mean([d[t] @ (V - finite_horizon_values(mdp, pi, gamma, keep - t))
                                   for t in range(keep)]),
        "vs_true_returns": np.mean([d[t] @ (V - finite_horizon_values(mdp, pi, gamma,
                                                                      keep + H - t))
                                    for t in range(keep)]),
    }
    assert expected["vs_cut_returns"] > 0.5  # measured 0.69: the cut biases the paper's
    assert abs(expected["vs_true_returns"]) < 1e-3  # gamma^H: pgscope's is ~0
    for key, exact in expected.items():
        err = result[key]["mean_error"]
        assert err["ci_low"] <= exact <= err["ci_high"], (key, err, exact)
    assert result["vs_cut_returns"]["mean_error"]["ci_low"] > 0  # the difference exists


def test_gae_targets_are_those_of_a_training_rollout():
    """The value probe's segments run H steps past the kept ones; its GAE targets must still
    be a training rollout's: the same first steps collected as a rollout of exactly
    ``steps_per_env`` steps give the same V_old + A_GAE (the trace stops at the end)."""
    from pgscope.probes.sampling import sample_batch
    from pgscope.probes.values import training_targets, true_return_segments

    keep, n_envs = 16, 4
    agent = tabular_agent(ENV_ID, gamma=0.9, gae_lambda=0.95, steps_per_iter=keep)
    H = effective_horizon(0.9, 0.01)
    seg = next(true_return_segments(agent, keep * n_envs, seed=3))
    # true_return_segments draws chunk 0 with seed * 10**8 (the seed it was given)
    short = sample_batch(agent, keep * n_envs, seed=3 * 10**8, horizon=keep, max_envs=n_envs)
    torch.testing.assert_close(seg.batch.obs, short.obs)  # the same first steps
    np.testing.assert_allclose(training_targets(seg.batch, agent), short.returns.numpy(),
                               rtol=1e-5, atol=1e-5)
    long = sample_batch(agent, (keep + H) * n_envs, seed=3 * 10**8, horizon=keep + H,
                        max_envs=n_envs)
    full_trace = long.returns.numpy()[:keep * n_envs]  # GAE whose trace runs on
    assert np.abs(full_trace - short.returns.numpy()).max() > 1e-2  # the check has power


# --- baselines: 'zero' (discounted returns, the paper's) and 'zero-gae' (GAE with V = 0) ---
def delayed_reward_mdp() -> TabularMDP:
    """State 0 chooses: action 0 pays nothing now but leads to state 1, which pays 1 per
    step; action 1 pays 1 now and leads to state 2, which pays nothing. States 1 and 2
    last 1/0.2 = 5 steps on average (both actions alike), then the episode ends. The return
    favours action 0, short-sighted sums of rewards favour action 1."""
    P = np.zeros((3, 2, 3))
    P[0, 0, 1] = P[0, 1, 2] = 1.0
    P[1, :, 1] = P[2, :, 2] = 0.8
    R = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    return TabularMDP(P=P, R=R, rho=np.array([1.0, 0.0, 0.0]))


def register_delayed() -> str:
    env_id = "pgscope-test/Delayed-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda: TabularEnv(delayed_reward_mdp()),
                     max_episode_steps=None, disable_env_checker=True)
    return env_id


def test_zero_baselines_equal_their_formulas():
    """On one chunk: 'zero' is sum_k gamma^k r_{t+k} to the episode's end over the whole
    segment (H steps past the kept ones), 'zero-gae' is sum_k (gamma lambda)^k r_{t+k} to
    the episode's end or the end of the kept steps, computed here by direct sums."""
    from pgscope.probes.baselines import baseline_advantages, lookahead_chunks
    from pgscope.probes.sampling import sample_batch

    gamma, lam, keep, n_envs = 0.9, 0.8, 16, 4
    agent = tabular_agent(ENV_ID, gamma=gamma, gae_lambda=lam, steps_per_iter=keep)
    H = effective_horizon(gamma, 0.01)
    batch, G = next(lookahead_chunks(agent, keep * n_envs, seed=4))
    adv = baseline_advantages(batch, G, {}, gamma, lam)
    assert set(adv) == {"zero", "zero-gae"} and batch.num_envs == n_envs
    # the same segments again (same seed), all keep + H steps of them
    full = sample_batch(agent, (keep + H) * n_envs, seed=4, horizon=keep + H, max_envs=n_envs)
    r = full.rewards.numpy().reshape(keep + H, n_envs)
    done = full.done.numpy().reshape(keep + H, n_envs)
    np.testing.assert_array_equal(r[:keep].ravel(), batch.rewards.numpy())

    def discounted(t: int, i: int, factor: float, end: int) -> float:
        total = 0.0
        for k in range(end - t):
            total += factor**k * r[t + k, i]
            if done[t + k, i]:
                break
        return total

    zero = np.array([[discounted(t, i, gamma, keep + H) for i in range(n_envs)]
                     for t in range(keep)]).ravel()
    zero_gae = np.array([[discounted(t, i, gamma * lam, keep) for i in range(n_envs)]
                         for t in range(keep)]).ravel()
    np.testing.assert_allclose(adv["zero"].numpy(), zero, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv["zero-gae"].numpy(), zero_gae, rtol=1e-5, atol=1e-6)
    assert np.abs(zero - zero_gae).max() > 0.5  # the two are different quantities


def test_zero_baseline_is_the_unbiased_policy_gradient():
    """The mean of K 'zero' estimates agrees with the exact policy gradient
    ``(1/T) sum_t sum_s d_t(s) sum_a pi(a|s) Q(s, a) grad log pi(a|s)`` (the
    policy-gradient theorem under the sample's state distributions d_t), within sampling
    error along the direction that separates it from 'zero-gae', whose own exact
    expectation (lambda-discounted rewards cut at the rollout end) it matches in turn.
    On this MDP the two point in opposite directions."""
    from pgscope.envs.tabular import exact_q
    from pgscope.probes.baselines import baseline_gradients

    gamma, lam, keep, n_envs, K = 0.7, 0.5, 32, 16, 8
    mdp = delayed_reward_mdp()
    agent = tabular_agent(register_delayed(), gamma=gamma, gae_lambda=lam,
                          steps_per_iter=keep)
    pi = policy_matrix(agent.policy, mdp)
    H = effective_horizon(gamma, 0.01)
    d = state_distributions(mdp, pi, keep)  # one chunk: steps 0 .. keep - 1 from a reset

    def expected_gradient(A: np.ndarray) -> np.ndarray:
        """E of the estimator with advantages A[t, s, a] at step t."""
        W = np.einsum("ts,sa,tsa->sa", d, pi, A) / keep
        logp = agent.policy.dist(torch.as_tensor(mdp.observations())).logits
        g = torch.autograd.grad((torch.as_tensor(W, dtype=logp.dtype) * logp).sum(),
                                list(agent.policy.parameters()))
        return torch.cat([x.reshape(-1) for x in g]).double().numpy()

    def q_cut(factor: float, m: int) -> np.ndarray:  # E[sum_{k<m} factor^k r_k | s, a]
        return mdp.R + factor * mdp.P @ finite_horizon_values(mdp, pi, factor, m - 1)

    policy_gradient = expected_gradient(np.stack([exact_q(mdp, pi, gamma)] * keep))
    exact = {"zero": expected_gradient(np.stack([q_cut(gamma, keep + H - t)
                                                 for t in range(keep)])),
             "zero-gae": expected_gradient(np.stack([q_cut(gamma * lam, keep - t)
                                                     for t in range(keep)]))}
    # H steps of lookahead leave 'zero' within gamma^H of the policy gradient
    assert np.linalg.norm(exact["zero"] - policy_gradient) < 1e-3 * np.linalg.norm(
        policy_gradient)
    ests = [baseline_gradients(agent, keep * n_envs, seed=1000 * (j + 1), value_fns={})
            for j in range(K)]
    u = exact["zero"] - exact["zero-gae"]
    u /= np.linalg.norm(u)
    for name in ("zero", "zero-gae"):
        g = np.stack([e[name] for e in ests])
        along = g @ u
        se = along.std(ddof=1) / np.sqrt(K)
        assert abs(along.mean() - exact[name] @ u) < 4 * se, name  # measured |z| < 0.1
        mean = g.mean(0)
        assert mean @ exact[name] / np.linalg.norm(mean) / np.linalg.norm(exact[name]) > 0.8
    # the check has power: 'zero' is 7 SE away from what 'zero-gae' estimates
    along = np.stack([e["zero"] for e in ests]) @ u
    assert along.mean() - exact["zero-gae"] @ u > 4 * along.std(ddof=1) / np.sqrt(K)
    assert exact["zero"] @ exact["zero-gae"] < 0  # opposite directions on this MDP


def test_monte_carlo_dataset_streams_the_true_returns_and_refuses_what_memory_cannot_hold(
        monkeypatch):
    """The data set of the 'true' value fit is the true-return states of every chunk, in
    order (streamed into one array, not a list of chunks); a fit_pairs whose data set
    would not fit in half the available memory is refused before sampling."""
    from pgscope.errors import ProbeError
    from pgscope.probes import ProbeSettings
    from pgscope.probes import baselines as probe_baselines
    from pgscope.probes.values import true_return_segments

    agent = tabular_agent(register_chain(30, 12), gamma=GAMMA, steps_per_iter=8)
    obs, returns = probe_baselines.monte_carlo_dataset(agent, 8 * 70, seed=2)
    parts = list(true_return_segments(agent, 8 * 70, 2 + 13))
    assert len(parts) == 2  # two chunks of 64 segments
    torch.testing.assert_close(obs, torch.cat([p.batch.obs[torch.from_numpy(p.true)]
                                               for p in parts]))
    np.testing.assert_allclose(returns.numpy(), np.concatenate([p.G[p.true] for p in parts]),
                               rtol=1e-6)
    assert len(obs) == 2 * 64 * 6  # elapsed 0..5 (of 0..7) pass the rule: 12 - 5 >= H

    settings = ProbeSettings(fit_pairs=5_000_000)
    monkeypatch.setattr(probe_baselines, "available_memory", lambda: 2**40)
    probe_baselines._check(settings, agent.config)  # 5e6 pairs, 1 TiB free: fine
    monkeypatch.setattr(probe_baselines, "available_memory", lambda: 2**28)
    with pytest.raises(ProbeError, match="fewer fit pairs"):
        probe_baselines._check(settings, agent.config)
    probe_baselines._check(ProbeSettings(fit_pairs=100_000), agent.config)


# --- landscape: independent env seeds per grid point, intervals over random directions ----
@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    from pgscope import train

    out = tmp_path_factory.mktemp("landscape") / "run"
    cfg = make_config("ppo", ENV_ID, dict(FLAT, steps_per_iter=128, minibatches=4, epochs=2,
                                          total_steps=128, gamma=0.9, gae_lambda=0.95,
                                          hidden=(16,)))
    return train(cfg, out, progress=False)


@pytest.fixture(scope="module")
def landscape(tabular_run):
    """A landscape along the step (direction multiple 0 only) over 5 random directions,
    with every call of episode_returns recorded (its env seed and number of envs)."""
    from pgscope.probes import landscape as probe_landscape

    calls: list[tuple[int, int]] = []
    real = probe_landscape.episode_returns

    def recorded(agent, n_steps, seed, n_envs=32, **kwargs):
        calls.append((seed, n_envs))
        return real(agent, n_steps, seed, n_envs=n_envs, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe_landscape, "episode_returns", recorded)
        result = probe_landscape.landscape_probe(tabular_run, steps=(0, 1, 2),
                                                 directions=(0,), counts=(100, 400), seed=3,
                                                 progress=False, random_directions=5)
    return result, calls


def test_landscape_env_seeds_are_disjoint_across_grid_points(landscape):
    from pgscope.probes.landscape import grid_seeds

    result, calls = landscape
    assert len(calls) == 5 * 3 * 1  # one rollout per point of each random direction
    used = [set(range(seed, seed + n_envs)) for seed, n_envs in calls]
    assert len(set().union(*used)) == sum(len(u) for u in used)  # no env seed twice
    assert [seed for seed, _ in calls] == list(np.ravel(result["env_seeds"]))
    # the same holds for a full grid and across probe seeds
    shape, n_envs = (5, 4, 4), 32
    starts = np.concatenate([grid_seeds(s, shape, n_envs).ravel() for s in (0, 1, 2)])
    covered = (starts[:, None] + np.arange(n_envs)).ravel()
    assert len(np.unique(covered)) == len(covered)
    # along the step every direction evaluates the same parameters: with independent
    # seeds the estimates differ (shared seeds would repeat one estimate)
    along = np.array(result["per_direction"]["true_return"]["400"])[:, :, 0]
    assert (along.std(0) > 0).all()


def test_landscape_intervals_cover_the_exact_return_along_the_step(tabular_run, landscape):
    """Along the step (b = 0) the D estimates at a point are independent repeats, so their
    interval covers the exact mean episode return J = rho^T V (gamma = 1) of the policy
    at theta_old + a Delta; the replayed step is reproduced here to compute J."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from pgscope.probes.trust_region import replay_update

    result, _ = landscape
    captured: dict = {}
    replay_update(tabular_run, None, 3, capture=captured)
    policy = captured["agent"].policy
    params = list(policy.parameters())
    new = parameters_to_vector(params).detach().clone()
    old = parameters_to_vector(captured["old_policy"].parameters()).detach()
    mdp = default_mdp()
    mean = np.array(result["true_return"]["400"])[:, 0]
    ci = result["intervals"]["true_return"]["400"]
    for i, a in enumerate(result["settings"]["steps"]):
        vector_to_parameters(old + a * (new - old), params)
        exact = float(mdp.rho @ exact_values(mdp, policy_matrix(policy, mdp), 1.0))
        low, high = ci["ci_low"][i][0], ci["ci_high"][i][0]
        assert low <= exact <= high, (a, low, exact, high, mean[i])
        assert high - low < 1.0  # measured ~0.5: the interval is informative
    vector_to_parameters(new, params)


def test_direction_interval_has_its_nominal_coverage():
    """The Student-t interval over D = 5 directions covers the mean of normal estimates
    95% of the time (a normal 1.96 interval would cover only ~88%)."""
    from pgscope.probes.landscape import direction_interval

    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 3.0, size=(5, 20_000))
    mean, low, high = direction_interval(values)
    np.testing.assert_allclose(mean, values.mean(0))
    coverage = np.mean((low <= 2.0) & (2.0 <= high))
    assert abs(coverage - 0.95) < 0.01, coverage
    _, low1, high1 = direction_interval(values[:1])
    assert np.isnan(low1).all() and np.isnan(high1).all()
