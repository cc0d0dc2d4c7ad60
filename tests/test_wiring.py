"""Every switch proven to act where it should.

``tests/test_optimizations.py`` proves each code-level optimization on its own; this file
proves that the update rules, the rollout and the training loop *use* each of them with the
right arguments, on the right network, at the right granularity and the right iteration.
Each test is aimed at one mis-wiring (the name says which): it spies on the named piece or
replays the step by hand on a small batch, and fails when the effect is removed, inverted or
applied in the wrong place. ``tools/mutants.py`` plants such bugs one at a time and checks
that this file (with the other fast tests) catches every one of them.

Conventions: networks are tiny (one hidden layer of 8), batches are synthetic and 64-128
pairs, training runs are CartPole with 64 steps per iteration; the whole file runs in well
under a minute on one core.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

import pgscope.algos.ppo as ppo_mod
import pgscope.algos.trpo as trpo_mod
import pgscope.engine.nets as nets_mod
from pgscope.agent import Agent, build_agent
from pgscope.algos import algorithm, update_one
from pgscope.algos.common import explained_variance, make_optimizer, policy_change
from pgscope.config import Config, make_config
from pgscope.engine.adam import MaskedAdam
from pgscope.engine.nets import SeedNets
from pgscope.engine.rollout import collect_one
from pgscope.engine.stacked import Stack
from pgscope.envs import make_vector_env
from pgscope.networks import CategoricalPolicy, GaussianPolicy
from pgscope.optimizations import RunningMeanStd, adapt_kl_beta, kl_early_stop
from pgscope.probes.sampling import sample_batch
from pgscope.rollout import Batch, Preprocessor, RolloutCollector

# ``pgscope.train`` is also the name of the train function the package exports
train_mod = importlib.import_module("pgscope.train")

OBS_DIM, ACT_DIM, N = 3, 2, 64


# --- small helpers ----------------------------------------------------------------------------
def _metric(metrics: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` that ``metrics`` holds (the metric keys were renamed once:
    ``grad_norm`` -> ``policy_grad_norm``, ``learning_rate`` -> ``lr``)."""
    for name in names:
        if name in metrics:
            return metrics[name]
    raise KeyError(f"none of {names} in {sorted(metrics)}")


def _config(preset: str = "ppo", **overrides: Any) -> Config:
    """A config for the synthetic batches (Pendulum-v1 has no per-env defaults)."""
    values: dict[str, Any] = dict(steps_per_iter=N, minibatches=4, epochs=2, hidden=(8,),
                                  seed=0)
    values.update(overrides)
    return make_config(preset, "Pendulum-v1", values)


def _agent(cfg: Config, seed: int = 0, discrete: bool = False) -> Agent:
    torch.manual_seed(seed)
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
    act_space = (gym.spaces.Discrete(4) if discrete
                 else gym.spaces.Box(-1.0, 1.0, shape=(ACT_DIM,), dtype=np.float32))
    return build_agent(cfg, obs_space, act_space)


def _batch(agent: Agent, n: int = N, seed: int = 0, adv_mean: float = 0.7) -> Batch:
    """An on-policy synthetic batch. The advantages have a non-zero mean and a scale that
    grows along the batch (so a minibatch's mean/std differ from the batch's), and the
    returns differ from the old values (so the value-clip reference matters)."""
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS_DIM, generator=gen)
    with torch.no_grad():
        dist = agent.policy.dist(obs)
        actions = dist.mean + dist.stddev * torch.randn(n, ACT_DIM, generator=gen)
        logp = agent.policy.log_prob(dist, actions)
        values = agent.value_net(obs)
    advantages = adv_mean + torch.randn(n, generator=gen) * torch.linspace(0.2, 3.0, n)
    returns = values + advantages
    return Batch(obs=obs, actions=actions, logp=logp, values=values, advantages=advantages,
                 returns=returns, rewards=torch.zeros(n),
                 terminated=torch.zeros(n, dtype=torch.bool),
                 done=torch.zeros(n, dtype=torch.bool), next_obs=obs)


def _stacked_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Seed 0's gradient of each stacked parameter (the batch of one's only seed)."""
    return [p.grad[0].detach().clone() if p.grad is not None else torch.zeros_like(p[0])
            for p in params]


def _seed0(stack: Stack, template: nn.Module) -> nn.Module:
    """A copy of ``template`` holding seed 0's parameters of ``stack`` as they are now."""
    net = copy.deepcopy(template)
    net.load_state_dict({k: p[0].detach().clone() for k, p in stack.params.items()})
    return net


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _clip(tensors: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Global-norm clipping written out: scale by max_norm / (norm + 1e-6) when above."""
    scale = min(1.0, max_norm / (_norm(tensors) + 1e-6))
    return [t * scale for t in tensors]


def _close(got: list[torch.Tensor], want: list[torch.Tensor], what: str,
           rtol: float = 2e-4, atol: float = 1e-6) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g.numpy(), w.detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"{what}, tensor {i}")


@dataclass
class _Step:
    """One optimizer step: the minibatch, the parameters at which its loss was evaluated,
    and the gradients the optimizer applied (after any clipping)."""

    idx: torch.Tensor
    policy: dict[str, torch.Tensor]
    value: dict[str, torch.Tensor]
    policy_grads: list[torch.Tensor]
    value_grads: list[torch.Tensor]


@dataclass
class _Trace:
    minibatch_calls: int = 0
    idx: list[torch.Tensor] = field(default_factory=list)
    steps: list[_Step] = field(default_factory=list)
    nets: list[SeedNets] = field(default_factory=list)  # every SeedNets the update built


def _capture_nets(monkeypatch: pytest.MonkeyPatch, built: list[SeedNets]) -> None:
    """Append every :class:`SeedNets` built from now on to ``built`` (``update_one``
    builds one around the agent: the stacks and the MaskedAdam the update trains)."""
    real_init = SeedNets.__init__

    def init(self: SeedNets, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(SeedNets, "__init__", init)


def _trace(monkeypatch: pytest.MonkeyPatch, agent: Agent) -> _Trace:
    """Record every minibatch the update draws and, at every optimizer step, the
    parameters and the gradients about to be applied.

    The one engine's seams: each seed's minibatches come from
    ``pgscope.engine.nets.minibatches`` (called once per seed per epoch by
    ``seed_minibatches``), the update trains the stacked parameters of a ``SeedNets``
    built around ``agent`` (the batch of one: seed 0) and steps them with
    ``MaskedAdam.step``, which reads the gradients off the stacked parameters."""
    trace = _Trace()
    real = nets_mod.minibatches
    real_step = MaskedAdam.step
    _capture_nets(monkeypatch, trace.nets)

    def minibatches(n: int, cfg: Config, generator: torch.Generator) -> Iterator[torch.Tensor]:
        trace.minibatch_calls += 1
        for idx in real(n, cfg, generator):
            trace.idx.append(idx.clone())
            yield idx

    def step(adam: MaskedAdam, mask: torch.Tensor | None = None,
             groups: Any = None) -> None:
        nets = next((n for n in trace.nets if n.adam is adam
                     and n.policies[0] is agent.policy), None)
        if nets is None:  # another trace's update (a test that runs several)
            real_step(adam, mask, groups)
            return
        assert len(nets) == 1 and nets.value_nets[0] is agent.value_net
        stepped = list(adam.groups) if groups is None else list(groups)
        if mask is None or bool(mask[0]):  # seed 0 steps (a masked-out seed is left alone)
            stacks = {"policy": nets.policy, "value": nets.value}
            grads: dict[str, list[torch.Tensor]] = {"policy": [], "value": []}
            for name in stepped:
                # the group steps exactly the stack's parameters, in the module's order
                assert adam.groups[name].params is stacks[name].flat_params
                grads[name] = _stacked_grads(list(stacks[name].parameters()))
            trace.steps.append(_Step(
                idx=trace.idx[len(trace.steps)],
                policy={k: p[0].detach().clone() for k, p in nets.policy.params.items()},
                value={k: p[0].detach().clone() for k, p in nets.value.params.items()},
                policy_grads=grads["policy"], value_grads=grads["value"]))
        real_step(adam, mask, groups)

    monkeypatch.setattr(nets_mod, "minibatches", minibatches)
    monkeypatch.setattr(MaskedAdam, "step", step)
    return trace


def _value_loss_by_hand(cfg: Config, value_net: nn.Module, batch: Batch,
                        idx: torch.Tensor) -> torch.Tensor:
    v, old, target = value_net(batch.obs[idx]), batch.values[idx], batch.returns[idx]
    loss = (v - target).pow(2)
    if cfg.value_clip:  # clipped around the *old* prediction, never around the target
        clipped = old + (v - old).clamp(-cfg.value_clip_range, cfg.value_clip_range)
        loss = torch.maximum(loss, (clipped - target).pow(2))
    return loss.mean()


@dataclass
class _Replay:
    policy_loss: float
    value_loss: float
    policy_norm: float  # before clipping
    value_norm: float
    policy_grads: list[torch.Tensor]  # after clipping
    value_grads: list[torch.Tensor]
    ratio: torch.Tensor  # pi / pi_old of this minibatch, before its step
    value_move: float  # max |V - V_old| in this minibatch

    @property
    def ratio_dev(self) -> float:
        return float((self.ratio - 1).abs().max())


def _replay_ppo_step(cfg: Config, agent: Agent, old_policy: nn.Module, batch: Batch,
                     step: _Step, beta: float) -> _Replay:
    """The PPO minibatch step written from the equations (SPEC: per-minibatch advantage
    normalization, clipped surrogate or KL penalty, entropy bonus subtracted, clipped value
    loss around V_old, each network's gradient clipped by its own norm)."""
    policy, value_net = copy.deepcopy(agent.policy), copy.deepcopy(agent.value_net)
    policy.load_state_dict(step.policy)
    value_net.load_state_dict(step.value)
    idx = step.idx
    obs, actions = batch.obs[idx], batch.actions[idx]
    dist = policy.dist(obs)
    ratio = torch.exp(policy.log_prob(dist, actions) - batch.logp[idx])
    adv = batch.advantages[idx]
    if cfg.adv_norm:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    if cfg.ppo_loss == "clip":
        eps = cfg.clip_eps
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()
    else:
        with torch.no_grad():
            old_dist = old_policy.dist(obs)
        loss = -(ratio * adv).mean() + beta * policy.kl(old_dist, dist).mean()
    objective = loss - cfg.ent_coef * policy.entropy(dist).mean()
    v_loss = _value_loss_by_hand(cfg, value_net, batch, idx)
    g_policy = list(torch.autograd.grad(objective, list(policy.parameters())))
    g_value = list(torch.autograd.grad(v_loss, list(value_net.parameters())))
    with torch.no_grad():
        value_move = float((value_net(obs) - batch.values[idx]).abs().max())
    out = _Replay(float(loss.detach()), float(v_loss.detach()), _norm(g_policy),
                  _norm(g_value), g_policy, g_value, ratio.detach(), value_move)
    if cfg.grad_clip:
        out.policy_grads = _clip(g_policy, cfg.max_grad_norm)
        out.value_grads = _clip(g_value, cfg.max_grad_norm)
    return out


def _run_ppo(monkeypatch: pytest.MonkeyPatch, cfg: Config, state: dict[str, float] | None = None,
             seed: int = 0) -> tuple[Agent, nn.Module, Batch, _Trace, dict[str, Any]]:
    agent = _agent(cfg, seed)
    batch = _batch(agent, cfg.steps_per_iter, seed)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    trace = _trace(monkeypatch, agent)
    old_policy = copy.deepcopy(agent.policy)
    metrics = update_one(cfg, agent.policy, agent.value_net, optimizer, batch,
                         torch.Generator().manual_seed(seed + 1),
                         {} if state is None else state)
    return agent, old_policy, batch, trace, metrics


# --- PPO: every minibatch step against a hand computation -----------------------------------
PPO_CASES = {
    # everything on, and every clip binding: ratio clip 0.1, value clip 0.05, grad clip 0.05
    "clip-all-on": ("ppo", dict(clip_eps=0.1, value_clip_range=0.05, max_grad_norm=0.05,
                                ent_coef=0.05, policy_lr=3e-2, value_lr=2e-2, epochs=3)),
    # the bare clipped surrogate: no normalization, no clipping of values or gradients
    "minimal": ("ppo-m", dict(adv_norm=False, policy_lr=1e-2)),
    # adaptive KL penalty with a non-default initial beta and an entropy bonus
    "kl-penalty": ("ppo-kl", dict(kl_beta_init=3.0, ent_coef=0.02, policy_lr=1e-2,
                                  max_grad_norm=0.2)),
}


@pytest.mark.parametrize("case", list(PPO_CASES))
def test_ppo_every_minibatch_step_matches_the_equations(monkeypatch, case):
    """Catches: advantages normalized over the batch instead of the minibatch, the entropy
    bonus with the wrong sign or coefficient, the ratio new/old swapped, the clip range
    ignored, the value loss clipped around the targets or not at all, the value net's (or
    the policy's) gradient not clipped or clipped with the joint norm, beta not used."""
    preset, overrides = PPO_CASES[case]
    cfg = _config(preset, **overrides)
    agent, old_policy, batch, trace, metrics = _run_ppo(monkeypatch, cfg)
    assert len(trace.steps) == cfg.epochs * cfg.minibatches
    replays = [_replay_ppo_step(cfg, agent, old_policy, batch, step, cfg.kl_beta_init)
               for step in trace.steps]
    for j, (step, rep) in enumerate(zip(trace.steps, replays, strict=True)):
        _close(step.policy_grads, rep.policy_grads, f"{case}: policy gradient of step {j}")
        _close(step.value_grads, rep.value_grads, f"{case}: value gradient of step {j}")
    # the metrics are the means over the same steps (entropy bonus excluded from the loss)
    assert metrics["policy_loss"] == pytest.approx(np.mean([r.policy_loss for r in replays]),
                                                   rel=1e-4, abs=1e-7)
    assert metrics["value_loss"] == pytest.approx(np.mean([r.value_loss for r in replays]),
                                                  rel=1e-4)
    assert _metric(metrics, "policy_grad_norm", "grad_norm") == pytest.approx(
        np.mean([r.policy_norm for r in replays]), rel=1e-4)
    assert metrics["value_grad_norm"] == pytest.approx(
        np.mean([r.value_norm for r in replays]), rel=1e-4)
    # ratio statistics: every minibatch of every epoch, each before its step; the first
    # minibatch is evaluated at the data-collecting policy
    ratios = torch.cat([r.ratio for r in replays])
    eps_ref = cfg.clip_eps if cfg.ppo_loss == "clip" and cfg.clip_eps < 1 else 0.2
    assert metrics["ratio_max"] == pytest.approx(float(ratios.max()), rel=1e-5)
    assert metrics["ratio_min"] == pytest.approx(float(ratios.min()), rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(
        float(((ratios - 1).abs() > eps_ref).double().mean()), abs=1.5 / len(ratios))
    assert metrics["clip_fraction"] > 0
    assert metrics["ratio_first_minibatch_dev"] < 1e-6
    if case == "clip-all-on":  # the case must exercise every clip, or it proves nothing
        assert max(r.ratio_dev for r in replays) > cfg.clip_eps
        assert max(r.value_move for r in replays) > cfg.value_clip_range
        assert min(r.policy_norm for r in replays) > cfg.max_grad_norm
        assert min(r.value_norm for r in replays) > cfg.max_grad_norm


def test_ppo_kl_penalty_uses_the_carried_beta(monkeypatch):
    """algo_state's kl_beta (not kl_beta_init) is the penalty of a later update."""
    cfg = _config("ppo-kl", kl_beta_init=3.0, policy_lr=1e-2, grad_clip=False)
    state = {"kl_beta": 0.25}
    agent, old_policy, batch, trace, metrics = _run_ppo(monkeypatch, cfg, state)
    assert metrics["kl_beta"] == 0.25
    for j, step in enumerate(trace.steps[1:], start=1):  # step 0: KL gradient is 0
        rep = _replay_ppo_step(cfg, agent, old_policy, batch, step, beta=0.25)
        _close(step.policy_grads, rep.policy_grads, f"policy gradient of step {j}")


@pytest.mark.parametrize("high_kl", [True, False])
def test_ppo_kl_beta_adapts_after_the_update(monkeypatch, high_kl):
    """beta doubles when the update's KL is above 1.5 x target, halves when below
    target / 1.5; the metric reports the beta that was used."""
    cfg = _config("ppo-kl", kl_beta_init=3.0, policy_lr=3e-2 if high_kl else 1e-6,
                  target_kl=1e-4 if high_kl else 0.5)
    state: dict[str, float] = {}
    _, _, _, _, metrics = _run_ppo(monkeypatch, cfg, state)
    assert metrics["kl_beta"] == 3.0
    assert state["kl_beta"] == (6.0 if high_kl else 1.5)


def test_ppo_minibatches_are_fresh_permutations_every_epoch(monkeypatch):
    """epochs x minibatches steps; each epoch draws a new permutation of the whole batch."""
    cfg = _config("ppo", epochs=3, minibatches=4)
    _, _, batch, trace, metrics = _run_ppo(monkeypatch, cfg)
    assert trace.minibatch_calls == cfg.epochs
    assert len(trace.idx) == len(trace.steps) == cfg.epochs * cfg.minibatches
    assert _metric(metrics, "epochs_run") == cfg.epochs
    epochs = [torch.cat(trace.idx[e * 4:(e + 1) * 4]) for e in range(cfg.epochs)]
    for perm in epochs:
        assert sorted(perm.tolist()) == list(range(len(batch)))
        assert [len(i) for i in trace.idx[:4]] == [N // 4] * 4
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_ppo_advantages_normalized_per_minibatch(monkeypatch):
    """normalize_advantages sees each minibatch's own advantages, with adv_norm."""
    real = ppo_mod.normalize_advantages
    for adv_norm in (True, False):
        seen: list[tuple[torch.Tensor, bool]] = []
        monkeypatch.setattr(ppo_mod, "normalize_advantages",
                            lambda adv, enabled, *a, seen=seen, **k:
                            seen.append((adv.clone(), enabled)) or real(adv, enabled, *a, **k))
        cfg = _config("ppo", adv_norm=adv_norm)
        _, _, batch, trace, _ = _run_ppo(monkeypatch, cfg)
        assert len(seen) == len(trace.steps)
        for (adv, enabled), idx in zip(seen, trace.idx, strict=True):
            assert enabled is adv_norm
            assert adv.shape == (1, len(idx))  # [seeds, m]: the batch of one
            assert torch.equal(adv[0], batch.advantages[idx])


def test_ppo_grad_clip_on_each_network_with_its_own_norm(monkeypatch):
    """clip_gradients_per_seed is called once on the policy's and once on the value net's
    (stacked) parameters, with max_grad_norm (None when grad_clip is off)."""
    real = ppo_mod.clip_gradients_per_seed
    for grad_clip in (True, False):
        calls: list[tuple[set[int], float | None]] = []

        def spy(flat, max_norm, real=real, calls=calls):
            calls.append(({id(p) for p in flat.params.values()}, max_norm))
            return real(flat, max_norm)

        monkeypatch.setattr(ppo_mod, "clip_gradients_per_seed", spy)
        cfg = _config("ppo", grad_clip=grad_clip, max_grad_norm=0.123)
        agent, _, _, trace, _ = _run_ppo(monkeypatch, cfg)
        # the update trains the stacks of the agent's own networks (seed 0 of one)
        nets = next(n for n in trace.nets if n.policies[0] is agent.policy)
        assert len(nets) == 1 and nets.value_nets[0] is agent.value_net
        for stack, net in ((nets.policy, agent.policy), (nets.value, agent.value_net)):
            assert [(k, p.shape[1:]) for k, p in stack.params.items()] == \
                [(k, p.shape) for k, p in net.named_parameters()]
        policy_ids = {id(p) for p in nets.policy.parameters()}
        value_ids = {id(p) for p in nets.value.parameters()}
        assert not policy_ids & value_ids
        limit = 0.123 if grad_clip else None
        assert len(calls) == 2 * cfg.epochs * cfg.minibatches
        assert calls[0::2] == [(policy_ids, limit)] * (len(calls) // 2)
        assert calls[1::2] == [(value_ids, limit)] * (len(calls) // 2)


def test_ppo_entropy_bonus_raises_entropy(monkeypatch):
    """With zero advantages the only policy signal is the entropy bonus: it must push the
    entropy (log-std) up, by entropy_bonus(entropy, ent_coef)."""
    coefs: list[float] = []
    real = ppo_mod.entropy_bonus
    monkeypatch.setattr(ppo_mod, "entropy_bonus",
                        lambda ent, coef: coefs.append(coef) or real(ent, coef))
    cfg = _config("ppo", ent_coef=0.05, adv_norm=False, policy_lr=1e-2)
    agent = _agent(cfg)
    batch = _batch(agent)
    batch.advantages = torch.zeros(N)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    before = agent.policy.log_std.detach().clone()
    update_one(cfg, agent.policy, agent.value_net, optimizer, batch,
               torch.Generator().manual_seed(1), {})
    assert coefs and set(coefs) == {0.05}
    assert (agent.policy.log_std.detach() > before + 0.5 * cfg.policy_lr).all()


def test_ppo_clip_eps_reaches_the_surrogate(monkeypatch):
    """The surrogate gets cfg.clip_eps and the ratio pi_new/pi_old of the minibatch,
    evaluated at the current parameters."""
    seen: list[tuple[torch.Tensor, float]] = []
    real = ppo_mod.clipped_surrogate_loss
    monkeypatch.setattr(ppo_mod, "clipped_surrogate_loss",
                        lambda ratio, adv, eps: seen.append((ratio.detach().clone(), eps))
                        or real(ratio, adv, eps))
    cfg = _config("ppo", clip_eps=0.07, policy_lr=1e-2)
    agent, _, batch, trace, _ = _run_ppo(monkeypatch, cfg)
    assert [eps for _, eps in seen] == [0.07] * len(trace.steps)
    policy = copy.deepcopy(agent.policy)
    for (ratio, _), step in zip(seen, trace.steps, strict=True):
        policy.load_state_dict(step.policy)
        with torch.no_grad():
            logp = policy.log_prob(policy.dist(batch.obs[step.idx]), batch.actions[step.idx])
        assert ratio.shape == (1, len(step.idx))  # [seeds, m]: the batch of one
        np.testing.assert_allclose(ratio[0].numpy(),
                                   (logp - batch.logp[step.idx]).exp().numpy(), rtol=1e-5)


def test_ppo_value_loss_gets_old_values_targets_and_range(monkeypatch):
    """value_loss(V, V_old of the minibatch, returns of the minibatch, range or None)."""
    real = ppo_mod.value_loss
    for value_clip in (True, False):
        seen: list[tuple[torch.Tensor, torch.Tensor, float | None]] = []
        monkeypatch.setattr(ppo_mod, "value_loss",
                            lambda v, old, target, c, seen=seen: seen.append((old, target, c))
                            or real(v, old, target, c))
        cfg = _config("ppo", value_clip=value_clip, value_clip_range=0.37)
        _, _, batch, trace, _ = _run_ppo(monkeypatch, cfg)
        assert len(seen) == len(trace.steps)
        for (old, target, c), idx in zip(seen, trace.idx, strict=True):
            assert old.shape == target.shape == (1, len(idx))  # [seeds, m]: the batch of one
            assert torch.equal(old[0], batch.values[idx])
            assert torch.equal(target[0], batch.returns[idx])
            assert c == (0.37 if value_clip else None)


def test_ppo_kl_early_stop_fires_and_counts_epochs(monkeypatch):
    """After each epoch kl_early_stop gets the mean analytic KL(old||new) over the whole
    batch and target_kl; when it fires no further step is taken and epochs_run says so."""
    calls: list[tuple[float, float, bool, float]] = []
    holder: dict[str, Any] = {}
    real = ppo_mod.kl_early_stop

    def spy(mean_kl: float, target_kl: float, enabled: bool) -> bool:
        # the parameters the update has reached: its stacks (the agent's modules get them
        # only when the update stores them, at its end)
        agent, trace = holder["agent"], holder["trace"]
        nets = next(n for n in trace.nets if n.policies[0] is agent.policy)
        policy = _seed0(nets.policy, agent.policy)
        old, obs = holder["old"], holder["batch"].obs
        with torch.no_grad():
            kl = float(policy.kl(old.dist(obs), policy.dist(obs)).mean())
        calls.append((mean_kl, target_kl, enabled, kl))
        return real(mean_kl, target_kl, enabled)

    monkeypatch.setattr(ppo_mod, "kl_early_stop", spy)
    for kl_stop, target, lr, epochs_expected in ((True, 1e-6, 1e-2, 1), (True, 10.0, 1e-2, 4),
                                                  (False, 1e-6, 1e-2, 4)):
        calls.clear()
        cfg = _config("ppo", kl_stop=kl_stop, target_kl=target, policy_lr=lr, epochs=4)
        agent = _agent(cfg)
        batch = _batch(agent)
        optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
        with pytest.MonkeyPatch.context() as mp:
            trace = _trace(mp, agent)
            holder.update(agent=agent, trace=trace, old=copy.deepcopy(agent.policy),
                          batch=batch)
            metrics = update_one(cfg, agent.policy, agent.value_net, optimizer, batch,
                                 torch.Generator().manual_seed(1), {})
        assert metrics["epochs_run"] == epochs_expected, (kl_stop, target)
        assert len(trace.steps) == epochs_expected * cfg.minibatches
        if kl_stop:
            assert len(calls) == epochs_expected
            for mean_kl, target_kl, enabled, kl in calls:
                assert enabled is True and target_kl == target
                assert mean_kl == pytest.approx(kl, rel=1e-5) and kl > 0


def test_ppo_learning_rates_and_adam_eps_per_network(monkeypatch):
    """One Adam step from a fresh state moves each parameter by about its group's lr
    (|m / sqrt(v)| = 1); policy_lr on the policy, value_lr on the value net, adam_eps as
    Adam's epsilon (a huge epsilon shrinks the step)."""
    for adam_eps, shrink in ((1e-8, False), (10.0, True)):
        cfg = _config("ppo", epochs=1, minibatches=1, grad_clip=False, policy_lr=1e-3,
                      value_lr=5e-2, adam_eps=adam_eps, ent_coef=0.01)
        agent = _agent(cfg)
        optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
        assert {g["name"]: g["eps"] for g in optimizer.param_groups} == \
            {"policy": adam_eps, "value": adam_eps}
        before_p = parameters_to_vector(agent.policy.parameters()).detach().clone()
        before_v = parameters_to_vector(agent.value_net.parameters()).detach().clone()
        update_one(cfg, agent.policy, agent.value_net, optimizer, _batch(agent),
                   torch.Generator().manual_seed(1), {})
        with torch.no_grad():
            move_p = float((parameters_to_vector(agent.policy.parameters()) - before_p)
                           .abs().max())
            move_v = float((parameters_to_vector(agent.value_net.parameters()) - before_v)
                           .abs().max())
        if shrink:
            assert move_p < 0.5 * cfg.policy_lr and move_v < 0.5 * cfg.value_lr
        else:
            assert move_p == pytest.approx(cfg.policy_lr, rel=1e-3)
            assert move_v == pytest.approx(cfg.value_lr, rel=1e-3)


# --- TRPO -------------------------------------------------------------------------------------
@dataclass
class _TrpoTrace:
    iters: int = -1
    b: torch.Tensor | None = None
    direction: torch.Tensor | None = None  # what CG returned (before any test tampering)
    f_direction: torch.Tensor | None = None  # F d at theta_old
    fvp_probe: torch.Tensor | None = None  # F v at theta_old for a fixed random v
    fisher_obs: list[torch.Tensor] = field(default_factory=list)
    vectors: list[torch.Tensor] = field(default_factory=list)  # the policy's set_flat calls


PROBE_SEED = 123


def _run_trpo(monkeypatch: pytest.MonkeyPatch, cfg: Config, seed: int = 0, n: int = 128,
              negate: bool = False) -> tuple[Agent, nn.Module, Batch, _TrpoTrace, _Trace,
                                              dict[str, Any]]:
    """One TRPO update (the batch of one) with spies on conjugate_gradient (row-wise: b is
    ``[1, P]``; ``negate`` returns -x: an ascent direction turned into a descent one, so
    that every trial fails the improvement test), on the KL the Fisher-vector product
    differentiates (its states) and on the policy stack's ``set_flat`` (every trial point
    of the line search, then the parameters it keeps)."""
    agent = _agent(cfg, seed)
    batch = _batch(agent, n, seed)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    value_trace = _trace(monkeypatch, agent)
    tt = _TrpoTrace()
    real_cg, real_set_flat = trpo_mod.conjugate_gradient, Stack.set_flat
    real_kl = trpo_mod.seed_mean_kl

    def cg(avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
           *args: Any, **kwargs: Any) -> torch.Tensor:
        assert b.dim() == 2 and b.shape[0] == 1  # one row per seed: the batch of one
        tt.iters, tt.b = iters, b[0].detach().clone()
        probe = torch.randn(b.shape[1], generator=torch.Generator().manual_seed(PROBE_SEED))

        def kl_spy(policy: Any, old_policy: Any, obs: torch.Tensor) -> torch.Tensor:
            assert obs.shape[0] == 1
            tt.fisher_obs.append(obs[0].detach().clone())
            return real_kl(policy, old_policy, obs)

        trpo_mod.seed_mean_kl = kl_spy
        try:
            fvp = avp(probe.unsqueeze(0))
        finally:
            trpo_mod.seed_mean_kl = real_kl
        assert fvp.shape == (1, b.shape[1])
        tt.fvp_probe = fvp[0].detach().clone()
        x = real_cg(avp, b, iters, *args, **kwargs)
        tt.direction, tt.f_direction = x[0].detach().clone(), avp(x)[0].detach().clone()
        return -x if negate else x

    def set_flat(stack: Stack, matrix: torch.Tensor) -> None:
        if type(stack.module) is type(agent.policy):  # the policy's stack
            assert matrix.shape[0] == 1
            tt.vectors.append(matrix[0].detach().clone())
        real_set_flat(stack, matrix)

    monkeypatch.setattr(trpo_mod, "conjugate_gradient", cg)
    monkeypatch.setattr(Stack, "set_flat", set_flat)
    old_policy = copy.deepcopy(agent.policy)
    metrics = update_one(cfg, agent.policy, agent.value_net, optimizer, batch,
                         torch.Generator().manual_seed(seed + 1), {})
    return agent, old_policy, batch, tt, value_trace, metrics


def _trpo_adv(cfg: Config, batch: Batch) -> torch.Tensor:
    adv = batch.advantages
    return (adv - adv.mean()) / (adv.std() + 1e-8) if cfg.adv_norm else adv


def _surrogate_and_kl(old_policy: nn.Module, theta: torch.Tensor, batch: Batch,
                      adv: torch.Tensor) -> tuple[float, float]:
    """mean(pi_theta / pi_old * A) and mean KL(old || theta) on the whole batch."""
    policy = copy.deepcopy(old_policy)
    torch.nn.utils.vector_to_parameters(theta, policy.parameters())
    with torch.no_grad():
        new, old = policy.dist(batch.obs), old_policy.dist(batch.obs)
        ratio = torch.exp(policy.log_prob(new, batch.actions) - batch.logp)
        return float((ratio * adv).mean()), float(policy.kl(old, new).mean())


def _fvp_by_hand(old_policy: nn.Module, obs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hessian of mean KL(old || theta) over ``obs`` at theta_old, times v."""
    policy = copy.deepcopy(old_policy)
    params = list(policy.parameters())
    with torch.no_grad():
        old = old_policy.dist(obs)
    kl = policy.kl(old, policy.dist(obs)).mean()
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params,
                                                                 create_graph=True)])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(grad @ v, params)])


@pytest.mark.parametrize("seed,adv_norm", [(0, True), (1, False)])
def test_trpo_gradient_fisher_cg_and_step_scaling(monkeypatch, seed, adv_norm):
    """b is the full-batch surrogate gradient (advantages normalized over the whole batch
    when adv_norm, ratio new/old); CG runs cg_iters iterations on F + damping I, F from
    fisher_fraction of the batch drawn at random; the full step is sqrt(2 max_kl / d^T F d) d."""
    cfg = _config("trpo", max_kl=0.003, cg_iters=7, cg_damping=0.3, fisher_fraction=0.25,
                  adv_norm=adv_norm)
    agent, old_policy, batch, tt, _, metrics = _run_trpo(monkeypatch, cfg, seed)
    assert tt.iters == 7
    # gradient of the surrogate at theta_old (on-policy ratio 1)
    policy = copy.deepcopy(old_policy)
    ratio = torch.exp(policy.log_prob(policy.dist(batch.obs), batch.actions) - batch.logp)
    adv = _trpo_adv(cfg, batch)
    surr = (ratio * adv).mean()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(surr, list(policy.parameters()))])
    np.testing.assert_allclose(tt.b.numpy(), g.numpy(), rtol=1e-4, atol=1e-7)
    assert metrics["policy_loss"] == pytest.approx(-float(surr), abs=1e-6)
    assert _metric(metrics, "policy_grad_norm", "grad_norm") == pytest.approx(
        float(g.norm()), rel=1e-4)
    # the Fisher states: a random subset of the requested size (not the head of the batch)
    fisher_n = int(cfg.fisher_fraction * N * 2)
    assert tt.fisher_obs and all(o.shape == (fisher_n, OBS_DIM) for o in tt.fisher_obs)
    sub = tt.fisher_obs[0]
    rows = {tuple(r) for r in batch.obs.tolist()}
    assert all(tuple(r) in rows for r in sub.tolist())
    assert len({tuple(r) for r in sub.tolist()}) == fisher_n
    assert not torch.equal(sub, batch.obs[:fisher_n])
    # F v with damping, computed by hand on those states
    probe = torch.randn(g.numel(), generator=torch.Generator().manual_seed(PROBE_SEED))
    want = _fvp_by_hand(old_policy, sub, probe) + cfg.cg_damping * probe
    np.testing.assert_allclose(tt.fvp_probe.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    # the full step: first trial point minus theta_old
    theta_old = parameters_to_vector(old_policy.parameters()).detach()
    step = tt.vectors[0] - theta_old
    d = tt.direction
    shs = float(d @ tt.f_direction)
    np.testing.assert_allclose(step.numpy(), (math.sqrt(2 * cfg.max_kl / shs) * d).numpy(),
                               rtol=1e-4, atol=1e-8)
    assert 0.5 * float(step @ (tt.f_direction * math.sqrt(2 * cfg.max_kl / shs))) == \
        pytest.approx(cfg.max_kl, rel=1e-4)


def test_trpo_fisher_subset_has_at_least_one_state(monkeypatch):
    """fisher_fraction * n below 1 still uses one state (not two, not none)."""
    cfg = _config("trpo", fisher_fraction=0.005)
    *_, tt, _, _ = _run_trpo(monkeypatch, cfg)
    assert tt.fisher_obs and all(o.shape == (1, OBS_DIM) for o in tt.fisher_obs)


def _check_line_search(cfg: Config, old_policy: nn.Module, batch: Batch, tt: _TrpoTrace,
                       agent: Agent, metrics: dict[str, Any]) -> list[tuple[float, float]]:
    """Trial k is theta_old + coef^k step; the accepted one is the first with mean KL <=
    max_kl and a better surrogate; with none, theta_old is restored."""
    theta_old = parameters_to_vector(old_policy.parameters()).detach()
    adv = _trpo_adv(cfg, batch)
    surr_old, _ = _surrogate_and_kl(old_policy, theta_old, batch, adv)
    step = tt.vectors[0] - theta_old
    trials = tt.vectors[:-1][:cfg.backtrack_iters]
    results = []
    accepted = None
    for k, theta in enumerate(trials):
        np.testing.assert_allclose((theta - theta_old).numpy(),
                                   (cfg.backtrack_coef ** k * step).numpy(), rtol=1e-4,
                                   atol=1e-7)
        surr, kl = _surrogate_and_kl(old_policy, theta, batch, adv)
        results.append((surr, kl))
        if kl <= cfg.max_kl and surr > surr_old:
            accepted = k
            break
    final = parameters_to_vector(agent.policy.parameters()).detach()
    # every set_flat but the last is a trial point; the last sets the parameters kept
    kept = tt.vectors[-1]
    if accepted is None:
        tried = [v for v in tt.vectors[:-1] if not torch.equal(v, theta_old)]
        assert len(tried) == len(tt.vectors) - 1 == cfg.backtrack_iters  # exactly these
        assert torch.equal(kept, theta_old) and torch.equal(final, theta_old)
        assert metrics["step_fraction"] == 0.0
        assert metrics["linesearch_steps"] == cfg.backtrack_iters
    else:
        assert len(tt.vectors) - 1 == accepted + 1  # stops at the first acceptable trial
        assert torch.equal(kept, trials[accepted])
        assert torch.equal(final, trials[accepted])
        assert metrics["step_fraction"] == cfg.backtrack_coef ** accepted
        assert metrics["linesearch_steps"] == accepted + 1
    return results


def test_trpo_line_search_rejects_trials_above_max_kl(monkeypatch):
    """A case where the full step improves the surrogate but breaks the KL limit: it must be
    rejected and a shorter one taken."""
    cfg = _config("trpo", max_kl=0.05, backtrack_coef=0.6, backtrack_iters=6,
                  fisher_fraction=0.05)  # few Fisher states: the quadratic model is off
    agent, old_policy, batch, tt, _, metrics = _run_trpo(monkeypatch, cfg)
    results = _check_line_search(cfg, old_policy, batch, tt, agent, metrics)
    surr_old = _surrogate_and_kl(old_policy, parameters_to_vector(
        old_policy.parameters()).detach(), batch, _trpo_adv(cfg, batch))[0]
    # the setup must have the property this test is about
    assert results[0][1] > cfg.max_kl and results[0][0] > surr_old
    assert 1 < metrics["linesearch_steps"] < cfg.backtrack_iters


def test_trpo_line_search_rejects_trials_that_do_not_improve(monkeypatch):
    """CG's direction negated: every trial worsens the surrogate, so every one is rejected
    (backtrack_iters of them, shrinking by backtrack_coef), even those within the KL limit,
    and theta_old is kept."""
    cfg = _config("trpo", max_kl=0.01, backtrack_coef=0.3, backtrack_iters=4)
    agent, old_policy, batch, tt, _, metrics = _run_trpo(monkeypatch, cfg, negate=True)
    results = _check_line_search(cfg, old_policy, batch, tt, agent, metrics)
    assert len(results) == 4 and all(kl <= cfg.max_kl for _, kl in results[1:])
    assert metrics["step_fraction"] == 0.0


@pytest.mark.parametrize("case", ["plain", "clipped"])
def test_trpo_value_fit_steps_match_the_equations(monkeypatch, case):
    """The value net is fit for epochs x minibatches Adam steps on the (clipped if
    value_clip) loss, its gradient clipped by its own norm when grad_clip."""
    overrides = dict(value_clip=True, value_clip_range=0.05, grad_clip=True,
                     max_grad_norm=0.05, value_lr=2e-2) if case == "clipped" else {}
    cfg = _config("trpo", epochs=3, minibatches=4, **overrides)
    agent, _, batch, _, vt, metrics = _run_trpo(monkeypatch, cfg)
    assert vt.minibatch_calls == cfg.epochs and len(vt.steps) == 12
    value_net = copy.deepcopy(agent.value_net)
    norms, losses, moves = [], [], []
    for j, step in enumerate(vt.steps):
        value_net.load_state_dict(step.value)
        loss = _value_loss_by_hand(cfg, value_net, batch, step.idx)
        grads = list(torch.autograd.grad(loss, list(value_net.parameters())))
        norms.append(_norm(grads))
        losses.append(float(loss))
        with torch.no_grad():
            moves.append(float((value_net(batch.obs[step.idx]) - batch.values[step.idx])
                               .abs().max()))
        if cfg.grad_clip:
            grads = _clip(grads, cfg.max_grad_norm)
        _close(step.value_grads, grads, f"value gradient of step {j}")
    assert metrics["value_loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert metrics["value_grad_norm"] == pytest.approx(np.mean(norms), rel=1e-4)
    if case == "clipped":
        assert min(norms) > cfg.max_grad_norm and max(moves) > cfg.value_clip_range


# --- the rollout side: preprocessing, actions, GAE arguments ------------------------------------
def _pre(preset: str = "ppo", **overrides: Any) -> Preprocessor:
    cfg = make_config(preset, "Pendulum-v1", dict(num_envs=2, steps_per_iter=64, **overrides))
    return Preprocessor(cfg, (OBS_DIM,))


def _pooled(rows: np.ndarray, prior: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``rows`` pooled with RunningMeanStd's prior (mean 0, var 1,
    weight 1e-4)."""
    n = len(rows)
    mean = rows.sum(axis=0) / (n + prior)
    var = (prior * (1.0 + mean**2) + ((rows - mean) ** 2).sum(axis=0)) / (n + prior)
    return mean, var


OBS_STREAM = np.random.default_rng(5).normal([1.0, -2.0, 50.0], [0.5, 3.0, 10.0],
                                             size=(12, 2, OBS_DIM))


@pytest.mark.parametrize("obs_clip", [True, False])
def test_obs_normalized_with_stats_including_the_current_obs_then_clipped(obs_clip):
    """obs_norm: the statistics are updated with the raw observation first, then it is
    normalized by them; obs_clip: the normalized value is clipped to obs_clip_bound."""
    pre = _pre(obs_clip=obs_clip, obs_clip_bound=1.5)
    seen = []
    for t in range(len(OBS_STREAM)):
        raw = OBS_STREAM[t].copy()
        if t == len(OBS_STREAM) - 1:
            raw[0, 2] = 500.0  # an outlier far beyond the clip bound
        seen.append(raw)
        out = pre.obs(raw, update=True)
        mean, var = _pooled(np.concatenate(seen))
        want = (raw - mean) / np.sqrt(var + 1e-8)
        if obs_clip:
            want = np.clip(want, -1.5, 1.5)
        np.testing.assert_allclose(out, want.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert (np.abs(out).max() > 1.5) is not obs_clip
    # update=False (final observations at truncation, Agent.act) never changes the stats
    count = pre.obs_norm.rms.count
    pre.obs(OBS_STREAM[0] * 100, update=False)
    assert pre.obs_norm.rms.count == count


def test_obs_clip_without_obs_norm_and_neither():
    raw = np.array([[0.5, -20.0, 30.0], [1.0, 2.0, -3.0]])
    np.testing.assert_allclose(_pre(obs_norm=False, obs_clip_bound=2.5).obs(raw, True),
                               np.clip(raw, -2.5, 2.5))
    np.testing.assert_allclose(_pre("ppo-m").obs(raw, True), raw.astype(np.float32))


def _scaled_rewards(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> np.ndarray:
    """Reward scaling written out: divide by the std (not the variance) of every discounted
    return seen so far, the return of an env reset after its episode ends."""
    ret = np.zeros(rewards.shape[1])
    seen: list[np.ndarray] = []
    out = np.zeros_like(rewards)
    for t in range(len(rewards)):
        ret = gamma * ret + rewards[t]
        seen.append(ret.copy())
        _, var = _pooled(np.concatenate(seen))
        out[t] = rewards[t] / np.sqrt(var + 1e-8)
        ret = np.where(dones[t], 0.0, ret)
    return out


REWARDS = np.random.default_rng(6).normal(2.0, 3.0, size=(10, 2))
DONES = np.zeros((10, 2), dtype=bool)
DONES[3, 0] = DONES[6, 1] = DONES[7, 0] = True


@pytest.mark.parametrize("multiplier", [1.0, 3.0])
@pytest.mark.parametrize("scale,clip", [(True, True), (True, False), (False, True),
                                        (False, False)])
def test_reward_multiplied_then_scaled_then_clipped(scale, clip, multiplier):
    """reward_multiplier first, then reward_scale with cfg.gamma (returns reset at episode
    end), then reward_clip to reward_clip_bound."""
    gamma = 0.8
    pre = _pre(reward_scale=scale, reward_clip=clip, reward_clip_bound=0.9, gamma=gamma,
               reward_multiplier=multiplier)
    got = np.stack([pre.reward(REWARDS[t], DONES[t]) for t in range(len(REWARDS))])
    want = REWARDS * multiplier
    if scale:
        want = _scaled_rewards(want, DONES, gamma)
    if clip:
        want = np.clip(want, -0.9, 0.9)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert (np.abs(got).max() > 0.9) is not clip


def test_frozen_preprocessor_never_updates_statistics():
    """Frozen statistics: with_frozen_statistics applies them and never changes them (nor the
    original's), while the training preprocessor does update."""
    pre = _pre()
    for t in range(5):
        pre.obs(OBS_STREAM[t], update=True)
        pre.reward(REWARDS[t], DONES[t])
    frozen = pre.with_frozen_statistics(3)
    assert frozen.statistics_frozen and not pre.statistics_frozen
    state = copy.deepcopy(pre.state_dict())
    frozen_state = copy.deepcopy(frozen.state_dict())
    raw = np.random.default_rng(1).normal(10.0, 5.0, size=(3, OBS_DIM))
    out = frozen.obs(raw, update=True)
    mean, var = pre.obs_norm.rms.mean, pre.obs_norm.rms.var
    np.testing.assert_allclose(out, np.clip((raw - mean) / np.sqrt(var + 1e-8), -10, 10),
                               rtol=1e-5)
    r = frozen.reward(np.array([5.0, -3.0, 1.0]), np.array([False, True, False]))
    np.testing.assert_allclose(r, np.array([5.0, -3.0, 1.0]) /
                               np.sqrt(pre.reward_scaler.rms.var + 1e-8), rtol=1e-9)
    for _ in range(3):
        frozen.obs(raw, update=True)
        frozen.reward(np.array([5.0, -3.0, 1.0]), np.array([False, False, False]))
    for name in ("obs_norm", "reward_scaler"):
        for key in ("mean", "var", "count"):
            assert torch.equal(frozen.state_dict()[name][key], frozen_state[name][key])
            assert torch.equal(pre.state_dict()[name][key], state[name][key])
    # the training preprocessor, given the same calls, updates both
    pre.obs(raw[:2], update=True)
    pre.reward(np.array([5.0, -3.0]), np.array([False, False]))
    assert float(pre.obs_norm.rms.count) > float(state["obs_norm"]["count"])
    assert float(pre.reward_scaler.rms.count) > float(state["reward_scaler"]["count"])


@pytest.mark.parametrize("preset", ["ppo-m", "trpo+"])
def test_frozen_statistics_with_switches_off_or_partly_on(preset):
    """with_frozen_statistics works whatever is switched on (ppo-m: no statistics)."""
    pre = _pre(preset)
    pre.obs(OBS_STREAM[0], update=True)
    pre.reward(REWARDS[0], DONES[0])
    frozen = pre.with_frozen_statistics(4)
    assert frozen.statistics_frozen and set(frozen.state_dict()) == set(pre.state_dict())
    raw = np.repeat(OBS_STREAM[1][:1], 4, axis=0)
    np.testing.assert_allclose(frozen.obs(raw, update=True), pre.obs(raw, update=False),
                               rtol=1e-6)


def test_kl_thresholds_are_strict():
    """'Above 1.5 x target' and 'below target / 1.5' are strict (exact binary values)."""
    assert not kl_early_stop(0.75, 0.5, True) and kl_early_stop(0.7500001, 0.5, True)
    assert adapt_kl_beta(1.0, 0.75, 0.5) == 1.0 and adapt_kl_beta(1.0, 0.7500001, 0.5) == 2.0
    assert adapt_kl_beta(1.0, 0.375, 0.5625) == 1.0  # 0.5625 / 1.5 = 0.375 exactly
    assert adapt_kl_beta(1.0, 0.3749999, 0.5625) == 0.5


def test_probe_sampling_leaves_the_agents_statistics_alone():
    cfg = make_config("ppo", "CartPole-v1", dict(steps_per_iter=32, hidden=(8,)))
    env = gym.make("CartPole-v1")
    torch.manual_seed(0)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    env.close()
    envs = make_vector_env("CartPole-v1", 1)
    collect_one(RolloutCollector(cfg, envs, agent.preprocessor, seed=0), agent.policy,
                                                                     agent.value_net)
    envs.close()
    trained = copy.deepcopy(agent.preprocessor.state_dict())
    assert float(trained["obs_norm"]["count"]) == pytest.approx(32 + 1e-4)
    assert float(trained["reward_scaler"]["count"]) == pytest.approx(32 + 1e-4)
    batch = sample_batch(agent, 100, seed=3)
    assert len(batch) == 100
    after = agent.preprocessor.state_dict()
    for name in ("obs_norm", "reward_scaler"):
        for key in ("mean", "var", "count"):
            assert torch.equal(after[name][key], trained[name][key]), (name, key)


class _RecordActions(gym.Env):
    """Records the actions it receives; small bounds so that samples fall outside them.
    Truncated by a time limit of 3 steps (reward 1 per step)."""

    received: list[np.ndarray] = []

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-10, 10, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-0.1, 0.2, shape=(ACT_DIM,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self.np_random.normal(size=OBS_DIM).astype(np.float32), {}

    def step(self, action: np.ndarray):
        _RecordActions.received.append(np.array(action, copy=True))
        return self.np_random.normal(size=OBS_DIM).astype(np.float32), 1.0, False, False, {}


RECORD_ID = "pgscope-wiring/RecordActions-v0"
if RECORD_ID not in gym.registry:
    gym.register(RECORD_ID, entry_point=_RecordActions, max_episode_steps=3)


@pytest.mark.parametrize("action_clip", [True, False])
def test_env_gets_clipped_action_batch_stores_and_scores_the_sample(action_clip):
    cfg = make_config("ppo", RECORD_ID, dict(num_envs=2, steps_per_iter=16, minibatches=2,
                                             hidden=(8,), init_log_std=0.5,
                                             action_clip=action_clip))
    envs = make_vector_env(RECORD_ID, 2)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    _RecordActions.received.clear()
    collector = RolloutCollector(cfg, envs, agent.preprocessor, seed=0)
    batch, _ = collect_one(collector, agent.policy, agent.value_net)
    envs.close()
    stored = batch.actions.numpy()
    # time-major (t, env) layout: env i at step t is row t * num_envs + i
    received = np.stack(_RecordActions.received)
    assert received.shape == stored.shape == (16, ACT_DIM)
    outside = (stored < -0.1) | (stored > 0.2)
    assert outside.mean() > 0.5  # the sample is stored unclipped
    want = np.clip(stored, [-0.1, -0.1], [0.2, 0.2]) if action_clip else stored
    np.testing.assert_allclose(received, want, rtol=1e-6)
    with torch.no_grad():
        logp = agent.policy.log_prob(agent.policy.dist(batch.obs), batch.actions)
    np.testing.assert_allclose(batch.logp.numpy(), logp.numpy(), rtol=1e-5)


def test_collector_layout_gae_arguments_and_reward_reset_at_truncation(monkeypatch):
    """num_envs x steps_per_env pairs; gae gets cfg.gamma and cfg.gae_lambda; the reward
    scaler's running return of an env is reset when its episode is truncated."""
    import pgscope.rollout as rollout_mod

    calls: list[tuple[float, float, np.ndarray]] = []
    real = rollout_mod.gae

    def spy(rewards, values, next_values, terminated, done, gamma, lam):
        calls.append((gamma, lam, done.copy()))
        return real(rewards, values, next_values, terminated, done, gamma, lam)

    monkeypatch.setattr(rollout_mod, "gae", spy)
    cfg = make_config("ppo", RECORD_ID, dict(num_envs=2, steps_per_iter=14, minibatches=2,
                                             hidden=(8,), gamma=0.77, gae_lambda=0.33))
    envs = make_vector_env(RECORD_ID, 2)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    assert agent.preprocessor.reward_scaler.gamma == 0.77
    collector = RolloutCollector(cfg, envs, agent.preprocessor, seed=0)
    batch, stats = collect_one(collector, agent.policy, agent.value_net)
    envs.close()
    assert len(batch) == 14 and batch.num_envs == 2
    assert [(g, lam) for g, lam, _ in calls] == [(0.77, 0.33)]
    done = calls[0][2]
    assert done.shape == (7, 2) and done[2].all() and done[5].all()
    assert stats.lengths == [3, 3, 3, 3]
    # after step 6 (1 step into the third episode) each env's return is just that reward
    np.testing.assert_allclose(agent.preprocessor.reward_scaler.ret, [1.0, 1.0])


@pytest.mark.parametrize("env_id,exact", [("CartPole-v1", True), (RECORD_ID, False)])
def test_collector_state_continues_episodes_or_says_it_cannot(env_id, exact):
    """A collector restored from another's state_dict draws the same samples; with an env
    whose state can be saved (CartPole) it also continues the same episodes and says so
    (True), with one that cannot (a test env) it restarts them and says so (False)."""
    cfg = make_config("ppo", env_id, dict(num_envs=2, steps_per_iter=8, minibatches=2,
                                          hidden=(8,)))
    envs_a, envs_b = make_vector_env(env_id, 2), make_vector_env(env_id, 2)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs_a.single_observation_space, envs_a.single_action_space)
    a = RolloutCollector(cfg, envs_a, agent.preprocessor, seed=0)
    collect_one(a, agent.policy, agent.value_net)
    state = a.state_dict()
    assert (state["envs"] is not None) is exact
    b = RolloutCollector(cfg, envs_b, copy.deepcopy(agent.preprocessor), seed=99)
    assert b.load_state_dict(state) is exact
    batch_a, _ = collect_one(a, agent.policy, agent.value_net)
    batch_b, _ = collect_one(b, agent.policy, agent.value_net)
    envs_a.close()
    envs_b.close()
    if exact:
        assert torch.equal(batch_a.obs, batch_b.obs)
        assert torch.equal(batch_a.actions, batch_b.actions)
    else:  # other episodes, the same sampling stream: equal noise, different states
        assert not torch.equal(batch_a.obs, batch_b.obs)
        with torch.no_grad():
            noise_a = batch_a.actions - agent.policy.dist(batch_a.obs).mean
            noise_b = batch_b.actions - agent.policy.dist(batch_b.obs).mean
        np.testing.assert_allclose(noise_a.numpy(), noise_b.numpy(), rtol=1e-4, atol=1e-5)


def test_batch_helpers_keep_the_layout_or_refuse():
    """The probes' batch helpers: head_index takes whole env segments first;
    recompute_advantages with the agent's own value net gives the batch's advantages;
    select and concat drop the layout, after which both refuse to run."""
    cfg = make_config("ppo", RECORD_ID, dict(num_envs=2, steps_per_iter=12, minibatches=2,
                                             hidden=(8,), gamma=0.9, gae_lambda=0.8))
    envs = make_vector_env(RECORD_ID, 2)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    batch, _ = collect_one(RolloutCollector(cfg, envs, agent.preprocessor, seed=0),
        agent.policy, agent.value_net)
    envs.close()
    assert batch.head_index(8).tolist() == [0, 2, 4, 6, 8, 10, 1, 3]
    adv = batch.recompute_advantages(agent.value_net, cfg.gamma, cfg.gae_lambda)
    np.testing.assert_allclose(adv.numpy(), batch.advantages.numpy(), rtol=1e-5, atol=1e-6)
    single = replace(batch, num_envs=1)  # one column: every pair in time order
    assert single.head_index(3).tolist() == [0, 1, 2]
    part = batch.select(torch.tensor([3, 0, 5]))
    assert torch.equal(part.obs, batch.obs[[3, 0, 5]]) and part.num_envs == 0
    both = Batch.concat([batch, part])
    assert len(both) == 15 and both.num_envs == 0
    assert torch.equal(both.actions, torch.cat([batch.actions, part.actions]))
    for reordered in (part, both):
        with pytest.raises(ValueError, match="time-major layout"):
            reordered.head_index(2)
        with pytest.raises(ValueError, match="time-major layout"):
            reordered.recompute_advantages(agent.value_net, cfg.gamma, cfg.gae_lambda)


# --- networks --------------------------------------------------------------------------------
def _linears(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("ortho", [True, False])
def test_networks_hidden_activation_init_and_log_std(discrete, ortho):
    cfg = _config("ppo", hidden=(16, 12), activation="relu", ortho_init=ortho,
                  init_log_std=-0.7)
    agent = _agent(cfg, discrete=discrete)
    policy, value = agent.policy, agent.value_net
    assert isinstance(policy, CategoricalPolicy if discrete else GaussianPolicy)
    out_dim = 4 if discrete else ACT_DIM
    for net, out in ((policy.net, out_dim), (value.net, 1)):
        dims = [(m.in_features, m.out_features) for m in _linears(net)]
        assert dims == [(OBS_DIM, 16), (16, 12), (12, out)]
        acts = [type(m) for m in net if not isinstance(m, nn.Linear)]
        assert acts == [nn.ReLU, nn.ReLU]
    if not discrete:
        assert torch.equal(policy.log_std.detach(), torch.full((ACT_DIM,), -0.7))
    for net, gain in ((policy.net, 0.01), (value.net, 1.0)):
        layers = _linears(net)
        if ortho:
            sv = torch.linalg.svdvals(layers[-1].weight.detach())
            np.testing.assert_allclose(sv.numpy(), gain, rtol=1e-4)
            sv0 = torch.linalg.svdvals(layers[0].weight.detach())
            np.testing.assert_allclose(sv0.numpy(), math.sqrt(2), rtol=1e-4)
        else:  # Xavier: within the uniform bound, not orthogonal
            w = layers[0].weight.detach()
            assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w.shape[1]))
            sv0 = torch.linalg.svdvals(w)
            assert float(sv0.max() / sv0.min()) > 1.2
    # the rollout's NumPy sampler runs the same (ReLU) network
    x = torch.randn(5, OBS_DIM)
    sample = policy.numpy_sampler()
    if not discrete:
        with torch.no_grad():
            policy.log_std.fill_(-30.0)  # the sampler froze std at build time: rebuild
        sample = policy.numpy_sampler()
        with torch.no_grad():
            np.testing.assert_allclose(sample(x.numpy(), np.random.default_rng(0)),
                                       policy.dist(x).mean.numpy(), rtol=1e-4, atol=1e-6)


def test_tanh_activation_is_the_default_and_applies_to_both_networks():
    agent = _agent(_config("ppo", hidden=(8, 8)))
    for net in (agent.policy.net, agent.value_net.net):
        assert [type(m) for m in net if not isinstance(m, nn.Linear)] == [nn.Tanh, nn.Tanh]


# --- the training loop ------------------------------------------------------------------------
TRAIN = dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=(8,), checkpoint_every=1,
             total_steps=64 * 3 + 1)  # 4 iterations: the last one is partial in total_steps


@dataclass
class _Recorder:
    """What the training loop handed to each update and each rollout."""

    updates: list[dict[str, Any]] = field(default_factory=list)
    collects: list[dict[str, Any]] = field(default_factory=list)


def _record_training(monkeypatch: pytest.MonkeyPatch, algo: str) -> _Recorder:
    """Spy on the one engine's seams of the training loop (a single run is the batch of
    one: seed 0): ``algorithm(algo).update(cfg, nets, batches, generators, states,
    heldout_obs)`` and ``collect_lockstep(collectors, policies, value_nets)`` as
    ``pgscope.train`` calls them."""
    rec = _Recorder()
    real_update = algorithm(algo).update
    real_collect = train_mod.collect_lockstep

    def update(cfg, nets, batches, generators, states, heldout_obs, *args, **kwargs):
        assert len(nets) == len(batches) == len(generators) == len(states) == 1
        # the stacks the update trains hold the seed's modules' parameters exactly
        policy = copy.deepcopy(nets.policies[0].state_dict())
        value = copy.deepcopy(nets.value_nets[0].state_dict())
        for stack, want in ((nets.policy, policy), (nets.value, value)):
            _same_state({k: p[0].detach() for k, p in stack.params.items()}, dict(want),
                        "stacks vs modules")
        rec.updates.append(dict(
            # the learning rates the update's MaskedAdam applies, and those the seed's own
            # optimizer holds (what the loop anneals and logs): they must agree
            lrs={name: g.lr for name, g in nets.adam.groups.items()},
            optimizer_lrs={g["name"]: g["lr"] for g in nets.optimizers[0].param_groups},
            optimizer=copy.deepcopy(nets.optimizers[0].state_dict()),
            # the Adam state the update steps from (seed 0's row of each group)
            adam={name: dict(step=g.step[0].clone(), exp_avg=g.exp_avg_flat[0].clone(),
                             exp_avg_sq=g.exp_avg_sq_flat[0].clone())
                  for name, g in nets.adam.groups.items()},
            generator=generators[0].get_state().clone(), state=dict(states[0]),
            heldout=None if heldout_obs[0] is None else heldout_obs[0].clone(),
            batch=batches[0], policy=policy, value=value))
        out = real_update(cfg, nets, batches, generators, states, heldout_obs, *args,
                          **kwargs)
        with torch.no_grad():
            rec.updates[-1]["values_after"] = nets.value_nets[0](batches[0].obs).clone()
        return out

    def collect(collectors, policies, value_nets):
        assert len(collectors) == len(policies) == len(value_nets) == 1
        rec.collects.append(dict(rng=copy.deepcopy(collectors[0].rng.bit_generator.state),
                                 pre=copy.deepcopy(collectors[0].pre.state_dict())))
        return real_collect(collectors, policies, value_nets)

    monkeypatch.setattr(algorithm(algo), "update", update)
    monkeypatch.setattr(train_mod, "collect_lockstep", collect)
    return rec


def _read_metrics(run: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["ppo", "trpo"])
def test_training_loop_lr_annealing_heldout_and_explained_variance(tmp_path, monkeypatch,
                                                                   preset):
    """Iteration k (from 0) uses base * (1 - k / num_iterations) in every parameter group
    (num_iterations from total_steps); the logged lr is the policy's; the update gets the
    previous iteration's states as held-out states; explained variance uses the values
    predicted before the update."""
    cfg = make_config(preset, "CartPole-v1", dict(TRAIN, policy_lr=1e-3, value_lr=2e-3,
                                                  lr_anneal=True))
    assert cfg.num_iterations == 4
    rec = _record_training(monkeypatch, preset)
    run = train_mod.train(cfg, tmp_path / "run", progress=False)
    records = _read_metrics(run)
    assert len(rec.updates) == len(records) == 4
    for k, (up, record) in enumerate(zip(rec.updates, records, strict=True)):
        frac = 1 - k / 4
        want = {"value": 2e-3 * frac} if preset == "trpo" else \
            {"policy": 1e-3 * frac, "value": 2e-3 * frac}
        assert up["lrs"] == pytest.approx(want, rel=1e-12), k
        assert up["optimizer_lrs"] == pytest.approx(want, rel=1e-12), k
        if preset == "ppo":
            assert _metric(record, "lr", "learning_rate") == pytest.approx(1e-3 * frac)
        if "value_lr" in record:
            assert record["value_lr"] == pytest.approx(2e-3 * frac)
        # held-out states: the previous iteration's batch
        if k == 0:
            assert up["heldout"] is None
        else:
            assert torch.equal(up["heldout"], rec.updates[k - 1]["batch"].obs)
            assert record["kl_heldout_mean"] is not None
        batch = up["batch"]
        before = explained_variance(batch.values, batch.returns)
        after = explained_variance(up["values_after"], batch.returns)
        assert record["explained_variance"] == pytest.approx(before, rel=1e-9, abs=1e-12)
        assert abs(before - after) > 1e-6  # the test can tell the two apart
        assert record["env_steps"] == 64 * (k + 1)


def test_set_learning_rates_uses_per_env_defaults():
    """Walker2d's lrs (config's per-env defaults) reach both optimizer groups."""
    cfg = make_config("ppo", "Walker2d-v5", dict(hidden=(8,), total_steps=4096,
                                                 steps_per_iter=1024))
    assert (cfg.policy_lr, cfg.value_lr) == (4e-4, 3e-4)
    agent = _agent(cfg)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == \
        {"policy": 4e-4, "value": 3e-4}
    lr = train_mod.set_learning_rates(optimizer, cfg, 1)
    assert lr == pytest.approx(3e-4)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == \
        pytest.approx({"policy": 3e-4, "value": 2.25e-4})
    off = replace(cfg, lr_anneal=False)
    train_mod.set_learning_rates(optimizer, off, 3)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == \
        {"policy": 4e-4, "value": 3e-4}


def _same_state(a: Any, b: Any, where: str = "") -> None:
    """Deep equality of nested dicts/lists of tensors, arrays and numbers."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_state(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def test_resume_restores_optimizer_rngs_algo_state_and_statistics(tmp_path, monkeypatch):
    """Resuming from the checkpoint of iteration 2 hands iteration 3 exactly what the
    uninterrupted run had: Adam moments and step, the update RNG, the sampling RNG, the
    ppo-kl beta, the observation and reward statistics, the networks and (an env whose
    state can be saved) the episodes in progress, so the metrics lines are the same."""
    cfg = make_config("ppo-kl", "CartPole-v1", dict(TRAIN, total_steps=64 * 4, epochs=2,
                                                    policy_lr=3e-3))
    rec = _record_training(monkeypatch, "ppo")
    out = tmp_path / "run"
    train_mod.train(cfg, out, progress=False)
    full = copy.deepcopy(rec)
    full_metrics = _read_metrics(out)
    assert full.updates[2]["state"]["kl_beta"] != cfg.kl_beta_init  # beta has moved
    assert full.updates[2]["optimizer"]["state"]  # Adam has moments
    # a kill after iteration 2's checkpoint
    (out / "checkpoints" / "last.pt").write_bytes(
        (out / "checkpoints" / "iter_000002.pt").read_bytes())
    rec.updates.clear()
    rec.collects.clear()
    train_mod.train(cfg, out, resume=True, progress=False)
    assert len(rec.updates) == 2
    got, want = rec.updates[0], full.updates[2]
    _same_state(got["optimizer"], want["optimizer"], "optimizer")
    _same_state(got["adam"], want["adam"], "MaskedAdam")  # the state the update steps
    assert float(want["adam"]["policy"]["step"]) == 2 * 2 * cfg.minibatches
    assert torch.equal(got["generator"], want["generator"]), "update RNG"
    assert got["state"] == want["state"], "algo_state"
    # the rollout of iteration 3 starts from the same sampling RNG and statistics
    _same_state(rec.collects[0]["rng"], full.collects[2]["rng"], "sample RNG")
    _same_state(rec.collects[0]["pre"], full.collects[2]["pre"], "preprocessor")
    assert float(rec.collects[0]["pre"]["obs_norm"]["count"]) > 64 * 2
    # (the networks at the start of iteration 3 equal the uninterrupted run's)
    _same_state(dict(got["policy"]), dict(want["policy"]), "policy")
    # CartPole's state is saved with the collector's (current observations, running episode
    # returns and lengths): iterations 3 and 4 are those of the uninterrupted run
    for k in (0, 1):
        for key in ("obs", "actions", "rewards", "advantages", "done"):
            assert torch.equal(getattr(rec.updates[k]["batch"], key),
                               getattr(full.updates[k + 2]["batch"], key)), (k, key)
    timing = set(train_mod.TIMING_KEYS)
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _read_metrics(out)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in full_metrics]


def test_seed_drives_init_envs_sampling_and_updates(tmp_path, monkeypatch):
    """seed: network init, env resets, the sampling stream and the update RNG all follow
    it; the same seed repeats all of them."""
    firsts = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        rec = _record_training(monkeypatch, "ppo")
        cfg = make_config("ppo", "CartPole-v1", dict(TRAIN, total_steps=64, seed=seed))
        train_mod.train(cfg, tmp_path / name, progress=False)
        up = rec.updates[0]
        firsts[name] = dict(policy=up["policy"], obs0=up["batch"].obs[0],
                            generator=up["generator"], rng=rec.collects[0]["rng"])
    a, b, c = firsts["a"], firsts["b"], firsts["c"]
    _same_state(a, b, "same seed")
    assert not torch.equal(a["policy"]["net.0.weight"], c["policy"]["net.0.weight"])
    assert not torch.equal(a["obs0"], c["obs0"])
    assert not torch.equal(a["generator"], c["generator"])
    assert a["rng"]["state"] != c["rng"]["state"]


def test_policy_change_heldout_kl_is_on_the_heldout_states():
    cfg = _config("ppo")
    agent = _agent(cfg)
    batch = _batch(agent)
    old = copy.deepcopy(agent.policy)
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    heldout = 3.0 + 2.0 * torch.randn(40, OBS_DIM, generator=torch.Generator().manual_seed(2))
    extra = {"clip_range": 0.2} if "clip_range" in inspect.signature(policy_change).parameters \
        else {}
    out = policy_change(agent.policy, old, batch, heldout, **extra)
    with torch.no_grad():
        kl_b = agent.policy.kl(old.dist(batch.obs), agent.policy.dist(batch.obs))
        kl_h = agent.policy.kl(old.dist(heldout), agent.policy.dist(heldout))
    assert out["kl_mean"] == pytest.approx(float(kl_b.mean()), rel=1e-5)
    assert out["kl_heldout_mean"] == pytest.approx(float(kl_h.mean()), rel=1e-5)
    assert out["kl_heldout_max"] == pytest.approx(float(kl_h.max()), rel=1e-5)
    assert abs(float(kl_h.mean()) - float(kl_b.mean())) > 1e-3


def test_running_mean_std_of_the_normalizer_is_the_shared_one():
    """obs_norm and reward_scale keep their statistics in RunningMeanStd (whose numbers
    tests/test_optimizations.py checks against gymnasium)."""
    pre = _pre()
    assert isinstance(pre.obs_norm.rms, RunningMeanStd)
    assert isinstance(pre.reward_scaler.rms, RunningMeanStd)
    assert pre.obs_clip == 10.0 and pre.reward_clip == 10.0
