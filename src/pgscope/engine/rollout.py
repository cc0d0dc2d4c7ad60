"""The rollout: N >= 1 seeds' rollouts in lockstep (a single run is the batch of one;
:func:`collect_one` collects for one agent, e.g. a probe's). Each seed keeps its own
:class:`pgscope.rollout.RolloutCollector` (its envs, preprocessor and sampling generator,
made exactly as a single run makes them); per env step one stacked NumPy forward pass gives
every seed's action means, each seed's noise comes from its own generator (drawn as its
single run draws it), and the rest of the step runs on arrays stacked over the seeds
(:mod:`pgscope.engine.lockstep`), written back to each collector at the rollout's end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import cast

import numpy as np
import torch
from torch import nn

from pgscope.engine.lockstep import (
    StackedEpisodes,
    StackedPreprocessor,
    can_step_directly,
    clip_stacked_actions,
    first_non_finite,
    step_envs,
)
from pgscope.envs.batch_step import LocomotionBatch
from pgscope.networks import CategoricalPolicy, GaussianPolicy, Policy, ValueNet
from pgscope.rollout import (
    Batch,
    FinishedEpisodes,
    NonFiniteEnvError,
    RolloutBuffers,
    RolloutCollector,
    check_finite_env_output,
)

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
    """The seeds' policies' samplers as one, each seed's draws from its own generator:
    Gaussian, mean + std x standard normal (float32); categorical, Gumbel-max over the
    logits (float64 uniforms), as each policy's own ``numpy_sampler`` draws them."""
    if all(isinstance(p, GaussianPolicy) for p in policies):
        gaussian = [cast(GaussianPolicy, p) for p in policies]
        forward = stacked_numpy_forward([p.net for p in gaussian])
        std = np.stack([p.log_std.detach().exp().numpy()[None] for p in gaussian])

        def sample(obs: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
            mean = forward(obs)
            noise = np.empty_like(mean)
            for rng, out in zip(rngs, noise, strict=True):
                rng.standard_normal(dtype=np.float32, out=out)
            return mean + std * noise

        return sample
    if all(isinstance(p, CategoricalPolicy) for p in policies):
        logits_of = stacked_numpy_forward([cast(CategoricalPolicy, p).net for p in policies])

        def sample_discrete(obs: np.ndarray, rngs: Sequence[np.random.Generator]
                            ) -> np.ndarray:
            logits = logits_of(obs).astype(np.float64)
            uniform = np.stack([rng.random(logits.shape[1:]) for rng in rngs])
            return np.argmax(logits - np.log(-np.log(uniform)), axis=-1)  # Gumbel-max

        return sample_discrete
    raise TypeError("the rollout samples policies of one kind, all GaussianPolicy or all "
                    f"CategoricalPolicy, not {sorted({type(p).__name__ for p in policies})}")


def stacked_buffers(collectors: Sequence[RolloutCollector]
                    ) -> tuple[RolloutBuffers, list[RolloutBuffers]]:
    """One rollout's arrays for every seed, ``[seeds, steps, envs, ...]``, and each seed's
    :class:`RolloutBuffers` as views of them (what its own ``start_rollout`` makes)."""
    template = collectors[0].start_rollout()
    arrays = {f.name: np.zeros((len(collectors), *value.shape), dtype=value.dtype)
              for f in fields(RolloutBuffers)
              if isinstance(value := getattr(template, f.name), np.ndarray)}
    stacked = RolloutBuffers(**arrays, episodes=FinishedEpisodes())
    seeds = [RolloutBuffers(**{k: v[i] for k, v in arrays.items()},
                            episodes=FinishedEpisodes()) for i in range(len(collectors))]
    return stacked, seeds


def collect_lockstep(collectors: Sequence[RolloutCollector], policies: Sequence[Policy],
                     value_nets: Sequence[ValueNet]
                     ) -> list[tuple[Batch, FinishedEpisodes] | Exception]:
    """One rollout of every seed, the envs of all seeds stepped in lockstep: each seed's
    ``Batch``, episodes and collector state are bit-identical to its own
    :meth:`RolloutCollector.collect` (the per-step work runs on stacked arrays,
    :mod:`pgscope.engine.lockstep`). A seed whose env or data raises (e.g.
    :class:`pgscope.rollout.NonFiniteEnvError`) stops stepping and gets its exception in
    place of a batch; the other seeds go on (the failed seed's collector keeps the state
    of the rollout's start, bar its sampling generator and envs)."""
    if not all(can_step_directly(c.envs) for c in collectors):
        raise TypeError("the rollout steps gymnasium SyncVectorEnvs with "
                        "same-step autoreset (pgscope.envs.make_vector_env) only")
    first, n = collectors[0], len(collectors)
    sample = stacked_sampler(policies)
    rngs = [c.rng for c in collectors]
    pre = StackedPreprocessor([c.pre for c in collectors])
    running = StackedEpisodes(collectors)
    buf, buffers = stacked_buffers(collectors)
    batch = LocomotionBatch.make([env for c in collectors for env in c.envs.envs])
    episodes = [b.episodes for b in buffers]
    raw = np.stack([c.raw_obs for c in collectors])
    steps_before = [c.steps_taken for c in collectors]
    failed: dict[int, Exception] = {}
    for t in range(first.cfg.steps_per_env):
        obs = pre.obs(raw, update=True)
        buf.obs[:, t] = obs
        actions = sample(obs, rngs)
        buf.actions[:, t] = actions
        raw, r, term, trunc, final, errors = step_envs(
            [c.envs for c in collectors], clip_stacked_actions(actions, first), failed.keys(),
            batch)
        failed.update(errors)
        steps = [s + t + 1 for s in steps_before]
        non_finite = first_non_finite(r, raw, steps, failed.keys())
        if non_finite:
            failed.update(non_finite)
            bad = list(non_finite)
            raw[bad], r[bad] = 0, 0.0
        ended = term | trunc
        buf.rewards[:, t] = pre.reward(r, ended)
        buf.terminated[:, t], buf.done[:, t] = term, ended
        running.step(r, ended, episodes)
        for (i, j), final_obs in final.items():
            if trunc[i, j] and i not in failed:  # bootstrap from the true final state
                try:
                    check_finite_env_output(final_obs, "observation", steps[i])
                except NonFiniteEnvError as exc:
                    failed[i] = exc
                    continue
                buf.next_obs[i, t, j] = pre.obs_of(i, final_obs[None])[0]
    # within the rollout the state after a step is the next step's observation
    still = ~buf.done[:, :-1].astype(bool)
    buf.next_obs[:, :-1][still] = buf.obs[:, 1:][still]
    live = [i for i in range(n) if i not in failed]
    pre.write_back(live)
    running.write_back(live)
    for i in live:
        collectors[i].raw_obs = raw[i].copy()
        collectors[i].steps_taken = steps_before[i] + first.cfg.steps_per_env
    return [failed[i] if i in failed else c.finish_rollout(b, p, v)
            for i, (c, b, p, v) in enumerate(zip(collectors, buffers, policies, value_nets,
                                                   strict=True))]


@torch.no_grad()
def collect_one(collector: RolloutCollector, policy: Policy, value_net: ValueNet
                ) -> tuple[Batch, FinishedEpisodes]:
    """One rollout of ``steps_per_env`` steps of every env of ``collector`` with ``policy``:
    :func:`collect_lockstep` of the batch of one; the env's or data's error is raised."""
    result = collect_lockstep([collector], [policy], [value_net])[0]
    if isinstance(result, Exception):
        raise result
    return result
