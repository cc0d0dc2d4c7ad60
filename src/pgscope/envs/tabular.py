"""A small tabular MDP with exact dynamic-programming answers, the ground truth for the
"Closer Look at Deep Policy Gradients" probes (Ilyas et al., 2020): true values, the true
expected GAE advantage of any value estimate, and the true expected policy gradient of any
:class:`~pgscope.networks.CategoricalPolicy`.

The MDP (:class:`TabularMDP`) has ``n_states`` states, ``n_actions`` actions, transitions
``P[s, a, s']`` whose rows sum to at most 1 (the missing mass ``1 - sum_s' P[s, a, s']`` is
the probability that the episode TERMINATES after taking ``a`` in ``s``), a deterministic
reward ``R[s, a]`` and an initial distribution ``rho[s]``. :class:`TabularEnv` plays it as a
gymnasium env with one-hot observations, registered as ``pgscope/Tabular-v0``.

Notation of the DP functions, for a policy matrix ``pi[s, a]``::

    P_pi[s, s'] = sum_a pi[s, a] P[s, a, s']      (sub-stochastic: rows lose the
    r_pi[s]     = sum_a pi[s, a] R[s, a]           termination probability)

All DP functions work in NumPy float64. ``gamma = 1`` is allowed wherever episodes end with
probability 1 (then ``I - P_pi`` is invertible).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from pgscope.networks import CategoricalPolicy

ENV_ID = "pgscope/Tabular-v0"

ObsTransform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class TabularMDP:
    """A finite MDP with termination.

    Attributes:
        P: ``(n_states, n_actions, n_states)`` transition probabilities; each row
            ``P[s, a]`` sums to at most 1, the rest being the termination probability.
        R: ``(n_states, n_actions)`` reward, paid deterministically for taking ``a`` in ``s``.
        rho: ``(n_states,)`` initial-state distribution.
    """

    P: np.ndarray
    R: np.ndarray
    rho: np.ndarray

    def __post_init__(self) -> None:
        for name in ("P", "R", "rho"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        S, A = self.R.shape
        if self.P.shape != (S, A, S) or self.rho.shape != (S,):
            raise ValueError(f"inconsistent shapes: P {self.P.shape}, R {self.R.shape}, "
                             f"rho {self.rho.shape}")
        if (self.P < 0).any() or (self.P.sum(-1) > 1 + 1e-12).any():
            raise ValueError("P must be non-negative with rows summing to at most 1")
        if (self.rho < 0).any() or not np.isclose(self.rho.sum(), 1.0):
            raise ValueError("rho must be a probability distribution")

    @property
    def n_states(self) -> int:
        return self.R.shape[0]

    @property
    def n_actions(self) -> int:
        return self.R.shape[1]

    @property
    def termination(self) -> np.ndarray:
        """``(n_states, n_actions)`` probability of terminating after ``(s, a)``."""
        return np.clip(1.0 - self.P.sum(-1), 0.0, 1.0)

    def observations(self) -> np.ndarray:
        """The one-hot observations of all states, ``(n_states, n_states)`` float32."""
        return np.eye(self.n_states, dtype=np.float32)


def default_mdp() -> TabularMDP:
    """The fixed MDP behind ``pgscope/Tabular-v0``: 6 states, 3 actions.

    Built from a seeded PCG64 stream using only ``Generator.random`` (whose stream NumPy
    keeps stable across versions) and rounded to 3 decimals, so it is the same everywhere:

    * termination probability ``0.05 + 0.1 u`` per state-action (in [0.05, 0.15], mean
      episode length about 10 steps; episodes always end);
    * the remaining mass spread over next states with weights ``u^3`` (peaked, so that
      different actions lead to clearly different places);
    * rewards ``R[s, a] = 2 u - 1`` in [-1, 1], deterministic;
    * ``rho`` uniform over the first three states.

    The seed was picked so that actions matter: under the uniform policy and
    ``gamma = 0.99`` the Q-values of each state spread by at least 0.69, every action is
    the optimal one in some state (optimal actions ``[2, 0, 1, 2, 2, 1]`` for gamma 0.9 and
    0.99), every state gets at least 12% of the long-run visits, and the mean episode
    length is about 10.5 steps.
    """
    rng = np.random.Generator(np.random.PCG64(20200228))
    S, A = 6, 3
    term = 0.05 + 0.1 * rng.random((S, A))
    weights = rng.random((S, A, S)) ** 3
    P = (1.0 - term)[..., None] * weights / weights.sum(-1, keepdims=True)
    R = 2.0 * rng.random((S, A)) - 1.0
    P = np.round(P, 3)  # rounding keeps rows <= 1 - 0.05 + 0.003, so termination > 0
    rho = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]) / 3.0
    return TabularMDP(P=P, R=np.round(R, 3), rho=rho)


class TabularEnv(gym.Env):
    """Plays a :class:`TabularMDP`: one-hot observations, ``Discrete(n_actions)`` actions.

    ``reset`` draws the state from ``rho`` (``options={"state": s}`` forces it); ``step``
    pays ``R[s, a]`` and draws the next state from ``P[s, a]`` or, with the missing mass,
    terminates (``terminated=True``; the returned observation is then all zeros, since the
    episode has no next state). ``info["state"]`` holds the state index behind the
    observation. There is no time limit, so episodes are never truncated.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, mdp: TabularMDP | None = None) -> None:
        self.mdp = mdp if mdp is not None else default_mdp()
        S, A = self.mdp.n_states, self.mdp.n_actions
        self.observation_space = spaces.Box(0.0, 1.0, shape=(S,), dtype=np.float32)
        self.action_space = spaces.Discrete(A)
        self._eye = self.mdp.observations()
        self._cdf = np.cumsum(np.concatenate(  # last column: terminate
            [self.mdp.P, self.mdp.termination[..., None]], axis=-1), axis=-1)
        self._state = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "state" in options:
            self._state = int(options["state"])
        else:
            self._state = int(self.np_random.choice(self.mdp.n_states, p=self.mdp.rho))
        return self._eye[self._state].copy(), {"state": self._state}

    def step(self, action: Any):
        s, a = self._state, int(action)
        reward = float(self.mdp.R[s, a])
        nxt = int(np.searchsorted(self._cdf[s, a], self.np_random.random(), side="right"))
        if nxt >= self.mdp.n_states:  # the termination column (or float round-off past it)
            return np.zeros(self.mdp.n_states, np.float32), reward, True, False, {"state": -1}
        self._state = nxt
        return self._eye[nxt].copy(), reward, False, False, {"state": nxt}


def register() -> None:
    """Register ``pgscope/Tabular-v0`` (idempotent).

    ``max_episode_steps=None``: no TimeLimit wrapper, so no episode is ever truncated.
    Every return observed is then a complete Monte Carlo return whose expectation is exactly
    :func:`exact_values`, and GAE never needs a time-limit bootstrap.
    """
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=f"{__name__}:TabularEnv", max_episode_steps=None,
                     disable_env_checker=True)


# --- exact dynamic programming ------------------------------------------------------------
def _policy_log_probs(policy: CategoricalPolicy, mdp: TabularMDP,
                      obs_transform: ObsTransform | None) -> torch.Tensor:
    """``log pi(a|s)`` for all states, ``(n_states, n_actions)``, differentiable."""
    obs = mdp.observations()
    if obs_transform is not None:
        obs = obs_transform(obs)
    dtype = next(policy.parameters()).dtype
    return policy.dist(torch.as_tensor(np.asarray(obs), dtype=dtype)).logits


def policy_matrix(policy: CategoricalPolicy, mdp: TabularMDP,
                  obs_transform: ObsTransform | None = None) -> np.ndarray:
    """``pi[s, a]``: the policy's action probabilities at every state.

    The network sees the batch of one-hot observations, passed first through
    ``obs_transform`` (NumPy in, NumPy out; e.g. the agent's observation normalization,
    ``lambda x: agent.preprocessor.obs(x, update=False)``); default identity.
    """
    with torch.no_grad():
        logp = _policy_log_probs(policy, mdp, obs_transform)
    return logp.double().exp().numpy()


def value_vector(value_net: torch.nn.Module, mdp: TabularMDP,
                 obs_transform: ObsTransform | None = None) -> np.ndarray:
    """``v_hat[s]``: a value network's estimate at every state (float64), with the same
    ``obs_transform`` convention as :func:`policy_matrix`."""
    obs = mdp.observations()
    if obs_transform is not None:
        obs = obs_transform(obs)
    dtype = next(value_net.parameters()).dtype
    with torch.no_grad():
        v = value_net(torch.as_tensor(np.asarray(obs), dtype=dtype))
    return v.double().numpy().reshape(mdp.n_states)


def _markov_chain(mdp: TabularMDP, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P_pi[s, s'], r_pi[s])`` of the policy."""
    pi = np.asarray(pi, dtype=np.float64)
    return np.einsum("sa,sat->st", pi, mdp.P), (pi * mdp.R).sum(-1)


def exact_values(mdp: TabularMDP, pi: np.ndarray, gamma: float) -> np.ndarray:
    """``V[s]`` of policy ``pi``: the solution of ``(I - gamma P_pi) V = r_pi``.

    Termination contributes 0 after it (``P_pi`` is sub-stochastic), so ``V[s]`` is the
    expected discounted return ``E[sum_t gamma^t r_t | s_0 = s]`` of a complete episode.
    """
    P_pi, r_pi = _markov_chain(mdp, pi)
    return np.linalg.solve(np.eye(mdp.n_states) - gamma * P_pi, r_pi)


def exact_q(mdp: TabularMDP, pi: np.ndarray, gamma: float,
            V: np.ndarray | None = None) -> np.ndarray:
    """``Q[s, a] = R[s, a] + gamma sum_s' P[s, a, s'] V[s']`` (``V`` computed if not given)."""
    if V is None:
        V = exact_values(mdp, pi, gamma)
    return mdp.R + gamma * mdp.P @ np.asarray(V, dtype=np.float64)


def stationary_distribution(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """``mu[s]``: the long-run fraction of env steps spent in ``s`` when episodes run back
    to back (each termination is followed by a reset ``s ~ rho``), i.e. the state
    distribution of long rollouts.

    By the renewal-reward theorem it is the expected number of visits per episode,
    ``n = rho^T (I - P_pi)^{-1}``, normalized: ``mu = n / sum(n)`` (``sum(n)`` is the mean
    episode length). Equivalently, ``mu`` is the stationary distribution of the chain
    ``K = P_pi + (1 - P_pi 1) rho^T``. Note: undiscounted, unlike the discounted state
    occupancy of the policy-gradient theorem.
    """
    P_pi, _ = _markov_chain(mdp, pi)
    visits = np.linalg.solve((np.eye(mdp.n_states) - P_pi).T, mdp.rho)
    return visits / visits.sum()


def expected_gae_advantage(mdp: TabularMDP, pi: np.ndarray, v_hat: np.ndarray,
                           gamma: float, lam: float) -> np.ndarray:
    """``E[A^GAE_t | s_t = s, a_t = a]`` for a value estimate ``v_hat[s]``, ``(S, A)``.

    GAE as in :func:`pgscope.rollout.gae`: ``A_t = sum_k (gamma lam)^k delta_{t+k}`` with
    ``delta_t = r_t + gamma v_hat(s_{t+1}) - v_hat(s_t)``, no bootstrap after termination
    and the trace stopping there; rollouts are taken as infinitely long (no cut at a
    rollout boundary). With the expected TD error under ``pi``,
    ``delta_bar = r_pi + gamma P_pi v_hat - v_hat``, the expected trace from a state is
    ``u = (I - gamma lam P_pi)^{-1} delta_bar``, and::

        E[A | s, a] = R[s, a] + gamma sum_s' P[s, a, s'] v_hat[s'] - v_hat[s]
                      + gamma lam sum_s' P[s, a, s'] u[s']

    (``P[s, a]`` sums to the survival probability, which handles termination). Checks:
    ``lam = 1`` gives ``Q - v_hat`` for any ``v_hat``; ``v_hat = V`` gives ``Q - V``.
    """
    v_hat = np.asarray(v_hat, dtype=np.float64)
    P_pi, r_pi = _markov_chain(mdp, pi)
    delta_bar = r_pi + gamma * P_pi @ v_hat - v_hat
    u = np.linalg.solve(np.eye(mdp.n_states) - gamma * lam * P_pi, delta_bar)
    one_step = mdp.R + gamma * mdp.P @ v_hat - v_hat[:, None]
    return one_step + gamma * lam * mdp.P @ u


def exact_expected_gradient(policy: CategoricalPolicy, mdp: TabularMDP, gamma: float,
                            lam: float, v_hat: np.ndarray,
                            obs_transform: ObsTransform | None = None) -> torch.Tensor:
    """The expected gradient of the surrogate ``mean_t[ratio_t A_t]`` at ``theta_old``.

    At ``theta_old`` the ratio is 1 and its gradient is ``grad log pi(a_t|s_t)``, so under
    long rollouts (``s ~ mu``, :func:`stationary_distribution`) with unnormalized GAE
    advantages (:func:`expected_gae_advantage`)::

        g = sum_s mu(s) sum_a pi(a|s) A(s, a) grad log pi(a|s)

    computed by autograd on ``sum_s mu(s) sum_a pi_detached(a|s) A(s, a) log pi(a|s)``.
    Returns the flat gradient over ``policy.parameters()`` (in their dtype). With
    ``lam = 1`` and ``v_hat = 0`` this is the policy-gradient theorem's
    ``sum_s d(s) sum_a grad pi(a|s) Q(s, a)`` with the undiscounted ``mu`` in place of the
    discounted occupancy ``d = rho^T (I - gamma P_pi)^{-1}``.
    """
    params = list(policy.parameters())
    logp = _policy_log_probs(policy, mdp, obs_transform)
    pi = logp.detach().double().exp().numpy()
    mu = stationary_distribution(mdp, pi)
    adv = expected_gae_advantage(mdp, pi, v_hat, gamma, lam)
    weights = torch.as_tensor(mu[:, None] * pi * adv, dtype=logp.dtype)
    grads = torch.autograd.grad((weights * logp).sum(), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


register()

__all__ = [
    "ENV_ID",
    "TabularMDP",
    "TabularEnv",
    "default_mdp",
    "register",
    "policy_matrix",
    "value_vector",
    "exact_values",
    "exact_q",
    "stationary_distribution",
    "expected_gae_advantage",
    "exact_expected_gradient",
]
