"""pgscope's rollout preprocessing, GAE, PPO update and TRPO step against the independent
reference in ``tests/reference_impl.py`` (which imports nothing from pgscope).

Each case collects two rollouts with pgscope's RolloutCollector on a small env whose steps
are recorded by a wrapper and checks both batches against the reference computed from the
raw stream. It then runs one update on the first batch (the one where the reward and
observation clips bind: the running statistics are young), as iteration ``ITERATION`` of
``NUM_ITERATIONS`` so that learning-rate annealing is visible, with the second batch's
states as held-out states, in pgscope and in the reference from the same weights, batch
and seed, in float64, and checks that both end with the same policy and value parameters
and the same metrics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import gymnasium as gym
import numpy as np
import pytest
import reference_impl as ref
import torch
from torch import nn

from pgscope.agent import Agent, build_agent
from pgscope.algos import update_one
from pgscope.algos.common import explained_variance, learning_rates, make_optimizer
from pgscope.config import Config, make_config
from pgscope.engine.rollout import collect_one
from pgscope.errors import ConfigError
from pgscope.rollout import Batch, FinishedEpisodes, RolloutCollector
from pgscope.train import set_learning_rates

PENDULUM, CARTPOLE, DRIFT = "Pendulum-v1", "CartPole-v1", "pgscope-test/Drift-v0"
STEPS = 128
NUM_ITERATIONS = 10
ITERATION = 4  # the update runs at iteration 4 (from 0): annealed lr = 0.6 x base
SEED = 3  # the run's seed: the collector's; the update generator's is SEED + 1 (as in train)
SETUP = dict(
    seed=SEED, steps_per_iter=STEPS, total_steps=STEPS * NUM_ITERATIONS, epochs=3,
    minibatches=3, hidden=(16, 16), policy_lr=2e-2, value_lr=1e-2, target_kl=0.0035, max_kl=0.02,
    cg_iters=4, fisher_fraction=0.25,
    # bounds tight enough that every clip binds in these short runs
    obs_clip_bound=1.5, reward_clip_bound=3.0, max_grad_norm=0.3, value_clip_range=0.05,
)
ENV_SETUP = {
    PENDULUM: dict(num_envs=1),
    CARTPOLE: dict(num_envs=2),
    DRIFT: dict(num_envs=2, init_log_std=0.5),  # std 1.6 > the action bound 1: action_clip
}

#: Switches flipped from their preset value, and the flipped value.
FLIPPABLE = ("value_clip", "reward_scale", "ortho_init", "lr_anneal", "reward_clip", "obs_norm",
             "obs_clip", "activation", "grad_clip", "adv_norm", "ent_coef", "kl_stop",
             "action_clip")
#: Switches TRPO does not read (PPO-only): a TRPO config that sets them is refused.
PPO_ONLY = ("ent_coef", "kl_stop")

# float64: both sides do the same arithmetic in a different order; what is left is rounding
# (~1e-16 relative) grown through a few dozen Adam steps: observed <1e-14.
F64 = dict(rtol=1e-9, atol=1e-10)
# pgscope averages per-minibatch gradient norms (Python floats) in float32, so its phase means
# carry float32 rounding (~6e-8 relative); every other metric agrees to ~1e-15.
F64_METRICS = dict(rtol=1e-6, atol=1e-10)
# pgscope in float32 (as training runs) against the float64 reference: float32's unit
# roundoff is 6e-8 and parameters of size <~1 take nine Adam steps, each rounded (TRPO:
# one natural-gradient step); observed differences are <= 6e-7 (parameters and metrics),
# so 2e-6 absolute / 1e-5 relative leaves a ~3x margin, while the planted bugs tried
# (e.g. Adam's eps 1e-5 -> 1e-8, CG damping dropped) still fail it.
F32 = dict(rtol=1e-5, atol=2e-6)



class Drift(gym.Env):
    """x <- x + 0.1 a with reward -|x|^2 - 0.1 |a|^2, both on the action as received (no
    clipping inside, unlike Pendulum, which clips its torque itself, so that action_clip
    matters); terminates when |x|_inf > 1.5, truncated by a 40-step time limit."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.x = np.zeros(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-1.0, 1.0, size=2)
        return self.x.astype(np.float32), {}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        self.x = self.x + 0.1 * a
        reward = -float(self.x @ self.x) - 0.1 * float(a @ a)
        return self.x.astype(np.float32), reward, bool(np.abs(self.x).max() > 1.5), False, {}


if DRIFT not in gym.registry:
    gym.register(DRIFT, entry_point=Drift, max_episode_steps=40)


def flipped(cfg: Config, switch: str) -> object:
    """The switch's value flipped from ``cfg``'s (ent_coef: 0 <-> 0.01)."""
    value = getattr(cfg, switch)
    if switch == "activation":
        return "relu" if value == "tanh" else "tanh"
    if switch == "ent_coef":
        return 0.01 if value == 0 else 0.0
    return not value


# ---------------------------------------------------------------------------------------
# pgscope <-> reference conversions
# ---------------------------------------------------------------------------------------
def to_params(module: nn.Module) -> ref.Params:
    """A pgscope policy or value net as the reference's weight matrices."""
    linears = [m for m in module.net if isinstance(m, nn.Linear)]
    params: ref.Params = {}
    for i, layer in enumerate(linears):
        params[f"W{i}"] = layer.weight.detach().clone()
        params[f"b{i}"] = layer.bias.detach().clone()
    if hasattr(module, "log_std"):
        params["log_std"] = module.log_std.detach().clone()
    return params


def hyper(cfg: Config) -> ref.Hyper:
    return ref.Hyper(**{f.name: getattr(cfg, f.name) for f in fields(ref.Hyper)})


def switches(cfg: Config) -> ref.RolloutSwitches:
    return ref.RolloutSwitches(**{f.name: getattr(cfg, f.name)
                                  for f in fields(ref.RolloutSwitches)})


def to_data(batch: Batch) -> ref.Data:
    return ref.Data(obs=batch.obs, actions=batch.actions, logp=batch.logp, values=batch.values,
                    advantages=batch.advantages, returns=batch.returns)


def as_double(batch: Batch, policy: nn.Module) -> Batch:
    """The batch in float64, log-probabilities recomputed by the (float64) data-collecting
    policy, as the rollout does in the networks' own precision."""
    d = {f.name: getattr(batch, f.name) for f in fields(Batch)}
    for k, v in d.items():
        if torch.is_tensor(v) and v.is_floating_point():
            d[k] = v.double()
    with torch.no_grad():
        d["logp"] = policy.log_prob(policy.dist(d["obs"]), d["actions"])
    return Batch(**d)


def iteration_metrics(update_metrics: dict[str, float], optimizer: torch.optim.Optimizer,
                      batch: Batch) -> dict[str, float]:
    """The update's keys of one metrics line, as train.py assembles it."""
    return {"explained_variance": explained_variance(batch.values, batch.returns),
            **learning_rates(optimizer), **update_metrics}


def assert_params_equal(module: nn.Module, params: ref.Params, **tol: float) -> None:
    mine = to_params(module)
    assert mine.keys() == params.keys()
    for k in params:
        np.testing.assert_allclose(mine[k].double().numpy(), params[k].double().numpy(),
                                   err_msg=k, **tol)


def assert_metrics_equal(got: dict[str, float], want: dict[str, float], **tol: float) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, f"pgscope does not log {missing}"
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, err_msg=k, **tol)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


# ---------------------------------------------------------------------------------------
# one case: rollouts, the rollout check, the update in pgscope and in the reference
# ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    cfg: Config
    batch: Batch  # as collected (float32)
    policy: nn.Module  # pgscope's networks after the float64 update
    value_net: nn.Module
    metrics: dict[str, float]
    state: dict[str, float]
    ref: ref.UpdateResult


def collect(cfg: Config, seed: int):
    """Two rollouts of pgscope's collector on recorded envs (same-step autoreset, as
    make_vector_env builds them); returns the agent, both batches, the episode stats of
    both, the recorded raw stream and the (closed) vector env."""
    recorders = [ref.RecordingWrapper(gym.make(cfg.env_id)) for _ in range(cfg.num_envs)]
    envs = gym.vector.SyncVectorEnv([lambda r=r: r for r in recorders],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    torch.manual_seed(seed)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    with torch.no_grad():  # nonzero biases, as after training (V(0) = 0 would hide bugs)
        for module in (agent.policy, agent.value_net):
            for layer in module.net:
                if isinstance(layer, nn.Linear):
                    layer.bias.uniform_(-0.2, 0.2)
    collector = RolloutCollector(cfg, envs, agent.preprocessor, seed=seed)
    first, stats1 = collect_one(collector, agent.policy, agent.value_net)
    second, stats2 = collect_one(collector, agent.policy, agent.value_net)
    envs.close()
    return agent, first, second, (stats1, stats2), ref.stream_from_recorders(recorders), envs


def check_rollout(cfg: Config, agent: Agent, batches: list[Batch],
                  stats: tuple[FinishedEpisodes, ...], stream: ref.RawStream,
                  envs: gym.vector.VectorEnv) -> None:
    """pgscope's batches equal the reference computed from the raw stream: observations,
    rewards, episode flags, next states, values, advantages, returns, log-probabilities
    of the stored (unclipped) actions, what the env received, and the episode returns."""
    value = to_params(agent.value_net)
    policy = to_params(agent.policy)
    value_fn = lambda x: ref.value_forward(  # noqa: E731
        {k: v.double() for k, v in value.items()}, torch.from_numpy(x).double(),
        cfg.activation).numpy()
    want = ref.reference_batches(stream, switches(cfg), cfg.steps_per_env, value_fn)
    assert len(want) == len(batches) == 2
    for got, exp in zip(batches, want, strict=True):
        # float32 storage on pgscope's side: compare to float32 resolution
        np.testing.assert_allclose(got.obs.numpy(), exp.obs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.rewards.numpy(), exp.rewards, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(got.terminated.numpy(), exp.terminated)
        np.testing.assert_array_equal(got.done.numpy(), exp.done)
        live = ~exp.terminated  # after termination the stored next state is unused
        np.testing.assert_allclose(got.next_obs.numpy()[live], exp.next_obs[live], rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(got.values.numpy(), exp.values, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.advantages.numpy(), exp.advantages, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(got.returns.numpy(), exp.returns, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            d = ref.policy_dist({k: v.double() for k, v in policy.items()},
                                torch.from_numpy(exp.obs).double(), cfg.activation)
            logp = ref.log_prob(d, got.actions.double())
        np.testing.assert_allclose(got.logp.numpy(), logp.numpy(), rtol=1e-5, atol=1e-5)
    # actions: the batch keeps the unclipped sample, the env received the clipped one
    sent = stream.env_actions.reshape(-1, *stream.env_actions.shape[2:])
    sampled = torch.cat([b.actions for b in batches]).numpy()
    space = envs.single_action_space
    if isinstance(space, gym.spaces.Box) and cfg.action_clip:
        np.testing.assert_array_equal(sent, np.clip(sampled, space.low, space.high))
    else:
        np.testing.assert_array_equal(sent, sampled)
    returns, lengths = ref.episode_returns(stream)
    assert stats[0].returns + stats[1].returns == pytest.approx(returns, rel=1e-12)
    assert stats[0].lengths + stats[1].lengths == lengths


def run_case(preset: str, env_id: str, overrides: dict | None = None,
             dtype: torch.dtype = torch.float64, kl_beta: float | None = None,
             heldout: bool = True) -> Outcome:
    """Collect, check the rollout, then update in pgscope (in ``dtype``) and in the
    reference (float64) from the same weights, batch and seed."""
    cfg = make_config(preset, env_id, {**SETUP, **ENV_SETUP[env_id], **(overrides or {})})
    agent, first, second, stats, stream, envs = collect(cfg, cfg.seed)
    check_rollout(cfg, agent, [first, second], stats, stream, envs)

    policy = copy.deepcopy(agent.policy).to(dtype)
    value_net = copy.deepcopy(agent.value_net).to(dtype)
    batch = as_double(first, policy) if dtype == torch.float64 else first
    heldout_obs = second.obs.to(dtype) if heldout else None
    init_policy, init_value = to_params(policy), to_params(value_net)

    optimizer = make_optimizer(cfg, policy, value_net)
    set_learning_rates(optimizer, cfg, ITERATION)
    state = {} if kl_beta is None else {"kl_beta": kl_beta}
    m = update_one(cfg, policy, value_net, optimizer, batch,
               torch.Generator().manual_seed(cfg.seed + 1), state, heldout_obs)
    metrics = iteration_metrics(m, optimizer, batch)

    # the reference always computes in float64, from the same (possibly float32) inputs
    data = ref.Data(**{k: v.double() if v.is_floating_point() else v
                       for k, v in vars(to_data(batch)).items()})
    init_policy = {k: v.double() for k, v in init_policy.items()}
    init_value = {k: v.double() for k, v in init_value.items()}
    h_obs = None if heldout_obs is None else heldout_obs.double()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    result = REFERENCE[cfg.algo](hyper(cfg), init_policy, init_value, data, gen, h_obs, kl_beta)
    return Outcome(cfg, first, policy, value_net, metrics, state, result)


#: The reference update of each algorithm: (hyper, policy, value, data, generator,
#: held-out states, kl_beta) -> ref.UpdateResult.
REFERENCE = {
    "ppo": lambda hp, p, v, d, gen, h, beta: ref.ppo_update(
        hp, p, v, d, gen, ITERATION, kl_beta=beta, heldout_obs=h),
    "trpo": lambda hp, p, v, d, gen, h, beta: ref.trpo_update(
        hp, p, v, d, gen, ITERATION, heldout_obs=h),
    "a2c": lambda hp, p, v, d, gen, h, beta: ref.a2c_update(hp, p, v, d, ITERATION,
                                                            heldout_obs=h),
}


def check_outcome(out: Outcome, **tol: float) -> None:
    assert_params_equal(out.policy, out.ref.policy, **(tol or F64))
    assert_params_equal(out.value_net, out.ref.value, **(tol or F64))
    assert_metrics_equal(out.metrics, out.ref.metrics, **(tol or F64_METRICS))
    if out.cfg.algo == "trpo":  # PPO-only keys mean nothing for TRPO
        assert not {"ratio_max", "ratio_min", "clip_fraction", "epochs_run", "lr",
                    "kl_beta"} & set(out.metrics)
    if out.cfg.ppo_loss == "kl" and out.cfg.algo == "ppo":
        assert out.state["kl_beta"] == out.ref.kl_beta_next


_BASE: dict[tuple[str, str], Outcome] = {}


def base_case(preset: str, env_id: str) -> Outcome:
    if (preset, env_id) not in _BASE:
        _BASE[(preset, env_id)] = run_case(preset, env_id)
    return _BASE[(preset, env_id)]


# ---------------------------------------------------------------------------------------
# the presets
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", [PENDULUM, CARTPOLE, DRIFT])
@pytest.mark.parametrize("preset", ["ppo", "ppo-kl", "trpo", "trpo+", "ppo-m", "ppo-noclip"])
def test_preset_matches_reference(preset, env_id):
    out = base_case(preset, env_id)
    check_outcome(out)
    # the first minibatch is on-policy: ratio 1 up to float64 rounding (the minibatch's
    # forward pass is a different matrix product from the batch's that stored log pi_old)
    assert out.metrics["ratio_first_minibatch_dev"] < 1e-12
    assert set(out.metrics) >= {"kl_heldout_mean", "kl_heldout_max"}
    assert ("entropy_frac" in out.metrics) == (env_id == CARTPOLE)
    assert ("policy_std" in out.metrics) == (env_id != CARTPOLE)


def test_ppo_kl_reads_and_adapts_beta_from_state():
    out = run_case("ppo-kl", PENDULUM, kl_beta=0.25)
    check_outcome(out)
    assert out.metrics["kl_beta"] == 0.25
    assert out.state["kl_beta"] in (0.125, 0.25, 0.5)
    base = base_case("ppo-kl", PENDULUM)  # beta 1.0: a different penalty, other weights
    assert not torch.allclose(flat(out.policy), flat(base.policy))


def test_no_heldout_states_no_heldout_keys():
    out = run_case("ppo", CARTPOLE, heldout=False)
    check_outcome(out)
    assert not {"kl_heldout_mean", "kl_heldout_max"} & set(out.metrics)


# ---------------------------------------------------------------------------------------
# every switch flipped
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", FLIPPABLE)
@pytest.mark.parametrize("preset", ["ppo", "trpo"])
def test_flipped_switch_matches_reference(preset, switch):
    env_id = DRIFT if switch == "action_clip" else PENDULUM  # Pendulum clips by itself
    base = base_case(preset, env_id)
    value = flipped(base.cfg, switch)
    if preset == "trpo" and switch in PPO_ONLY:  # TRPO would ignore it: refused up front
        with pytest.raises(ConfigError, match=switch):
            run_case(preset, env_id, {switch: value})
        return
    out = run_case(preset, env_id, {switch: value})
    check_outcome(out)
    changed = not (torch.equal(flat(out.policy), flat(base.policy))
                   and torch.equal(flat(out.value_net), flat(base.value_net)))
    assert changed, f"flipping {switch} to {value} changed nothing"
    if switch == "kl_stop" and preset == "ppo":
        assert out.cfg.kl_stop and out.metrics["epochs_run"] < out.cfg.epochs  # it fired
        # ... on a KL between 1.5 and 3 x target: the factor 1.5 decided it
        assert 1.5 < out.ref.trace["epoch_kl"][-1] / out.cfg.target_kl < 3.0


@pytest.mark.parametrize("preset", ["trpo", "ppo"])
def test_reward_multiplier_matches_reference(preset):
    """The learner sees k x reward, before reward scaling (which then nearly undoes it) and
    clipping; the episode returns stay in the env's units (checked with the rollout)."""
    base = base_case(preset, PENDULUM)
    out = run_case(preset, PENDULUM, {"reward_multiplier": 5.0})
    check_outcome(out)
    rewards, base_rewards = out.batch.rewards.numpy(), base.batch.rewards.numpy()
    if out.cfg.reward_scale:  # k r / std(k G) = r / std(G) but for the statistics' prior
        np.testing.assert_allclose(rewards, base_rewards, rtol=0.05)
        assert not np.array_equal(rewards, base_rewards)
    else:
        np.testing.assert_allclose(rewards, 5.0 * base_rewards, rtol=1e-12)
        assert not torch.equal(flat(out.value_net), flat(base.value_net))


@pytest.mark.parametrize("preset,eps_ref", [("ppo", 0.1), ("ppo-kl", 0.2), ("trpo", 0.2)])
def test_clip_fractions_count_against_the_reference_range(preset, eps_ref):
    """clip_eps 0.1: the clipped surrogate counts against it, the others against 0.2."""
    out = run_case(preset, PENDULUM, {"clip_eps": 0.1})
    check_outcome(out)
    assert hyper(out.cfg).clip_fraction_eps == eps_ref
    assert 0 < out.metrics["clip_fraction_after"] < 1


def test_every_switch_binds_in_the_base_case():
    """The setup is one where each switch matters: clips bind, actions leave the bounds."""
    out = base_case("ppo", PENDULUM)
    t = out.ref.trace
    cfg = out.cfg
    assert max(t["policy_grad_norm"]) > cfg.max_grad_norm
    assert min(t["policy_grad_norm"]) < cfg.max_grad_norm
    assert max(t["value_grad_norm"]) > cfg.max_grad_norm
    assert (base_case("ppo", DRIFT).batch.actions.abs() > 1.0).any()  # bounds are +-1
    assert (out.batch.obs.abs() == cfg.obs_clip_bound).any()
    assert (out.batch.rewards.abs() == cfg.reward_clip_bound).any()
    assert out.metrics["epochs_run"] == cfg.epochs  # kl_stop is off in the preset
    assert out.metrics["clip_fraction"] > 0
    assert max(base_case("trpo+", PENDULUM).ref.trace["value_grad_norm"]) > cfg.max_grad_norm


# ---------------------------------------------------------------------------------------
# TRPO's line search
# ---------------------------------------------------------------------------------------
def test_trpo_line_search_backtracks_on_kl():
    """On Drift the full step overshoots max_kl while improving the surrogate: only the KL
    test rejects it, and the half step is taken."""
    out = base_case("trpo", DRIFT)
    check_outcome(out)
    t = out.ref.trace
    assert out.metrics["linesearch_steps"] == 2 and out.metrics["step_fraction"] == 0.5
    assert t["trial_kl"][0] > out.cfg.max_kl and t["trial_improvement"][0] > 0
    assert 0 < out.metrics["kl_mean"] <= out.cfg.max_kl


def test_trpo_line_search_backtracks_on_surrogate():
    """With a loose KL limit the long steps stay inside it but make the surrogate worse:
    the improvement test rejects them."""
    out = run_case("trpo", PENDULUM, {"max_kl": 50.0})
    check_outcome(out)
    t = out.ref.trace
    assert out.metrics["linesearch_steps"] == 3
    assert out.metrics["step_fraction"] == 0.25
    assert all(kl <= 50.0 and imp <= 0 for kl, imp in
               zip(t["trial_kl"][:2], t["trial_improvement"][:2], strict=True))


@pytest.mark.parametrize("env_id,overrides,rejected_by", [
    (DRIFT, {"backtrack_iters": 1}, "kl"),
    (PENDULUM, {"max_kl": 50.0, "backtrack_iters": 2}, "surrogate"),
])
def test_trpo_line_search_rejects_every_step(env_id, overrides, rejected_by):
    out = run_case("trpo", env_id, overrides)
    check_outcome(out)
    m, t = out.metrics, out.ref.trace
    assert m["step_fraction"] == 0.0 and m["step_norm"] == 0.0
    assert m["linesearch_steps"] == out.cfg.backtrack_iters
    assert m["kl_mean"] == 0.0 and m["ratio_max_after"] == m["ratio_min_after"] == 1.0
    if rejected_by == "kl":
        assert all(kl > out.cfg.max_kl for kl in t["trial_kl"])
    else:
        assert all(imp <= 0 for imp in t["trial_improvement"])


def test_trpo_cg_iterations_matter():
    """cg_iters 6 instead of the setup's 4. (Around 8-10 iterations CG on these damped
    low-rank Fisher matrices amplifies 1e-16 perturbations of the products to ~1e-6 in
    the solution, so the float64 comparison stays below that.)"""
    base = base_case("trpo", PENDULUM)
    out = run_case("trpo", PENDULUM, {"cg_iters": 6})
    check_outcome(out)
    assert not torch.allclose(flat(out.policy), flat(base.policy))


# ---------------------------------------------------------------------------------------
# float32, as training runs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,env_id", [("ppo", PENDULUM), ("trpo", CARTPOLE),
                                            ("trpo+", PENDULUM)])
def test_float32_update_matches_float64_reference(preset, env_id):
    """pgscope in float32, as it trains. (Not ``trpo`` on Pendulum: with its unnormalized
    observations (up to 8) CG amplifies float32 rounding ~200x: the gradient and a single
    Fisher-vector product agree with float64 to 2e-7, the 4-iteration CG direction only to
    3e-5, and the parameters to ~1e-5.)"""
    out = run_case(preset, env_id, dtype=torch.float32)
    check_outcome(out, **F32)


# ---------------------------------------------------------------------------------------
# construction: activation and initialization
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("env_id", [PENDULUM, CARTPOLE])
def test_forward_matches_reference_mlp(act, env_id):
    cfg = make_config("ppo", env_id, {"activation": act, "hidden": (16, 8)})
    env = gym.make(env_id)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    obs = torch.randn(50, env.observation_space.shape[0], generator=torch.Generator()
                      .manual_seed(0)) * 3
    other = "relu" if act == "tanh" else "tanh"
    for module in (agent.policy.net, agent.value_net.net):
        params = to_params(agent.policy if module is agent.policy.net else agent.value_net)
        with torch.no_grad():
            got = module(obs)
        np.testing.assert_allclose(got.numpy(), ref.mlp_forward(params, obs, act).numpy(),
                                   rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, ref.mlp_forward(params, obs, other), atol=1e-3)


@pytest.mark.parametrize("ortho", [True, False])
def test_initialization_matches_definition(ortho):
    cfg = make_config("ppo", PENDULUM, {"ortho_init": ortho, "hidden": (16, 8),
                                        "init_log_std": -0.5})
    env = gym.make(PENDULUM)
    torch.manual_seed(0)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    np.testing.assert_array_equal(agent.policy.log_std.detach().numpy(), -0.5)
    for module, out_gain in ((agent.policy, 0.01), (agent.value_net, 1.0)):
        params = to_params(module)
        n = ref.num_layers(params)
        for i in range(n):
            w, b = params[f"W{i}"].double(), params[f"b{i}"]
            assert torch.count_nonzero(b) == 0
            fan_out, fan_in = w.shape
            if ortho:
                gain = out_gain if i == n - 1 else math.sqrt(2)
                # rows orthogonal when the layer narrows, columns when it widens
                gram = w @ w.T if fan_out <= fan_in else w.T @ w
                np.testing.assert_allclose(gram.numpy(), gain ** 2 * np.eye(len(gram)),
                                           atol=1e-6 * max(1.0, gain ** 2))
            else:
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform, gain 1
                assert w.abs().max() <= bound
                assert w.abs().max() > 0.5 * bound
                if min(fan_in, fan_out) > 1:  # and not orthogonal: singular values spread
                    sv = torch.linalg.svdvals(w)
                    assert sv.max() / sv.min() > 1.05


# ---------------------------------------------------------------------------------------
# learning-rate annealing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["ppo", "trpo"])
@pytest.mark.parametrize("anneal", [True, False])
def test_set_learning_rates_follows_reference_formula(preset, anneal):
    cfg = make_config(preset, PENDULUM, {**SETUP, "lr_anneal": anneal})
    env = gym.make(PENDULUM)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    for k in range(cfg.num_iterations):
        set_learning_rates(optimizer, cfg, k)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        want_v = ref.annealed_lr(cfg.value_lr, k, cfg.num_iterations, anneal)
        assert lrs["value"] == pytest.approx(want_v, rel=1e-12)
        if preset == "ppo":
            want_p = ref.annealed_lr(cfg.policy_lr, k, cfg.num_iterations, anneal)
            assert lrs["policy"] == pytest.approx(want_p, rel=1e-12)
        else:
            assert "policy" not in lrs
