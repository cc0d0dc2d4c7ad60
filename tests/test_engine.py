"""The one engine (:func:`pgscope.train.train_batch`, each algorithm's update over N
seeds): what it computes for a seed does not depend on the batch.

One update of N seeds equals, bit for bit, each seed's update as the batch of one
(:func:`pgscope.algos.update_one`), from the same weights, batches, generators and
algorithm states: every algorithm, KL early stopping firing for some seeds only, a TRPO
line search rejecting for one seed only, in float32 and float64. Training: a diverging
member is recorded and the others train on exactly as alone; runs stopped alone or in a
batch resume alone or in a batch to the same bits; what cannot batch is refused before
anything is written. Whole runs in every layout: tests/test_engine_invariance.py.
Networks are tiny and envs small (Pendulum, CartPole, the helper envs).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from pgscope.agent import Agent, build_agent
from pgscope.algos import algorithm, update_one
from pgscope.algos.common import make_optimizer
from pgscope.callbacks import Callback, IterationEnd
from pgscope.cli import EXIT_ERROR, main
from pgscope.config import Config, make_config
from pgscope.engine.nets import SeedNets
from pgscope.errors import ConfigError, RunDirError
from pgscope.metrics import TIMING_KEYS
from pgscope.rollout import Batch
from pgscope.run import RunDir, load_checkpoint
from pgscope.train import parse_seeds, resume, train, train_batch

OBS_DIM, ACT_DIM, PAIRS = 3, 2, 64
SEEDS = (0, 1, 2)


def _config(preset: str, **overrides: Any) -> Config:
    values: dict[str, Any] = dict(steps_per_iter=PAIRS, minibatches=4, epochs=3, hidden=(8,),
                                  seed=0, cg_iters=5)
    values.update(overrides)
    return make_config(preset, "Pendulum-v1", values)


def _agent(cfg: Config, seed: int) -> Agent:
    torch.manual_seed(seed)
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(ACT_DIM,), dtype=np.float32)
    return build_agent(cfg, obs_space, act_space)


def _batch(agent: Agent, seed: int, adv_scale: float = 1.0) -> Batch:
    """An on-policy synthetic batch whose advantages have a seed-dependent mean and scale
    (so sharing the normalization or the clipping across seeds shows)."""
    gen = torch.Generator().manual_seed(100 + seed)
    obs = torch.randn(PAIRS, OBS_DIM, generator=gen) * (1 + seed)
    with torch.no_grad():
        dist = agent.policy.dist(obs)
        actions = dist.mean + dist.stddev * torch.randn(PAIRS, ACT_DIM, generator=gen)
        logp = agent.policy.log_prob(dist, actions)
        values = agent.value_net(obs)
    advantages = (0.5 * seed + torch.randn(PAIRS, generator=gen)
                  * torch.linspace(0.2, 3.0, PAIRS)) * adv_scale * (1 + 3 * seed)
    return Batch(obs=obs, actions=actions, logp=logp, values=values, advantages=advantages,
                 returns=values + advantages, rewards=torch.zeros(PAIRS),
                 terminated=torch.zeros(PAIRS, dtype=torch.bool),
                 done=torch.zeros(PAIRS, dtype=torch.bool), next_obs=obs)


def _single_and_batched(cfg: Config, seeds: tuple[int, ...] = SEEDS,
                        states: list[dict[str, float]] | None = None,
                        adv_scale: float = 1.0
                        ) -> tuple[list[Agent], list[dict], list[Agent], list[dict]]:
    """Each seed's update as the batch of one and the update of all seeds as one batch,
    from the same weights, batches, generators and algorithm states."""
    agents = [_agent(cfg, s) for s in seeds]
    batches = [_batch(a, s, adv_scale) for a, s in zip(agents, seeds, strict=True)]
    states = states or [{} for _ in seeds]
    single = copy.deepcopy(agents)
    single_states = copy.deepcopy(states)
    single_metrics = []
    for agent, batch, s, state in zip(single, batches, seeds, single_states, strict=True):
        optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
        single_metrics.append(update_one(
            cfg, agent.policy, agent.value_net, optimizer, batch,
            torch.Generator().manual_seed(s + 1), state, batch.obs[:16]))
    batched = copy.deepcopy(agents)
    nets = SeedNets(cfg, [a.policy for a in batched], [a.value_net for a in batched],
                    [make_optimizer(cfg, a.policy, a.value_net) for a in batched])
    batched_metrics = algorithm(cfg.algo).update(
        cfg, nets, batches, [torch.Generator().manual_seed(s + 1) for s in seeds], states,
        [b.obs[:16] for b in batches])
    for metrics, state in zip(batched_metrics, states, strict=True):
        metrics["state"] = dict(state)
    for metrics, state in zip(single_metrics, single_states, strict=True):
        metrics["state"] = dict(state)
    return single, single_metrics, batched, batched_metrics


def _max_param_diff(a: Agent, b: Agent) -> float:
    return max(float((parameters_to_vector(x.parameters())
                      - parameters_to_vector(y.parameters())).abs().max())
               for x, y in ((a.policy, b.policy), (a.value_net, b.value_net)))


def _assert_same(single: list[Agent], single_metrics: list[dict], batched: list[Agent],
                 batched_metrics: list[dict], still: tuple[int, ...] = ()) -> None:
    """Bit for bit: every parameter, every metric, every algorithm state (and every seed
    but those in ``still`` moved its policy)."""
    for i, (a, b) in enumerate(zip(single, batched, strict=True)):
        moved = float((parameters_to_vector(a.policy.parameters()).detach()
                       - parameters_to_vector(_agent(a.config, SEEDS[i]).policy.parameters())
                       ).abs().max())
        assert (moved == 0) == (i in still), f"seed {i}: moved {moved}"
        assert _max_param_diff(a, b) == 0, f"seed {i}: parameters differ"
    for i, (m1, m2) in enumerate(zip(single_metrics, batched_metrics, strict=True)):
        assert m1.keys() == m2.keys(), f"seed {i}: keys {set(m1) ^ set(m2)}"
        for key, v1 in m1.items():
            v2 = m2[key]
            if isinstance(v1, float) and np.isnan(v1):
                assert np.isnan(v2), f"seed {i}: {key}"
            else:
                assert v2 == v1, f"seed {i}: {key}"


@pytest.mark.parametrize("preset", ["ppo", "ppo-m", "ppo-noclip", "ppo-kl", "trpo", "trpo+",
                                    "a2c"])
def test_one_update_of_a_batch_equals_each_seeds_update_alone(preset):
    overrides = dict(epochs=1, minibatches=1) if preset == "a2c" else {}
    cfg = _config(preset, ent_coef=0.01 if preset == "ppo" else 0.0, **overrides)
    _assert_same(*_single_and_batched(cfg))


@pytest.mark.parametrize("preset", ["ppo", "ppo-kl", "trpo", "trpo+"])
def test_one_update_of_a_batch_equals_each_seeds_update_alone_in_float64(preset):
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _assert_same(*_single_and_batched(_config(preset)))
    finally:
        torch.set_default_dtype(before)


def test_a_planted_cross_seed_reduction_breaks_the_equality(monkeypatch):
    """The check above is sensitive: advantages normalized over every seed's minibatch
    together (a reduction across seeds) instead of per seed make it fail."""
    import pgscope.algos.ppo as ppo_mod

    real = ppo_mod.normalize_advantages
    monkeypatch.setattr(ppo_mod, "normalize_advantages",
                        lambda adv, on: real(adv.reshape(1, -1), on).reshape(adv.shape))
    with pytest.raises(AssertionError, match="parameters differ"):
        _assert_same(*_single_and_batched(_config("ppo")))


def test_value_dr3_coef_batched_equals_single_updates():
    """The DR3 term (masked mean over pairs without an episode end) per seed, in PPO's
    value loss and in TRPO's value fit."""
    real = _batch

    def batch(agent: Agent, seed: int, adv_scale: float = 1.0) -> Batch:
        out = real(agent, seed, adv_scale)
        done = torch.arange(PAIRS) % (5 + seed) == 0  # episode ends differ per seed
        return replace(out, next_obs=torch.roll(out.obs, -1, 0) * 0.9, done=done)

    globals()["_batch"] = batch
    try:
        for preset in ("ppo", "trpo"):
            cfg = _config(preset, value_dr3_coef=0.3)
            single, single_metrics, batched, batched_metrics = _single_and_batched(cfg)
            _assert_same(single, single_metrics, batched, batched_metrics)
            plain = _single_and_batched(_config(preset))[0]  # the term changes the update
            assert _max_param_diff(single[0], plain[0]) > 1e-4
    finally:
        globals()["_batch"] = real


def test_kl_stop_firing_for_some_seeds_only():
    cfg = _config("ppo", kl_stop=True, target_kl=0.001, epochs=6, policy_lr=3e-3)
    single, single_metrics, batched, batched_metrics = _single_and_batched(cfg)
    epochs = [m["epochs_run"] for m in single_metrics]
    assert len(set(epochs)) > 1 and min(epochs) < cfg.epochs, epochs
    _assert_same(single, single_metrics, batched, batched_metrics)


def test_trpo_line_search_rejecting_for_one_seed_only():
    """Seed 1's advantages are all zero: its surrogate cannot improve, so its line search
    rejects every fraction and it keeps theta_old, while the others step."""
    real = _batch

    def batch(agent: Agent, seed: int, adv_scale: float = 1.0) -> Batch:
        out = real(agent, seed, adv_scale)
        return replace(out, advantages=torch.zeros(PAIRS)) if seed == 1 else out

    globals()["_batch"] = batch
    try:
        cfg = _config("trpo")
        single, single_metrics, batched, batched_metrics = _single_and_batched(cfg)
    finally:
        globals()["_batch"] = real
    fractions = [m["step_fraction"] for m in single_metrics]
    assert fractions[1] == 0 and fractions[0] > 0 and fractions[2] > 0, fractions
    _assert_same(single, single_metrics, batched, batched_metrics, still=(1,))


# --- training runs -------------------------------------------------------------------------
class _NanForSeed1(gym.Env):
    """A small continuous-control toy whose observations turn NaN after 40 steps, but
    only for the env a run of seed 1 resets first (env seed 1000 = 1 x 1000 + 0)."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-10, 10, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
        self.doomed, self.steps = False, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.doomed = seed == 1000
        return self.np_random.normal(size=3).astype(np.float32), {}

    def step(self, action):
        self.steps += 1
        obs = self.np_random.normal(size=3).astype(np.float32)
        if self.doomed and self.steps > 40:
            obs[:] = np.nan
        return obs, float(-np.sum(np.square(action))), False, False, {}


if "test_batched/NanForSeed1-v0" not in gym.registry:
    gym.register("test_batched/NanForSeed1-v0", entry_point=_NanForSeed1,
                 max_episode_steps=40)

TIMING = TIMING_KEYS
ITERATIONS = 3


def _run_config(preset: str, seed: int = 0, env: str = "Pendulum-v1", **overrides: Any
                ) -> Config:
    values: dict[str, Any] = dict(seed=seed, steps_per_iter=64, total_steps=64 * ITERATIONS,
                                  hidden=(8,), minibatches=4, epochs=2, num_envs=2,
                                  checkpoint_every=1)
    values.update(overrides)
    return make_config(preset, env, values)


def _records(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(got: Path, want: Path) -> None:
    """Every non-timing metric of every iteration equal, and the last checkpoints'
    tensors equal."""
    a, b = _records(got), _records(want)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb, f"{got.name} iteration {rb['iteration']}"
    ca = load_checkpoint(RunDir(got).last_checkpoint)
    cb = load_checkpoint(RunDir(want).last_checkpoint)
    for part in ("policy", "value_net", "optimizer"):
        assert _tensors(ca[part]) == _tensors(cb[part]), f"{got.name}: {part}"


def _tensors(tree: Any) -> list[Any]:
    """The leaves of a checkpoint entry, tensors as lists (comparable with ==)."""
    if isinstance(tree, dict):
        return [(k, _tensors(v)) for k, v in sorted(tree.items(), key=lambda kv: str(kv[0]))]
    if isinstance(tree, (list, tuple)):
        return [_tensors(v) for v in tree]
    return tree.tolist() if torch.is_tensor(tree) else tree


class _StopAt(Callback):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_iteration_end(self, event: IterationEnd) -> bool:
        return event.iteration < self.iteration


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict[str, dict[int, Path]]:
    """Uninterrupted runs of each seed trained alone, the references."""
    root = tmp_path_factory.mktemp("single")
    runs: dict[str, dict[int, Path]] = {}
    for preset in ("ppo", "trpo"):
        runs[preset] = {}
        for seed in SEEDS:
            runs[preset][seed] = train(_run_config(preset, seed), root / f"{preset}-{seed}",
                                       progress=False)
    return runs


@pytest.mark.parametrize("preset", ["ppo", "trpo"])
def test_a_batch_equals_its_seeds_alone_and_reproduces_itself(tmp_path, single_runs, preset):
    cfgs = [_run_config(preset, s) for s in SEEDS]
    first = train_batch(cfgs, [tmp_path / f"a{s}" for s in SEEDS], progress=False)
    assert [m.state for m in first] == ["complete"] * len(SEEDS)
    for seed, member in zip(SEEDS, first, strict=True):
        _assert_same_metrics(member.path, single_runs[preset][seed])
        assert RunDir(member.path).read_status()["state"] == "complete"
    again = train_batch(cfgs, [tmp_path / f"b{s}" for s in SEEDS], progress=False)
    for a, b in zip(first, again, strict=True):
        assert _records(a.path) == _records(b.path)


def test_a_diverging_member_is_recorded_and_the_others_complete(tmp_path):
    env = "test_batched/NanForSeed1-v0"
    cfgs = [_run_config("ppo", s, env) for s in SEEDS]
    members = train_batch(cfgs, [tmp_path / f"b{s}" for s in SEEDS], progress=False)
    assert [m.state for m in members] == ["complete", "diverged", "complete"]
    status = RunDir(members[1].path).read_status()
    assert status["state"] == "diverged" and status["where"] == "env observation"
    assert "non-finite observation" in members[1].error
    assert load_checkpoint(RunDir(members[1].path).last_checkpoint)["iteration"] == 1
    for seed in (0, 2):  # the others train on exactly as alone
        single = train(cfgs[seed], tmp_path / f"s{seed}", progress=False)
        _assert_same_metrics(members[seed].path, single)


def test_runs_resume_alone_or_in_a_batch(tmp_path, single_runs):
    """A batch stopped after iteration 2 continues alone (seed 0, through ``resume``) and
    as a batch (seeds 1, 2); runs stopped alone after iteration 2 continue as a batch.
    Every continuation equals the uninterrupted run alone."""
    cfgs = [_run_config("ppo", s) for s in SEEDS]
    stopped = train_batch(cfgs, [tmp_path / f"b{s}" for s in SEEDS], progress=False,
                          callbacks=lambda i: [_StopAt(2)])
    assert [m.state for m in stopped] == ["interrupted"] * len(SEEDS)
    resume(stopped[0].path, progress=False)
    again = train_batch([], [m.path for m in stopped[1:]], resume=True, progress=False)
    assert [m.state for m in again] == ["complete"] * 2
    for seed, member in zip(SEEDS, stopped, strict=True):
        _assert_same_metrics(member.path, single_runs["ppo"][seed])

    singles = [train(c, tmp_path / f"s{c.seed}", progress=False, callbacks=[_StopAt(2)])
               for c in cfgs]
    resumed = train_batch([], singles, resume=True, progress=False)
    assert [m.state for m in resumed] == ["complete"] * len(SEEDS)
    for seed, path in zip(SEEDS, singles, strict=True):
        _assert_same_metrics(path, single_runs["ppo"][seed])


def test_resume_needs_the_same_iteration(tmp_path):
    cfgs = [_run_config("ppo", s) for s in SEEDS[:2]]
    a = train(cfgs[0], tmp_path / "a", progress=False, callbacks=[_StopAt(1)])
    b = train(cfgs[1], tmp_path / "b", progress=False, callbacks=[_StopAt(2)])
    with pytest.raises(RunDirError, match="same iteration"):
        train_batch([], [a, b], resume=True, progress=False)


@pytest.mark.parametrize("first, second, message", [
    (dict(seed=0), dict(seed=0), "distinct"),
    (dict(seed=0), dict(seed=1, epochs=3), "'epochs'"),
])
def test_configs_that_cannot_batch_are_refused_before_anything_is_written(
        tmp_path, first, second, message):
    cfgs = [_run_config("ppo", **first), _run_config("ppo", **second)]
    with pytest.raises(ConfigError, match=message):
        train_batch(cfgs, [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_seeds_train_discrete_actions_and_a2c(tmp_path):
    """Once refused by the batched engine: CartPole (discrete) and a2c through --seeds."""
    for preset, extra in (("ppo", []), ("a2c", ["--set", "epochs=1", "--set",
                                                "minibatches=1"])):
        out = tmp_path / preset
        assert main(["train", "--algo", preset, "--env", "CartPole-v1", "--seeds", "0-1",
                     "--out", str(out), "--steps", "128", "--quiet", "--set",
                     "steps_per_iter=64", "--set", "hidden=8", *extra]) == 0
        for seed in (0, 1):
            assert RunDir(out / f"seed_{seed}").read_status()["state"] == "complete"


def test_cli_trains_seeds_as_batches_into_seed_directories(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["train", "--algo", "ppo", "--env", "Pendulum-v1", "--seeds", "0-1,5",
                 "--batch-size", "2", "--out", str(out), "--steps", "64", "--quiet",
                 "--set", "steps_per_iter=64", "--set", "hidden=8", "--set", "epochs=1"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed_0", "seed_1", "seed_5"]
    for seed in (0, 1, 5):
        run = RunDir(out / f"seed_{seed}")
        assert run.read_config().seed == seed and run.read_status()["state"] == "complete"
    assert parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    for bad in ("1-", "0,0", "x"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert main(["train", "--seed", "0", "--batch-size", "2", "--out", str(tmp_path / "x")]
                ) == EXIT_ERROR
    assert "--batch-size applies to --seeds only" in capsys.readouterr().err


def test_a_taken_run_directory_refuses_the_whole_batch_before_anything_is_written(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not a run")
    cfgs = [_run_config("ppo", s) for s in SEEDS[:2]]
    with pytest.raises(RunDirError, match="not a pgscope run"):
        train_batch(cfgs, [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a").exists()
