"""Studies: spec validation, the runner (resume, kill -9, dead workers, Ray), analysis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pgscope import seed_statistics as stats
from pgscope.cli import main
from pgscope.config import make_config
from pgscope.errors import ConfigError, PgscopeError, RunDirError
from pgscope.run import RunDir
from pgscope.study import builtin_study, load_spec, parse_spec, run_study
from pgscope.study.analysis import final_scores, load_study, summarize, write_summary
from pgscope.study.presets import BUILTIN_STUDIES
from pgscope.study.runner import prepare_study_dir
from pgscope.train import TIMING_KEYS, train

FAST = dict(steps_per_iter=256, minibatches=4, epochs=2)


def _spec(**extra):
    data = dict(name="t", envs=["CartPole-v1"], seeds=2, total_steps=768, set=dict(FAST),
                configs=[dict(label="ppo", preset="ppo"),
                         dict(label="small", preset="ppo", hidden=[16])])
    data.update(extra)
    return data


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in RunDir(path).read_metrics()]


# --- the spec -----------------------------------------------------------------------------
def test_toml_spec_is_parsed_and_every_run_resolved(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("""
name = "clip"
envs = ["CartPole-v1"]
seeds = [3, 5]
total_steps = 1024
set = { steps_per_iter = 256 }
[[configs]]
label = "ppo"
preset = "ppo"
[[configs]]
label = "noclip"
preset = "ppo"
clip_eps = 1e32
[score]
last_iterations = 2
[statistics]
baseline = "noclip"
[probes]
every = 2
kinds = "values"
""")
    spec = load_spec(f)
    runs = spec.runs()
    assert [(r.label, r.seed) for r in runs] == [("ppo", 3), ("ppo", 5), ("noclip", 3),
                                                  ("noclip", 5)]
    assert runs[2].config.clip_eps == 1e32 and runs[0].config.clip_eps == 0.2
    assert all(r.config.steps_per_iter == 256 and r.config.total_steps == 1024 for r in runs)
    assert runs[1].rel_path == "runs/ppo/CartPole-v1/seed_5"
    assert spec.baseline == "noclip" and spec.score.window(4) == 2
    assert all(r.config.probe_every == 2 and r.config.probe_kinds == "values" for r in runs)


@pytest.mark.parametrize("change,message", [
    (dict(nmae="x"), "unknown key 'nmae'.*Did you mean name"),
    (dict(configs=[dict(label="a", preset="ppo", lr_anneel=False)]),
     "unknown config key 'lr_anneel'.*Did you mean lr_anneal"),
    (dict(configs=[dict(label="a", preset="ppo"), dict(label="a", preset="trpo")]),
     "duplicate config labels: a"),
    (dict(configs=[dict(label="a/b", preset="ppo")]), "label 'a/b' may only use"),
    (dict(configs=[dict(label="a", preset="pop")]), "unknown preset 'pop'.*Did you mean ppo"),
    (dict(configs=[dict(label="a", preset="ppo", clip_eps=-1.0)]), "clip_eps"),
    (dict(configs=[dict(label="a", preset="ppo", value_clip="yes please")]), "value_clip"),
    (dict(configs=[dict(label="a", preset="ppo", seed=3)]), "'seed' is set by the study"),
    (dict(seeds=[1, 1]), "lists a seed twice"),
    (dict(seeds=0), "'seeds' must be >= 1"),
    (dict(total_steps=-5), "total_steps"),
    (dict(score=dict(last_fraction=0.1, last_iterations=3)), "not both"),
    (dict(score=dict(last_fraction=2.0)), "last_fraction must lie in"),
    (dict(score=dict(failure_threshold={"Hopper-v5": 100})), "not one of the study's envs"),
    (dict(statistics=dict(rep=10)), "unknown key 'rep'.*Did you mean reps"),
    (dict(statistics=dict(baseline="nope")), "baseline 'nope' is not a config label"),
    (dict(statistics=dict(reps="many")), "reps"),
    (dict(probes=dict(evry=3)), "unknown key 'evry'"),
    (dict(configs=[]), "no configs"),
])
def test_bad_specs_give_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(_spec(**change))


def test_invalid_toml_and_missing_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("name = 'x'\nenvs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_factorial_expands_to_all_combinations():
    spec = parse_spec(_spec(configs=[], factorial=dict(
        base="ppo", factors=dict(value_clip=[True, False], reward_multiplier=[0.1, 10.0]))))
    assert spec.labels == ["ppo+vc.rm=0.1", "ppo+vc.rm=10", "ppo-vc.rm=0.1", "ppo-vc.rm=10"]
    assert spec.factors == ("value_clip", "reward_multiplier")
    cfg = {r.label: r.config for r in spec.runs()}
    assert cfg["ppo-vc.rm=10"].value_clip is False
    assert cfg["ppo-vc.rm=10"].reward_multiplier == 10.0
    assert cfg["ppo-vc.rm=10"].steps_per_iter == 256  # the common 'set' applies too


@pytest.mark.parametrize("name", list(BUILTIN_STUDIES))
def test_builtin_studies_resolve_in_both_sizes(name):
    full, quick = builtin_study(name), builtin_study(name, quick=True)
    steps = lambda s: len(s.runs()) * s.total_steps  # noqa: E731
    assert steps(quick) <= 1_000_000 < steps(full)  # minutes on 2 cores vs a cluster
    if name == "code-level-ablation":
        assert len(full.configs) == 16 and set(full.factors) == {
            "value_clip", "reward_scale", "ortho_init", "lr_anneal"}
    if name == "seed-lottery":
        assert len(quick.configs) == 1 and len(quick.seeds) >= 10
    if name == "reward-scale":
        assert {r.config.reward_multiplier for r in quick.runs()} == {0.01, 0.1, 1, 10, 100}
    with pytest.raises(ConfigError, match="Did you mean"):
        builtin_study(name[:-1])


# --- the runner ---------------------------------------------------------------------------
def test_study_runs_ordinary_run_dirs_and_resumes_without_rerunning(tmp_path):
    spec = parse_spec(_spec())
    out = tmp_path / "study"
    outcome = run_study(spec, out, workers=2, progress=False)
    assert len(outcome.complete) == 4 and not outcome.failed
    # each run equals a plain 'pgscope train' of the same config
    ref = train(make_config("ppo", "CartPole-v1", dict(FAST, seed=1, total_steps=768)),
                tmp_path / "ref", progress=False)
    assert _metrics(out / "runs/ppo/CartPole-v1/seed_1") == _metrics(ref)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    again = run_study(spec, out, progress=False)
    assert again.skipped == 4 and not again.complete
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}


def test_output_dir_with_another_study_or_other_files_is_refused(tmp_path):
    out = tmp_path / "study"
    prepare_study_dir(out, parse_spec(_spec()))
    before = (out / "study.json").read_bytes()
    with pytest.raises(RunDirError, match="holds a different study"):
        run_study(parse_spec(_spec(seeds=3)), out, progress=False)
    assert (out / "study.json").read_bytes() == before  # nothing lost
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and is not a pgscope study"):
        run_study(parse_spec(_spec()), other, progress=False)
    assert (other / "notes.txt").read_text() == "mine"
    # analysis settings may change without invalidating the runs
    prepare_study_dir(out, parse_spec(_spec(statistics=dict(reps=500))))
    assert json.loads((out / "study.json").read_text())["spec"]["statistics"]["reps"] == 500


def test_cli_errors_for_study_commands(tmp_path, capsys):
    f = tmp_path / "dup.toml"
    f.write_text('name="x"\nenvs=["CartPole-v1"]\nseeds=1\ntotal_steps=256\n'
                 '[[configs]]\nlabel="a"\npreset="ppo"\n[[configs]]\nlabel="a"\npreset="ppo"\n')
    assert main(["study", "run", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "duplicate config labels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["study", "run", "--preset", "seed-lotery"]) == 2
    assert "Did you mean seed-lottery" in capsys.readouterr().err
    assert main(["study", "summary", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["study", "summary", str(tmp_path)]) == 2
    assert "not a pgscope study directory" in capsys.readouterr().err
    for args, message in ((["--preset", "seed-lottery", str(f)], "not both or neither"),
                          ([], "not both or neither"),
                          ([str(f), "--quick"], "--quick applies to built-in studies"),
                          (["--preset", "seed-lottery", "--address", "x:1"],
                           "--address needs --backend ray"),
                          (["--preset", "seed-lottery", "--workers", "0"],
                           "--workers must be >= 1")):
        assert main(["study", "run", *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(PgscopeError, match="unknown backend 'dask'"):
        run_study(parse_spec(_spec()), tmp_path / "o3", backend="dask", progress=False)
    assert not (tmp_path / "o3").exists()
    f2 = tmp_path / "badenv.toml"
    f2.write_text('name="x"\nenvs=["Hoper-v5"]\nseeds=1\ntotal_steps=256\n'
                  '[[configs]]\nlabel="a"\npreset="ppo"\n')
    assert main(["study", "run", str(f2), "--out", str(tmp_path / "o2")]) == 2
    assert "Hopper-v5" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_kill_minus_9_of_the_whole_study_then_rerun_loses_nothing(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('name="k"\nenvs=["CartPole-v1"]\nseeds=2\ntotal_steps=5120\n'
                         'set={steps_per_iter=256, minibatches=4, epochs=2}\n'
                         '[[configs]]\nlabel="ppo"\npreset="ppo"\n')
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "pgscope.cli", "study", "run", str(spec_file), "--out",
           str(out), "--quiet", "--workers", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run0 = out / "runs/ppo/CartPole-v1/seed_0"
    deadline = time.time() + 120
    while time.time() < deadline and len(RunDir(run0).read_metrics()) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-run
    proc.wait()
    killed_at = len(RunDir(run0).read_metrics())
    assert 3 <= killed_at < 20
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for seed in (0, 1):
        ref = train(make_config("ppo", "CartPole-v1", dict(FAST, seed=seed, total_steps=5120)),
                    tmp_path / f"ref{seed}", progress=False)
        got = _metrics(out / f"runs/ppo/CartPole-v1/seed_{seed}")
        assert [r["iteration"] for r in got] == list(range(1, 21))  # each exactly once
        assert [r["env_steps"] for r in got] == [256 * i for i in range(1, 21)]
        # what was written before the kill is kept as it was (at most the iteration after
        # the last checkpoint is redone); the envs restart on resume, so later iterations
        # differ from an uninterrupted run, as for 'pgscope train --resume'
        if seed == 0:
            assert got[:killed_at - 1] == _metrics(ref)[:killed_at - 1]
        assert RunDir(out / f"runs/ppo/CartPole-v1/seed_{seed}").read_status()["state"] == \
            "complete"


def _start_long_study(tmp_path, seeds: int = 2):
    """A CLI study of ``seeds`` long CartPole runs, one batch each, on two workers, in its
    own session, once the first two are running: (process, their run dirs)."""
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(f'name="long"\nenvs=["CartPole-v1"]\nseeds={seeds}\n'
                         'total_steps=2560000\n'
                         'set={steps_per_iter=256, minibatches=4, epochs=2}\n'
                         '[[configs]]\nlabel="ppo"\npreset="ppo"\n')
    cmd = [sys.executable, "-m", "pgscope.cli", "study", "run", str(spec_file), "--out",
           str(tmp_path / "study"), "--quiet", "--workers", "2", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    runs = [RunDir(tmp_path / f"study/runs/ppo/CartPole-v1/seed_{s}") for s in (0, 1)]
    deadline = time.time() + 120
    while time.time() < deadline and not all(
            r.path.exists() and len(r.read_metrics()) >= 2 for r in runs):
        time.sleep(0.05)
    return proc, runs


def _wait_until_interrupted(runs, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not all(
            r.read_status().get("state") == "interrupted" for r in runs):
        time.sleep(0.1)
    assert [r.read_status()["state"] for r in runs] == ["interrupted"] * 2
    written = [len(r.read_metrics()) for r in runs]
    time.sleep(1.5)  # nothing trains them any more
    assert [len(r.read_metrics()) for r in runs] == written < [10_000] * 2


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_workers_stop_with_the_driver(tmp_path, how):
    """SIGTERM (the CLI's interruption) or kill -9 of the driver alone: its local workers
    end their runs as 'interrupted' within seconds (not when the runs finish, an hour
    later), releasing the runs for a resume, and start none of the batches still queued
    (four one-seed batches on two workers: seeds 2 and 3 wait; the pool had already
    queued one of them where shutdown cannot cancel it). After SIGTERM no process of the
    study is left."""
    proc, runs = _start_long_study(tmp_path, seeds=4)
    try:
        os.kill(proc.pid, getattr(signal, how))
        if how == "SIGTERM":
            assert proc.wait(timeout=60) != 0
        _wait_until_interrupted(runs, 30)
        waiting = [tmp_path / f"study/runs/ppo/CartPole-v1/seed_{s}" for s in (2, 3)]
        time.sleep(3)  # a worker that took a queued batch would have started it by now
        assert not any((w / "metrics.jsonl").exists() for w in waiting)
        if how == "SIGTERM":
            deadline = time.time() + 30
            while time.time() < deadline and _group_alive(proc.pid):
                time.sleep(0.2)
            assert not _group_alive(proc.pid), "a worker outlived the stopped study"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the study
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _die_once_spec(tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv("PGSCOPE_TEST_DIE_MARKER", str(marker))
    spec = parse_spec(dict(name="die", envs=["helper_envs:helper_envs/DieOnce-v0"], seeds=2,
                           total_steps=1536, set=dict(FAST),
                           configs=[dict(label="ppo", preset="ppo")]))
    return spec, marker


def test_local_worker_that_dies_is_retried_from_its_checkpoint(tmp_path, monkeypatch):
    spec, marker = _die_once_spec(tmp_path, monkeypatch)
    outcome = run_study(spec, tmp_path / "study", workers=2, progress=False)
    assert marker.exists()  # a worker really was killed
    assert len(outcome.complete) == 2 and not outcome.failed
    for r in spec.runs():
        got = [m["iteration"] for m in RunDir(tmp_path / "study" / r.rel_path).read_metrics()]
        assert got == list(range(1, 7))


@pytest.mark.xdist_group("ray")  # `make test` runs two workers: one Ray at a time
def test_ray_backend_runs_the_study_and_retries_a_dead_worker(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    spec, marker = _die_once_spec(tmp_path, monkeypatch)
    tests_dir = str(Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PGSCOPE_TEST_DIE_MARKER": str(marker),
                                       "PYTHONPATH": tests_dir}})
    try:
        outcome = run_study(spec, tmp_path / "study", backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert marker.exists()
    assert len(outcome.complete) == 2 and not outcome.failed, outcome
    ref = run_study(spec, tmp_path / "local", workers=1, progress=False)  # marker exists now
    assert len(ref.complete) == 2
    same = 0
    for r in spec.runs():
        got = _metrics(tmp_path / "study" / r.rel_path)
        assert [m["iteration"] for m in got] == list(range(1, 7))  # each exactly once
        same += got == _metrics(tmp_path / "local" / r.rel_path)
    # both equal the uninterrupted runs: the killed one resumed exactly (its CartPole state
    # is checkpointed), the other is unchanged by Ray
    assert same == 2


# --- analysis on a study with hand-written metrics ----------------------------------------
def _fake_study(tmp_path, returns, states=None, **extra):
    """A study whose runs' metrics are written by hand: returns[label][seed] = per-iteration
    mean returns (4 iterations each)."""
    spec = parse_spec(_spec(total_steps=1024, seeds=len(returns["ppo"]), **extra))
    out = tmp_path / "fake"
    prepare_study_dir(out, spec)
    for r in spec.runs():
        run, _lock = RunDir.create(out / r.rel_path, r.config)
        series = returns[r.label][r.seed]
        for i, ret in enumerate(series):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1), return_mean=ret))
        state = (states or {}).get((r.label, r.seed), "complete")
        if state != "partial":
            run.write_status(state)
    return spec, out


def test_final_scores_follow_the_recorded_definition(tmp_path):
    returns = {"ppo": [[1, 2, 3, 4], [1, 2, None, 6], [0, 0, 10, 20]],
               "small": [[5, 5, 5, 5], [1, 1, 1, 1], [2, 2]]}
    spec, out = _fake_study(tmp_path, returns, states={("small", 2): "partial"},
                            score=dict(last_iterations=2))
    df = load_study(out)
    assert list(df.columns[:5]) == ["label", "env", "seed", "preset", "state"]
    assert len(df) == 4 * 5 + 2  # one row per run and iteration
    s = final_scores(spec, df).set_index(["label", "seed"])["score"]
    assert s[("ppo", 0)] == 3.5 and s[("ppo", 1)] == 6.0 and s[("ppo", 2)] == 15.0
    assert s[("small", 0)] == 5.0 and np.isnan(s[("small", 2)])  # unfinished: no score
    spec_frac = parse_spec(_spec(total_steps=1024, seeds=3, score=dict(last_fraction=0.5)))
    assert final_scores(spec_frac, df).set_index(["label", "seed"])["score"][("ppo", 0)] == 3.5
    spec_last = parse_spec(_spec(total_steps=1024, seeds=3, score=dict(last_fraction=0.25)))
    assert final_scores(spec_last, df).set_index(["label", "seed"])["score"][("ppo", 2)] == 20


def test_summary_tables_equal_the_statistics_on_the_scores(tmp_path):
    rng = np.random.default_rng(0)
    ppo = rng.normal(100, 20, 6)
    small = rng.normal(80, 30, 6)
    returns = {"ppo": [[0, 0, 0, v] for v in ppo], "small": [[0, 0, 0, v] for v in small]}
    returns["small"][5] = [0, 0, 0, float("nan")]
    spec, out = _fake_study(tmp_path, returns, states={("small", 5): "diverged"},
                            score=dict(last_iterations=1,
                                       failure_threshold={"CartPole-v1": 90.0}),
                            statistics=dict(reps=1000, seed=4, lottery_splits=50))
    res = summarize(out)
    agg = res["tables"]["aggregates"].set_index("label")
    assert agg.loc["ppo", "iqm"] == pytest.approx(stats.iqm(ppo))
    lo_hi = stats.stratified_bootstrap_ci(ppo, stats.iqm, reps=1000, seed=4)[1:]
    assert (agg.loc["ppo", "iqm_low"], agg.loc["ppo", "iqm_high"]) == pytest.approx(lo_hi)
    assert agg.loc["small", "n_complete"] == 5 and agg.loc["small", "n_diverged"] == 1
    assert agg.loc["small", "n"] == 6 and agg.loc["small", "n_missing"] == 0
    assert agg.loc["small", "mean"] == pytest.approx(np.mean(small[:5]))  # complete runs
    # the diverged run counts as a failure, next to the runs below the threshold
    k = int(np.sum(small[:5] < 90)) + 1
    assert agg.loc["small", "failure_rate"] == pytest.approx(k / 6)
    comp = res["tables"]["comparisons"].iloc[0]
    assert (comp["a"], comp["b"]) == ("small", "ppo")
    # Welch's t on the complete runs; rank statistics with the diverged run as -inf
    t = sps.ttest_ind(small[:5], ppo, equal_var=False)
    assert (comp["welch_t"], comp["welch_p"]) == pytest.approx((t.statistic, t.pvalue))
    u = sps.mannwhitneyu(np.append(small[:5], -np.inf), ppo)
    assert comp["mannwhitney_p"] == pytest.approx(u.pvalue)
    assert comp["prob_improvement"] == pytest.approx(u.statistic / 36)
    assert (comp["n_complete_a"], comp["n_diverged_a"], comp["n_b"]) == (5, 1, 6)
    assert agg.loc["ppo", "seeds_needed"] == stats.seeds_needed(
        float(np.std(ppo, ddof=1)), 0.1 * float(np.mean(ppo)))
    lot = res["tables"]["lottery"].set_index("label")
    assert lot.loc["ppo", "splits"] == 10  # C(6, 3) / 2
    expected = stats.seed_lottery(ppo, splits=50, seed=4)
    assert lot.loc["ppo", "fraction_significant"] == expected["fraction_significant"]
    assert lot.loc["ppo", "worst_split_seeds"] == expected["worst_split"]  # seeds 0..5
    groups = res["tables"]["lottery_curves"].query("label == 'ppo'")["group"].unique()
    assert len(groups) == 2 and all(g.startswith("group ") for g in groups)


def test_main_effects_pool_over_the_other_factors(tmp_path):
    spec = parse_spec(_spec(total_steps=1024, seeds=2, configs=[], factorial=dict(
        base="ppo", factors=dict(value_clip=[True, False], lr_anneal=[True, False])),
        score=dict(last_iterations=1)))
    out = tmp_path / "fact"
    prepare_study_dir(out, spec)
    score = {"ppo+vc+la": [10, 12], "ppo+vc-la": [11, 13], "ppo-vc+la": [1, 2],
             "ppo-vc-la": [3, 4]}
    for r in spec.runs():
        run, _lock = RunDir.create(out / r.rel_path, r.config)
        for i in range(4):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1),
                                    return_mean=float(score[r.label][r.seed])))
        run.write_status("complete")
    eff = summarize(out)["tables"]["main_effects"].set_index("factor")
    assert not eff.loc["value_clip", "level"] and eff.loc["value_clip", "reference"]
    assert eff.loc["value_clip", "difference"] == pytest.approx(2.5 - 11.5)
    assert eff.loc["lr_anneal", "difference"] == pytest.approx(7.75 - 6.25)
    assert eff.loc["value_clip", "prob_improvement"] == 0.0


def test_summary_command_writes_tables_and_plots(tmp_path, capsys):
    returns = {"ppo": [[1, 2, 3, 4 + s] for s in range(4)],
               "small": [[1, 1, 2, 2 + s] for s in range(4)]}
    _, out = _fake_study(tmp_path, returns)
    assert main(["study", "summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert "IQM" in text and "small vs ppo" in text and "mean of the per-iteration" in text
    names = {p.name for p in (out / "summary").iterdir()}
    assert {"scores.csv", "aggregates.csv", "comparisons.csv", "curves.csv", "profiles.csv",
            "summary.json", "curves.png", "intervals.png", "profiles.png",
            "improvement.png"} <= names
    data = json.loads((out / "summary" / "summary.json").read_text())
    assert data["score"]["last_fraction"] == 0.1
    assert data["tables"]["aggregates"][0]["n_complete"] == 4
    curves = pd.read_csv(out / "summary" / "curves.csv")
    first = curves[curves["label"] == "ppo"].iloc[-1]
    assert first["mean"] == pytest.approx(np.mean([4, 5, 6, 7]))


def test_write_summary_on_a_study_with_nothing_finished(tmp_path):
    spec = parse_spec(_spec())
    prepare_study_dir(tmp_path / "s", spec)
    res = write_summary(tmp_path / "s")
    assert res["meta"]["complete"] == 0 and len(res["meta"]["missing"]) == 4


def test_a_key_typo_inside_a_study_config_names_the_config():
    data = dict(name="x", envs=["Pendulum-v1"], seeds=1, total_steps=512,
                configs=[dict(label="fine", preset="ppo"),
                         dict(label="typo", preset="trpo", set={"polcy_lr": 1e-3})])
    with pytest.raises(ConfigError, match="config 'typo' \\(preset trpo, env Pendulum-v1\\): "
                                          "unknown config key 'polcy_lr'. Did you mean "
                                          "policy_lr"):
        parse_spec(data)
