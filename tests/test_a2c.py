"""A2C (pgscope/algos/a2c.py), added through the algorithm registry alone: its update
against its own independent reference (tests/reference_impl.py: one full-batch
policy-gradient step written from the equations), its preset and checks, the keys its
runs log, its probes, and a study that runs it next to PPO."""

from __future__ import annotations

import json

import pytest
import test_reference_updates as refup
import torch

from pgscope import make_config, train
from pgscope.algos import algorithm
from pgscope.cli import main
from pgscope.config import PRESETS
from pgscope.errors import ConfigError
from pgscope.metrics import REGISTRY, metrics_for
from pgscope.study import parse_spec, run_study
from pgscope.study.analysis import summarize

ONE_STEP = dict(epochs=1, minibatches=1)
REUSE_KEYS = {"ratio_max", "ratio_min", "clip_fraction", "epochs_run", "kl_beta"}


def _case(env_id: str, overrides: dict | None = None, **kwargs) -> refup.Outcome:
    return refup.run_case("a2c", env_id, {**ONE_STEP, **(overrides or {})}, **kwargs)


def _check(out: refup.Outcome, **tol: float) -> None:
    refup.check_outcome(out, **tol)
    assert not REUSE_KEYS & set(out.metrics)


# --- the update against the reference ------------------------------------------------------
@pytest.mark.parametrize("env_id", [refup.PENDULUM, refup.CARTPOLE, refup.DRIFT])
def test_a2c_update_matches_reference(env_id):
    out = _case(env_id)
    _check(out)
    assert out.metrics["ratio_first_minibatch_dev"] < 1e-12
    assert ("entropy_frac" in out.metrics) == (env_id == refup.CARTPOLE)


#: Settings that cannot matter for one step from theta_old: the keys A2C does not read
#: (PPO's sample reuse and KL machinery), and value clipping, which clips V - V_old, 0 at
#: the only step. Flipping them must change nothing.
NO_EFFECT = {"kl_stop": True, "clip_eps": 0.05, "ppo_loss": "kl", "target_kl": 1e-6,
             "value_clip": True}


@pytest.mark.parametrize("switch", [s for s in refup.FLIPPABLE if s not in NO_EFFECT])
def test_a2c_flipped_switch_matches_reference(switch):
    env_id = refup.DRIFT if switch == "action_clip" else refup.PENDULUM
    base = _case(env_id)
    out = _case(env_id, {switch: refup.flipped(base.cfg, switch)})
    _check(out)
    assert not (torch.equal(refup.flat(out.policy), refup.flat(base.policy))
                and torch.equal(refup.flat(out.value_net), refup.flat(base.value_net)))


def test_a2c_settings_without_effect():
    base = _case(refup.PENDULUM)
    out = _case(refup.PENDULUM, NO_EFFECT)
    _check(out)
    assert torch.equal(refup.flat(out.policy), refup.flat(base.policy))
    assert torch.equal(refup.flat(out.value_net), refup.flat(base.value_net))
    assert out.metrics == base.metrics


def test_a2c_in_float32_matches_the_float64_reference():
    _check(_case(refup.PENDULUM, dtype=torch.float32), **refup.F32)


def test_the_reference_step_is_the_policy_gradient():
    """The reference takes the gradient of -mean(log pi A); pgscope that of -mean(r A): at
    theta_old they are the same vector (so the comparison above is between two
    formulations, not one formula twice)."""
    cfg = make_config("a2c", refup.PENDULUM, {**refup.SETUP, **ONE_STEP})
    agent, batch, *_ = refup.collect(cfg, cfg.seed)
    policy = agent.policy.double()
    batch = refup.as_double(batch, policy)
    adv = batch.advantages
    grads = []
    for form in ("log", "ratio"):
        logp = policy.log_prob(policy.dist(batch.obs), batch.actions)
        objective = logp if form == "log" else (logp - batch.logp).exp()
        grads.append(torch.autograd.grad(-(objective * adv).mean(), list(policy.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --- preset, checks, logged keys, probes ---------------------------------------------------
def test_a2c_preset_is_ppo_with_one_full_batch_step():
    assert PRESETS["a2c"]["algo"] == "a2c"
    a2c, ppo = make_config("a2c", "Hopper-v5"), make_config("ppo", "Hopper-v5")
    assert (a2c.epochs, a2c.minibatches, a2c.value_clip) == (1, 1, False)
    differs = {k for k in vars(a2c) if getattr(a2c, k) != getattr(ppo, k)}
    assert differs == {"preset", "algo", "epochs", "minibatches", "value_clip"}
    for key in ("epochs", "minibatches"):
        with pytest.raises(ConfigError, match=f"'{key}' must be 1 for a2c"):
            make_config("a2c", "Hopper-v5", {key: 4})
    assert algorithm("a2c").policy_optimizer


@pytest.mark.parametrize("env", ["Pendulum-v1", "CartPole-v1"])
def test_a2c_runs_log_exactly_the_registered_keys(tmp_path, env):
    cfg = make_config("a2c", env, dict(steps_per_iter=64, hidden=(8,), total_steps=128))
    run = train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        expected = {m.name for m in metrics_for("a2c", discrete=env == "CartPole-v1",
                                                ppo_loss=cfg.ppo_loss,
                                                heldout=r["iteration"] >= 2,
                                                evaluation=False)}
        assert set(r) == expected
    assert "a2c" in REGISTRY["lr"].algorithms and "a2c" not in REGISTRY["epochs_run"].algorithms


def test_a2c_probes(tmp_path, capsys):
    run = train(make_config("a2c", "CartPole-v1", dict(steps_per_iter=64, hidden=(8,),
                                                       total_steps=128)),
                tmp_path / "run", progress=False)
    assert main(["probe", "trust-region", str(run), "--out", str(tmp_path / "tr"),
                 "--quiet"]) == 0
    replay = json.loads((tmp_path / "tr" / "trust-region.json").read_text())["replay"]
    assert [e["epoch"] for e in replay["per_epoch"]] == [1]  # one full-batch step
    assert replay["clip_range"] == 0.2
    assert main(["probe", "landscape", str(run), "--out", str(tmp_path / "ls"),
                 "--landscape-counts", "200", "--landscape-grid", "0", "1", "--quiet"]) == 0
    land = json.loads((tmp_path / "ls" / "landscape.json").read_text())
    assert abs(land["surrogate"][0][0]) < 1e-5  # mean(r A) at theta_old, A normalized


# --- studies ---------------------------------------------------------------------------------
def test_a_study_runs_a2c_next_to_ppo(tmp_path):
    spec = parse_spec({
        "name": "a2c-vs-ppo", "envs": ["CartPole-v1"], "seeds": 2, "total_steps": 128,
        "set": {"steps_per_iter": 64, "hidden": [8]},
        "configs": [{"label": "a2c", "preset": "a2c"},
                    {"label": "ppo", "preset": "ppo", "epochs": 2, "minibatches": 2}],
        "score": {"last_fraction": 1.0},
    })
    assert {r.config.algo for r in spec.runs()} == {"a2c", "ppo"}
    outcome = run_study(spec, tmp_path / "study", workers=1, progress=False)
    assert len(outcome.complete) == 4 and not outcome.failed
    scores = summarize(tmp_path / "study")["tables"]["scores"]
    assert set(scores["label"]) == {"a2c", "ppo"}
    assert (scores["outcome"] == "complete").all()
