"""Rollouts of N seeds in lockstep: each seed's own :class:`pgscope.rollout.RolloutCollector`
(its envs, preprocessor and sampling generator, made exactly as a single run makes them)
steps in turn, and one stacked NumPy forward pass per env step gives every seed's action
means; each seed's noise comes from its own generator, drawn as its single run draws it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from pgscope.networks import GaussianPolicy, Policy, ValueNet
from pgscope.rollout import Batch, FinishedEpisodes, RolloutCollector

#: ``sample(obs, rngs) -> actions``: obs ``[N, envs, obs_dim]``, one generator per seed.
StackedSampler = Callable[[np.ndarray, Sequence[np.random.Generator]], np.ndarray]


def stacked_numpy_forward(nets: Sequence[nn.Sequential]) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`pgscope.networks.numpy_forward` of N networks of one architecture at once:
    ``[N, batch, in] -> [N, batch, out]``, with the weights stacked ``[N, in, out]``."""
    layers: list[tuple[type[nn.Module], np.ndarray | None, np.ndarray | None]] = []
    for modules in zip(*nets, strict=True):
        first = modules[0]
        if isinstance(first, nn.Linear):
            w = np.stack([m.weight.detach().numpy().T.copy() for m in modules])
            b = np.stack([m.bias.detach().numpy()[None] for m in modules])
            layers.append((nn.Linear, w, b))
        elif isinstance(first, (nn.Tanh, nn.ReLU)):
            layers.append((type(first), None, None))
        else:  # pragma: no cover - mlp() builds only these
            raise TypeError(f"stacked_numpy_forward cannot run {type(first).__name__}")

    def forward(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        for kind, w, b in layers:
            if w is not None and b is not None:
                x = np.matmul(x, w) + b
            elif kind is nn.Tanh:
                x = np.tanh(x)
            else:
                x = np.maximum(x, 0)
        return x

    return forward


def stacked_sampler(policies: Sequence[Policy]) -> StackedSampler:
    """The seeds' Gaussian policies' samplers as one: the same draws as each policy's own
    ``numpy_sampler`` (mean + std x standard normal from the seed's generator)."""
    gaussian = [p for p in policies if isinstance(p, GaussianPolicy)]
    if len(gaussian) != len(policies):
        raise TypeError("the seed-batched rollout samples Gaussian policies only")
    forward = stacked_numpy_forward([p.net for p in gaussian])
    std = np.stack([p.log_std.detach().exp().numpy()[None] for p in gaussian])

    def sample(obs: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        mean = forward(obs)
        noise = np.stack([rng.standard_normal(mean.shape[1:], dtype=np.float32)
                          for rng in rngs])
        return mean + std * noise

    return sample


def collect_lockstep(collectors: Sequence[RolloutCollector], policies: Sequence[Policy],
                     value_nets: Sequence[ValueNet]
                     ) -> list[tuple[Batch, FinishedEpisodes] | Exception]:
    """One rollout of every seed, the envs of all seeds stepped in lockstep. A seed whose
    env or data raises (e.g. :class:`pgscope.rollout.NonFiniteEnvError`) stops stepping
    and gets its exception in place of a batch; the other seeds go on."""
    sample = stacked_sampler(policies)
    rngs = [c.rng for c in collectors]
    buffers = [c.start_rollout() for c in collectors]
    failed: dict[int, Exception] = {}
    for t in range(collectors[0].cfg.steps_per_env):
        obs = np.stack([np.zeros_like(b.obs[t]) if i in failed else c.observe(b, t)
                        for i, (c, b) in enumerate(zip(collectors, buffers, strict=True))])
        actions = sample(obs, rngs)
        for i, (c, b) in enumerate(zip(collectors, buffers, strict=True)):
            if i not in failed:
                try:
                    c.step(b, t, actions[i])
                except Exception as exc:  # noqa: BLE001 - the seed's own failure
                    failed[i] = exc
    return [failed[i] if i in failed else c.finish_rollout(b, p, v)
            for i, (c, b, p, v) in enumerate(zip(collectors, buffers, policies, value_nets,
                                                   strict=True))]
