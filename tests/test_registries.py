"""The registries (pgscope.algos, pgscope.probes, pgscope.sinks) are the one place that
knows each algorithm and probe: nothing else branches on a name, presets and metric keys
come from the algorithms, a new algorithm registered from outside the package trains
without any other change; and the identity of a run (its config hash) covers what
changes training, never what only observes it."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from pgscope import make_config, train
from pgscope.algos import ALGORITHMS, Algorithm, algorithm, presets, register_algorithm
from pgscope.algos.ppo import LOGS as PPO_LOGS
from pgscope.algos.ppo import ppo_update
from pgscope.algos.ppo import surrogate as ppo_surrogate
from pgscope.config import OBSERVER_KEYS, PRESETS, Config, config_hash
from pgscope.errors import ConfigError, RunDirError
from pgscope.metrics import REGISTRY, metrics_for
from pgscope.probes import probe_names, probes
from pgscope.registry import Registry, UnknownNameError
from pgscope.run import RunDir, checkpoint_identity, load_agent, run_identity
from pgscope.sinks import SINKS

SRC = Path(__file__).resolve().parents[1] / "src" / "pgscope"
TINY = dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=(8,), total_steps=128)


# --- no branch on an algorithm's or a probe's name outside its own module ----------------------
BRANCH = re.compile(r"""(\.algo|\balgo|\bkind|\bname)\s*[!=]=\s*["'](ppo|trpo|a2c|gradients|"""
                    r"""values|baselines|landscape|trust-region|features)["']""")


def test_no_branch_on_an_algorithm_or_probe_name_outside_its_module():
    """Not even the HTML report: each probe's reading and table are its own (``reading``
    and ``table`` of :class:`pgscope.probes.Probe`)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if BRANCH.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_branch_detector_sees_a_branch():
    assert BRANCH.search('    if cfg.algo == "ppo":')
    assert BRANCH.search("clips = cfg.algo == 'trpo' and x")
    assert BRANCH.search('        if kind == "gradients":')
    assert not BRANCH.search('    update = algorithm(cfg.algo).update')


# --- the algorithm registry ----------------------------------------------------------------
def test_presets_and_algo_values_come_from_the_algorithms():
    assert set(PRESETS) == set(presets())
    for name, values in PRESETS.items():
        assert values["algo"] in ALGORITHMS, name
        assert name in algorithm(values["algo"]).presets
    cfg = make_config("trpo+", "Hopper-v5")
    assert cfg.algo == "trpo" and cfg.obs_norm
    with pytest.raises(ConfigError, match="'algo' must be one of"):
        make_config("ppo", "Hopper-v5", {"algo": "sac"})


def test_metric_keys_an_algorithm_logs_are_registered_metrics():
    for algo in ALGORITHMS.values():
        assert set(algo.logs) <= set(REGISTRY), algo.name
        logged = {m.name for m in metrics_for(algo.name)}
        assert set(algo.logs) <= logged
        assert {m.name for m in REGISTRY.values() if m.every_algorithm} <= logged
    assert "trpo" not in REGISTRY["clip_fraction"].algorithms
    assert set(REGISTRY["iteration"].algorithms) == set(ALGORITHMS)
    with pytest.raises(ValueError, match="metric registry does not define"):
        register_algorithm(replace(algorithm("ppo"), name="x", presets={}, logs=("nope",)))
    with pytest.raises(ValueError, match="already belong"):
        register_algorithm(replace(algorithm("ppo"), name="x"))
    assert "x" not in ALGORITHMS


def test_registry_errors_name_close_matches():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 2)
    with pytest.raises(UnknownNameError, match="unknown thing 'alpa'. Did you mean alpha"):
        reg.get("alpa")
    assert reg.names() == ("alpha",) and "alpha" in reg and len(reg) == 1


@pytest.fixture
def toy_algorithm():
    """A new algorithm registered from outside pgscope.algos: PPO's update with one
    epoch, under its own name and preset."""

    def update(cfg, *args, **kwargs):
        return ppo_update(replace(cfg, epochs=1), *args, **kwargs)

    algo = register_algorithm(Algorithm(
        name="toy", description="PPO with one epoch", update=update, surrogate=ppo_surrogate,
        presets={"toy": dict(ppo_loss="clip")}, logs=PPO_LOGS))
    yield algo
    ALGORITHMS.unregister("toy")


def test_a_new_algorithm_trains_through_the_registry_alone(tmp_path, toy_algorithm):
    assert "toy" in PRESETS and "toy" in REGISTRY["policy_loss"].algorithms
    cfg = make_config("toy", "CartPole-v1", dict(TINY, epochs=5))
    assert cfg.algo == "toy"
    run = train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epochs_run"] for r in lines] == [1, 1]  # the toy's own update ran
    assert set(lines[-1]) == {m.name for m in metrics_for("toy", discrete=True,
                                                          ppo_loss="clip", heldout=True,
                                                          evaluation=False)}
    assert load_agent(run).config.algo == "toy"


def test_a_plug_in_registers_its_own_metric_and_logs_it(tmp_path):
    """register_metric: a plug-in algorithm's new key, defined before the algorithm that
    logs it; the run logs it and the registry says who logs it. Bad definitions are
    refused."""
    from pgscope.metrics import GROUPS, Metric, register_metric

    metric = register_metric(Metric("toy_updates", "Updates the toy algorithm has done.",
                                    "count", GROUPS[1]))

    def update(cfg, nets, batches, generators, states, *args, **kwargs):
        out = ppo_update(cfg, nets, batches, generators, states, *args, **kwargs)
        for state, metrics in zip(states, out, strict=True):
            state["toy_updates"] = state.get("toy_updates", 0) + 1
            metrics["toy_updates"] = state["toy_updates"]
        return out

    register_algorithm(Algorithm(
        name="toy2", description="PPO counting its updates", update=update,
        surrogate=ppo_surrogate, presets={"toy2": dict(ppo_loss="clip")},
        logs=(*PPO_LOGS, "toy_updates")))
    try:
        assert REGISTRY["toy_updates"].algorithms == ("toy2",)
        run = train(make_config("toy2", "CartPole-v1", TINY), tmp_path / "run",
                    progress=False)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["toy_updates"] for r in lines] == [1, 2]
        for bad, message in ((metric, "already defined"),
                             (replace(metric, name="t2", group="nope"), "group"),
                             (replace(metric, name="t3", timing=True), "timing"),
                             (replace(metric, name="t4", requires=("x",)), "requirement")):
            with pytest.raises(ValueError, match=message):
                register_metric(bad)
    finally:
        ALGORITHMS.unregister("toy2")
        REGISTRY.pop("toy_updates")


# --- the probe and sink registries -----------------------------------------------------------
def test_probes_are_registered_with_everything_run_probes_needs():
    assert probe_names() == ("gradients", "values", "baselines", "landscape", "trust-region",
                             "features")
    for name in probe_names():
        probe = probes().get(name)
        assert probe.name == name and probe.description and probe.schema
        assert callable(probe.compute) and callable(probe.plot) and callable(probe.headline)
        assert callable(probe.reading) and callable(probe.table)
    with pytest.raises(ConfigError, match="probe_kinds"):
        make_config("ppo", "CartPole-v1", dict(probe_every=2, probe_kinds="gradient"))
    with pytest.raises(ConfigError, match="probe_kinds"):  # also before any is scheduled
        make_config("ppo", "CartPole-v1", dict(probe_every=0, probe_kinds="gradient"))


def test_built_in_sinks_in_order():
    assert SINKS.names() == ("critic-features", "periodic-eval", "metrics-file", "progress",
                             "tensorboard", "csv", "wandb", "scheduled-probes")


# --- identity ----------------------------------------------------------------------------------
OBSERVING = dict(probe_every=5, probe_kinds="values", probe_sizes=(10, 20), probe_k=3,
                 probe_true_pairs=500, probe_value_pairs=100, checkpoint_every=3,
                 tensorboard=True, csv=True, wandb=True, features_every=0, eval_every=4,
                 eval_episodes=3, eval_deterministic=False)


def test_observer_keys_are_exactly_the_schedule_checkpoints_and_logging():
    assert set(OBSERVER_KEYS) == set(OBSERVING)


@pytest.mark.parametrize("key", sorted(OBSERVING))
def test_keys_that_only_observe_do_not_change_the_identity(key):
    base = make_config("ppo", "Hopper-v5", {"probe_true_pairs": 1000})
    other = replace(base, **{key: OBSERVING[key]})
    assert other != base
    assert config_hash(other) == config_hash(base)
    assert run_identity(other) == run_identity(base)


@pytest.mark.parametrize("key,value", [("seed", 1), ("policy_lr", 1e-3), ("epochs", 3),
                                       ("heldout_kl", False), ("torch_threads", 2),
                                       ("reward_multiplier", 2.0), ("hidden", (32, 32))])
def test_keys_that_change_training_change_the_identity(key, value):
    base = make_config("ppo", "Hopper-v5")
    other = replace(base, **{key: value})
    assert config_hash(other) != config_hash(base)
    assert run_identity(other) != run_identity(base)


def test_total_steps_changes_the_hash_but_not_the_run():
    base = make_config("ppo", "Hopper-v5")
    longer = replace(base, total_steps=2 * base.total_steps)
    assert config_hash(longer) != config_hash(base)  # the lr annealing plan differs
    assert run_identity(longer) == run_identity(base)  # --resume --steps extends a run


def test_a_run_is_the_same_run_whatever_its_probe_schedule(tmp_path):
    cfg = make_config("ppo", "CartPole-v1", TINY)
    run = train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="already holds this run"):
        train(replace(cfg, probe_every=7, tensorboard=True), run, progress=False)
    with pytest.raises(RunDirError, match="holds a different run"):
        train(replace(cfg, seed=9), run, progress=False)


def test_an_old_run_directory_still_loads_and_resumes(tmp_path):
    """A run written before the observer keys existed (no tensorboard/csv keys, its hash
    over every key): the identity is recomputed from the stored config dicts."""
    cfg = make_config("ppo", "CartPole-v1", dict(TINY, total_steps=64))
    run = train(cfg, tmp_path / "run", progress=False)
    data = json.loads((run / "config.json").read_text())
    for key in ("tensorboard", "csv"):
        del data["config"][key]
    data["config_hash"] = "0123456789abcdef"  # whatever an older version stored
    (run / "config.json").write_text(json.dumps(data))
    old = RunDir.open(run).read_config()
    assert (old.tensorboard, old.csv) == (False, False)
    import torch

    for ckpt_path in (run / "checkpoints").glob("*.pt"):
        ckpt = torch.load(ckpt_path, weights_only=True)
        for key in ("tensorboard", "csv"):
            del ckpt["config"][key]
        ckpt["config_hash"] = "0123456789abcdef"
        torch.save(ckpt, ckpt_path)
        assert checkpoint_identity(ckpt) == run_identity(old)
    assert load_agent(run).config == old
    train(Config(), run, resume=True, progress=False, total_steps=128)
    assert RunDir(run).read_status()["state"] == "complete"
