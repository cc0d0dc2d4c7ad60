"""pgscope doctor: every alarm fires on a run crafted to trigger it and stays silent on the
same setting without the fault; the CLI's exit status, JSON and study table.

Crafted runs are real (tiny) training runs. Where no config can produce a fault, the
fault is planted by monkeypatching (named in CRAFTED: the wrong-sign entropy bonus, a
wrong-sign k3 estimator, stale log-probabilities, a growing per-iteration delay, an
advantage sign flip after progress); the two probe alarms read synthetic probe results
written into a real run. The false-positive check on healthy Pendulum and Hopper runs is
the bench ``bench/doctor_health.py`` (results in docs/doctor.md).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path

import pytest
import torch

import helper_envs  # noqa: F401 - registers helper_envs/NanAfter-v0
import pgscope.algos.ppo as ppo_mod
from pgscope import make_config, train
from pgscope.cli import main
from pgscope.doctor import ALARMS, RunData, check, diagnose, streaks
from pgscope.errors import DivergenceError

train_mod = importlib.import_module("pgscope.train")  # the package exports train() itself
TINY = dict(steps_per_iter=256, minibatches=4, epochs=4, hidden=(32,), checkpoint_every=1000)


def _iters(n: int, steps: int = 256) -> dict:
    return {"total_steps": n * steps, "steps_per_iter": steps}


# --- the faults that no config can produce (planted with monkeypatch) --------------------
def _wrong_sign_entropy(mp: pytest.MonkeyPatch) -> None:
    """ent_coef < 0 is refused by config validation: flip the bonus's sign instead."""
    mp.setattr(ppo_mod, "entropy_bonus", lambda entropy, coef: -coef * entropy.mean(-1))


def _wrap_update(mp: pytest.MonkeyPatch, wrapper) -> None:
    """Route PPO's update through ``wrapper(original_update, *args, **kwargs)``: in the
    algorithm registry when there is one, else in the training loop's table."""
    try:
        from pgscope.algos import algorithm
    except ImportError:  # before the algorithm registry
        original = train_mod.UPDATES["ppo"]
        mp.setitem(train_mod.UPDATES, "ppo", lambda *a, **k: wrapper(original, *a, **k))
        return
    algo = algorithm("ppo")
    original = algo.update
    mp.setattr(algo, "update", lambda *a, **k: wrapper(original, *a, **k))


def _wrong_sign_k3(mp: pytest.MonkeyPatch) -> None:
    """A k3 estimator written as log r - (r - 1): the negative of the right one."""
    def wrapper(update, *args, **kwargs):
        return [dict(m, approx_kl=-m["approx_kl"]) for m in update(*args, **kwargs)]
    _wrap_update(mp, wrapper)


def _stale_logp(mp: pytest.MonkeyPatch) -> None:
    """Log-probabilities that do not belong to the data-collecting policy."""
    collect = train_mod.collect_lockstep

    def stale(*args):
        out = collect(*args)
        for batch, _ in out:
            batch.logp = batch.logp + 0.05
        return out
    mp.setattr(train_mod, "collect_lockstep", stale)


def _growing_delay(mp: pytest.MonkeyPatch) -> None:
    """A leak: every rollout takes 0.1 s more CPU than the one before. The delay is added
    to both clocks the training loop reads, wall and process CPU time (no real work, so
    the test stays fast)."""
    collect, wall, cpu = train_mod.collect_lockstep, time.perf_counter, time.process_time
    lag, calls = [0.0], [0]

    def slow(*args):
        calls[0] += 1
        lag[0] += 0.1 * calls[0]
        return collect(*args)
    mp.setattr(train_mod, "collect_lockstep", slow)
    mp.setattr(time, "perf_counter", lambda: wall() + lag[0])
    mp.setattr(time, "process_time", lambda: cpu() + lag[0])


def _advantage_flip_after(n: int):
    """From update ``n + 1`` on, the advantages' sign is flipped (a sign bug that appears
    mid-run, e.g. after a refactor behind a schedule): the policy unlearns."""
    def patch(mp: pytest.MonkeyPatch) -> None:
        calls = [0]

        def wrapper(update, cfg, nets, batches, *args, **kwargs):
            calls[0] += 1
            if calls[0] > n:
                for batch in batches:
                    batch.advantages = -batch.advantages
            return update(cfg, nets, batches, *args, **kwargs)
        _wrap_update(mp, wrapper)
    return patch


def _dead_critic(mp: pytest.MonkeyPatch) -> None:
    """A value net whose first layer is all zeros (with value_lr 1e-12 it stays so): its
    features are the same for every state, so it predicts one number for all of them."""
    build = train_mod.build_agent

    def dead(*args, **kwargs):
        agent = build(*args, **kwargs)
        with torch.no_grad():
            agent.value_net.net[0].weight.zero_()
        return agent
    mp.setattr(train_mod, "build_agent", dead)


PEND, CART, BANDIT = "Pendulum-v1", "CartPole-v1", "pgscope/ActionReward-v0"
#: name -> (preset, env, overrides, planted fault or None, what it is)
CRAFTED = {
    "healthy-pendulum": ("ppo", PEND, {**_iters(20), "value_lr": 3e-3}, None,
                         "ppo preset (tiny), value_lr 3e-3 so the value net learns in 20 "
                         "iterations"),
    "short-pendulum": ("ppo", PEND, _iters(4), None, "ppo preset, 4 tiny iterations"),
    "healthy-cartpole": ("ppo", CART, _iters(40), None, "ppo preset (tiny)"),
    "healthy-bandit": ("ppo", BANDIT, {**_iters(40, 128), "policy_lr": 3e-3}, None,
                       "ppo preset, lr 3e-3"),
    "high-lr": ("ppo-noclip", PEND, {**_iters(12), "policy_lr": 0.05, "epochs": 10}, None,
                "too high lr: ppo-noclip, policy_lr 0.05, 10 epochs"),
    "wrong-k3": ("ppo", PEND, _iters(6), _wrong_sign_k3, "k3 estimator with the wrong sign "
                 "(monkeypatched)"),
    "stale-logp": ("ppo", PEND, _iters(6), _stale_logp, "stored log-probabilities + 0.05 "
                   "(monkeypatched)"),
    "entropy-down-discrete": ("ppo", CART, {**_iters(40), "ent_coef": 1.0, "policy_lr": 0.01},
                              _wrong_sign_entropy, "wrong-sign entropy bonus, ent_coef 1, "
                              "lr 0.01 (monkeypatched sign)"),
    "zero-policy-lr": ("ppo", CART, {**_iters(16), "policy_lr": 1e-12}, None,
                       "policy_lr 1e-12 (0 is refused)"),
    "entropy-down-gaussian": ("ppo", PEND, {**_iters(10), "ent_coef": 1.0, "policy_lr": 0.05},
                              _wrong_sign_entropy, "wrong-sign entropy bonus, ent_coef 1, "
                              "lr 0.05 (monkeypatched sign)"),
    "zero-value-lr": ("ppo", PEND, {**_iters(20), "value_lr": 1e-12}, None,
                      "value_lr 1e-12 (0 is refused)"),
    "big-rewards": ("ppo", PEND, {**_iters(8), "reward_scale": False, "reward_clip": False,
                                  "reward_multiplier": 10.0}, None,
                    "no reward scaling/clipping, rewards x 10"),
    "huge-std": ("ppo", PEND, {**_iters(8), "init_log_std": 3.0}, None,
                 "huge initial std: init_log_std 3 (std 20, bounds +-2)"),
    "collapse": ("ppo", BANDIT, {**_iters(40, 128), "policy_lr": 3e-3},
                 _advantage_flip_after(8), "advantage sign flipped after 8 iterations "
                 "(monkeypatched)"),
    "nan-env": ("ppo", "helper_envs/NanAfter-v0", _iters(6), None,
                "env returns NaN observations after 300 steps"),
    "dead-critic": ("ppo", PEND, {**_iters(20), "value_lr": 1e-12}, _dead_critic,
                    "value net's first layer zeroed, value_lr 1e-12 (monkeypatched)"),
    "slowing": ("ppo", PEND, {**_iters(24, 128)}, _growing_delay,
                "each rollout 0.1 s slower than the last (monkeypatched clock)"),
}

#: alarm -> the crafted run that must fire it, and the healthy control that must not.
DETECTION = {
    "kl-above-target": ("high-lr", "healthy-pendulum"),
    "kl-extreme": ("high-lr", "healthy-pendulum"),
    "clip-fraction-high": ("high-lr", "healthy-pendulum"),
    "negative-kl": ("wrong-k3", "healthy-pendulum"),
    "ratio-not-one": ("stale-logp", "healthy-pendulum"),
    "entropy-collapse": ("entropy-down-discrete", "healthy-cartpole"),
    "entropy-at-max": ("zero-policy-lr", "healthy-cartpole"),
    "std-collapse": ("entropy-down-gaussian", "healthy-pendulum"),
    "explained-variance-negative": ("zero-value-lr", "healthy-pendulum"),
    "values-out-of-scale": ("big-rewards", "healthy-pendulum"),
    "actions-saturated": ("huge-std", "healthy-pendulum"),
    "return-collapse": ("collapse", "healthy-bandit"),
    "non-finite": ("nan-env", "healthy-pendulum"),
    "sps-decay": ("slowing", "healthy-pendulum"),
    "dead-critic": ("dead-critic", "healthy-pendulum"),
    "no-learning": ("zero-policy-lr", "healthy-bandit"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Crafted runs by name, trained on first use."""
    root = tmp_path_factory.mktemp("doctor")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            preset, env, overrides, fault, _ = CRAFTED[name]
            cfg = make_config(preset, env, {**TINY, "seed": 0, **overrides})
            with pytest.MonkeyPatch.context() as mp:
                if fault is not None:
                    fault(mp)
                try:
                    train(cfg, root / name, progress=False)
                except DivergenceError:
                    pass  # recorded in status.json: what the doctor must find
            done[name] = root / name
        return done[name]
    return get


def _fired(path: Path) -> set[str]:
    return {f.alarm for f in diagnose(path)}


def test_every_alarm_has_a_crafted_run_or_a_synthetic_test():
    synthetic = {"probe-value-error", "probe-baseline-worse", "feature-coadaptation"}
    assert set(DETECTION) | synthetic == {a.name for a in ALARMS}
    for a in ALARMS:
        assert a.threshold and a.source and a.sign and a.severity in ("bug", "warning")


@pytest.mark.parametrize("alarm", sorted(DETECTION))
def test_alarm_fires_on_its_crafted_run_and_not_on_the_control(runs, alarm):
    crafted, control = DETECTION[alarm]
    findings = [f for f in diagnose(runs(crafted)) if f.alarm == alarm]
    assert findings, f"{alarm} did not fire on {crafted}: {_fired(runs(crafted))}"
    f = findings[0]
    assert f.evidence and f.threshold and f.source
    assert all(a <= b for a, b in f.ranges)
    assert alarm not in _fired(runs(control)), f"{alarm} fired on the healthy {control}"


def test_healthy_controls_fire_no_bug_alarm(runs):
    for name in ("healthy-pendulum", "healthy-cartpole", "healthy-bandit"):
        bugs = [f.alarm for f in diagnose(runs(name)) if f.severity == "bug"]
        assert not bugs, (name, bugs)


def test_finding_reports_the_iteration_range_and_the_numbers(runs):
    f = next(f for f in diagnose(runs("huge-std")) if f.alarm == "actions-saturated")
    records = RunData.load(runs("huge-std")).records
    sat = [r["action_saturation"] for r in records]
    assert f.ranges[0][0] == records[0]["iteration"]  # saturated from the start
    assert f.values["worst"] == pytest.approx(max(sat[f.ranges[0][0] - 1:f.ranges[0][1]]))
    assert f"{f.values['worst']:.3g}" in f.evidence
    assert min(sat) > 0.8  # std 20 against bounds +-2: ~92% of the samples are outside


def test_action_saturation_counts_components_outside_the_bounds():
    import numpy as np

    from pgscope.rollout import action_saturation

    low, high = np.array([-1.0, -2.0]), np.array([1.0, 2.0])
    actions = np.array([[[0.0, 2.5]], [[-1.5, 0.0]], [[1.0, -2.0]], [[3.0, -3.0]]])
    assert action_saturation(actions, low, high) == pytest.approx(4 / 8)  # bounds are inside
    assert math.isnan(action_saturation(np.zeros((2, 1), dtype=int), None, None))


def _write_probe(run: Path, kind: str, result: dict) -> None:
    folder = run / "probes" / "iter_000004"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.json").write_text(json.dumps({**result, "checkpoint": {"iteration": 4}}))


def _ci(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci_low": low, "ci_high": high}


def test_probe_alarms_read_probe_results(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs("healthy-pendulum"), run)
    assert not {"probe-value-error", "probe-baseline-worse"} & _fired(run)
    _write_probe(run, "values", {"vs_true_returns": {"relative_error": _ci(0.3, 0.2, 0.4)}})
    _write_probe(run, "baselines", {"rows": [{"n": 100, "agent": {"covariance_trace":
                                              _ci(1.0, 0.8, 1.2)}, "zero": {
                                              "covariance_trace": _ci(2.0, 1.5, 2.5)}}]})
    assert not {"probe-value-error", "probe-baseline-worse"} & _fired(run)  # healthy values
    _write_probe(run, "values", {"vs_true_returns": {"relative_error": _ci(3.0, 2.0, 4.0)}})
    _write_probe(run, "baselines", {"rows": [{"n": 100, "agent": {"covariance_trace":
                                              _ci(5.0, 4.0, 6.0)}, "zero": {
                                              "covariance_trace": _ci(2.0, 1.5, 2.5)}}]})
    found = {f.alarm: f for f in diagnose(run)}
    assert {"probe-value-error", "probe-baseline-worse"} <= set(found)
    assert found["probe-value-error"].ranges == [(4, 4)]


def _synthetic(**series) -> RunData:
    n = len(next(iter(series.values())))
    records = [{"iteration": i + 1, **{k: v[i] for k, v in series.items()}} for i in range(n)]
    return RunData(records, {"algo": "ppo", "target_kl": 0.01})


def test_persistence_needs_a_full_window():
    # four iterations above the bound, one below, four above: never 5 in a row
    kl = [0.05] * 4 + [0.001] + [0.05] * 4
    assert not [f for f in check(_synthetic(kl_mean=kl)) if f.alarm == "kl-above-target"]
    kl = [0.001] * 3 + [0.05] * 5 + [0.001]
    f = next(f for f in check(_synthetic(kl_mean=kl)) if f.alarm == "kl-above-target")
    assert f.ranges == [(4, 8)]
    assert streaks([True, True, False, True, True, True], 2) == [(0, 1), (3, 5)]


def test_null_values_of_never_null_keys_are_non_finite():
    records = [{"iteration": 1, "value_loss": 0.5, "return_mean": None},
               {"iteration": 2, "value_loss": None, "return_mean": None}]
    found = [f for f in check(RunData(records)) if f.alarm == "non-finite"]
    assert len(found) == 1 and found[0].ranges == [(2, 2)]
    assert "value_loss" in found[0].evidence and "return_mean" not in found[0].evidence


def test_cli_exit_status_json_and_study_table(runs, tmp_path, capsys):
    healthy, sick = runs("healthy-pendulum"), runs("huge-std")
    assert main(["doctor", str(sick), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    alarms = {f["alarm"] for f in out["findings"]}
    assert "actions-saturated" in alarms
    f = next(f for f in out["findings"] if f["alarm"] == "actions-saturated")
    assert {"threshold", "source", "ranges", "evidence", "values"} <= set(f)
    assert main(["doctor", str(sick)]) == 1
    text = capsys.readouterr().out
    assert "actions-saturated" in text and "source:" in text and "iterations:" in text
    assert main(["doctor", str(runs("short-pendulum"))]) == 0  # too short for any window
    assert "healthy" in capsys.readouterr().out
    assert main(["doctor", str(healthy)]) == 1  # the tiny run does not learn in 20 iterations
    assert "no-learning" in capsys.readouterr().out

    # a study: one line per run with what it fired
    from pgscope.study import load_spec

    spec_file = tmp_path / "s.toml"
    spec_file.write_text(
        'name = "doc"\nenvs = ["Pendulum-v1"]\nseeds = [0]\ntotal_steps = 512\n'
        'set = { steps_per_iter = 256, minibatches = 4, epochs = 2, hidden = [16] }\n'
        '[[configs]]\nlabel = "fine"\npreset = "ppo"\n'
        '[[configs]]\nlabel = "wide"\npreset = "ppo"\ninit_log_std = 1.0\n')
    spec = load_spec(spec_file)
    from pgscope.study import run_study

    study = tmp_path / "study"
    run_study(spec, study, workers=1, progress=False)
    assert main(["doctor", str(study)]) == 0  # two iterations: too short for any window
    capsys.readouterr()
    # plant a fault into one run's metrics: a negative KL on its second line
    wide = study / spec.runs()[1].rel_path / "metrics.jsonl"
    lines = [json.loads(x) for x in wide.read_text().splitlines()]
    lines[1]["approx_kl"] = -0.5
    wide.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["doctor", str(study)]) == 1
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "wide" in line)
    assert "negative-kl" in row
    assert "negative-kl" not in next(line for line in table.splitlines() if "fine" in line)
    assert main(["doctor", str(study), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["fine", "wide"]
    assert [f["alarm"] for f in rows[1]["findings"]] == ["negative-kl"]


def test_kl_target_is_the_one_the_run_uses():
    records = [{"iteration": i + 1, "kl_mean": 0.03} for i in range(6)]

    def fired(config):
        return "kl-above-target" in {f.alarm for f in check(RunData(records, config))}
    assert not fired({"algo": "ppo", "ppo_loss": "clip", "target_kl": 0.01})  # bar 0.04
    assert fired({"algo": "ppo", "ppo_loss": "clip", "kl_stop": True, "target_kl": 0.01})
    assert fired({"algo": "ppo", "ppo_loss": "kl", "target_kl": 0.01})
    assert fired({"algo": "trpo", "max_kl": 0.01})
    assert not fired({"algo": "trpo", "max_kl": 0.13})
    # an annealed limit (trpo+-paper-files: 0.04 -> 0.07) is judged against its larger end
    records[:] = [{"iteration": i + 1, "kl_mean": 0.1} for i in range(6)]
    assert not fired({"algo": "trpo", "max_kl": 0.04, "max_kl_final": 0.07})
    assert fired({"algo": "trpo", "max_kl": 0.04, "max_kl_final": 0.0})


@pytest.mark.parametrize("preset, overrides", [
    ("ppo", {}), ("ppo", {"kl_stop": True, "target_kl": 0.005}), ("ppo-kl", {}),
    ("trpo", {}), ("trpo+-paper-files", {}), ("a2c", {}), ("ppo-m", {})])
def test_the_report_draws_the_kl_line_where_the_doctor_fires(preset, overrides):
    """One KL target per algorithm (pgscope.algos.kl_target): the report's dashed line on
    the KL panel sits at the doctor's kl-above-target threshold, 2 x the target (it used
    to sit at 2 x target_kl = 0.02 for clipped PPO while the doctor fired at 0.04)."""
    from pgscope.algos import kl_target
    from pgscope.report.run_page import kl_alarm_line

    config = make_config(preset, "Hopper-v5", overrides).to_dict()
    target, _ = RunData([], config).kl_target()
    assert kl_alarm_line(config) == 2 * target == 2 * kl_target(config)[0]
    records = [{"iteration": i + 1, "kl_mean": 1.01 * target * 2} for i in range(6)]
    assert "kl-above-target" in {f.alarm for f in check(RunData(records, config))}
    records = [{"iteration": i + 1, "kl_mean": 0.99 * target * 2} for i in range(6)]
    assert "kl-above-target" not in {f.alarm for f in check(RunData(records, config))}
    if preset == "ppo" and not overrides:
        assert kl_alarm_line(config) == 0.04


def test_the_readme_counts_the_checks_there_are():
    """The README said 17 checks while the CLI and the report counted 18."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    counts = [int(n) for n in re.findall(r"\*\*doctor\*\* runs (\d+) named checks", readme)]
    assert counts == [len(ALARMS)]


def test_sps_decay_judges_cpu_time_not_a_busy_machine():
    """A healthy run on a machine that gets busy: wall-clock sps halves (4,688 -> 2,276
    steps/s was seen) while the CPU seconds per iteration hold: no sps-decay. The same run
    whose CPU seconds grow (a leak) fires it; a run without cpu_s (written before it was
    logged) is judged on its wall-clock sps as before."""
    n, steps = 40, 2048
    busy = [{"iteration": i + 1, "env_steps": steps * (i + 1), "cpu_s": 0.45,
             "sps": 4688.0 if i < n // 2 else 2276.0} for i in range(n)]
    assert "sps-decay" not in {f.alarm for f in check(RunData(busy, {}))}
    leak = [dict(r, cpu_s=0.45 * (1 + 3 * i / n)) for i, r in enumerate(busy)]
    assert "sps-decay" in {f.alarm for f in check(RunData(leak, {}))}
    old = [{k: v for k, v in r.items() if k != "cpu_s"} for r in busy]
    old = [dict(r, sps=4688.0 / (1 + 3 * i / n)) for i, r in enumerate(old)]
    assert "sps-decay" in {f.alarm for f in check(RunData(old, {}))}
