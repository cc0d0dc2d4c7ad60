"""Separate policy and value MLPs (docs/design.md section 1.1).

Continuous actions: diagonal Gaussian with a state-independent log-std parameter.
Discrete actions: categorical over logits. Both are :class:`Policy`: the one interface the
rollout, the algorithms and the probes use (``dist(obs)``, ``log_prob(dist, actions)``,
``entropy(dist)``, ``kl(old, new)``, ``mode(dist)``, ``numpy_sampler()``, ...), so none
of them branches on the kind of policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal, kl_divergence

from pgscope.optimizations import activation, init_network

#: ``sample(obs, rng) -> actions``: a policy's fast NumPy sampler (see :func:`numpy_forward`).
Sampler = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@runtime_checkable
class Policy(Protocol):
    """What pgscope needs of a policy network (an ``nn.Module``): its action distribution
    at a batch of states and the per-state quantities of such distributions."""

    #: categorical (True) or Gaussian (False) actions
    discrete: bool

    def dist(self, obs: torch.Tensor) -> Distribution:
        """The action distribution at each state of ``obs``."""
        ...

    def log_prob(self, dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) per state."""
        ...

    def entropy(self, dist: Distribution) -> torch.Tensor:
        """Entropy per state."""
        ...

    def kl(self, old: Distribution, new: Distribution) -> torch.Tensor:
        """Analytic KL(old || new) per state."""
        ...

    def mode(self, dist: Distribution) -> torch.Tensor:
        """The most likely action per state (the deterministic policy)."""
        ...

    def mean_std(self) -> float:
        """Mean standard deviation of the actions (NaN for categorical policies)."""
        ...

    def max_entropy(self) -> float:
        """The largest entropy a distribution of this policy can have."""
        ...

    def numpy_sampler(self) -> Sampler:
        """A fast sampler frozen at the current parameters."""
        ...

    # the nn.Module methods pgscope uses
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any: ...


def one_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A linear layer with one output, ``x . w + b`` (``weight``: ``[..., 1, in]``
    broadcast against ``x``: ``[..., m, in]``), as an elementwise product summed over
    the inputs. Every row is reduced on its own, in the same order, whatever the number
    of rows or of stacked networks; a matrix-vector kernel (``addmm`` with one column,
    ``baddbmm``) picks different kernels for one and for several stacked matrices and so
    rounds a seed's value differently alone and in a batch (docs/architecture.md, "One
    engine")."""
    return (x * weight).sum(-1, keepdim=True) + bias


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose one-output form is
    :func:`one_output`, so that a network's own forward pass and the stacked one
    (:class:`pgscope.engine.stacked.SeedBatched`) give the same bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features == 1:
            return one_output(x, self.weight, self.bias)
        return super().forward(x)


def mlp(sizes: list[int], act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation(act)())
    return nn.Sequential(*layers)


def numpy_forward(net: nn.Sequential) -> Callable[[np.ndarray], np.ndarray]:
    """A float32 NumPy copy of ``net``'s forward pass, frozen at the current weights.

    Rollouts call the policy once per env step on a batch of one (or a few) observations,
    where torch's per-op dispatch costs several times the arithmetic (docs/design.md section 6).
    The weights do not change during a rollout, so the rollout samples through this copy;
    log-probabilities for the update are recomputed by the torch policy in one batch.
    """
    ops: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
    for m in net:
        if isinstance(m, nn.Linear):
            ops.append(("linear", m.weight.detach().numpy().T.copy(),
                        m.bias.detach().numpy().copy()))
        elif isinstance(m, nn.Tanh):
            ops.append(("tanh", None, None))
        elif isinstance(m, nn.ReLU):
            ops.append(("relu", None, None))
        else:  # pragma: no cover - mlp() builds only these
            raise TypeError(f"numpy_forward cannot run {type(m).__name__}")

    def forward(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        for kind, w, b in ops:
            if kind == "linear":
                x = x @ w + b
            elif kind == "tanh":
                x = np.tanh(x)
            else:
                x = np.maximum(x, 0)
        return x

    return forward


class GaussianPolicy(nn.Module):
    """Diagonal Gaussian policy: ``N(mean_net(obs), exp(log_std)^2)``."""

    discrete = False

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], act: str,
                 ortho_init: bool, init_log_std: float = 0.0) -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim], act)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        init_network(self.net, ortho_init, output_gain=0.01)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) per state (lets ``torch.func.functional_call`` take per-sample grads)."""
        return self.log_prob(self.dist(obs), actions)

    def dist(self, obs: torch.Tensor) -> Normal:
        mean = self.net(obs)
        return Normal(mean, self.log_std.exp().expand_as(mean), validate_args=False)

    @staticmethod
    def log_prob(dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        return dist.log_prob(actions).sum(-1)

    @staticmethod
    def entropy(dist: Distribution) -> torch.Tensor:
        return dist.entropy().sum(-1)

    @staticmethod
    def kl(old: Distribution, new: Distribution) -> torch.Tensor:
        """Analytic KL(old || new) per state."""
        return kl_divergence(old, new).sum(-1)

    @staticmethod
    def mode(dist: Distribution) -> torch.Tensor:
        return dist.mean

    def mean_std(self) -> float:
        return float(self.log_std.exp().mean())

    def numpy_sampler(self) -> Sampler:
        """A fast sampler frozen at the current parameters (see :func:`numpy_forward`)."""
        forward = numpy_forward(self.net)
        std = self.log_std.detach().exp().numpy().copy()

        def sample(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            mean = forward(obs)
            return mean + std * rng.standard_normal(mean.shape, dtype=np.float32)

        return sample

    def max_entropy(self) -> float:
        return math.inf


class CategoricalPolicy(nn.Module):
    """Categorical policy over ``logits_net(obs)``."""

    discrete = True

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...], act: str,
                 ortho_init: bool) -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, n_actions], act)
        self.n_actions = n_actions
        init_network(self.net, ortho_init, output_gain=0.01)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) per state (lets ``torch.func.functional_call`` take per-sample grads)."""
        return self.log_prob(self.dist(obs), actions)

    def dist(self, obs: torch.Tensor) -> Categorical:
        return Categorical(logits=self.net(obs), validate_args=False)

    @staticmethod
    def log_prob(dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        return dist.log_prob(actions.long())

    @staticmethod
    def entropy(dist: Distribution) -> torch.Tensor:
        return dist.entropy()

    @staticmethod
    def kl(old: Distribution, new: Distribution) -> torch.Tensor:
        return kl_divergence(old, new)

    @staticmethod
    def mode(dist: Distribution) -> torch.Tensor:
        return cast(Categorical, dist).probs.argmax(-1)

    def mean_std(self) -> float:
        return float("nan")

    def numpy_sampler(self) -> Sampler:
        """A fast sampler frozen at the current parameters (see :func:`numpy_forward`)."""
        forward = numpy_forward(self.net)

        def sample(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            logits = forward(obs).astype(np.float64)
            gumbel = -np.log(-np.log(rng.random(logits.shape)))
            return np.argmax(logits + gumbel, axis=-1)  # Gumbel-max: exact categorical

        return sample

    def max_entropy(self) -> float:
        return math.log(self.n_actions)


class ValueNet(nn.Module):
    """State-value MLP ``V(s)``; output layer gain 1.0 under orthogonal init."""

    def __init__(self, obs_dim: int, hidden: tuple[int, ...], act: str, ortho_init: bool) -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, 1], act)
        init_network(self.net, ortho_init, output_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """The penultimate activations phi(s), ``(..., hidden[-1])``: the input of the last
        linear layer, so ``forward(obs) == last_layer(features(obs)).squeeze(-1)``
        (pgscope.features, docs/dr3.md)."""
        return cast(torch.Tensor, self.net[:-1](obs))

    @property
    def last_layer(self) -> nn.Linear:
        """The output layer ``V(s) = w . phi(s) + b``."""
        return cast(nn.Linear, self.net[-1])
