"""The metric registry (pgscope.metrics) against what training really logs, docs/metrics.md
against the registry, and the meaning of the metrics whose definitions differ between
libraries or used to differ between pgscope's algorithms."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import pgscope.algos.ppo as ppo_mod
from pgscope import make_config, train
from pgscope.agent import build_agent
from pgscope.algos import update_one
from pgscope.algos.common import make_optimizer
from pgscope.metrics import (
    ALGORITHMS,
    GROUPS,
    METRICS,
    REGISTRY,
    REQUIREMENTS,
    TIMING_KEYS,
    main,
    metric_value,
    metrics_for,
    render_markdown,
)
from pgscope.rollout import Batch
from pgscope.train import TIMING_KEYS as TRAIN_TIMING_KEYS

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
TINY = dict(steps_per_iter=64, minibatches=2, epochs=2, hidden=(8,), total_steps=3 * 64)
DISCRETE = {"Pendulum-v1": False, "CartPole-v1": True}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# (a) real runs log exactly the registry's keys --------------------------------------------
@pytest.mark.parametrize("env", ["Pendulum-v1", "CartPole-v1"])
@pytest.mark.parametrize("preset,overrides", [
    ("ppo", {}),
    ("ppo-kl", {}),
    # target_kl tiny: the first epoch's KL exceeds 1.5 x target, the epochs stop early
    ("ppo", {"kl_stop": True, "epochs": 3, "target_kl": 1e-9}),
    ("ppo", {"heldout_kl": False}),
    ("trpo", {}),
], ids=["ppo", "ppo-kl", "ppo-kl_stop", "ppo-no-heldout", "trpo"])
def test_runs_log_exactly_the_registered_keys(tmp_path, preset, overrides, env):
    cfg = make_config(preset, env, {**TINY, **overrides})
    records = _records(train(cfg, tmp_path / "run", progress=False))
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        unknown = set(r) - set(REGISTRY)
        assert not unknown, f"keys not in the registry: {unknown}"
        foreign = {k for k in r if cfg.algo not in REGISTRY[k].algorithms}
        assert not foreign, f"registry says {cfg.algo} does not log {foreign}"
        heldout = cfg.heldout_kl and r["iteration"] >= 2
        expected = {m.name for m in metrics_for(cfg.algo, discrete=DISCRETE[env],
                                                ppo_loss=cfg.ppo_loss, heldout=heldout,
                                                evaluation=False)}
        assert set(r) == expected, (expected - set(r), set(r) - expected)
        assert r["ratio_first_minibatch_dev"] == 0.0  # every algorithm, every iteration
        if cfg.algo == "ppo":
            stopped_early = cfg.kl_stop  # with target_kl 1e-9 it fires after epoch 1
            assert r["epochs_run"] == (1 if stopped_early else cfg.epochs)


def test_metrics_for_conditions():
    names = lambda *a, **k: {m.name for m in metrics_for(*a, **k)}  # noqa: E731
    trpo = names("trpo", discrete=True, heldout=False)
    assert {"clip_fraction", "ratio_max", "ratio_min", "lr", "epochs_run", "kl_beta",
            "policy_std", "kl_heldout_mean"}.isdisjoint(trpo)
    assert {"clip_fraction_after", "ratio_max_after", "approx_kl", "entropy_frac",
            "value_lr", "step_fraction"} <= trpo
    ppo = names("ppo", discrete=False, ppo_loss="clip", heldout=True)
    assert {"clip_fraction", "lr", "policy_std", "kl_heldout_max"} <= ppo
    assert {"kl_beta", "entropy_frac", "step_norm"}.isdisjoint(ppo)
    assert "kl_beta" in names("ppo", ppo_loss="kl")
    # a setting left open keeps the metrics that depend on it: everything PPO may log
    assert names("ppo") == {m.name for m in METRICS if "ppo" in m.algorithms}
    with pytest.raises(ValueError, match="unknown algorithm"):
        metrics_for("a3c")


def test_registry_is_well_formed():
    assert len(REGISTRY) == len(METRICS)  # one definition per key
    for m in METRICS:
        assert m.meaning and m.unit and m.group in GROUPS, m.name
        assert m.algorithms and set(m.algorithms) <= set(ALGORITHMS), m.name
        assert set(m.requires) <= set(REQUIREMENTS), m.name
        assert bool(m.requires) == bool(m.condition), m.name  # words and tags agree
        assert not m.legacy or m.legacy != m.name
    assert TIMING_KEYS == ("sps", "cpu_s", "rollout_s", "update_s", "time_elapsed")
    assert TRAIN_TIMING_KEYS is TIMING_KEYS  # train uses the registry's


def test_metric_value_falls_back_to_the_legacy_key():
    old_trpo_line = {"ratio_max": 1.3, "clip_fraction": 0.1, "grad_norm": 2.0, "kl_k3": 0.01}
    assert metric_value(old_trpo_line, "ratio_max_after") == 1.3
    assert metric_value(old_trpo_line, "clip_fraction_after") == 0.1
    assert metric_value(old_trpo_line, "policy_grad_norm") == 2.0
    assert metric_value(old_trpo_line, "approx_kl") == 0.01
    assert metric_value(old_trpo_line, "kl_mean") is None
    new = {"ratio_max": 3.0, "ratio_max_after": 1.5}
    assert metric_value(new, "ratio_max_after") == 1.5  # never the phase-wide PPO key


# (b) the doc is the rendered registry -----------------------------------------------------
def test_docs_metrics_md_is_the_rendered_registry(capsys):
    assert DOC.read_text() == render_markdown(), (
        "docs/metrics.md is stale: run .venv/bin/python -m pgscope.metrics > docs/metrics.md")
    main()
    assert capsys.readouterr().out == render_markdown()
    for m in METRICS:
        assert f"| `{m.name}` |" in DOC.read_text()


# (c) what the numbers mean ----------------------------------------------------------------
OBS_DIM = 3


def _setup(preset: str, discrete: bool = False, seed: int = 0, n: int = 256, **overrides):
    """An agent, its optimizer and an on-policy synthetic batch of ``n`` samples."""
    torch.manual_seed(seed)
    cfg = make_config(preset, "Hopper-v5", {"steps_per_iter": n, "minibatches": 4,
                                            "epochs": 3, "hidden": (16,), "seed": seed,
                                            **overrides})
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
    act_space = (gym.spaces.Discrete(3) if discrete
                 else gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32))
    agent = build_agent(cfg, obs_space, act_space)
    policy, value_net = agent.policy, agent.value_net
    if not discrete:
        with torch.no_grad():
            policy.log_std.copy_(torch.tensor([-0.4, 0.3]))
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS_DIM, generator=gen)
    with torch.no_grad():
        dist = policy.dist(obs)
        actions = dist.sample()
        logp = policy.log_prob(dist, actions)
        values = value_net(obs)
    advantages = torch.randn(n, generator=gen)
    batch = Batch(obs=obs, actions=actions, logp=logp, values=values, advantages=advantages,
                  returns=values + advantages, rewards=torch.zeros(n),
                  terminated=torch.zeros(n, dtype=torch.bool),
                  done=torch.zeros(n, dtype=torch.bool), next_obs=obs)
    optimizer = make_optimizer(cfg, policy, value_net)
    return cfg, policy, value_net, optimizer, batch, torch.Generator().manual_seed(seed + 1)


@torch.no_grad()
def _ratio(policy, batch: Batch) -> torch.Tensor:
    return (policy.log_prob(policy.dist(batch.obs), batch.actions) - batch.logp).exp()


@pytest.mark.parametrize("discrete", [False, True])
def test_trpo_logs_after_update_ratios_only(discrete):
    # A large KL limit so that a good share of ratios leave 1 +- 0.2 after the step.
    cfg, policy, value_net, opt, batch, gen = _setup("trpo", discrete, max_kl=0.5)
    old = copy.deepcopy(policy)
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})
    assert m["step_fraction"] > 0
    assert {"clip_fraction", "ratio_max", "ratio_min"}.isdisjoint(m)
    assert not torch.equal(torch.cat([p.flatten() for p in policy.parameters()]),
                           torch.cat([p.flatten() for p in old.parameters()]))
    r = _ratio(policy, batch)  # pi_new / pi_old on the whole batch, after the update
    fraction = float(((r - 1).abs() > 0.2).double().mean())
    assert 0.0 < fraction < 1.0
    assert m["clip_fraction_after"] == pytest.approx(fraction, abs=1e-12)
    assert m["ratio_max_after"] == pytest.approx(float(r.max()), rel=1e-6)
    assert m["ratio_min_after"] == pytest.approx(float(r.min()), rel=1e-6)
    assert m["ratio_first_minibatch_dev"] == 0.0


@pytest.mark.parametrize("preset", ["ppo", "ppo-kl", "trpo"])
@pytest.mark.parametrize("discrete", [False, True])
def test_after_update_kl_statistics_and_data_policy(preset, discrete):
    overrides = {"policy_lr": 3e-3} if preset.startswith("ppo") else {"max_kl": 0.05}
    cfg, policy, value_net, opt, batch, gen = _setup(preset, discrete, **overrides)
    old = copy.deepcopy(policy)
    m = update_one(
        cfg, policy, value_net, opt, batch, gen, {})
    r = _ratio(policy, batch)
    k3 = float(((r - 1) - r.log()).mean())
    assert k3 > 0
    assert m["approx_kl"] == pytest.approx(k3, rel=1e-5)
    assert m["ratio_first_minibatch_dev"] == 0.0
    if cfg.algo == "ppo":
        # clip_fraction_after is over the whole batch after the update, which differs from
        # PPO's phase-wide clip_fraction over the minibatches before their steps
        assert m["clip_fraction_after"] == pytest.approx(
            float(((r - 1).abs() > 0.2).double().mean()), abs=1e-12)
    with torch.no_grad():
        entropy = float(old.entropy(old.dist(batch.obs)).mean())
    assert m["entropy"] == pytest.approx(entropy, rel=1e-6)
    if discrete:
        assert m["entropy_frac"] == pytest.approx(entropy / math.log(3), rel=1e-6)
        assert "policy_std" not in m
    else:
        before = float(old.log_std.detach().exp().mean())
        after = float(policy.log_std.detach().exp().mean())
        assert m["policy_std"] == pytest.approx(before, rel=1e-6)
        if cfg.algo == "ppo":  # PPO moves log_std: the test tells pre from post
            assert after != pytest.approx(before, rel=1e-5)
        assert "entropy_frac" not in m


@pytest.mark.parametrize("grad_clip", [False, True])
def test_ppo_policy_grad_norm_is_the_mean_pre_clip_norm(monkeypatch, grad_clip):
    # max_grad_norm tiny: with grad_clip every minibatch's gradient is clipped
    cfg, policy, value_net, opt, batch, gen = _setup(
        "ppo", ent_coef=0.01, grad_clip=grad_clip, max_grad_norm=1e-3)
    params = list(policy.parameters())
    norms: list[float] = []
    real = ppo_mod.clip_gradients_per_seed

    def watch(flat, max_norm):  # the stacked parameters of the batch of one
        ps = list(flat.params.values())
        if [p.shape[1:] for p in ps] == [p.shape for p in params]:  # the policy's
            norms.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ps))))
        return real(flat, max_norm)

    monkeypatch.setattr(ppo_mod, "clip_gradients_per_seed", watch)
    m = update_one(cfg, policy, value_net, opt, batch, gen, {})
    assert len(norms) == cfg.epochs * cfg.minibatches  # one policy gradient per minibatch
    assert m["policy_grad_norm"] == pytest.approx(float(np.mean(norms)), rel=1e-5)
    assert m["policy_grad_norm"] > 10 * cfg.max_grad_norm  # before clipping, in both cases


@pytest.mark.parametrize("preset,anneal", [("ppo", True), ("ppo", False), ("trpo", True)])
def test_learning_rates_follow_annealing(tmp_path, preset, anneal):
    cfg = make_config(preset, "CartPole-v1", {**TINY, "total_steps": 4 * 64,
                                               "lr_anneal": anneal, "policy_lr": 1e-3,
                                               "value_lr": 2e-3})
    records = _records(train(cfg, tmp_path / "run", progress=False))
    for r in records:
        k = r["iteration"]
        factor = 1 - (k - 1) / 4 if anneal else 1.0
        assert r["value_lr"] == pytest.approx(2e-3 * factor, rel=1e-12)
        if preset == "ppo":
            assert r["lr"] == pytest.approx(1e-3 * factor, rel=1e-12)
        else:
            assert "lr" not in r  # TRPO takes natural-gradient steps, no policy lr


# readers ----------------------------------------------------------------------------------
LEGACY = {"ratio_max_after": "ratio_max", "ratio_min_after": "ratio_min",
          "clip_fraction_after": "clip_fraction"}


def test_trust_region_series_use_after_keys_and_read_older_files(tmp_path):
    from pgscope.probes.plots import plot_trust_region
    from pgscope.probes.trust_region import KEYS, from_metrics

    run = train(make_config("trpo", "CartPole-v1", TINY), tmp_path / "run", progress=False)
    records = _records(run)
    result = from_metrics(run)
    assert not result["legacy_keys"]
    for key in ("ratio_max_after", "ratio_min_after", "clip_fraction_after", "kl_mean"):
        assert key in KEYS
        assert result["series"][key] == [r[key] for r in records]
    assert result["summary"]["ratio_max_after_max"] == max(r["ratio_max_after"]
                                                           for r in records)
    plot_trust_region([result], None, tmp_path / "tr.png")

    # a metrics file written before the *_after keys existed: read through the old keys
    old_lines = [{LEGACY.get(k, k): v + 0.5 if k in LEGACY else v for k, v in r.items()}
                 for r in records]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_lines))
    old = from_metrics(run)
    assert old["legacy_keys"]
    for key, legacy in LEGACY.items():
        assert old["series"][key] == [r[legacy] for r in old_lines]
    plot_trust_region([result, old], None, tmp_path / "tr2.png")
