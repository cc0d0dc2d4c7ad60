"""Runs that did not complete, in the study statistics: no survival bias, counts next to
every aggregate, and full float precision in the summary files.

The rule under test (``pgscope.study.analysis.OUTCOME_RULE``): a diverged or failed run
counts as the worst possible outcome (-inf) in rank statistics, is left out (and counted)
by mean statistics, and a run that has not finished is missing: listed, never counted.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pgscope import seed_statistics as stats
from pgscope.run import RunDir
from pgscope.study import parse_spec
from pgscope.study.analysis import (
    OUTCOME_RULE,
    aggregates,
    comparisons,
    format_summary,
    main_effects,
    profiles,
    write_summary,
)
from pgscope.study.runner import execute_run, prepare_study_dir, run_state
from pgscope.train import train

rly = pytest.importorskip("rliable.library", reason="rliable is a test dependency")
rmetrics = pytest.importorskip("rliable.metrics")

STABLE = [150.0, 200.0, 250.0, 280.0, 305.0]  # five complete runs
UNSTABLE = [300.0, 310.0, 320.0]  # three complete runs; the other two seeds diverged
X = np.array([-np.inf, -np.inf, *UNSTABLE])  # 'unstable' as the rank statistics see it
Y = np.array(STABLE)
REPS = 2000


def _spec(envs=("CartPole-v1",), **extra):
    data = dict(name="outcomes", envs=list(envs), seeds=5, total_steps=1024,
                set=dict(steps_per_iter=256, minibatches=4, epochs=1),
                configs=[dict(label="stable", preset="ppo"),
                         dict(label="unstable", preset="ppo", clip_eps=1e32)],
                score=dict(last_iterations=1),
                statistics=dict(reps=REPS, seed=0, baseline="stable"))
    data.update(extra)
    return parse_spec(data)


def _scores(env="CartPole-v1", unstable_done=UNSTABLE):
    """A final-scores table: 'stable' completes on all 5 seeds, 'unstable' diverges on
    seeds 0 and 1 (no score) and completes on 2..4."""
    rows = [dict(label="stable", env=env, seed=s, state="complete", score=v)
            for s, v in enumerate(STABLE)]
    rows += [dict(label="unstable", env=env, seed=s, state="diverged", score=np.nan)
             for s in (0, 1)]
    rows += [dict(label="unstable", env=env, seed=s + 2, state="complete", score=v)
             for s, v in enumerate(unstable_done)]
    return pd.DataFrame(rows)


# --- the pieces: percentile intervals with -inf ---------------------------------------------
def test_percentile_interval_keeps_minus_inf_instead_of_nan():
    """Against NumPy with -inf replaced by a huge negative number: where the interpolation
    touches that number the answer must be -inf, elsewhere exactly NumPy's."""
    rng = np.random.default_rng(1)
    for share in (0.0, 0.02, 0.3, 0.6, 1.0):
        v = rng.normal(size=400)
        v[: int(share * len(v))] = -np.inf
        rng.shuffle(v)
        for level in (0.95, 0.5):
            ours = stats.percentile_interval(v, level)
            huge = np.quantile(np.where(np.isneginf(v), -1e300, v),
                               [(1 - level) / 2, (1 + level) / 2])
            expected = tuple(-np.inf if h < -1e299 else h for h in huge)
            assert ours == expected
    # along an axis (profiles, curves) the same holds per column
    m = np.array([[-np.inf, 1.0], [-np.inf, 2.0], [0.0, 3.0], [1.0, 4.0]])
    lo, hi = stats.percentile_interval(m, 0.9, axis=0)
    assert lo.tolist() == [-np.inf, pytest.approx(1.15)] and np.isfinite(hi).all()


# --- the rule on a study-like table ---------------------------------------------------------
def test_rank_statistics_count_diverged_runs_as_the_worst_outcome():
    spec = _spec()
    comp = comparisons(spec, _scores()).iloc[0]
    assert (comp["a"], comp["b"]) == ("unstable", "stable")
    # P(a > b) and Mann-Whitney U with the two diverged runs as -inf, against SciPy/rliable
    ref = sps.mannwhitneyu(X, Y, alternative="two-sided")
    assert comp["prob_improvement"] == pytest.approx(ref.statistic / 25) == 14 / 25
    assert (comp["mannwhitney_u"], comp["mannwhitney_p"]) == pytest.approx(
        (ref.statistic, ref.pvalue))
    assert comp["prob_improvement"] == pytest.approx(
        float(rmetrics.probability_of_improvement(X[:, None], Y[:, None])))
    assert comp["prob_improvement_low"] <= comp["prob_improvement"] \
        <= comp["prob_improvement_high"]
    # the survival-biased answer (diverged runs dropped) is far from it
    biased = sps.mannwhitneyu(UNSTABLE, Y, alternative="two-sided")
    assert biased.statistic / 15 == pytest.approx(14 / 15)
    assert abs(biased.pvalue - comp["mannwhitney_p"]) > 0.05
    # mean statistics: complete runs only, with the runs left out counted next to them
    t = sps.ttest_ind(UNSTABLE, STABLE, equal_var=False)
    assert (comp["welch_t"], comp["welch_p"]) == pytest.approx((t.statistic, t.pvalue))
    assert comp["difference"] == pytest.approx(np.mean(UNSTABLE) - np.mean(STABLE))
    assert [comp[k] for k in ("n_a", "n_complete_a", "n_diverged_a", "n_failed_a",
                              "n_missing_a")] == [5, 3, 2, 0, 0]
    assert [comp[k] for k in ("n_b", "n_complete_b", "n_diverged_b", "n_failed_b",
                              "n_missing_b")] == [5, 5, 0, 0, 0]


def test_a_failed_run_counts_like_a_diverged_one_but_separately():
    scores = _scores()
    scores.loc[(scores["label"] == "unstable") & (scores["seed"] == 1), "state"] = "failed"
    comp = comparisons(_spec(), scores).iloc[0]
    assert comp["prob_improvement"] == pytest.approx(14 / 25)  # as with two diverged runs
    assert (comp["n_diverged_a"], comp["n_failed_a"], comp["n_missing_a"]) == (1, 1, 0)
    agg = aggregates(_spec(), scores).set_index("label").loc["unstable"]
    assert agg["iqm"] == -np.inf and agg["failure_rate"] == 0.4 and agg["n_failed"] == 1


def test_performance_profile_keeps_diverged_runs_in_the_denominator():
    prof = profiles(_spec(), _scores())
    u = prof[prof["label"] == "unstable"]
    taus = u["tau"].to_numpy()
    assert taus[0] == min(STABLE) and taus[-1] == max(UNSTABLE)  # range of complete scores
    # hand count: complete runs above tau over all five finished runs
    hand = [sum(v > tau for v in UNSTABLE) / 5 for tau in taus]
    np.testing.assert_allclose(u["fraction"], hand)
    assert u["fraction"].iloc[0] == 0.6  # the survival-biased profile would start at 1.0
    theirs, _ = rly.create_performance_profile({"u": X[:, None]}, taus, reps=10)
    np.testing.assert_allclose(u["fraction"], theirs["u"], atol=1e-12)
    assert (u["low"] <= u["fraction"]).all() and (u["fraction"] <= u["high"]).all()
    assert (u["n"] == 5).all() and (u["n_diverged"] == 2).all() and (u["n_complete"] == 3).all()
    s = prof[prof["label"] == "stable"]
    np.testing.assert_allclose(s["fraction"], [np.mean(Y > tau) for tau in taus])


def test_iqm_and_median_rank_diverged_runs_lowest_and_report_minus_inf_honestly():
    agg = aggregates(_spec(), _scores()).set_index("label")
    u = agg.loc["unstable"]
    # 2 of 5 diverged: the middle 50% of 5 runs (trimming one each side) holds a -inf
    assert u["iqm"] == -np.inf == stats.iqm(X) == rmetrics.aggregate_iqm(X[:, None])
    assert u["median"] == 300.0 == np.median(X)  # the survival-biased median is 310
    # the bootstrap intervals are computed the same way and contain no NaN
    for name, fn in (("iqm", stats.iqm), ("median", stats.median)):
        assert not np.isnan([u[name], u[f"{name}_low"], u[f"{name}_high"]]).any()
        assert (u[name], u[f"{name}_low"], u[f"{name}_high"]) == \
            stats.stratified_bootstrap_ci(X, fn, reps=REPS, seed=0)
    assert u["iqm_low"] == -np.inf and u["median_low"] == -np.inf
    assert np.isfinite(u["iqm_high"]) and u["median_high"] == 320.0
    # the mean leaves the diverged runs out, and the row says how many
    assert u["mean"] == pytest.approx(np.mean(UNSTABLE)) and np.isfinite(u["mean_low"])
    assert u["std"] == pytest.approx(np.std(UNSTABLE, ddof=1))
    assert (u["n"], u["n_complete"], u["n_diverged"], u["n_missing"]) == (5, 3, 2, 0)
    assert u["failure_rate"] == 0.4  # diverged runs are failures (no threshold set)
    # one diverged run of five: the IQM is finite again, and below the survival-biased one
    one = _scores(unstable_done=[300.0, 310.0, 320.0, 330.0])
    one = one.drop(index=one.index[(one["label"] == "unstable") & (one["seed"] == 1)])
    one.loc[len(one)] = dict(label="unstable", env="CartPole-v1", seed=1, state="complete",
                             score=290.0)
    u1 = aggregates(_spec(), one).set_index("label").loc["unstable"]
    x1 = np.array([-np.inf, 290.0, 300.0, 310.0, 320.0])
    assert u1["iqm"] == pytest.approx(stats.iqm(x1)) == pytest.approx(300.0)
    assert u1["iqm"] < stats.iqm(x1[1:])


def test_missing_runs_are_listed_never_counted():
    scores = _scores()
    scores.loc[scores["label"] == "stable", "state"] = ["complete"] * 3 + ["partial", "new"]
    scores.loc[scores["state"].isin(["partial", "new"]), "score"] = np.nan
    comp = comparisons(_spec(), scores).iloc[0]
    ref = sps.mannwhitneyu(X, Y[:3], alternative="two-sided")
    assert comp["prob_improvement"] == pytest.approx(ref.statistic / 15)
    assert (comp["n_b"], comp["n_complete_b"], comp["n_missing_b"]) == (5, 3, 2)
    agg = aggregates(_spec(), scores).set_index("label").loc["stable"]
    assert agg["median"] == np.median(Y[:3]) and agg["failure_rate"] == 0.0


def test_main_effects_and_the_all_envs_row_count_diverged_runs_too():
    envs = ("CartPole-v1", "Pendulum-v1")
    spec = _spec(envs=envs)
    scores = pd.concat([_scores(envs[0]), _scores(envs[1], unstable_done=[100, 400, 500])])
    comp = comparisons(spec, scores).set_index("env")
    x2 = np.array([-np.inf, -np.inf, 100, 400, 500])
    assert comp.loc["Pendulum-v1", "prob_improvement"] == pytest.approx(
        sps.mannwhitneyu(x2, Y).statistic / 25)
    both_x, both_y = np.stack([X, x2], 1), np.stack([Y, Y], 1)
    assert comp.loc["all", "prob_improvement"] == pytest.approx(
        float(rmetrics.probability_of_improvement(both_x, both_y)))
    assert (comp.loc["all", "n_a"], comp.loc["all", "n_diverged_a"]) == (10, 4)
    fact = parse_spec(dict(name="f", envs=["CartPole-v1"], seeds=5, total_steps=1024,
                           set=dict(steps_per_iter=256), configs=[],
                           factorial=dict(base="ppo", factors=dict(value_clip=[True, False])),
                           score=dict(last_iterations=1), statistics=dict(reps=200)))
    fs = _scores().replace({"label": {"stable": "ppo+vc", "unstable": "ppo-vc"}})
    eff = main_effects(fact, fs).iloc[0]
    assert eff["prob_improvement"] == pytest.approx(14 / 25) and eff["n_diverged_a"] == 2


# --- end to end: run directories -> summary files and the printed table ----------------------
def _write_study(tmp_path, spec, final):
    """Run directories written by hand: final[(label, seed)] = (state, last return)."""
    out = tmp_path / "study"
    prepare_study_dir(out, spec)
    for r in spec.runs():
        state, last = final[(r.label, r.seed)]
        if state == "new":
            continue
        made = RunDir.create(out / r.rel_path, r.config)
        run, lock = made if isinstance(made, tuple) else (made, None)  # (run, writer lock)
        n = 4 if state == "complete" else 2
        for i in range(n):
            ret = last if i == n - 1 and state == "complete" else 10.0 * (i + 1)
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1), return_mean=ret))
        if state != "partial":
            run.write_status(state)
        if lock is not None:
            lock.release()
    return out


def test_summary_files_and_table_carry_the_counts_and_the_rule(tmp_path):
    spec = _spec()
    final = {("stable", s): ("complete", v) for s, v in enumerate(STABLE)}
    final.update({("unstable", 0): ("diverged", None), ("unstable", 1): ("failed", None)})
    final.update({("unstable", s + 2): ("complete", v) for s, v in enumerate(UNSTABLE)})
    final[("stable", 4)] = ("partial", None)  # still running: missing
    out = _write_study(tmp_path, spec, final)
    res = write_summary(out)
    data = json.loads((out / "summary" / "summary.json").read_text())
    assert data["outcome_rule"] == OUTCOME_RULE
    assert (data["runs"], data["complete"], data["diverged"], data["failed"]) == (10, 7, 1, 1)
    assert [(m["label"], m["seed"], m["state"]) for m in data["missing"]] == \
        [("stable", 4, "partial")]
    for name in ("aggregates", "comparisons", "profiles", "curves"):
        for row in data["tables"][name]:
            suffixes = ("_a", "_b") if name == "comparisons" else ("",)
            for sfx in suffixes:
                assert {f"n{sfx}", f"n_complete{sfx}", f"n_diverged{sfx}", f"n_failed{sfx}",
                        f"n_missing{sfx}"} <= set(row), (name, row)
    agg = {r["label"]: r for r in data["tables"]["aggregates"]}
    assert (agg["stable"]["n"], agg["stable"]["n_complete"], agg["stable"]["n_missing"]) == \
        (5, 4, 1)
    assert agg["unstable"]["iqm"] == "-inf"
    assert (agg["unstable"]["n_diverged"], agg["unstable"]["n_failed"]) == (1, 1)
    comp = data["tables"]["comparisons"][0]
    ref = sps.mannwhitneyu(X, Y[:4], alternative="two-sided")
    assert comp["prob_improvement"] == pytest.approx(ref.statistic / 20)
    assert comp["mannwhitney_p"] == pytest.approx(ref.pvalue)
    scores_csv = pd.read_csv(out / "summary" / "scores.csv")
    assert scores_csv["rank_score"].tolist()[5:7] == [-np.inf, -np.inf]
    assert (out / "summary" / "intervals.png").exists()  # -inf points drawn, not a crash
    text = format_summary(res)
    assert OUTCOME_RULE in text
    assert "3/1/1/0 of 5" in text and "4/0/0/1 of 5" in text  # aggregates, comparisons
    assert "-inf [-inf," in text


def test_summary_json_and_csv_keep_full_precision(tmp_path):
    """A Welch p-value of about 1e-12 must survive the files (a 10-decimal JSON writer
    would print it as 0)."""
    spec = _spec(statistics=dict(reps=200, seed=0, baseline="stable"))
    low = [100.0, 100.5, 101.0, 99.5, 100.2]
    high = [128.0, 128.6, 127.6, 128.5, 127.8]  # Welch p = 1.2e-12
    final = {("stable", s): ("complete", v) for s, v in enumerate(low)}
    final.update({("unstable", s): ("complete", v) for s, v in enumerate(high)})
    out = _write_study(tmp_path, spec, final)
    res = write_summary(out, plots=False)
    p = float(res["tables"]["comparisons"].iloc[0]["welch_p"])
    assert p == pytest.approx(sps.ttest_ind(high, low, equal_var=False).pvalue, rel=1e-12)
    assert 1e-13 < p < 1e-10
    data = json.loads((out / "summary" / "summary.json").read_text())
    assert data["tables"]["comparisons"][0]["welch_p"] == p  # bit for bit
    with open(out / "summary" / "comparisons.csv") as f:
        assert float(next(csv.DictReader(f))["welch_p"]) == p
    agg = res["tables"]["aggregates"].set_index("label")
    json_agg = {r["label"]: r for r in data["tables"]["aggregates"]}
    assert json_agg["unstable"]["mean"] == agg.loc["unstable", "mean"]
    assert "e-1" in format_summary(res)  # the printed table rounds, in scientific notation


def test_the_runner_reports_a_failed_run_and_resumes_it(tmp_path):
    """status.json 'failed' (training raised an error): the summary counts the run as a
    failure, and the next study run resumes it from its checkpoint."""
    spec = _spec(seeds=1, total_steps=512)
    r = spec.runs()[0]
    path = tmp_path / r.rel_path
    train(r.config, path, progress=False)
    RunDir(path).write_status("failed", iteration=1, error="RuntimeError: simulated")
    assert run_state(path) == "failed"
    assert execute_run(str(path), r.config.to_dict()) == {"state": "complete"}
    assert run_state(path) == "complete"
    assert [m["iteration"] for m in RunDir(path).read_metrics()] == [1, 2]
