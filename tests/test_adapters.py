"""Adapters for agents trained elsewhere (pgscope.adapters): SB3 PPO/A2C model zips and
CleanRL-layout agents load into pgscope agents that act, value and score actions exactly
as the original networks do, carry the model's own gamma/lambda/clip/segment length and
normalization, and every probe runs on them. The gradient the probes estimate equals the
gradient of SB3's own PPO loss on the same batch."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sb3 = pytest.importorskip("stable_baselines3")

from pgscope import probes  # noqa: E402
from pgscope.adapters import (  # noqa: E402
    ProbeAgent,
    from_cleanrl,
    load_cleanrl,
    load_sb3,
)
from pgscope.adapters.common import AdapterError  # noqa: E402
from pgscope.probes.gradients import GradientAccumulator  # noqa: E402
from pgscope.rollout import Batch  # noqa: E402

#: Small probe settings: every probe runs, none for long.
SMALL = dict(sizes=(20, 40), k=2, true_pairs=400, value_pairs=100, fit_pairs=200,
             landscape_counts=(20,), landscape_grid=(0, 1), progress=False,
             log=lambda line: None)
#: Non-default hyperparameters, so that a loader that ignores the model's own fails.
HYPER = dict(gamma=0.9, gae_lambda=0.8, clip_range=0.15)


def _train_ppo(env_id: str, path: Path, **kwargs) -> Path:
    model = sb3.PPO("MlpPolicy", env_id, n_steps=256, batch_size=64, n_epochs=2, seed=0,
                    device="cpu", policy_kwargs=dict(net_arch=[32, 32]), **HYPER, **kwargs)
    model.learn(2048)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def sb3_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sb3")
    return {env: _train_ppo(env, d / f"ppo_{env}.zip")
            for env in ("Pendulum-v1", "CartPole-v1")}


def _random_obs(model, n: int = 32) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, (n, *model.observation_space.shape)).astype(np.float32)


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_sb3_agent_acts_values_and_scores_like_the_model(sb3_models, env_id: str) -> None:
    model = sb3.PPO.load(sb3_models[env_id], device="cpu")
    agent = load_sb3(sb3_models[env_id], env_id)
    assert isinstance(agent, ProbeAgent)
    obs = _random_obs(model)
    with torch.no_grad():
        x = torch.as_tensor(obs)
        v_sb3 = model.policy.predict_values(x).numpy().ravel()
        dist = model.policy.get_distribution(x)
        actions = dist.sample()
        logp_sb3 = dist.log_prob(actions).numpy()
        logp_ours = agent.policy.log_prob(agent.policy.dist(x), actions.reshape(
            len(obs), -1).squeeze(-1) if agent.policy.discrete else actions).numpy()
    np.testing.assert_allclose(agent.value(obs), v_sb3, atol=1e-6)
    np.testing.assert_allclose(logp_ours, logp_sb3, atol=1e-5)
    det, _ = model.predict(obs, deterministic=True)
    ours = agent.act(obs)
    if not agent.policy.discrete:  # SB3 clips the mean to the bounds
        ours = np.clip(ours, model.action_space.low, model.action_space.high)
    np.testing.assert_allclose(ours.reshape(det.shape), det, atol=1e-6)


def test_sb3_hyperparameters_come_from_the_model(sb3_models) -> None:
    agent = load_sb3(sb3_models["Pendulum-v1"], "Pendulum-v1")
    cfg = agent.config
    assert (cfg.gamma, cfg.gae_lambda, cfg.clip_eps) == (0.9, 0.8, 0.15)
    assert (cfg.steps_per_env, cfg.num_envs, cfg.epochs, cfg.minibatches) == (256, 1, 2, 4)
    assert cfg.adv_norm and cfg.hidden == (32, 32) and cfg.activation == "tanh"
    assert not cfg.obs_norm and not cfg.reward_scale


def test_sb3_a2c_and_relu(tmp_path: Path) -> None:
    model = sb3.A2C("MlpPolicy", "CartPole-v1", n_steps=8, gamma=0.95, seed=0, device="cpu",
                    policy_kwargs=dict(net_arch=dict(pi=[16], vf=[8, 8]),
                                       activation_fn=nn.ReLU))
    model.learn(64)
    model.save(tmp_path / "a2c.zip")
    agent = load_sb3(tmp_path / "a2c.zip", "CartPole-v1")
    cfg = agent.config
    assert (cfg.gamma, cfg.gae_lambda, cfg.steps_per_env, cfg.activation) == \
        (0.95, 1.0, 8, "relu")
    assert not cfg.adv_norm and cfg.epochs == 1 and cfg.minibatches == 1
    assert cfg.algo == "a2c"
    obs = _random_obs(model)
    with torch.no_grad():
        v_sb3 = model.policy.predict_values(torch.as_tensor(obs)).numpy().ravel()
    np.testing.assert_allclose(agent.value(obs), v_sb3, atol=1e-6)
    np.testing.assert_array_equal(agent.act(obs), model.predict(obs, deterministic=True)[0])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_gradient_estimate_equals_sb3_ppo_loss_gradient(sb3_models, tmp_path: Path,
                                                         env_id: str) -> None:
    """SB3's own PPO update (its code: rollout buffer, advantage normalization, loss,
    backward) on its first minibatch of its first epoch, where the ratio is 1 and nothing
    clips: the gradient it hands the optimizer is minus the probes' policy-gradient
    estimate on the same batch, and vf_coef x the probes' value-loss gradient."""
    from stable_baselines3.common.env_util import make_vec_env

    model = sb3.PPO.load(sb3_models[env_id], env=make_vec_env(env_id, n_envs=1, seed=0),
                         device="cpu")
    n = model.n_steps * model.n_envs
    model.batch_size = n  # one minibatch: SB3 normalizes advantages over the whole batch
    model.max_grad_norm = 1e12  # no gradient clipping before the captured step
    model.ent_coef = 0.0
    captured: dict[str, torch.Tensor] = {}

    def capture(*args, **kwargs):
        captured.update({k: p.grad.detach().clone().double()
                         for k, p in model.policy.named_parameters() if p.grad is not None})
        raise _Stop

    model.policy.optimizer.step = capture
    with pytest.raises(_Stop):
        model.learn(n, reset_num_timesteps=False)
    model.save(tmp_path / "at_update.zip")  # the parameters the gradient was taken at
    agent = load_sb3(tmp_path / "at_update.zip", env_id)

    buf = model.rollout_buffer
    obs = torch.as_tensor(buf.observations.reshape(n, -1))
    actions = torch.as_tensor(buf.actions.reshape(n, -1))
    actions = actions.squeeze(-1).long() if agent.policy.discrete else actions
    zeros = torch.zeros(n)
    batch = Batch(obs=obs, actions=actions, logp=zeros, values=zeros,
                  advantages=torch.as_tensor(buf.advantages.reshape(n)),
                  returns=torch.as_tensor(buf.returns.reshape(n)), rewards=zeros,
                  terminated=zeros.bool(), done=zeros.bool(), next_obs=obs)
    acc = GradientAccumulator(agent)
    acc.add(batch)

    hidden = len(agent.config.hidden)

    def sb3_name(name: str, head: str, trunk: str) -> str:
        if name == "log_std":
            return name
        _, index, kind = name.split(".")
        return f"{head}.{kind}" if int(index) == 2 * hidden else f"{trunk}.{index}.{kind}"

    sb3_policy = torch.cat([captured[sb3_name(k, "action_net", "mlp_extractor.policy_net")]
                            .reshape(-1) for k, _ in agent.policy.named_parameters()])
    ours = torch.from_numpy(acc.policy_gradient())
    assert ours.norm() > 1e-3
    torch.testing.assert_close(-sb3_policy, ours, atol=1e-5, rtol=1e-4)
    # the same as the mean of per-sample gradients (torch.func, as the probe takes them)
    params = {k: v.detach() for k, v in agent.policy.named_parameters()}

    def logp_one(p, o, a):
        return functional_call(agent.policy, p, (o[None], a[None])).sum()

    per_sample = vmap(grad(logp_one), in_dims=(None, 0, 0))(params, batch.obs, batch.actions)
    adv = batch.advantages.double()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    mean = torch.cat([(g.double() * adv.reshape(-1, *[1] * (g.ndim - 1))).mean(0).reshape(-1)
                      for g in per_sample.values()])
    torch.testing.assert_close(-sb3_policy, mean, atol=1e-5, rtol=1e-4)
    value_hidden = len([m for m in agent.value_net.net if isinstance(m, nn.Linear)]) - 1
    hidden = value_hidden
    sb3_value = torch.cat([captured[sb3_name(k, "value_net", "mlp_extractor.value_net")]
                           .reshape(-1) for k, _ in agent.value_net.named_parameters()])
    torch.testing.assert_close(sb3_value, model.vf_coef * torch.from_numpy(
        acc.value_gradient()), atol=1e-5, rtol=1e-4)


def test_every_probe_runs_on_an_sb3_model(sb3_models, tmp_path: Path) -> None:
    agent = load_sb3(sb3_models["Pendulum-v1"], "Pendulum-v1")
    results = probes.run("all", agent=agent, out=tmp_path / "out", **SMALL)
    assert set(results) == set(probes.probe_names())
    for kind in results:
        assert (tmp_path / "out" / f"{kind}.json").exists()
        assert (tmp_path / "out" / f"{kind}.png").exists()
    assert results["values"]["settings"]["gamma"] == 0.9
    assert results["gradients"]["settings"]["horizon"] == 256


def test_vecnormalize_needs_trust_and_is_applied(sb3_models, tmp_path: Path) -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=0), clip_obs=5.0)
    model = sb3.PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0,
                    device="cpu")
    model.learn(256)
    model.save(tmp_path / "m.zip")
    venv.save(str(tmp_path / "vn.pkl"))
    with pytest.raises(AdapterError, match="trust_pickle"):
        load_sb3(tmp_path / "m.zip", "Pendulum-v1", vecnormalize=tmp_path / "vn.pkl")
    with pytest.warns(UserWarning, match="VecNormalize"):
        load_sb3(tmp_path / "m.zip", "Pendulum-v1")
    agent = load_sb3(tmp_path / "m.zip", "Pendulum-v1", vecnormalize=tmp_path / "vn.pkl",
                     trust_pickle=True)
    assert agent.config.obs_norm and agent.config.obs_clip_bound == 5.0
    assert agent.config.reward_scale and agent.preprocessor.statistics_frozen
    raw = np.random.default_rng(0).uniform(-3, 3, (16, 3)).astype(np.float32) * 5
    with torch.no_grad():
        v = model.policy.predict_values(torch.as_tensor(venv.normalize_obs(raw))).numpy()
    np.testing.assert_allclose(agent.value(raw), v.ravel(), atol=1e-5)
    with open(tmp_path / "vn.pkl", "rb") as f:
        vn = pickle.load(f)
    frozen = agent.preprocessor.with_frozen_statistics(1)
    np.testing.assert_allclose(frozen.reward(np.array([2.0]), np.array([False])),
                               vn.normalize_reward(np.array([2.0])), rtol=1e-6)


def test_sb3_refuses_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(AdapterError, match="not a readable SB3 model zip"):
        load_sb3(tmp_path / "x.zip", "CartPole-v1")


# --- CleanRL ------------------------------------------------------------------------------
class ContinuousAgent(nn.Module):
    """CleanRL ppo_continuous_action's Agent layout (weights only; no training)."""

    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64),
                                    nn.Tanh(), nn.Linear(64, 1))
        self.actor_mean = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64),
                                        nn.Tanh(), nn.Linear(64, act_dim))
        self.actor_logstd = nn.Parameter(torch.linspace(-0.5, 0.2, act_dim)[None])


class DiscreteAgent(nn.Module):
    """CleanRL ppo's Agent layout."""

    def __init__(self, obs_dim: int, n: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64),
                                    nn.Tanh(), nn.Linear(64, 1))
        self.actor = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64),
                                   nn.Tanh(), nn.Linear(64, n))


def test_cleanrl_continuous_with_obs_stats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ContinuousAgent(3, 1)
    torch.save(net.state_dict(), tmp_path / "agent.pt")
    mean, var = np.array([0.5, -0.2, 1.0]), np.array([0.3, 2.0, 4.0])
    np.savez(tmp_path / "stats.npz", mean=mean, var=var, count=1000.0, return_var=9.0,
             return_count=500.0)
    agent = load_cleanrl(tmp_path / "agent.pt", "Pendulum-v1", "continuous",
                         obs_stats=tmp_path / "stats.npz", overrides={"gamma": 0.9})
    assert agent.config.gamma == 0.9 and agent.config.steps_per_env == 2048
    raw = np.random.default_rng(0).uniform(-30, 30, (16, 3))
    x = torch.as_tensor(np.clip((raw - mean) / np.sqrt(var + 1e-8), -10, 10), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(agent.value(raw), net.critic(x).squeeze(-1).numpy(),
                                   atol=1e-6)
        np.testing.assert_allclose(agent.act(raw), net.actor_mean(x).numpy(), atol=1e-6)
        a = torch.randn(16, 1)
        ref = torch.distributions.Normal(net.actor_mean(x), net.actor_logstd.exp())
        np.testing.assert_allclose(agent.policy.log_prob(agent.policy.dist(x), a).numpy(),
                                   ref.log_prob(a).sum(-1).numpy(), atol=1e-5)
    reward = agent.preprocessor.with_frozen_statistics(1).reward(np.array([6.0]),
                                                                 np.array([False]))
    np.testing.assert_allclose(reward, [6.0 / np.sqrt(9.0 + 1e-8)])


def test_every_probe_runs_on_a_cleanrl_discrete_agent(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DiscreteAgent(4, 2)
    agent = from_cleanrl(net, "CartPole-v1", "discrete",
                         overrides={"steps_per_iter": 128, "minibatches": 2})
    assert agent.config.num_envs == 4 and agent.config.steps_per_env == 32
    x = torch.randn(8, 4)
    with torch.no_grad():
        torch.testing.assert_close(agent.policy.dist(x).logits,
                                   torch.log_softmax(net.actor(x), -1))
    results = probes.run("all", agent=agent, **SMALL)
    assert set(results) == set(probes.probe_names())
    assert results["gradients"]["settings"]["env_id"] == "CartPole-v1"


def test_cleanrl_refuses_other_layouts() -> None:
    with pytest.raises(AdapterError, match="unexpected keys"):
        from_cleanrl(DiscreteAgent(4, 2), "CartPole-v1", "continuous")
    with pytest.raises(AdapterError, match="outputs"):
        from_cleanrl(DiscreteAgent(4, 3), "CartPole-v1", "discrete")


# --- command line ---------------------------------------------------------------------------
def test_cli_probes_a_cleanrl_checkpoint(tmp_path: Path) -> None:
    from pgscope.cli import main

    torch.manual_seed(0)
    torch.save(DiscreteAgent(4, 2).state_dict(), tmp_path / "agent.pt")
    out = tmp_path / "out"
    code = main(["probe", "gradients", "--cleanrl", str(tmp_path / "agent.pt"),
                 "--cleanrl-arch", "discrete", "--env", "CartPole-v1", "--set", "gamma=0.97",
                 "--out", str(out), "--sizes", "20", "40", "--k", "2", "--true-pairs", "400",
                 "--quiet"])
    assert code == 0
    import json

    result = json.loads((out / "gradients.json").read_text())
    assert result["settings"]["env_id"] == "CartPole-v1" and result["settings"]["horizon"] == 128


def test_cli_refuses_vecnormalize_without_trust(sb3_models, tmp_path: Path, capsys) -> None:
    from pgscope.cli import main

    (tmp_path / "vn.pkl").write_bytes(pickle.dumps({"not": "read"}))
    code = main(["probe", "gradients", "--sb3", str(sb3_models["CartPole-v1"]), "--env",
                 "CartPole-v1", "--vecnormalize", str(tmp_path / "vn.pkl"), "--out",
                 str(tmp_path / "out")])
    assert code != 0
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["probe", "gradients", "--sb3", str(sb3_models["CartPole-v1"]),
                 "--out", str(tmp_path / "out")]) != 0  # no --env
