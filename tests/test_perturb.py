"""Robustness evaluation (pgscope.perturb, pgscope.robustness, pgscope.study.robustness):
each perturbation kind acts as stated (observation and action noise in their units, mass
and friction changed during episodes and restored exactly, the delay's queue, the time
limit), the nominal level is the unperturbed evaluation bit for bit, the noise is seeded,
the AUC and the normalized curve follow their definitions, bad --perturb strings fail
before any compute, and a study's robustness tables and report panel."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from pgscope import load_agent, make_config, train
from pgscope.cli import main
from pgscope.envs.perturbations import (
    ACTION_NOISE_TAG,
    OBSERVATION_NOISE_TAG,
    ActionNoise,
    ObservationNoise,
    ObservationRecorder,
)
from pgscope.evaluate import PlayedEpisodes, evaluate, play_episodes
from pgscope.perturb import (
    KINDS,
    Perturbation,
    PerturbationError,
    PerturbContext,
    apply_perturbations,
    parse_perturbation,
    parse_perturbations,
    scaled_time_limit,
)
from pgscope.robustness import (
    auc,
    curve,
    evaluate_robustness,
    make_perturbed_env,
    observation_std,
    play_perturbed,
    robustness_of_agent,
)

TINY = dict(steps_per_iter=64, hidden=(8,), total_steps=128, minibatches=2, epochs=1)


@pytest.fixture(scope="module")
def hopper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perturb") / "hopper"
    return train(make_config("ppo", "Hopper-v5", TINY), out, progress=False)


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perturb") / "pendulum"
    return train(make_config("ppo", "Pendulum-v1", TINY), out, progress=False)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):  # no observation normalization
    out = tmp_path_factory.mktemp("perturb") / "cartpole"
    return train(make_config("ppo", "CartPole-v1", {**TINY, "obs_norm": False}), out,
                 progress=False)


class ActionRecorder(gym.Wrapper):
    """Keeps every action passed to ``step`` (a copy), per episode."""

    def __init__(self, env):
        super().__init__(env)
        self.episodes: list[list[np.ndarray]] = []

    def reset(self, **kwargs):
        self.episodes.append([])
        return super().reset(**kwargs)

    def step(self, action):
        self.episodes[-1].append(np.array(action, copy=True))
        return super().step(action)


class ModelSpy(gym.Wrapper):
    """Copies MuJoCo model fields at every step, before the step (what the physics uses)."""

    def __init__(self, env, fields):
        super().__init__(env)
        self.fields, self.seen = fields, []

    def step(self, action):
        model = self.unwrapped.model
        self.seen.append({f: np.array(getattr(model, f), copy=True) for f in self.fields})
        return super().step(action)


# --- observation noise ----------------------------------------------------------------------
def test_obs_noise_moves_what_the_policy_sees_by_level_stds_of_the_normalization(hopper_run):
    agent = load_agent(hopper_run)
    std, source = observation_std(agent)
    rms = agent.preprocessor.obs_norm.rms
    assert np.array_equal(std, np.sqrt(rms.var + agent.preprocessor.obs_norm.epsilon))
    assert "normalization" in source
    inner = ObservationRecorder(gym.make("Hopper-v5"))
    outer = ObservationRecorder(apply_perturbations(
        inner, [("obs-noise", 0.5)], PerturbContext(seed=0, obs_std=std)))
    play_episodes(agent, outer, 6, seed=0)  # outer: what the policy receives
    diff = (np.array(outer.observations) - np.array(inner.observations)) / std
    assert diff.shape[0] > 300
    assert diff.std() == pytest.approx(0.5, rel=0.04)
    assert abs(diff.mean()) < 0.02
    assert np.allclose(diff.std(axis=0), 0.5, rtol=0.2)  # every coordinate in its own std


def test_obs_noise_unit_without_obs_norm_is_the_unperturbed_episodes_std(cartpole_run):
    agent = load_agent(cartpole_run)
    assert agent.preprocessor.obs_norm is None
    res = robustness_of_agent(agent, ["obs-noise=0.5"], episodes=3, seed=2, reps=200)
    c = res["robustness"]["curves"][0]
    rec = ObservationRecorder(gym.make("CartPole-v1"))
    assert play_episodes(agent, rec, 3, seed=2).returns == res["returns"]
    assert c["obs_std"] == pytest.approx(np.array(rec.observations, dtype=np.float64).std(axis=0),
                                      rel=1e-12)
    assert "unperturbed episodes" in c["obs_std_source"]


# --- action noise ---------------------------------------------------------------------------
def test_action_noise_is_added_in_half_range_units(pendulum_run):
    agent = load_agent(pendulum_run)  # actions in [-2, 2]: the unit is 2
    inner = ActionRecorder(gym.make("Pendulum-v1"))
    outer = ActionRecorder(apply_perturbations(
        inner, [("action-noise", 0.3)], PerturbContext(seed=0, action_clip=False)))
    play_episodes(agent, outer, 3, seed=0)
    diff = np.concatenate([np.array(r) - np.array(c) for r, c in
                           zip(inner.episodes, outer.episodes, strict=True)])
    assert len(diff) == 600
    assert diff.std() == pytest.approx(0.3 * 2.0, rel=0.08)
    assert abs(diff.mean()) < 0.06


def test_action_noise_is_added_before_the_clipping(hopper_run):
    agent = load_agent(hopper_run)
    with torch.no_grad():
        agent.policy.net[2].bias.add_(5.0)  # mean actions far above the bound 1
    inner = ActionRecorder(gym.make("Hopper-v5"))
    outer = ActionRecorder(apply_perturbations(
        inner, [("action-noise", 0.5)], PerturbContext(seed=4, action_clip=True)))
    play_episodes(agent, outer, 1, seed=4)
    chosen, received = np.array(outer.episodes[0]), np.array(inner.episodes[0])
    assert (chosen > 3).all()  # the policy's own action reaches the wrapper unclipped
    rng = np.random.default_rng([4, ACTION_NOISE_TAG])
    noise = 0.5 * rng.standard_normal(chosen.shape)  # the wrapper's stream, step by step
    assert np.array_equal(received, np.clip(chosen + noise, -1, 1))
    assert (received == 1).mean() > 0.99  # clip(clip(a) + noise) would be below 1 half the time


def test_action_noise_wrapper_clips_only_when_the_run_clips():
    env = gym.make("Pendulum-v1")
    a = np.array([5.0])
    for clip, expected in ((True, 2.0), (False, None)):
        w = ActionNoise(env, np.array([0.1]), clip=clip, seed=1)
        w.reset(seed=1)
        out = w.action(a)
        noise = 0.1 * np.random.default_rng([1, ACTION_NOISE_TAG]).standard_normal(1)
        assert np.array_equal(out, [expected] if clip else a + noise)
        assert np.isinf(w.action_space.high).all()  # the caller's clip is a no-op


# --- dynamics -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fields", [("mass", ("body_mass", "body_inertia")),
                                         ("friction", ("geom_friction",))])
def test_dynamics_scale_the_model_during_episodes_and_restore_it_exactly(hopper_run, kind,
                                                                         fields):
    agent = load_agent(hopper_run)
    base = gym.make("Hopper-v5")
    model = base.unwrapped.model
    original = {f: np.array(getattr(model, f), copy=True) for f in fields}
    spy = ModelSpy(base, fields)
    env = apply_perturbations(spy, [(kind, 3.0)], PerturbContext())
    ends = []
    played = play_episodes(agent, env, 3, seed=0, watch=lambda i, step: ends.append(
        [np.array(getattr(model, f), copy=True) for f in fields]) or True)
    assert len(spy.seen) == sum(played.lengths)
    for seen in spy.seen:  # every step of every episode: x3 (never compounded)
        for f in fields:
            assert np.array_equal(seen[f], original[f] * 3.0)
    for f in fields:
        assert np.array_equal(getattr(model, f), original[f])  # restored after the episode
    env.close()
    for f in fields:
        assert np.array_equal(getattr(model, f), original[f])  # and at close, bit for bit
    nominal = play_episodes(agent, gym.make("Hopper-v5"), 3, seed=0)
    assert played.returns != nominal.returns  # the physics changed


def test_dynamics_kinds_refuse_non_mujoco_envs_before_any_episode(cartpole_run, monkeypatch):
    import pgscope.robustness as rob

    monkeypatch.setattr(rob, "play_episodes", lambda *a, **k: pytest.fail("played"))
    with pytest.raises(PerturbationError, match=r"cannot perturb env 'CartPole-v1': mass: "
                                                "needs a MuJoCo env.*action-noise: needs "
                                                "continuous"):
        evaluate_robustness(cartpole_run, ["mass=2", "action-noise=0.1", "delay=1"])


# --- delay ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_delay_sends_the_action_of_k_steps_before(hopper_run, k):
    agent = load_agent(hopper_run)
    inner = ActionRecorder(gym.make("Hopper-v5"))
    outer = ActionRecorder(apply_perturbations(inner, [("delay", k)], PerturbContext()))
    play_episodes(agent, outer, 2, seed=0)
    assert len(inner.episodes) == 2
    for received, chosen in zip(inner.episodes, outer.episodes, strict=True):
        received, chosen = np.array(received), np.array(chosen)
        assert len(chosen) > k
        assert np.array_equal(received[:k], np.zeros((k, 3)))  # the null action first
        assert np.array_equal(received[k:], chosen[:-k])


def test_delay_of_discrete_actions_starts_with_action_0(cartpole_run):
    agent = load_agent(cartpole_run)
    inner = ActionRecorder(gym.make("CartPole-v1"))
    outer = ActionRecorder(apply_perturbations(inner, [("delay", 2)], PerturbContext()))
    play_episodes(agent, outer, 1, seed=0)
    received, chosen = inner.episodes[0], outer.episodes[0]
    assert [int(a) for a in received[:2]] == [0, 0]
    assert [int(a) for a in received[2:]] == [int(a) for a in chosen[:-2]]


# --- time limit -----------------------------------------------------------------------------
def test_time_limit_factor_sets_the_episode_lengths(pendulum_run):
    res = evaluate_robustness(pendulum_run, ["time-limit=0.1,0.25,1.5"], episodes=2, reps=200)
    c = res["robustness"]["curves"][0]
    assert {p["level"]: p["lengths"] for p in c["points"]} == {
        0.1: [20, 20], 0.25: [50, 50], 1.0: [200, 200], 1.5: [300, 300]}
    assert scaled_time_limit(0.0025, 200) == 1 and scaled_time_limit(0.3333, 1000) == 333
    assert scaled_time_limit(0.0999, 200) == 20 and scaled_time_limit(0.001, 200) == 1


# --- the nominal level, seeding, frozen statistics ------------------------------------------
@pytest.mark.parametrize("deterministic", [True, False])
def test_nominal_level_is_the_unperturbed_evaluation_bit_for_bit(hopper_run, deterministic):
    plain = evaluate(hopper_run, episodes=3, seed=7, deterministic=deterministic)
    agent = load_agent(hopper_run)
    std, _ = observation_std(agent)
    ctx = PerturbContext(seed=7, obs_std=std)
    for k in KINDS.values():
        played = play_perturbed(agent, [(k.name, k.nominal)], 3, context=ctx, seed=7,
                                deterministic=deterministic)
        assert played.returns == plain["returns"], k.name
    res = evaluate_robustness(hopper_run, ["obs-noise=0.5", "mass=0.5", "delay=1"],
                              episodes=3, seed=7, deterministic=deterministic)
    for key in ("returns", "lengths", "mean_return", "ci_low", "ci_high"):
        assert res[key] == plain[key]
    for c in res["robustness"]["curves"]:
        (p,) = [p for p in c["points"] if p["level"] == c["nominal"]]
        assert p["returns"] == plain["returns"]
        assert (p["ci_low"], p["ci_high"]) == (plain["ci_low"], plain["ci_high"])
        assert p["normalized"] == p["normalized_low"] == p["normalized_high"] == 1.0
        assert all(q["returns"] != plain["returns"] for q in c["points"] if q is not p)


def test_noise_is_seeded_by_each_episode_reset_seed():
    def noise(seed, wrapper):
        inner = ObservationRecorder(gym.make("Pendulum-v1"))
        outer = ObservationRecorder(wrapper(inner))
        outer.reset(seed=seed)
        for _ in range(5):
            outer.step(np.zeros(1, dtype=np.float32))
        return np.array(outer.observations) - np.array(inner.observations)

    def make(env):
        return ObservationNoise(env, np.ones(3), seed=0)

    assert np.array_equal(noise(3, make), noise(3, make))
    assert not np.allclose(noise(3, make), noise(4, make))
    expected = np.random.default_rng([3, OBSERVATION_NOISE_TAG]).standard_normal((6, 3))
    assert np.allclose(noise(3, make), expected.astype(np.float32), atol=1e-6)


def test_robustness_is_reproducible_and_seeded(hopper_run):
    def run(seed):
        return evaluate_robustness(hopper_run, ["obs-noise=1", "action-noise=0.2"],
                                   episodes=2, seed=seed, reps=300)["robustness"]["curves"]

    a, b, c = run(0), run(0), run(1)
    assert a == b  # every number, the intervals included
    for ca, cc in zip(a, c, strict=True):
        pa, pc = ca["points"][-1], cc["points"][-1]
        assert pa["returns"] != pc["returns"]
        # episode 1 of seed 0 and episode 0 of seed 1 share their reset seed: same noise
        assert pa["returns"][1] == pc["returns"][0]


def test_robustness_leaves_the_agent_and_its_statistics_unchanged(hopper_run):
    agent = load_agent(hopper_run)
    before = {k: v.clone() for k, v in agent.preprocessor.state_dict()["obs_norm"].items()}
    params = [p.detach().clone() for p in agent.policy.parameters()]
    robustness_of_agent(agent, ["obs-noise=1", "mass=2"], episodes=2, reps=100)
    after = agent.preprocessor.state_dict()["obs_norm"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, q) for p, q in zip(params, agent.policy.parameters(),
                                                 strict=True))


# --- curves and AUC -------------------------------------------------------------------------
def test_auc_of_hand_made_curves():
    assert auc([0, 0.1, 0.2, 0.4], [1, 0.8, 0.6, 0.2]) == pytest.approx(0.6)
    assert auc([0, 1, 3], [1, 1, 1]) == pytest.approx(1.0)
    assert auc([0.5, 1, 2], [0.5, 1, 1]) == pytest.approx((0.5 * 0.75 + 1.0) / 1.5)
    with pytest.raises(ValueError, match="increasing"):
        auc([0, 0.2, 0.1], [1, 1, 1])


def test_curve_normalizes_by_the_nominal_point_and_pairs_the_bootstrap():
    played = {0.0: PlayedEpisodes([10.0, 20.0, 30.0], [5, 5, 5]),
              0.1: PlayedEpisodes([8.0, 16.0, 24.0], [5, 5, 5]),
              0.3: PlayedEpisodes([2.0, 4.0, 6.0], [4, 4, 4])}
    c = curve(Perturbation("obs-noise", (0.1, 0.3)), played, reps=500)
    norm = [p["normalized"] for p in c["points"]]
    assert norm == pytest.approx([1.0, 0.8, 0.2])
    assert c["auc"] == pytest.approx(auc([0, 0.1, 0.3], [1.0, 0.8, 0.2]))
    # every episode scaled by the same factor: paired resamples give zero-width intervals
    for p in c["points"]:
        assert p["normalized_low"] == pytest.approx(p["normalized"])
        assert p["normalized_high"] == pytest.approx(p["normalized"])
    assert c["auc_low"] == pytest.approx(c["auc"]) and c["auc_high"] == pytest.approx(c["auc"])
    assert c["points"][1]["ci_low"] < 16.0 < c["points"][1]["ci_high"]
    negative = {k: PlayedEpisodes([-r for r in v.returns], v.lengths)
                for k, v in played.items()}
    bad = curve(Perturbation("obs-noise", (0.1, 0.3)), negative, reps=100)
    assert bad["auc"] is None and "not positive" in bad["note"]


# --- parsing and the command line -----------------------------------------------------------
def test_parse_perturbation_sorts_and_adds_the_nominal_level():
    p = parse_perturbation("mass=2,0.5,2")
    assert p == Perturbation("mass", (0.5, 2.0)) and p.curve_levels == (0.5, 1.0, 2.0)
    assert parse_perturbation("delay=3,1").curve_levels == (0.0, 1.0, 3.0)
    assert str(p) == "mass=0.5,2"


@pytest.mark.parametrize("text,message", [
    ("obsnoise=0.1", r"unknown perturbation kind 'obsnoise'\. Did you mean obs-noise"),
    ("obs-noise", r"write KIND=LEVEL\[,LEVEL\.\.\.\]"),
    ("=0.1", r"write KIND=LEVEL"),
    ("obs-noise=0.1,abc", r"'abc' is not a number"),
    ("obs-noise=-0.1", r"obs-noise levels must be >= 0"),
    ("mass=0", r"mass levels must be > 0"),
    ("delay=1.5", r"delay levels must be whole numbers"),
    ("time-limit=nan", r"must be finite"),
    ("delay=0", r"at least one level other than the nominal 0"),
    ("friction=1", r"at least one level other than the nominal 1"),
])
def test_bad_perturb_strings_fail_before_any_compute(text, message, tmp_path, capsys,
                                                     monkeypatch):
    import pgscope.robustness as rob

    with pytest.raises(PerturbationError, match=message):
        parse_perturbation(text)
    monkeypatch.setattr(rob, "play_episodes", lambda *a, **k: pytest.fail("played"))
    missing = tmp_path / "no-such-run"  # parsed before the run is even looked at
    assert main(["evaluate", str(missing), "--perturb", "delay=1", "--perturb", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --perturb '{text}'") and err.count("\n") == 1
    assert main(["study", "robustness", str(missing), "--perturb", text]) == 2
    assert capsys.readouterr().err.startswith(f"error: --perturb '{text}'")


def test_a_kind_given_twice_or_none_is_refused():
    with pytest.raises(PerturbationError, match="'delay' is given twice"):
        parse_perturbations(["delay=1", "delay=2"])
    with pytest.raises(PerturbationError, match="no perturbation given"):
        parse_perturbations([])


def test_cli_prints_the_curve_table_and_writes_json(hopper_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", str(hopper_run), "--episodes", "2", "--perturb", "delay=2",
                 "--perturb", "friction=0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "delay: level = env steps" in text and "(nominal)" in text and "AUC" in text
    data = json.loads(out.read_text())
    assert [c["kind"] for c in data["robustness"]["curves"]] == ["delay", "friction"]
    assert data["robustness"]["curves"][0]["levels"] == [0.0, 2.0]
    assert main(["evaluate", str(hopper_run), "--episodes", "1", "--perturb", "delay=1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["robustness"]["curves"][0]["kind"] == "delay"
    assert (hopper_run / "robustness.json").exists()  # the default output
    assert main(["evaluate", str(hopper_run), "--perturb", "delay=1", "--video",
                 str(tmp_path / "v.mp4")]) == 2
    assert "--video cannot be combined with --perturb" in capsys.readouterr().err
    assert main(["evaluate", str(hopper_run), "--out", str(out)]) == 2
    assert "--out applies to --perturb only" in capsys.readouterr().err


def test_make_perturbed_env_combines_kinds_and_undoes_them():
    env = make_perturbed_env("Hopper-v5", [("time-limit", 0.01), ("mass", 2.0),
                                           ("delay", 1)], PerturbContext())
    model = env.unwrapped.model
    original = np.array(model.body_mass, copy=True)
    assert env.spec.max_episode_steps == 10
    env.reset(seed=0)
    env.reset(seed=1)  # a reset before the episode's end scales the originals again
    assert np.array_equal(model.body_mass, original * 2)
    env.close()
    assert np.array_equal(model.body_mass, original)


# --- a study --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hopper_study(tmp_path_factory):
    from pgscope.study import load_spec, run_study

    root = tmp_path_factory.mktemp("robust-study")
    spec_file = root / "s.toml"
    spec_file.write_text(
        'name = "robust"\nenvs = ["Hopper-v5"]\nseeds = [0, 1]\ntotal_steps = 128\n'
        "set = { steps_per_iter = 64, minibatches = 2, epochs = 1, hidden = [8] }\n"
        '[[configs]]\nlabel = "base"\npreset = "ppo"\n'
        '[[configs]]\nlabel = "wide"\npreset = "ppo"\ninit_log_std = 1.0\n')
    study = root / "study"
    run_study(load_spec(spec_file), study, workers=1, progress=False)
    return study


def test_study_robustness_tables_and_report_panel(hopper_study, capsys):
    from pgscope.report import write_report

    assert main(["study", "robustness", str(hopper_study), "--perturb", "mass=0.5,2",
                 "--episodes", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "mass on Hopper-v5" in text and "base!" in text and "wide!" in text
    summary = hopper_study / "summary"
    curves = pd.read_csv(summary / "robustness.csv")
    runs = pd.read_csv(summary / "robustness_runs.csv")
    aucs = pd.read_csv(summary / "robustness_auc.csv")
    assert len(curves) == 2 * 3 and len(runs) == 2 * 2 * 3 and len(aucs) == 2
    assert (curves[curves["nominal"]]["normalized"] == 1.0).all()
    for _, row in curves.iterrows():  # the mean over seeds of each seed's normalized curve
        per_run = runs[(runs["label"] == row["label"]) & (runs["level"] == row["level"])]
        assert len(per_run) == 2
        assert row["normalized"] == pytest.approx(per_run["normalized"].mean())
        assert row["normalized_low"] <= row["normalized"] <= row["normalized_high"]
    one = evaluate_robustness(hopper_study / "runs/base/Hopper-v5/seed_1", ["mass=0.5,2"],
                              episodes=2, reps=100)["robustness"]["curves"][0]
    mine = runs[(runs["label"] == "base") & (runs["seed"] == 1)].sort_values("level")
    assert list(mine["normalized"]) == pytest.approx([p["normalized"] for p in one["points"]])
    base_auc = aucs[aucs["label"] == "base"]["auc"].iloc[0]
    per_seed = [auc([0.5, 1, 2], list(g.sort_values("level")["normalized"]))
                for _, g in runs[runs["label"] == "base"].groupby("seed")]
    assert base_auc == pytest.approx(np.mean(per_seed))
    data = json.loads((summary / "robustness.json").read_text())
    assert data["evaluated"] == 4 and not data["not_evaluated"]
    # the configs compared on their runs' own AUCs (wide against the baseline, base)
    run_auc = pd.DataFrame(data["run_auc"])
    x = run_auc[run_auc["label"] == "wide"]["auc"].to_numpy(float)
    y = run_auc[run_auc["label"] == "base"]["auc"].to_numpy(float)
    cmp = pd.read_csv(summary / "robustness_comparisons.csv")
    assert len(cmp) == 1 and (cmp["a"].iloc[0], cmp["b"].iloc[0]) == ("wide", "base")
    assert cmp["difference"].iloc[0] == pytest.approx(x.mean() - y.mean())
    assert cmp["mannwhitney_p"].iloc[0] == pytest.approx(
        scipy.stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)
    assert "AUC comparisons" in text and "wide vs base" in text
    assert not (summary / "robustness_main_effects.csv").exists()  # not a factorial
    html = write_report(hopper_study).read_text()
    assert 'id="robustness"' in html and "study-robustness-0" in html
    assert "AUC comparisons" in html and "wide vs base" in html
    # two worker processes give the same tables, bit for bit
    assert main(["study", "robustness", str(hopper_study), "--perturb", "mass=0.5,2",
                 "--episodes", "2", "--quiet", "--workers", "2", "--out",
                 str(hopper_study / "two-workers")]) == 0
    capsys.readouterr()
    for name in ("robustness", "robustness_auc", "robustness_runs", "robustness_comparisons"):
        pd.testing.assert_frame_equal(pd.read_csv(summary / f"{name}.csv"),
                                      pd.read_csv(hopper_study / "two-workers" / f"{name}.csv"),
                                      check_exact=True)
    # the study summary prints the last robustness evaluation, read back from its JSON
    assert main(["study", "summary", str(hopper_study), "--no-plots"]) == 0
    summary_text = capsys.readouterr().out
    assert "robustness (pgscope study robustness" in summary_text
    robust_part = summary_text[summary_text.index("robustness (pgscope"):]
    assert text.split("\n\nwritten:")[0].split("\n", 1)[1] in robust_part
    assert "normalized return (1 = unperturbed)" in html
    assert not math.isnan(base_auc)


def test_auc_comparison_against_its_definition():
    """P(AUC_a > AUC_b) counts ties half; the tests are SciPy's on the same AUCs; a side
    with fewer than two defined AUCs is not compared."""
    from pgscope.study.robustness import compare_aucs
    from pgscope.study.spec import StatsSpec

    st = StatsSpec(reps=500)
    x, y = np.array([0.9, 0.8, 0.6, np.nan]), np.array([0.5, 0.6, 0.65])
    row = compare_aucs(x, y, st)
    pairs = [(a > b) + 0.5 * (a == b) for a in x[:3] for b in y]
    assert row["prob_improvement"] == pytest.approx(np.mean(pairs))  # 7.5 of 9
    assert row["prob_improvement_low"] <= row["prob_improvement"] <= row["prob_improvement_high"]
    assert (row["runs_a"], row["runs_b"]) == (3, 3)
    assert row["difference"] == pytest.approx(np.mean([0.9, 0.8, 0.6]) - y.mean())
    assert row["welch_p"] == pytest.approx(
        scipy.stats.ttest_ind(x[:3], y, equal_var=False).pvalue)
    assert row["mannwhitney_p"] == pytest.approx(
        scipy.stats.mannwhitneyu(x[:3], y, alternative="two-sided").pvalue)
    assert math.isnan(compare_aucs(np.array([0.5, np.nan]), y, st)["difference"])


def test_auc_main_effects_of_a_factorial(tmp_path):
    """AUC = 0.5 + 0.2 [value_clip on] - 0.1 [lr_anneal on] per run: the main effects
    recover +0.2 and -0.1 (levels against the first level, pooled over the other
    factor), and every pair is compared with the baseline."""
    from pgscope.study import load_spec
    from pgscope.study.robustness import auc_comparisons, auc_main_effects

    spec_file = tmp_path / "f.toml"
    spec_file.write_text(
        'name = "f"\nenvs = ["Hopper-v5"]\nseeds = 3\ntotal_steps = 2048\n'
        '[factorial]\nbase = "ppo"\n'
        "factors = { value_clip = [false, true], lr_anneal = [false, true] }\n")
    spec = load_spec(spec_file)
    rows = []
    for c in spec.configs:
        for seed in range(3):
            value = 0.5 + 0.2 * c.overrides["value_clip"] - 0.1 * c.overrides["lr_anneal"]
            rows.append(dict(label=c.label, env="Hopper-v5", seed=seed, kind="mass",
                             auc=value + 0.01 * seed))
    run_aucs = pd.DataFrame(rows)
    effects = auc_main_effects(spec, run_aucs).set_index("factor")
    assert effects.loc["value_clip", "difference"] == pytest.approx(0.2)
    assert effects.loc["lr_anneal", "difference"] == pytest.approx(-0.1)
    assert effects.loc["value_clip", "runs_a"] == 6
    on = run_aucs["label"].map({c.label: c.overrides["lr_anneal"] for c in spec.configs})
    a, b = run_aucs[on]["auc"].to_numpy(), run_aucs[~on]["auc"].to_numpy()
    assert effects.loc["lr_anneal", "prob_improvement"] == pytest.approx(
        np.mean([(u > v) + 0.5 * (u == v) for u in a for v in b]))  # pooled: 9 of 36
    cmp = auc_comparisons(spec, run_aucs)
    assert len(cmp) == len(spec.labels) - 1 and set(cmp["b"]) == {spec.baseline}
