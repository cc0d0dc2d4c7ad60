"""The TRPO update (conjugate gradient, Fisher-vector products, KL-constrained line search)
and the PPO update, on small synthetic batches."""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

import pgscope.algos.trpo as trpo_mod
from pgscope.agent import build_agent
from pgscope.algos import update_one
from pgscope.algos.common import make_optimizer
from pgscope.algos.trpo import conjugate_gradient
from pgscope.config import make_config
from pgscope.engine.nets import SeedPhases
from pgscope.errors import ConfigError
from pgscope.optimizations import adapt_kl_beta, normalize_advantages
from pgscope.rollout import Batch

OBS_DIM, ACT_DIM = 4, 2


def _spaces():
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(ACT_DIM,), dtype=np.float32)
    return obs_space, act_space


def _setup(preset: str, seed: int = 0, n: int = 256, adv: str = "random", **overrides):
    """An agent, its optimizer and an on-policy synthetic batch of ``n`` samples."""
    torch.manual_seed(seed)
    cfg = make_config(preset, "Hopper-v5", {"steps_per_iter": n, "minibatches": 4,
                                            "epochs": 2, "hidden": (16, 16), "seed": seed,
                                            **overrides})
    agent = build_agent(cfg, *_spaces())
    policy, value_net = agent.policy, agent.value_net
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS_DIM, generator=gen)
    with torch.no_grad():
        dist = policy.dist(obs)
        actions = dist.mean + dist.stddev * torch.randn(n, ACT_DIM, generator=gen)
        logp = policy.log_prob(policy.dist(obs), actions)
        values = value_net(obs)
    if adv == "random":
        advantages = torch.randn(n, generator=gen)
    elif adv == "zero":
        advantages = torch.zeros(n)
    else:  # constant
        advantages = torch.full((n,), 3.0)
    returns = values + advantages
    batch = Batch(obs=obs, actions=actions, logp=logp, values=values,
                  advantages=advantages, returns=returns, rewards=torch.zeros(n),
                  terminated=torch.zeros(n, dtype=torch.bool),
                  done=torch.zeros(n, dtype=torch.bool), next_obs=obs)
    optimizer = make_optimizer(cfg, policy, value_net)
    return cfg, policy, value_net, optimizer, batch, torch.Generator().manual_seed(seed + 1)


def _mean_kl(old_policy, policy, obs: torch.Tensor) -> float:
    with torch.no_grad():
        return float(policy.kl(old_policy.dist(obs), policy.dist(obs)).mean())


def _surrogate(policy, batch: Batch, adv: torch.Tensor) -> float:
    with torch.no_grad():
        ratio = (policy.log_prob(policy.dist(batch.obs), batch.actions) - batch.logp).exp()
        return float((ratio * adv).mean())


# conjugate gradient ---------------------------------------------------------------------
def one_system(avp, b, iters, tol=1e-10):
    """conjugate_gradient (rows of systems) for the single system ``avp``, ``b``."""
    return conjugate_gradient(lambda rows: torch.stack([avp(r) for r in rows]), b[None],
                              iters, tol)[0]


def test_conjugate_gradient_solves_each_row_on_its_own():
    """Rows are independent systems: solved together, each row is bit for bit what it is
    alone, also when one row converges (and stops) before the other."""
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + torch.eye(6, dtype=torch.float64)
    a[1] = 2.0 * torch.eye(6, dtype=torch.float64)  # row 1 converges in one iteration
    b = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    together = conjugate_gradient(lambda v: torch.stack([a[i] @ v[i] for i in range(2)]), b,
                                  iters=8)
    for i in range(2):
        alone = one_system(lambda v, i=i: a[i] @ v, b[i], iters=8)
        assert torch.equal(together[i], alone)
    np.testing.assert_allclose(together[1].numpy(), (b[1] / 2).numpy(), rtol=1e-12)


def test_conjugate_gradient_solves_spd_system():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(10, dtype=torch.float64)
    b = torch.randn(10, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    x = one_system(lambda v: a @ v, b, iters=50, tol=1e-24)
    np.testing.assert_allclose(x.numpy(), exact.numpy(), atol=1e-5, rtol=0)
    assert torch.linalg.vector_norm(a @ x - b).item() < 1e-8
    # Too few iterations do not get there on this (condition number ~100) system.
    rough = one_system(lambda v: a @ v, b, iters=2)
    assert torch.linalg.vector_norm(rough - exact).item() > 1e-3


def test_conjugate_gradient_hand_cases():
    b = torch.tensor([3.0, -6.0, 1.5], dtype=torch.float64)
    # A = 3 I: the first search direction is exact, x = b / 3 after one iteration.
    x = one_system(lambda v: 3.0 * v, b, iters=1)
    np.testing.assert_allclose(x.numpy(), [1.0, -2.0, 0.5], rtol=1e-12)
    # Diagonal with 3 distinct eigenvalues: exact in 3 iterations.
    d = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    x = one_system(lambda v: d * v, b, iters=3)
    np.testing.assert_allclose(x.numpy(), [3.0, -3.0, 0.375], rtol=1e-10)
    # b = 0: nothing to solve, zero iterations' worth of work.
    calls = []
    x = one_system(lambda v: calls.append(1) or v, torch.zeros(3), iters=10)
    assert calls == [] and torch.count_nonzero(x) == 0


# Fisher-vector product ---------------------------------------------------------------------
def test_fisher_vector_product_equals_hessian_of_kl(monkeypatch):
    """Capture the FVP closure trpo_update hands to conjugate_gradient and compare, column by
    column, with the explicit Hessian of mean KL(old || new) at theta_old (+ damping I)."""
    cfg, policy, value_net, opt, batch, gen = _setup(
        "trpo", n=64, hidden=(8,), fisher_fraction=1.0, cg_damping=0.1)
    old = copy.deepcopy(policy).double()
    names = [name for name, _ in old.named_parameters()]
    shapes = [p.shape for _, p in old.named_parameters()]
    theta_old = parameters_to_vector(old.parameters()).detach()
    obs = batch.obs.double()
    with torch.no_grad():
        old_dist = old.dist(obs)

    def kl_of_flat(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            k = math.prod(shape)
            params[name] = theta[i:i + k].view(shape)
            i += k
        mean = functional_call(old.net, {k[len("net."):]: v for k, v in params.items()
                                         if k.startswith("net.")}, (obs,))
        new_dist = torch.distributions.Normal(mean, params["log_std"].exp().expand_as(mean))
        return old.kl(old_dist, new_dist).mean()

    hessian = torch.autograd.functional.hessian(kl_of_flat, theta_old)
    dim = theta_old.numel()
    assert dim == OBS_DIM * 8 + 8 + 8 * ACT_DIM + ACT_DIM + ACT_DIM == 60
    captured = {}
    real_cg = trpo_mod.conjugate_gradient

    def spy(avp, b, iters, tol=1e-10):  # the batch of one: rows [1, P]
        eye = torch.eye(dim)
        captured["F"] = torch.stack([avp(eye[i][None])[0] for i in range(dim)],
                                    dim=1).double()
        captured["v"] = torch.randn(dim, generator=torch.Generator().manual_seed(9))
        captured["Fv"] = avp(captured["v"][None])[0].double()
        return real_cg(avp, b, iters, tol)

    monkeypatch.setattr(trpo_mod, "conjugate_gradient", spy)
    update_one(cfg, policy, value_net, opt, batch, gen, {})

    expected = hessian + cfg.cg_damping * torch.eye(dim, dtype=torch.float64)
    scale = expected.abs().max().item()
    np.testing.assert_allclose(captured["F"].numpy(), expected.numpy(), atol=1e-5 * scale,
                               rtol=1e-4)
    np.testing.assert_allclose(captured["Fv"].numpy(),
                               (expected @ captured["v"].double()).numpy(),
                               atol=1e-5 * scale * math.sqrt(dim), rtol=1e-4)
    # The KL Hessian at theta_old is symmetric positive semi-definite; with damping, PD.
    assert torch.linalg.eigvalsh(expected).min().item() >= cfg.cg_damping - 1e-8
    # log_std block by hand: KL(N(m,s0)||N(m,s)) = log s/s0 + s0^2/(2 s^2) - 1/2 per dim,
    # second derivative in log s at s = s0 is 2 for each action dim (the mean is unchanged).
    # log_std is the policy's own parameter, so it comes first in the flat vector.
    assert names[0] == "log_std"
    np.testing.assert_allclose(captured["F"][:ACT_DIM, :ACT_DIM].numpy(),
                               (2.0 + cfg.cg_damping) * np.eye(ACT_DIM), rtol=1e-5, atol=1e-6)


# trpo_update end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("max_kl", [0.001, 0.01, 0.13])
def test_trpo_step_respects_kl_and_improves_surrogate(max_kl):
    cfg, policy, value_net, opt, batch, gen = _setup("trpo", max_kl=max_kl)
    old = copy.deepcopy(policy)
    adv = normalize_advantages(batch.advantages, cfg.adv_norm)
    surr_before = _surrogate(old, batch, adv)
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})

    assert m["step_fraction"] > 0
    assert m["step_fraction"] == cfg.backtrack_coef ** (m["linesearch_steps"] - 1)
    kl = _mean_kl(old, policy, batch.obs)
    assert kl <= max_kl + 1e-7
    assert kl > 0
    assert m["kl_mean"] == pytest.approx(kl, rel=1e-5)
    assert m["kl_max"] >= m["kl_mean"]
    surr_after = _surrogate(policy, batch, adv)
    assert surr_after > surr_before
    assert surr_before == pytest.approx(float(adv.mean()), abs=1e-6)  # on-policy: ratio 1
    assert m["policy_loss"] == pytest.approx(-surr_before, abs=1e-6)
    assert m["ratio_first_minibatch_dev"] == 0.0
    assert m["ratio_min_after"] <= 1.0 <= m["ratio_max_after"]
    moved = parameters_to_vector(policy.parameters()) - parameters_to_vector(old.parameters())
    assert moved.norm().item() == pytest.approx(m["step_norm"], rel=1e-4)
    assert 0.0 <= m["clip_fraction_after"] <= 1.0


def test_trpo_full_step_is_near_the_kl_limit():
    # With a small limit the quadratic model is accurate: the first (full) step is accepted
    # and its KL is close to, but not above, max_kl; damping shortens the step a little.
    kls = {}
    for damping in (1e-3, 0.1):
        cfg, policy, value_net, opt, batch, gen = _setup(
            "trpo", max_kl=1e-4, fisher_fraction=1.0, cg_damping=damping, hidden=(8,))
        old = copy.deepcopy(policy)
        m = update_one(cfg, policy, value_net, opt, batch, gen, {})
        assert m["step_fraction"] == 1.0 and m["linesearch_steps"] == 1
        kls[damping] = _mean_kl(old, policy, batch.obs)
    assert 0.95e-4 < kls[1e-3] <= 1e-4
    assert 0.5e-4 < kls[0.1] < kls[1e-3]


@pytest.mark.parametrize("adv", ["zero", "constant"])
def test_trpo_no_step_leaves_policy_unchanged(adv):
    # Advantages without signal normalize to 0: no improving direction, no accepted step.
    cfg, policy, value_net, opt, batch, gen = _setup("trpo", adv=adv)
    before = parameters_to_vector(policy.parameters()).detach().clone()
    value_before = parameters_to_vector(value_net.parameters()).detach().clone()
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})
    assert m["step_fraction"] == 0.0
    assert m["linesearch_steps"] == cfg.backtrack_iters
    assert m["step_norm"] == 0.0
    assert torch.equal(parameters_to_vector(policy.parameters()), before)
    assert m["kl_mean"] == 0.0 and m["kl_max"] == 0.0
    assert m["ratio_first_minibatch_dev"] == 0.0
    assert m["ratio_max_after"] == 1.0 and m["ratio_min_after"] == 1.0
    # The value net is still fit on its targets (values + advantages): it moves only when
    # the advantages are not zero.
    moved = not torch.equal(parameters_to_vector(value_net.parameters()), value_before)
    assert moved == (adv == "constant")


def test_trpo_tiny_kl_limit_is_kept():
    # The step is scaled to the limit, so even max_kl = 1e-12 yields an accepted (tiny) step
    # whose KL stays below the limit; rejecting every step takes a batch without signal.
    cfg, policy, value_net, opt, batch, gen = _setup("trpo", max_kl=1e-12)
    old = copy.deepcopy(policy)
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})
    assert m["step_fraction"] == 1.0
    assert 0.0 < _mean_kl(old, policy, batch.obs) <= 1e-12
    assert 0.0 < m["step_norm"] < 1e-4
    adv = normalize_advantages(batch.advantages, True)
    assert _surrogate(policy, batch, adv) > _surrogate(old, batch, adv)


def test_trpo_optimizer_holds_value_net_only():
    cfg, policy, value_net, opt, *_ = _setup("trpo")
    assert [g["name"] for g in opt.param_groups] == ["value"]
    assert opt.param_groups[0]["lr"] == cfg.value_lr


# ppo_update ------------------------------------------------------------------------------------
PPO_KEYS = ("ratio_max", "ratio_min", "clip_fraction", "kl_mean", "kl_max", "policy_loss",
            "value_loss", "entropy")


def test_ppo_update_metrics(monkeypatch):
    cfg, policy, value_net, opt, batch, gen = _setup("ppo", epochs=3, policy_lr=3e-3)
    assert [g["name"] for g in opt.param_groups] == ["policy", "value"]
    seen: list[torch.Tensor] = []
    real = SeedPhases.record

    def record(self, active, ratio=None, **values):
        seen.append(ratio[0].detach().clone())  # the batch of one's seed
        real(self, active, ratio, **values)

    monkeypatch.setattr(SeedPhases, "record", record)
    old = copy.deepcopy(policy)
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})

    for key in PPO_KEYS:
        assert key in m and math.isfinite(m[key]), key
    assert m["ratio_first_minibatch_dev"] == 0.0
    assert m["ratio_max"] >= 1.0 >= m["ratio_min"]
    assert 0.0 <= m["clip_fraction"] <= 1.0
    assert m["epochs_run"] == 3
    # Phase-wide, not last-minibatch: every minibatch of every epoch was counted.
    assert len(seen) == cfg.epochs * cfg.minibatches
    allr = torch.cat(seen)
    assert allr.numel() == cfg.epochs * len(batch)
    assert m["ratio_max"] == pytest.approx(float(allr.max()))
    assert m["ratio_min"] == pytest.approx(float(allr.min()))
    outside = float(((allr - 1).abs() > cfg.clip_eps).float().mean())
    assert m["clip_fraction"] == pytest.approx(outside)
    assert m["clip_fraction"] > 0  # lr 3e-3 moves ratios past 1 +- 0.2 in later epochs
    assert torch.equal(seen[0], torch.ones_like(seen[0]))  # first minibatch is on-policy
    # KL after the update on the training batch, as policy_change reports it.
    assert m["kl_mean"] == pytest.approx(_mean_kl(old, policy, batch.obs), rel=1e-5)
    assert m["kl_max"] >= m["kl_mean"] > 0
    assert m["entropy"] == pytest.approx(ACT_DIM * (0.5 + 0.5 * math.log(2 * math.pi)),
                                         rel=1e-6)  # old policy: log_std 0


def test_ppo_update_without_signal_keeps_ratio_one():
    # Zero advantages, no entropy bonus: the policy loss has zero gradient, the policy stays.
    cfg, policy, value_net, opt, batch, gen = _setup("ppo", adv="zero")
    before = parameters_to_vector(policy.parameters()).detach().clone()
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})
    assert torch.equal(parameters_to_vector(policy.parameters()), before)
    assert m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0 and m["clip_fraction"] == 0.0
    assert m["kl_mean"] == 0.0


def test_ppo_kl_adapts_beta():
    cfg, policy, value_net, opt, batch, gen = _setup("ppo-kl", policy_lr=3e-3)
    state: dict[str, float] = {}
    m = update_one(cfg, policy, value_net, opt, batch, gen, state)
    assert m["kl_beta"] == cfg.kl_beta_init == 1.0
    assert state["kl_beta"] == adapt_kl_beta(1.0, m["kl_mean"], cfg.target_kl)
    assert state["kl_beta"] in (0.5, 1.0, 2.0)
    assert m["ratio_first_minibatch_dev"] == 0.0


@pytest.mark.parametrize("key, value", [("ent_coef", 0.01), ("kl_stop", True)])
def test_switches_trpo_would_ignore_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        make_config("trpo", "Pendulum-v1", {key: value})
    make_config("ppo", "Pendulum-v1", {key: value})  # PPO uses them
