"""The code-level optimizations, one named piece each (docs/design.md section 1.5).

Each function or class here implements exactly one switch of :class:`pgscope.config.Config`
and is tested on its own in ``tests/test_optimizations.py``. The rollout and the algorithm
updates call these pieces; none of the switches is re-implemented anywhere else.

| switch          | piece                          |
|-----------------|--------------------------------|
| value_clip      | :func:`value_loss`             |
| reward_scale    | :class:`RewardScaler`          |
| ortho_init      | :func:`init_network`           |
| lr_anneal       | :func:`annealed_lr`            |
| reward_clip     | :func:`clip_rewards`           |
| obs_norm        | :class:`ObsNormalizer`         |
| obs_clip        | :func:`clip_observations`      |
| activation      | :func:`activation`             |
| grad_clip       | :func:`clip_gradients`         |
| adv_norm        | :func:`normalize_advantages`   |
| ent_coef        | :func:`entropy_bonus`          |
| kl_stop         | :func:`kl_early_stop`          |
| action_clip     | :func:`clip_actions`           |
| reward_multiplier | :func:`multiply_rewards`     |
| value_dr3_coef  | :func:`dr3_penalty`            |
| value_dr3_form  | :func:`dr3_penalty` (``form``) |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from pgscope.features import dr3_mean


def clip(x: np.ndarray, low: Any, high: Any) -> np.ndarray:
    """``np.clip(x, low, high)`` as two ufunc calls (the same values, NaN and signed zeros
    included; without ``np.clip``'s Python-level dispatch, which the rollout pays several
    times per env step)."""
    return np.minimum(np.maximum(x, low), high)


def combine_moments(mean: Any, var: Any, count: Any, batch_mean: Any, batch_var: Any,
                    n: int) -> tuple[Any, Any, Any]:
    """Chan et al.'s parallel update: the mean, variance and count of ``count`` samples of
    moments ``(mean, var)`` joined with ``n`` samples of moments ``(batch_mean,
    batch_var)``. Elementwise, so it also updates stacked statistics (one per seed) at once
    (:class:`pgscope.engine.lockstep.StackedRunningMeanStd`)."""
    delta = batch_mean - mean
    total = count + n
    new_mean = mean + delta * (n / total)
    m2 = var * count + batch_var * n + delta * delta * (count * n / total)
    return new_mean, m2 / total, total


class RunningMeanStd:
    """Running mean and variance over batches (Chan et al.'s parallel update).

    Gives the same numbers as ``gymnasium.wrappers.utils.RunningMeanStd`` (tested), with
    less per-call overhead for the batch-of-one updates of a rollout step, where it is
    called twice per env step.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        n = x.shape[0]
        if n == 1:
            batch_mean, batch_var = x[0], 0.0
        else:
            batch_mean, batch_var = x.mean(axis=0), x.var(axis=0)
        self.mean, self.var, self.count = combine_moments(
            self.mean, self.var, self.count, batch_mean, batch_var, n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": torch.as_tensor(self.mean), "var": torch.as_tensor(self.var),
                "count": torch.as_tensor(self.count, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean = state["mean"].numpy().astype(np.float64)
        self.var = state["var"].numpy().astype(np.float64)
        self.count = float(state["count"])


# 1. value-function clipping ------------------------------------------------------------
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    targets: torch.Tensor,
    clip_range: float | None,
) -> torch.Tensor:
    """Mean squared error of the value net over the last (sample) dim; with
    ``clip_range`` the PPO-style clipped variant:
    ``max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``."""
    unclipped = (values - targets).pow(2)
    if clip_range is None:
        return unclipped.mean(-1)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return torch.max(unclipped, (clipped_values - targets).pow(2)).mean(-1)


# 2. reward scaling ---------------------------------------------------------------------
class RewardScaler:
    """Divide rewards by the running std of the discounted return (no mean shift).

    The discounted return is tracked per env and reset when an episode ends (terminated
    or truncated), as in the "Implementation Matters" code.
    """

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8) -> None:
        self.gamma = gamma
        self.epsilon = epsilon
        self.rms = RunningMeanStd(shape=())
        self.ret = np.zeros(num_envs, dtype=np.float64)

    def __call__(self, rewards: np.ndarray, done: np.ndarray, update: bool = True
                 ) -> np.ndarray:
        self.ret = self.ret * self.gamma + rewards
        if update:
            self.rms.update(self.ret)
        scaled = rewards / np.sqrt(self.rms.var + self.epsilon)
        self.ret[done] = 0.0
        return scaled

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.rms.state_dict(), "ret": torch.as_tensor(self.ret)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rms.load_state_dict(state)
        ret = state["ret"].numpy().astype(np.float64)
        if ret.shape == self.ret.shape:
            self.ret = ret


# 3. orthogonal init with layer scaling --------------------------------------------------
def init_network(net: nn.Module, orthogonal: bool, output_gain: float) -> None:
    """Orthogonal init (gain sqrt(2) on hidden layers, ``output_gain`` on the last layer,
    zero biases) when ``orthogonal``; otherwise Xavier-uniform with zero biases."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        if orthogonal:
            gain = output_gain if i == len(linears) - 1 else math.sqrt(2)
            nn.init.orthogonal_(layer.weight, gain=gain)
        else:
            nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)


# 4. Adam learning-rate annealing --------------------------------------------------------
def annealed_lr(base_lr: float, iteration: int, num_iterations: int, anneal: bool) -> float:
    """Linear decay to 0 over training: iteration 0 uses ``base_lr``, the last
    ``base_lr / num_iterations``."""
    if not anneal:
        return base_lr
    return base_lr * (1.0 - iteration / num_iterations)


# 5. reward clipping ----------------------------------------------------------------------
def clip_rewards(rewards: np.ndarray, bound: float | None) -> np.ndarray:
    """Clip (already scaled) rewards to ``[-bound, bound]``; ``None`` leaves them."""
    return rewards if bound is None else clip(rewards, -bound, bound)


# 6. observation normalization -----------------------------------------------------------
class ObsNormalizer:
    """Running mean/std observation normalization (stats updated during rollouts only)."""

    def __init__(self, shape: tuple[int, ...], epsilon: float = 1e-8) -> None:
        self.rms = RunningMeanStd(shape=shape)
        self.epsilon = epsilon

    def update(self, obs: np.ndarray) -> None:
        self.rms.update(obs)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return (obs - self.rms.mean) / np.sqrt(self.rms.var + self.epsilon)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.rms.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rms.load_state_dict(state)


# 7. observation clipping -----------------------------------------------------------------
def clip_observations(obs: np.ndarray, bound: float | None) -> np.ndarray:
    """Clip (already normalized) observations to ``[-bound, bound]``."""
    return obs if bound is None else clip(obs, -bound, bound)


# 8. activation ---------------------------------------------------------------------------
def activation(name: str) -> type[nn.Module]:
    """``"tanh"`` (the default of every preset) or ``"relu"``."""
    return {"tanh": nn.Tanh, "relu": nn.ReLU}[name]


# 9. global gradient-norm clipping ---------------------------------------------------------
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm of ``params`` to ``max_norm`` (if given); return the
    norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        norms = [g.norm() for g in (p.grad for p in params) if g is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms)))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


# further switches --------------------------------------------------------------------------
def multiply_rewards(rewards: np.ndarray, multiplier: float) -> np.ndarray:
    """Henderson et al.'s reward-scale experiment: the learner sees ``multiplier x reward``
    (before reward scaling and clipping); the logged episode returns are not multiplied."""
    return rewards if multiplier == 1.0 else rewards * multiplier


def normalize_advantages(adv: torch.Tensor, enabled: bool, eps: float = 1e-8) -> torch.Tensor:
    """Per-minibatch advantage normalization to zero mean and unit std (the sample std,
    m - 1 in the denominator) over the last (sample) dim: each seed's own in the
    engine's ``[N, m]``. The std is the two-pass sqrt(sum((a - mean)^2) / (m - 1)), whose
    sums reduce each row alike whatever N; ``Tensor.std``'s float64 kernel reduces one row
    differently from several (docs/architecture.md, "One engine")."""
    m = adv.shape[-1]
    if not enabled or m < 2:
        return adv
    centered = adv - adv.mean(-1, keepdim=True)
    std = (centered.square().sum(-1, keepdim=True) / (m - 1)).sqrt()
    return centered / (std + eps)


def entropy_bonus(entropy: torch.Tensor, coef: float) -> torch.Tensor:
    """The term subtracted from the policy loss to reward entropy (0 when ``coef`` is 0):
    ``coef`` x the mean entropy over the last (sample) dim."""
    return coef * entropy.mean(-1)


def kl_early_stop(mean_kl: float, target_kl: float, enabled: bool) -> bool:
    """True when the update epochs should stop: mean KL(old||new) above 1.5 x target."""
    return enabled and mean_kl > 1.5 * target_kl


def clip_actions(actions: np.ndarray, low: np.ndarray | None, high: np.ndarray | None,
                 enabled: bool) -> np.ndarray:
    """Clip sampled actions to the action bounds before they reach the env. The unclipped
    sample is what the rollout stores and the update scores. Without bounds (discrete
    actions: ``None``) the actions pass unchanged."""
    if not enabled or low is None or high is None:
        return actions
    return clip(actions, low, high)


def adapt_kl_beta(beta: float, mean_kl: float, target_kl: float) -> float:
    """ppo-kl's adaptive penalty: double beta when KL > 1.5 target, halve it when
    KL < target / 1.5 (Schulman et al. 2017, section 4)."""
    if mean_kl > 1.5 * target_kl:
        return beta * 2.0
    if mean_kl < target_kl / 1.5:
        return beta / 2.0
    return beta


def dr3_penalty(features: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                next_obs: torch.Tensor, valid: torch.Tensor, coef: float,
                form: str = "abs") -> torch.Tensor:
    """The DR3 regularizer (Kumar et al. 2021) added to the value loss:
    ``coef * mean_i |phi(s_i) . phi(s'_i)|`` (``form="abs"``, the default) or
    ``coef * mean_i phi(s_i) . phi(s'_i)`` (``"signed"``;
    :func:`pgscope.features.dr3_pair_values`) over the pairs with ``valid[i]``
    (:func:`pgscope.features.dr3_pairs`: the successor ``s'_i = next_obs[i]`` is not
    terminal), where ``phi = features`` (:meth:`ValueNet.features`); the gradient flows
    through both features. Exactly 0 (no forward pass) when ``coef`` is 0, and 0 when no
    pair is valid. The mean is a masked one over the last (sample) dim, so the engine gets
    each seed's own."""
    if coef == 0:
        return torch.zeros((), dtype=obs.dtype)
    return coef * dr3_mean(features(obs), features(next_obs), valid, form)
