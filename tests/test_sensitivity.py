"""Hyperparameter sweeps and sensitivity: the spec's ``sweep`` (grids, log and linear
ranges, two keys crossed, errors, labels, study.json), the sensitivity figures on studies
whose scores are a known function of the swept value (hand-written metrics, no training),
the printed summary, the files, the report's panels and the built-in preset."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pgscope.errors import ConfigError
from pgscope.run import RunDir
from pgscope.study import builtin_study, parse_spec
from pgscope.study.analysis import format_summary, summarize, write_summary
from pgscope.study.runner import open_study, prepare_study_dir
from pgscope.study.spec import StudySpec

ENV = "CartPole-v1"
SMALL = dict(steps_per_iter=256, minibatches=4)


def _spec(configs, **extra):
    data = dict(name="sweep", envs=[ENV], seeds=3, total_steps=1024, set=dict(SMALL),
                configs=configs, score=dict(last_iterations=1), statistics=dict(reps=300))
    data.update(extra)
    return data


def _ppo(sweep, label="ppo", **more):
    return dict(label=label, preset="ppo", sweep=sweep, **more)


# --- parsing --------------------------------------------------------------------------------
def test_a_list_grid_gives_one_labelled_config_per_value():
    spec = parse_spec(_spec([_ppo(dict(policy_lr=[1e-3, 1e-4, 3e-4, 3e-3]))]))
    assert spec.labels == ["ppo.policy_lr=0.0001", "ppo.policy_lr=0.0003",
                           "ppo.policy_lr=0.001", "ppo.policy_lr=0.003"]  # sorted
    assert [c.overrides["policy_lr"] for c in spec.configs] == [1e-4, 3e-4, 1e-3, 3e-3]
    assert all(c.overrides["minibatches"] == 4 for c in spec.configs)  # 'set' kept
    (sweep,) = spec.sweeps
    assert (sweep.family, sweep.keys, sweep.scales) == ("ppo", ("policy_lr",), ("log",))
    assert sweep.points()[1] == ("ppo.policy_lr=0.0003", (3e-4,))
    # every generated config is resolved: the runs carry the swept value
    assert [r.config.policy_lr for r in spec.runs()[::3]] == [1e-4, 3e-4, 1e-3, 3e-3]
    # a list spanning less than a decade is linear; 'scale' states it either way
    assert parse_spec(_spec([_ppo(dict(clip_eps=[0.1, 0.2, 0.3]))])).sweeps[0].scales == \
        ("linear",)
    stated = parse_spec(_spec([_ppo(dict(policy_lr=dict(values=[1e-4, 1e-3],
                                                         scale="linear")))]))
    assert stated.sweeps[0].scales == ("linear",)


def test_log_and_linear_ranges():
    spec = parse_spec(_spec([_ppo(dict(policy_lr=dict(log=[1e-4, 1e-2], points=5))),
                             _ppo(dict(clip_eps=dict(linear=[0.1, 0.3], points=3)), "clip"),
                             _ppo(dict(epochs=dict(linear=[2, 10], points=3)), "ep")]))
    lr, clip, ep = spec.sweeps
    assert lr.grids[0] == pytest.approx(np.logspace(-4, -2, 5), rel=1e-6)
    assert lr.scales == ("log",) and lr.labels[1] == "ppo.policy_lr=0.000316228"
    # the label reads back as the exact value (6 significant digits)
    assert float(lr.labels[1].split("=")[1]) == lr.grids[0][1]
    assert clip.grids[0] == pytest.approx((0.1, 0.2, 0.3)) and clip.scales == ("linear",)
    assert ep.grids[0] == (2, 6, 10) and all(isinstance(v, int) for v in ep.grids[0])


def test_two_keys_are_crossed():
    spec = parse_spec(_spec([_ppo(dict(policy_lr=[1e-4, 1e-3], epochs=[2, 4, 6]))]))
    assert spec.labels == [f"ppo.policy_lr={lr}.epochs={ep}" for lr in ("0.0001", "0.001")
                           for ep in (2, 4, 6)]
    (sweep,) = spec.sweeps
    assert sweep.shape == (2, 3) and sweep.scales == ("log", "linear")
    by_label = {c.label: c.overrides for c in spec.configs}
    assert by_label["ppo.policy_lr=0.001.epochs=4"] == {**SMALL, "policy_lr": 1e-3,
                                                        "epochs": 4}


def test_top_level_sweep_applies_to_configs_without_their_own():
    spec = parse_spec(_spec([dict(label="ppo", preset="ppo"),
                             dict(label="trpo", preset="trpo", sweep=dict(
                                 max_kl=[0.01, 0.1]))], sweep=dict(policy_lr=[1e-4, 1e-3])))
    assert spec.labels == ["ppo.policy_lr=0.0001", "ppo.policy_lr=0.001",
                           "trpo.max_kl=0.01", "trpo.max_kl=0.1"]
    assert [s.family for s in spec.sweeps] == ["ppo", "trpo"]
    fact = parse_spec(_spec([], factorial=dict(base="ppo", factors=dict(
        value_clip=[True, False])), sweep=dict(policy_lr=[1e-4, 1e-3])))
    assert fact.labels == ["ppo+vc.policy_lr=0.0001", "ppo+vc.policy_lr=0.001",
                           "ppo-vc.policy_lr=0.0001", "ppo-vc.policy_lr=0.001"]
    assert fact.factors == ("value_clip",)


def test_sweeps_round_trip_through_study_json_and_enter_the_hash(tmp_path):
    data = _spec([_ppo(dict(policy_lr=dict(log=[1e-4, 1e-2], points=3), epochs=[2, 4]))])
    spec = parse_spec(data)
    prepare_study_dir(tmp_path / "s", spec)
    back = open_study(tmp_path / "s")
    assert back == spec and back.sweeps == spec.sweeps and back.hash() == spec.hash()
    assert json.loads((tmp_path / "s" / "study.json").read_text())["spec"]["sweeps"][0][
        "keys"] == ["policy_lr", "epochs"]
    other = parse_spec(_spec([_ppo(dict(policy_lr=dict(log=[1e-4, 1e-2], points=4),
                                        epochs=[2, 4]))]))
    assert other.hash() != spec.hash()  # another grid, another study
    old = {k: v for k, v in spec.to_dict().items() if k != "sweeps"}  # before sweeps
    assert StudySpec.from_dict(old).sweeps == ()


@pytest.mark.parametrize("sweep, words", [
    (dict(policy_rl=[1e-4]), ["'policy_rl'", "unknown config key", "policy_lr"]),
    (dict(policy_lr=[]), ["'policy_lr'", "non-empty list"]),
    (dict(policy_lr=dict(log=[0.0, 1e-2], points=3)), ["'policy_lr'", "positive bounds"]),
    (dict(policy_lr=dict(log=[-1e-4, 1e-2], points=3)), ["'policy_lr'", "positive bounds"]),
    (dict(policy_lr=dict(log=[1e-4, 1e-2], points=1)), ["'policy_lr'", ">= 2"]),
    (dict(policy_lr=dict(log=[1e-4, 1e-2], points=2.5)), ["'policy_lr'", ">= 2"]),
    (dict(policy_lr=dict(log=[1e-4, 1e-2])), ["'policy_lr'", "'points'"]),
    (dict(policy_lr=dict(linear=[1e-2, 1e-4], points=3)), ["'policy_lr'", "low end"]),
    (dict(policy_lr=dict(log=[1e-4], points=3)), ["'policy_lr'", "two numbers"]),
    (dict(policy_lr=dict(log=[1e-4, 1e-2], linear=[1, 2], points=3)),
     ["'policy_lr'", "exactly one"]),
    (dict(policy_lr=dict(log=[1e-4, 1e-2], points=3, steps=2)), ["'policy_lr'", "'steps'"]),
    (dict(policy_lr=dict(values=[1e-4], scale="exp")), ["'policy_lr'", "'scale'"]),
    (dict(policy_lr=dict(values=[-1.0, 1.0], scale="log")), ["'policy_lr'", "positive"]),
    (dict(policy_lr=[1e-4, 1e-4]), ["'policy_lr'", "twice"]),
    (dict(policy_lr=[1e-4, "big"]), ["'policy_lr'", "'big'"]),
    (dict(epochs=[2, 2.5]), ["'epochs'", "whole numbers"]),
    (dict(epochs=dict(linear=[2, 3], points=4)), ["'epochs'", "repeated"]),
    (dict(value_clip=[True, False]), ["'value_clip'", "numeric"]),
    (dict(seed=[0, 1]), ["'seed'", "set by the study"]),
    (dict(minibatches=[4, 8]), ["'minibatches'", "also set"]),
    (dict(policy_lr=[1e-4], epochs=[2], gamma=[0.9]), ["3 keys", "policy_lr"]),
    ({}, ["'sweep'", "'ppo'"]),
    ([1e-4, 1e-3], ["'sweep'", "'ppo'"]),
])
def test_a_bad_sweep_is_one_config_error_naming_the_key(sweep, words):
    with pytest.raises(ConfigError) as exc:
        parse_spec(_spec([_ppo(sweep)]))
    message = str(exc.value)
    for word in words:
        assert word in message, (word, message)


def test_other_sweep_errors():
    with pytest.raises(ConfigError, match="policy_lr=-0.001.*policy_lr"):  # resolved
        parse_spec(_spec([_ppo(dict(policy_lr=[-1e-3, 1e-3]))]))
    with pytest.raises(ConfigError, match=r"label\(s\) ppo also name"):  # a family = a label
        parse_spec(_spec([dict(label="ppo", preset="ppo"), _ppo(dict(policy_lr=[1e-3]))]))
    with pytest.raises(ConfigError, match="sensitivity_fraction"):
        parse_spec(_spec([_ppo(dict(policy_lr=[1e-3]))],
                         statistics=dict(sensitivity_fraction=1.5)))


# --- the figures on studies with known scores -------------------------------------------------
def peak(lr: float) -> float:
    """The known score of the log sweep: a parabola in log10(lr), 1000 at 1e-3."""
    return 1000.0 - 400.0 * (math.log10(lr) + 3.0) ** 2


TWIN = {0.1: 100.0, 0.2: 50.0, 0.3: 20.0, 0.4: 100.0, 0.5: 30.0}  # two separate peaks
LOSS = {0.8: -120.0, 0.85: -105.0, 0.9: -100.0, 0.95: -108.0, 1.0: -130.0}  # negative
OFFSET = (-5.0, 0.0, 5.0)  # per seed; they cancel in each point's mean


def plane(lr: float, epochs: int) -> float:
    """The known score of the 2-D sweep: 500 at (1e-3, 4)."""
    return 500.0 - 100.0 * (math.log10(lr) + 3.0) ** 2 - 5.0 * (epochs - 4) ** 2


def _write(spec, out, score, states=None):
    prepare_study_dir(out, spec)
    for r in spec.runs():
        run, lock = RunDir.create(out / r.rel_path, r.config)
        value = score(r) + OFFSET[r.seed]
        for i in range(4):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1),
                                    return_mean=value if i == 3 else 0.0))
        run.write_status((states or {}).get((r.label, r.seed), "complete"))
        lock.release()
    return out


@pytest.fixture(scope="module")
def study_1d(tmp_path_factory):
    spec = parse_spec(_spec(
        [_ppo(dict(policy_lr=dict(log=[1e-4, 1e-2], points=9))),
         _ppo(dict(clip_eps=dict(linear=[0.1, 0.5], points=5)), "clip"),
         _ppo(dict(gae_lambda=dict(linear=[0.8, 1.0], points=5)), "gl")],
        score=dict(last_iterations=1, failure_threshold={ENV: 598.0}),
        statistics=dict(reps=400, sensitivity_fraction=0.12)))

    def score(r):
        c = r.config
        if r.label.startswith("gl."):
            return LOSS[round(c.gae_lambda, 6)]
        return peak(c.policy_lr) if r.label.startswith("ppo.") else TWIN[round(c.clip_eps, 6)]
    out = _write(spec, tmp_path_factory.mktemp("s1") / "study", score,
                 states={("ppo.policy_lr=0.01", 1): "diverged"})
    return spec, out, write_summary(out, plots=False)


def test_the_curve_is_the_known_function(study_1d):
    spec, _, res = study_1d
    curve = res["tables"]["sensitivity_curve"]
    ppo = curve[curve["family"] == "ppo"]
    assert list(ppo["label"]) == list(spec.sweeps[0].labels)
    assert list(ppo["value"]) == pytest.approx(np.logspace(-4, -2, 9), rel=1e-6)
    assert list(ppo["mean"]) == pytest.approx([peak(v) for v in ppo["value"]], abs=1e-9)
    assert (ppo["mean_low"] < ppo["mean"]).all() and (ppo["mean"] < ppo["mean_high"]).all()
    assert list(ppo["key"].unique()) == ["policy_lr"]
    # per-point failure rates: below the threshold (598) or diverged, of all but missing
    rates = dict(zip(ppo["value"].round(8), ppo["failure_rate"], strict=True))
    assert rates[1e-4] == pytest.approx(1 / 3)  # 595 fails, 600 and 605 pass
    assert rates[1e-2] == pytest.approx(2 / 3)  # 595 fails, seed 1 diverged
    assert rates[1e-3] == 0
    last = ppo.iloc[-1]
    assert (last["n_complete"], last["n_diverged"]) == (2, 1)


def test_best_point_region_and_width(study_1d):
    _, _, res = study_1d
    sens = res["tables"]["sensitivity"].set_index("family")
    ppo = sens.loc["ppo"]
    assert ppo["best_value"] == 1e-3 and ppo["best_mean"] == pytest.approx(1000.0)
    assert ppo["best_mean_low"] < 1000 < ppo["best_mean_high"]
    # near-best: >= 1000 - 0.12 * 1000 = 880, so log10 lr in [-3.5, -2.5]: 5 of 9 points
    assert ppo["threshold"] == pytest.approx(880.0)
    assert (ppo["near_points"], ppo["points"], ppo["region_points"]) == (5, 9, 5)
    assert ppo["near_fraction"] == pytest.approx(5 / 9)
    assert (ppo["region_from"], ppo["region_to"]) == pytest.approx((10 ** -3.5, 10 ** -2.5),
                                                                   rel=1e-6)
    assert ppo["width"] == pytest.approx(1.0, abs=1e-6) and ppo["width_unit"] == "decades"
    assert ppo["span"] == pytest.approx(2.0) and ppo["width_relative"] == pytest.approx(0.5)
    # the seeds' spread (+-5) never moves a point across the threshold or the peak
    assert ppo["best_p"] == 1.0 and ppo["best_set_points"] == 1
    assert (ppo["width_low"], ppo["width_high"]) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert ppo["best_set_from"] == ppo["best_set_to"] == 1e-3
    # two separate peaks: both near-best, only the best's own neighbourhood is its region
    clip = sens.loc["clip"]
    assert (clip["near_points"], clip["region_points"]) == (2, 1)
    assert clip["best_value"] == pytest.approx(0.1) and clip["width"] == 0.0
    assert clip["width_unit"] == "clip_eps units" and clip["span"] == pytest.approx(0.4)
    points = res["tables"]["sensitivity_curve"].query("family == 'clip'")
    assert list(points["near_best"]) == [True, False, False, True, False]
    assert list(points["in_region"]) == [True, False, False, False, False]
    # a negative best: near-best is best - f |best| = -100 - 12 = -112, not (1 - f) x best
    gl = sens.loc["gl"]
    assert gl["threshold"] == pytest.approx(-112.0) and gl["best_value"] == 0.9
    assert (gl["near_points"], gl["region_points"]) == (3, 3)
    assert (gl["region_from"], gl["region_to"], gl["width"]) == pytest.approx((0.85, 0.95, 0.1))


def test_p_best_is_shared_by_equal_points(study_1d):
    _, _, res = study_1d
    curve = res["tables"]["sensitivity_curve"]
    for family in ("ppo", "clip", "gl"):
        assert curve[curve["family"] == family]["p_best"].sum() == pytest.approx(1.0)
    clip = curve.query("family == 'clip'").set_index("value")["p_best"]
    # 0.1 and 0.4 have the same scores: each is best in about half of the resamples
    assert clip[0.1] == pytest.approx(0.5, abs=0.1) and clip[0.4] == pytest.approx(0.5,
                                                                                  abs=0.1)
    assert clip[0.2] == clip[0.3] == clip[0.5] == 0.0
    sens = res["tables"]["sensitivity"].set_index("family")
    assert sens.loc["clip", "best_set_points"] == 2  # a 95% set needs both
    assert (sens.loc["clip", "best_set_from"], sens.loc["clip", "best_set_to"]) == \
        pytest.approx((0.1, 0.4))


def test_summary_files_and_printed_table(study_1d):
    _, out, res = study_1d
    files = {p.name for p in (out / "summary").iterdir()}
    assert {"sensitivity.csv", "sensitivity_curve.csv"} <= files
    csv = pd.read_csv(out / "summary" / "sensitivity.csv").set_index("family")
    assert csv.loc["ppo", "width"] == pytest.approx(1.0, abs=1e-6)
    data = json.loads((out / "summary" / "summary.json").read_text())
    assert data["sensitivity"]["fraction"] == 0.12
    assert data["sensitivity"]["sweeps"][0]["keys"] == ["policy_lr"]
    assert "log10" in data["sensitivity"]["definitions"]["width"]
    json_rows = {r["family"]: r for r in data["tables"]["sensitivity"]}
    assert json_rows["ppo"]["best_label"] == "ppo.policy_lr=0.001"
    assert len(data["tables"]["sensitivity_curve"]) == 19
    text = format_summary(res)
    assert "hyperparameter sensitivity" in text and "best - 0.12 |best|" in text
    line = next(x for x in text.splitlines() if x.startswith("ppo!"))
    assert "policy_lr" in line and "0.000316228..0.00316228" in line
    assert "1.00 [1.00, 1.00] decades (of 2)" in line and "5/9" in line
    assert any("policy_lr=0.001 " in x and x.rstrip().endswith("B")
               for x in text.splitlines())


@pytest.fixture(scope="module")
def study_2d(tmp_path_factory):
    spec = parse_spec(_spec([_ppo(dict(policy_lr=[1e-4, 1e-3, 1e-2], epochs=[2, 4, 6]))],
                            statistics=dict(reps=300, sensitivity_fraction=0.12)))
    out = _write(spec, tmp_path_factory.mktemp("s2") / "study",
                 lambda r: plane(r.config.policy_lr, r.config.epochs))
    return spec, out, summarize(out)


def test_two_dimensional_sensitivity(study_2d):
    _, _, res = study_2d
    curve = res["tables"]["sensitivity_curve"]
    assert list(curve["mean"]) == pytest.approx(
        [plane(a, b) for a, b in zip(curve["value"], curve["value2"], strict=True)])
    row = res["tables"]["sensitivity"].iloc[0]
    assert (row["key"], row["key2"]) == ("policy_lr", "epochs")
    assert (row["best_value"], row["best_value2"]) == (1e-3, 4)
    # >= 440: lr 1e-3 with every epochs value (480, 500, 480); lr 1e-4 or 1e-2 lose 100
    assert (row["near_points"], row["region_points"], row["points"]) == (3, 3, 9)
    assert row["width"] == 0.0 and row["width_unit"] == "decades"
    assert (row["region_from2"], row["region_to2"], row["width2"]) == (2, 6, 4)
    assert row["width2_unit"] == "epochs units" and row["width2_relative"] == 1.0
    assert (row["scale"], row["scale2"]) == ("log", "linear")


def test_unfinished_points_have_no_mean_and_cut_the_region(tmp_path):
    spec = parse_spec(_spec([_ppo(dict(policy_lr=dict(log=[1e-4, 1e-2], points=5)))]))
    empty = tmp_path / "empty"
    prepare_study_dir(empty, spec)
    res = write_summary(empty, plots=False)  # nothing finished: empty tables, a note
    assert res["tables"]["sensitivity"].empty
    assert "no swept point has a complete run yet" in format_summary(res)
    # the point 3.16e-3 (next to the best, 1e-3) never finished: no mean, not near-best,
    # so 1e-2 (within f of the best) is near-best but outside the best's region
    unfinished = "ppo.policy_lr=0.00316228"
    score = {1e-4: 10.0, 3.16228e-4: 50.0, 1e-3: 100.0, 3.16228e-3: 95.0, 1e-2: 95.0}
    out = tmp_path / "partial"
    prepare_study_dir(out, spec)
    for r in spec.runs():
        if r.label == unfinished:
            continue
        run, lock = RunDir.create(out / r.rel_path, r.config)
        for i in range(4):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1),
                                    return_mean=score[r.config.policy_lr] + OFFSET[r.seed]))
        run.write_status("complete")
        lock.release()
    res = summarize(out)
    curve = res["tables"]["sensitivity_curve"].set_index("label")
    assert math.isnan(curve.loc[unfinished, "mean"]) and curve.loc[unfinished, "n_missing"] == 3
    assert curve.loc[unfinished, "p_best"] == 0 and not curve.loc[unfinished, "near_best"]
    row = res["tables"]["sensitivity"].iloc[0]
    assert (row["points_scored"], row["near_points"], row["region_points"]) == (4, 2, 1)
    assert row["width"] == 0.0


# --- the report -------------------------------------------------------------------------------
def test_report_has_a_panel_per_swept_family(study_1d, study_2d):
    from pgscope.report.sensitivity import sensitivity_html
    from pgscope.report.study_page import study_page

    _, out, _ = study_1d
    page = study_page(out)
    sections = {anchor: body for anchor, _, body in page.sections}
    assert "sensitivity" in sections
    body = sections["sensitivity"]
    assert 'id="study-sensitivity-0"' in body and 'id="study-sensitivity-1"' in body
    figs = body.split('id="study-sensitivity-')
    assert '"type":"log"' in figs[1] and '"type":"log"' not in figs[2]  # ppo log, clip not
    assert "near-best region (width 1 decades)" in figs[1]
    assert "0.000316228" in body and "ppo" in body and "clip_eps" in body
    _, _, res2 = study_2d
    html = sensitivity_html(res2["tables"], res2["meta"])
    assert '"type":"heatmap"' in html and 'id="study-sensitivity-0"' in html
    assert "500 B" in html  # the best cell, marked


def test_a_study_without_sweeps_has_no_sensitivity(tmp_path):
    spec = parse_spec(_spec([dict(label="ppo", preset="ppo")]))
    res = summarize(_write(spec, tmp_path / "plain", lambda r: 1.0))
    assert "sensitivity" not in res["tables"] and "sensitivity" not in res["meta"]
    assert "hyperparameter sensitivity" not in format_summary(res)


# --- the built-in study -----------------------------------------------------------------------
def test_step_size_preset():
    full = builtin_study("step-size-sensitivity")
    quick = builtin_study("step-size-sensitivity", quick=True)
    assert full.envs == quick.envs == ("Hopper-v5",)
    assert [(s.family, s.keys, s.scales) for s in full.sweeps] == [
        ("ppo", ("policy_lr",), ("log",)), ("trpo", ("max_kl",), ("log",))]
    for spec, points in ((full, 5), (quick, 3)):
        for sweep in spec.sweeps:
            grid = sweep.grids[0]
            assert len(grid) == points
            assert math.log10(grid[-1] / grid[0]) == pytest.approx(2.0)  # same span: widths
    assert len(full.seeds) == 3 and len(full.runs()) == 30
    assert len(quick.runs()) == 12 and quick.total_steps < full.total_steps
    assert full.baseline == "ppo.policy_lr=0.000316228"
    assert {r.config.algo for r in full.runs()} == {"ppo", "trpo"}
