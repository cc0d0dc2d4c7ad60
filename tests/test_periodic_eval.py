"""Evaluation during training (pgscope.periodic_eval, config eval_every): its numbers are
those of ``pgscope evaluate`` on the checkpoint kept at that iteration (the ground truth);
training is the same bits with it on or off; a seed evaluates the same alone or in a
batch; it never changes the agent's observation/reward statistics; its config keys are
checked and only observe a run; the run report shows it; a study can score by it."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pgscope import make_config, train, train_batch
from pgscope.callbacks import IterationEnd
from pgscope.config import config_hash, parse_overrides
from pgscope.errors import ConfigError
from pgscope.evaluate import evaluate, evaluate_agent
from pgscope.metrics import REGISTRY, TIMING_KEYS, metrics_for
from pgscope.periodic_eval import PeriodicEval, eval_due, eval_seed
from pgscope.run import RunDir, load_agent, load_checkpoint
from pgscope.sinks import SINKS

ITERATIONS = 3
TINY = dict(steps_per_iter=64, minibatches=2, epochs=2, hidden=(8,),
            total_steps=64 * ITERATIONS, checkpoint_every=1)
EVAL_KEYS = {m.name for m in REGISTRY.values() if "eval" in m.requires}
#: (env, eval settings): the mean action on Discrete actions, sampled Box actions (clipped
#: to the bounds), an interval over 10 episodes (not flagged)
SETTINGS = {
    "cartpole-deterministic": ("CartPole-v1", dict(eval_every=1, eval_episodes=3)),
    "pendulum-stochastic": ("Pendulum-v1", dict(eval_every=2, eval_episodes=2,
                                                eval_deterministic=False)),
    "cartpole-10-episodes": ("CartPole-v1", dict(eval_every=3, eval_episodes=10)),
}


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _leaves(tree: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a checkpoint by its path (tensors as dtype, shape and values)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{path}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{path}[{i}]").items()}
    if torch.is_tensor(tree):
        return {path: (tree.dtype, tuple(tree.shape), tree.tolist())}
    return {path: tree}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each setting's run with evaluation, and the same run without (eval_every 0)."""
    root = tmp_path_factory.mktemp("periodic_eval")
    out = {}
    for name, (env, settings) in SETTINGS.items():
        cfg = make_config("ppo", env, {**TINY, "seed": 1, **settings})
        off = dataclasses.replace(cfg, eval_every=0)
        out[name] = (train(cfg, root / name / "on", progress=False),
                     train(off, root / name / "off", progress=False))
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_eval_keys_are_logged_where_due_and_are_registered(runs, name):
    on, off = runs[name]
    cfg = RunDir(on).read_config()
    records = _records(on)
    assert [r["iteration"] for r in records] == list(range(1, ITERATIONS + 1))
    for r in records:
        due = eval_due(cfg, r["iteration"])
        heldout = r["iteration"] >= 2
        expected = {m.name for m in metrics_for("ppo", discrete=name.startswith("cartpole"),
                                                ppo_loss="clip", heldout=heldout,
                                                evaluation=due)}
        assert set(r) == expected, (r["iteration"], expected ^ set(r))
        if due:
            assert r["eval_episodes"] == cfg.eval_episodes
            assert r["eval_few_samples"] is (cfg.eval_episodes < 10)
            assert r["eval_return_low"] <= r["eval_return"] <= r["eval_return_high"]
    # every eval_every-th iteration and the last one
    assert [r["iteration"] for r in records if "eval_return" in r] == [
        i for i in range(1, ITERATIONS + 1) if i % cfg.eval_every == 0 or i == ITERATIONS]
    assert not EVAL_KEYS & {k for r in _records(off) for k in r}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_eval_numbers_are_pgscope_evaluate_on_the_checkpoint_of_that_iteration(runs, name):
    """The ground truth: ``evaluate`` loads the checkpoint kept at the iteration (a fresh
    agent, statistics from the file) and plays the episodes from the logged seed."""
    on, _ = runs[name]
    cfg = RunDir(on).read_config()
    evaluated = [r for r in _records(on) if "eval_return" in r]
    assert evaluated
    for r in evaluated:
        it = r["iteration"]
        assert r["eval_seed"] == eval_seed(cfg, it)
        truth = evaluate(on, checkpoint=it, episodes=cfg.eval_episodes,
                         deterministic=cfg.eval_deterministic, seed=r["eval_seed"])
        assert truth["checkpoint"] == it
        assert r["eval_return"] == truth["mean_return"]
        assert r["eval_return_low"] == truth["ci_low"]
        assert r["eval_return_high"] == truth["ci_high"]
        assert r["eval_episodes"] == truth["episodes"]
        assert r["eval_episode_length"] == sum(truth["lengths"]) / len(truth["lengths"])
        assert r["eval_few_samples"] == (truth["ci_few_samples"] is not None)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_training_is_the_same_bits_with_evaluation_on_and_off(runs, name):
    on, off = runs[name]
    skip = EVAL_KEYS | set(TIMING_KEYS)
    a = [{k: v for k, v in r.items() if k not in skip} for r in _records(on)]
    b = [{k: v for k, v in r.items() if k not in skip} for r in _records(off)]
    assert len(a) == len(b) == ITERATIONS
    for x, y in zip(a, b, strict=True):
        differ = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
        assert not differ, (x["iteration"], differ)
    names = sorted(p.name for p in RunDir(on).checkpoint_dir.glob("*.pt"))
    assert names == sorted(p.name for p in RunDir(off).checkpoint_dir.glob("*.pt"))
    assert "last.pt" in names and f"iter_{ITERATIONS:06d}.pt" in names
    for file in names:
        x, y = (_leaves(load_checkpoint(RunDir(r).checkpoint_dir / file)) for r in (on, off))
        for leaves in (x, y):  # the wall-clock time and the eval keys of the saved config
            leaves.pop("/elapsed")
            for key in ("eval_every", "eval_episodes", "eval_deterministic"):
                leaves.pop(f"/config/{key}")
        assert x.keys() == y.keys()
        differ = sorted(k for k in x if x[k] != y[k])
        assert not differ, (file, differ[:5])


def test_a_seed_evaluates_the_same_alone_and_in_a_batch(runs, tmp_path):
    """Each member evaluates its own agent: seed 1's eval keys (and every other non-timing
    key) in a batch of seeds 2, 1, 0 equal its run alone."""
    alone, _ = runs["cartpole-deterministic"]
    cfg = RunDir(alone).read_config()
    seeds = (2, 1, 0)
    members = train_batch([dataclasses.replace(cfg, seed=s) for s in seeds],
                          [tmp_path / f"seed_{s}" for s in seeds], progress=False)
    assert {m.state for m in members} == {"complete"}

    def lines(run: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _records(run)]

    batched = lines(tmp_path / "seed_1")
    assert batched == lines(alone)
    assert all("eval_return" in r for r in batched)
    other = [r["eval_return"] for r in lines(tmp_path / "seed_2")]
    assert [r["eval_seed"] for r in lines(tmp_path / "seed_2")] != [
        r["eval_seed"] for r in batched]  # each seed's evaluation has seeds of its own
    assert len(other) == ITERATIONS


def _statistics(agent) -> dict[str, Any]:
    return copy.deepcopy({k: {n: t.clone() for n, t in v.items()}
                          for k, v in agent.preprocessor.state_dict().items()})


def test_evaluation_never_changes_the_agents_statistics_or_networks(runs):
    """The sink evaluates the live agent through a frozen copy of its preprocessor: the
    running observation mean/var/count and the reward scaler stay as they were."""
    on, _ = runs["pendulum-stochastic"]
    agent = load_agent(on)
    cfg = agent.config
    assert cfg.obs_norm and cfg.reward_scale  # there are statistics to change
    before = _statistics(agent)
    params = [p.detach().clone() for p in (*agent.policy.parameters(),
                                           *agent.value_net.parameters())]
    metrics: dict[str, Any] = {}
    PeriodicEval().on_iteration_end(IterationEnd(on, cfg, agent, ITERATIONS, 0, metrics,
                                                 batch=None))  # type: ignore[arg-type]
    assert metrics["eval_episodes"] == cfg.eval_episodes  # it did evaluate
    after = _statistics(agent)
    assert before.keys() == after.keys() == {"obs_norm", "reward_scaler"}
    for key in before:
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name]), (key, name)
    now = [p.detach() for p in (*agent.policy.parameters(), *agent.value_net.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(params, now, strict=True))
    assert not agent.preprocessor.statistics_frozen  # the agent's own one is untouched
    # the statistics are applied, not ignored: other statistics give other returns
    shifted = load_agent(on)
    shifted.preprocessor.obs_norm.rms.mean = shifted.preprocessor.obs_norm.rms.mean + 1.0
    seed = eval_seed(cfg, ITERATIONS)
    assert evaluate_agent(shifted, 2, False, seed)["returns"] != evaluate_agent(
        agent, 2, False, seed)["returns"]


def test_the_sink_completes_the_line_before_the_metrics_file_writes_it():
    names = SINKS.names()
    assert names.index("periodic-eval") < names.index("metrics-file")


def test_the_schedule_and_the_seeds():
    cfg = make_config("ppo", "CartPole-v1", {**TINY, "total_steps": 64 * 7, "eval_every": 3})
    assert [i for i in range(0, 8) if eval_due(cfg, i)] == [3, 6, 7]  # and the last one
    assert not any(eval_due(dataclasses.replace(cfg, eval_every=0), i) for i in range(8))
    seeds = {eval_seed(dataclasses.replace(cfg, seed=s), i) for s in range(4) for i in
             range(1, 50)}
    assert len(seeds) == 4 * 49 and all(0 <= s < 2**32 for s in seeds)
    assert eval_seed(cfg, 3) == eval_seed(make_config("ppo", "Hopper-v5", {"seed": 0}), 3)


def test_config_keys_are_checked_and_only_observe_the_run():
    base = make_config("ppo", "CartPole-v1")
    assert (base.eval_every, base.eval_episodes, base.eval_deterministic) == (0, 10, True)
    with pytest.raises(ConfigError, match=r"'eval_every' must be >= 0 .*got -1"):
        make_config("ppo", "CartPole-v1", {"eval_every": -1})
    with pytest.raises(ConfigError, match=r"'eval_episodes' must be >= 1 .*got 0"):
        make_config("ppo", "CartPole-v1", {"eval_every": 5, "eval_episodes": 0})
    with pytest.raises(ConfigError, match="'eval_deterministic' expects a value of type bool"):
        parse_overrides(["eval_deterministic=maybe"])
    with pytest.raises(ConfigError, match="'eval_every' expects int"):
        make_config("ppo", "CartPole-v1", {"eval_every": 2.5})
    cfg = make_config("ppo", "CartPole-v1", parse_overrides(
        ["eval_every=5", "eval_episodes=20", "eval_deterministic=false"]))
    assert (cfg.eval_every, cfg.eval_episodes, cfg.eval_deterministic) == (5, 20, False)
    assert config_hash(cfg) == config_hash(base)  # not part of the run's identity


def test_the_run_report_shows_the_evaluations_only_when_there_are_some(runs, tmp_path):
    from pgscope.report import write_report

    on, off = runs["cartpole-deterministic"]
    html = write_report(on, tmp_path / "on.html").read_text()
    assert '<section id="evaluation">' in html and 'id="curve-eval"' in html
    assert "last evaluation return (iteration 3, 3 episodes" in html
    assert "95% bootstrap CI over the evaluation" in html  # the band
    last = _records(on)[-1]
    assert json.dumps(last["eval_return_high"]) in html  # the band's data
    html = write_report(off, tmp_path / "off.html").read_text()
    assert 'id="evaluation"' not in html and "curve-eval" not in html


# --- the study score rule ------------------------------------------------------------------
def _hand_study(tmp_path: Path, score: Any, eval_every: int = 5):
    """One config, three CartPole seeds of 12 iterations with hand-written returns and
    evaluations (iterations 5, 10 and the last, 12)."""
    from pgscope.study import parse_spec
    from pgscope.study.runner import prepare_study_dir

    spec = parse_spec(dict(name="hand", envs=["CartPole-v1"], seeds=3, total_steps=12 * 256,
                           set=dict(steps_per_iter=256, minibatches=4, eval_every=eval_every),
                           configs=[dict(label="a", preset="ppo")], score=score))
    evals = {0: {5: 10.0, 10: 20.0, 12: 30.0},
             1: {5: 50.0, 10: 40.0, 12: None},  # the last evaluation's return was NaN
             2: {5: 70.0, 10: 80.0}}  # no evaluation at the last iteration
    out = tmp_path / "study"
    prepare_study_dir(out, spec)
    for r in spec.runs():
        run, _lock = RunDir.create(out / r.rel_path, r.config)
        for it in range(1, 13):
            line: dict[str, Any] = dict(iteration=it, env_steps=256 * it, return_mean=1000.0)
            if it in evals[r.seed]:
                ret = evals[r.seed][it]
                line.update(eval_return=ret, eval_return_low=ret, eval_return_high=ret,
                            eval_episodes=10, eval_few_samples=False)
            run.append_metrics(line)
        run.write_status("complete")
    return spec, out


def test_eval_last_scores_each_run_by_its_last_evaluation(tmp_path):
    import pandas as pd

    from pgscope.study.analysis import (
        aggregates,
        final_scores,
        load_study,
        summarize,
        write_summary,
    )

    spec, out = _hand_study(tmp_path, "eval-last")
    scores = final_scores(spec, load_study(out)).set_index("seed")
    # by hand: seed 0's last evaluation 30; seed 1's last one is null (no score: missing);
    # seed 2's last evaluation is at iteration 10: 80 (never return_mean's 1000)
    assert scores.loc[0, "score"] == 30.0 and scores.loc[2, "score"] == 80.0
    assert pd.isna(scores.loc[1, "score"]) and scores.loc[1, "outcome"] == "missing"
    assert set(scores["window"]) == {1}
    row = aggregates(spec, final_scores(spec, load_study(out))).iloc[0]
    assert row["mean"] == pytest.approx((30.0 + 80.0) / 2)
    assert "last evaluation during training" in spec.score.describe()
    meta = summarize(out)["meta"]
    assert meta["missing"][0]["why"] == ("complete, but without an evaluation during "
                                         "training (eval_every)")
    # the same by name over a spec scored otherwise (pgscope study summary --score)
    _, other = _hand_study(tmp_path / "other", {})
    result = write_summary(other, plots=False, score="eval-last")
    assert "last evaluation during training" in result["meta"]["score_definition"]
    written = pd.read_csv(other / "summary" / "scores.csv").set_index("seed")
    assert list(written["score"].fillna(-1)) == [30.0, -1, 80.0]


def test_eval_last_refuses_a_study_that_never_evaluates(tmp_path):
    from pgscope.study import parse_spec
    from pgscope.study.analysis import summarize

    spec = dict(name="x", envs=["CartPole-v1"], seeds=1, total_steps=512,
                configs=[dict(label="a", preset="ppo"),
                         dict(label="b", preset="ppo", eval_every=2)], score="eval-last")
    with pytest.raises(ConfigError, match="config.s. a never evaluate: set eval_every"):
        parse_spec(spec)
    parse_spec({**spec, "set": {"eval_every": 4}})  # every config evaluates
    _, out = _hand_study(tmp_path, {}, eval_every=0)
    with pytest.raises(ConfigError, match="--score eval-last: .*never evaluate"):
        summarize(out, score="eval-last")
