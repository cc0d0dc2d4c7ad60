"""The authors' configurations as presets (ppo-paper, ppo-m-paper, trpo-paper, trpo+-paper),
the per-env preset values behind them, ``pgscope presets``, the papers' score rule and the
annealed TRPO KL limit.

The table below is the citation check: every value was read from the authors' released
code, MadryLab/implementation-matters (Engstrom et al., 2020): the base file src/MuJoCo.json
overridden by configs/{hopper,walker,humanoid}_{ppo,ppom,trpo,trpo_plus}.py, and for keys
their code hard-wires, src/policy_gradients/{agent,models,steps,torch_utils}.py.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch

import pgscope.algos.trpo as trpo_mod
from pgscope.agent import build_agent
from pgscope.algos import update_one
from pgscope.algos.common import make_optimizer
from pgscope.cli import main
from pgscope.config import ENV_DEFAULTS, PRESETS, make_config
from pgscope.errors import ConfigError
from pgscope.presets_view import format_presets
from pgscope.rollout import Batch
from pgscope.run import RunDir
from pgscope.study import builtin_study, parse_spec
from pgscope.study.analysis import aggregates, final_scores, load_study
from pgscope.study.runner import prepare_study_dir
from pgscope.train import train

FAMILIES = ("Hopper", "Walker2d", "Humanoid")

#: Read from src/MuJoCo.json and the code; the same in all four presets.
COMMON = {
    "total_steps": 488 * 2048,  # MuJoCo.json: train_steps 488 x t 2048
    "steps_per_iter": 2048,  # MuJoCo.json: t
    "num_envs": 1,  # MuJoCo.json: num_actors
    "gamma": 0.99,  # MuJoCo.json: gamma
    "epochs": 10,  # MuJoCo.json: ppo_epochs 10, val_epochs 10
    "minibatches": 32,  # MuJoCo.json: num_minibatches
    "adam_eps": 1e-5,  # MuJoCo.json: adam_eps; agent.py: value Adam eps 1e-5
    "value_clip_range": 0.2,  # MuJoCo.json: clip_val_eps
    "hidden": (64, 64),  # models.py: HIDDEN_SIZES, ValueDenseNet hidden_sizes
    "activation": "tanh",  # models.py: ACTIVATION
    "init_log_std": 0.0,  # models.py: log_stdev = zeros
    "obs_norm": True,  # MuJoCo.json: norm_states true (never overridden)
    "reward_clip_bound": 10.0,  # MuJoCo.json: clip_rewards 10
    "obs_clip_bound": 10.0,  # MuJoCo.json: clip_observations 10
    "adv_norm": True,  # steps.py: surrogate_reward -> adv_normalize
    "action_clip": False,  # agent.py: multi_actor_step, the raw sample to env.step
    "torch_threads": 1,  # configs: cpu True -> torch.set_num_threads(1)
}
PPO = {**COMMON, "algo": "ppo", "ppo_loss": "clip", "clip_eps": 0.2, "ent_coef": 0.0,
       "kl_stop": False, "grad_clip": False, "gae_lambda": 0.95}
TRPO = {**COMMON, "algo": "trpo", "fisher_fraction": 0.1, "cg_iters": 10, "cg_damping": 0.1,
        "backtrack_iters": 10, "backtrack_coef": 0.5, "lr_anneal": False, "grad_clip": False}

#: preset -> key -> value, or (Hopper, Walker2d, Humanoid) where the env decides.
EXPECTED: dict[str, dict[str, object]] = {
    "ppo-paper": {  # configs/{hopper,walker,humanoid}_ppo.py
        **PPO,
        "policy_lr": (3e-4, 4e-4, 1.5e-4),  # ppo_lr_adam
        "value_lr": (2.5e-4, 3e-4, 1e-4),  # val_lr
        "value_clip": (False, True, True),  # value_clipping
        "reward_scale": True,  # norm_rewards "returns"
        "reward_clip": True,  # clip_rewards 10 (base)
        "obs_clip": True,  # clip_observations 10 (base)
        "ortho_init": True,  # initialization "orthogonal"
        "lr_anneal": True,  # anneal_lr True
    },
    "ppo-m-paper": {  # configs/{hopper,walker,humanoid}_ppom.py
        **PPO,
        "policy_lr": (1.7e-4, 1e-4, 9e-5),  # ppo_lr_adam
        "value_lr": (4e-4, 2e-4, 4e-4),  # val_lr
        "value_clip": False,  # value_clipping False
        "reward_scale": False,  # norm_rewards "none"
        "reward_clip": False,  # clip_rewards -1
        "obs_clip": False,  # clip_observations -1
        "ortho_init": False,  # initialization "xavier"
        "lr_anneal": False,  # anneal_lr False
    },
    "trpo-paper": {  # configs/{hopper,walker,humanoid}_trpo.py
        **TRPO,
        "gae_lambda": 0.95,
        "max_kl": (0.13, 0.04, 0.07),  # max_kl
        "max_kl_final": (0.13, 0.04, 0.07),  # max_kl_final
        "value_lr": (2e-4, 3e-4, 3e-4),  # val_lr
        "value_clip": False, "reward_scale": False, "reward_clip": False,
        "obs_clip": False, "ortho_init": False,
    },
    "trpo+-paper": {  # configs/{hopper,walker,humanoid}_trpo_plus.py
        **TRPO,
        "gae_lambda": (0.95, 0.95, 0.85),  # lambda (humanoid_trpo_plus.py: 0.85)
        "max_kl": (0.04, 0.07, 0.1),  # max_kl
        "max_kl_final": 0.0,  # constant, as their code ran: see test_their_kl_increment_*
        "value_lr": (2e-4, 1e-4, 5e-5),  # val_lr
        "value_clip": (False, False, True),  # value_clipping
        "ortho_init": (True, True, False),  # initialization
        "max_grad_norm": (1.0, 1.0, 0.5),  # clip_grad_norm (read by ppo_step only)
        "reward_scale": True, "reward_clip": True, "obs_clip": True,
    },
}
#: the schedule their TRPO+ config files describe (max_kl_final), never applied by their code
EXPECTED["trpo+-paper-files"] = {**EXPECTED["trpo+-paper"],
                                 "max_kl_final": (0.07, 0.04, 0.05)}


def _expected(preset: str, family: str) -> dict[str, object]:
    i = FAMILIES.index(family)
    return {k: v[i] if isinstance(v, tuple) and k != "hidden" else v
            for k, v in EXPECTED[preset].items()}


# --- the presets --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_every_value_of_the_paper_presets_is_the_cited_one(preset, family):
    cfg = make_config(preset, f"{family}-v5")
    wrong = {k: (getattr(cfg, k), v) for k, v in _expected(preset, family).items()
             if getattr(cfg, k) != v}
    assert not wrong, wrong  # key: (resolved, cited)
    assert cfg.num_iterations == 488
    # nothing the preset sets escapes the table
    assert set(PRESETS[preset]) <= set(EXPECTED[preset])


def test_per_env_preset_values_win_over_env_defaults_and_lose_to_overrides():
    assert ENV_DEFAULTS["Hopper"]["policy_lr"] == 3e-4
    assert make_config("ppo-m-paper", "Hopper-v4").policy_lr == 1.7e-4  # any Hopper version
    assert make_config("trpo-paper", "Hopper-v5", {"value_lr": 1e-3}).value_lr == 1e-3
    # pgscope's own presets keep the per-env defaults
    assert make_config("ppo-m", "Hopper-v5").policy_lr == 3e-4


def test_a_paper_preset_on_another_env_names_the_per_env_keys_to_give():
    with pytest.raises(ConfigError, match="preset 'trpo-paper' sets max_kl, max_kl_final, "
                                          "value_lr per env, for Hopper, Humanoid, Walker2d"):
        make_config("trpo-paper", "Pendulum-v1")
    cfg = make_config("trpo-paper", "Pendulum-v1", {"max_kl": 0.02, "max_kl_final": 0.02,
                                                    "value_lr": 1e-3})
    assert (cfg.max_kl, cfg.obs_norm, cfg.ortho_init) == (0.02, True, False)


# --- pgscope presets ----------------------------------------------------------------------
def test_side_by_side_marks_exactly_the_differing_keys():
    text = format_presets(["ppo", "ppo-paper"], "Hopper-v5")
    rows = {line.split()[-3]: line for line in text.splitlines()[3:]}
    keys = [k for k in make_config("ppo").to_dict() if k not in ("preset", "env_id")]
    assert sorted(rows) == sorted(keys)  # every key, once
    marked = {k for k, line in rows.items() if line.startswith("*")}
    assert marked == {"total_steps", "value_clip", "grad_clip", "action_clip"}
    assert rows["value_clip"].split()[-2:] == ["true", "false"]
    assert f"4 of {len(keys)} keys differ" in text.splitlines()[0]
    diff = format_presets(["ppo", "ppo-paper"], "Walker2d-v5", diff_only=True)
    assert {line.split()[1] for line in diff.splitlines()[3:]} == {
        "total_steps", "grad_clip", "action_clip"}  # Walker2d: their PPO clips values


def test_presets_command_one_preset_two_presets_and_the_list(capsys):
    assert main(["presets", "trpo+-paper", "--env", "Humanoid-v5"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows["gae_lambda"] == ["0.85", "preset,", "per", "env"]
    assert rows["policy_lr"] == ["0.00015", "env"] and rows["seed"] == ["0", "default"]
    assert rows["max_kl_final"][0] in ("0", "0.0") and rows["ortho_init"][0] == "false"
    assert main(["presets", "trpo", "trpo-paper", "--diff"]) == 0
    out = capsys.readouterr().out
    assert "obs_norm" in out and "max_kl_final" in out and "gamma" not in out
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "value_lr={Hopper: 0.0002, Walker2d: 0.0003, Humanoid: 0.0003}" in listing
    assert main(["presets", "ppo", "ppo-m", "trpo"]) == 2  # EXIT_ERROR
    assert main(["presets", "ppo", "--diff"]) == 2
    assert "--diff compares two presets" in capsys.readouterr().err


# --- the papers' score rule ---------------------------------------------------------------
def _hand_study(tmp_path, score):
    """One config, three CartPole seeds of 15 iterations with hand-written returns."""
    spec = parse_spec(dict(name="hand", envs=["CartPole-v1"], seeds=3, total_steps=15 * 256,
                           set=dict(steps_per_iter=256, minibatches=4),
                           configs=[dict(label="a", preset="ppo")], score=score))
    returns = {0: [0.0] * 5 + [100.0] * 10,
               1: [0.0] * 5 + [10.0 * k for k in range(1, 11)],
               2: [0.0] * 5 + [300.0] * 4 + [None] + [300.0] * 5}  # no episode ended in 10
    out = tmp_path / "study"
    prepare_study_dir(out, spec)
    for r in spec.runs():
        run, _lock = RunDir.create(out / r.rel_path, r.config)
        for i, ret in enumerate(returns[r.seed]):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1), return_mean=ret))
        run.write_status("complete")
    return spec, out


def test_engstrom_code_score_is_their_run_py_5_rewards(tmp_path):
    """'engstrom-code': their run.py's final_results '5_rewards', np.array(rewards)[-5:]
    .mean() of the per-iteration mean episode rewards, written here from that definition;
    seed 2's iteration without a finished episode leaves a 4-iteration window."""
    spec, out = _hand_study(tmp_path, "engstrom-code")
    scores = final_scores(spec, load_study(out)).set_index("seed")["score"]
    assert list(scores) == [100.0, (60 + 70 + 80 + 90 + 100) / 5, 300.0]
    row = aggregates(spec, final_scores(spec, load_study(out))).iloc[0]
    assert row["mean"] == pytest.approx((100 + 80 + 300) / 3)
    assert "5_rewards" in spec.score.describe()


def test_paper_score_is_the_mean_of_the_last_10_iterations_then_the_mean_over_runs(tmp_path):
    spec, out = _hand_study(tmp_path, "paper")
    assert spec.score.window(15) == parse_spec(
        {**_spec_dict(), "score": "last-10"}).score.window(15) == 10
    assert spec.score == parse_spec({**_spec_dict(), "score": {"rule": "paper"}}).score
    scores = final_scores(spec, load_study(out)).set_index("seed")["score"]
    assert list(scores) == [100.0, 55.0, 300.0]  # by hand: 100; (10+...+100)/10; 300
    row = aggregates(spec, final_scores(spec, load_study(out))).iloc[0]
    assert row["mean"] == pytest.approx(455.0 / 3)
    assert row["mean_low"] < row["mean"] < row["mean_high"]
    assert spec.statistics.level == 0.95
    # the default score (last 10% = 2 iterations) gives seed 1 another score
    default, _ = _hand_study(tmp_path / "d", {})
    assert final_scores(default, load_study(out)).set_index("seed")["score"][1] == 95.0


def _spec_dict():
    return dict(name="x", envs=["CartPole-v1"], seeds=1, total_steps=512,
                configs=[dict(label="a", preset="ppo")])


def test_score_rule_by_name_in_the_spec_and_on_the_summary_command(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown score rule 'papr'. Did you mean paper"):
        parse_spec({**_spec_dict(), "score": "papr"})
    with pytest.raises(ConfigError, match="fixes the window"):
        parse_spec({**_spec_dict(), "score": {"rule": "paper", "last_iterations": 5}})
    _, out = _hand_study(tmp_path, {})  # the spec's own score: last 10%
    assert main(["study", "summary", str(out), "--no-plots", "--score", "paper"]) == 0
    text = capsys.readouterr().out
    assert "'last-10' under its earlier name" in text and "151.7" in text
    scores = pd.read_csv(out / "summary" / "scores.csv")
    assert list(scores["score"]) == [100.0, 55.0, 300.0] and set(scores["window"]) == {10}


def test_builtin_implementation_matters_hopper_study():
    spec = builtin_study("implementation-matters-hopper")
    assert spec.labels == ["ppo-paper", "ppo-m-paper", "trpo-paper", "trpo+-paper"]
    assert spec.envs == ("Hopper-v5",) and len(spec.seeds) == 10
    assert spec.total_steps == 488 * 2048 and spec.score.rule == "paper"
    assert {r.config.preset for r in spec.runs()} == set(spec.labels)
    assert spec.statistics.compare == "all"


def _bench():
    """bench/implementation_matters.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "implementation_matters.py"
    module_spec = importlib.util.spec_from_file_location("implementation_matters", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    return bench


def test_the_table_ranks_only_configs_with_complete_runs():
    """bench/implementation_matters.py: a config with no complete run yet has no place in
    the ranking (it is named as waiting), and P(a > b) is read in either stored order."""
    bench = _bench()
    aggregates = pd.DataFrame(dict(env=["Hopper-v5"] * 3, label=["ppo-paper", "trpo-paper",
                                                                   "ppo-m-paper"],
                                   mean=[2000.0, 2500.0, float("nan")]))
    comparisons = pd.DataFrame(dict(a=["ppo-paper"], b=["trpo-paper"], env=["Hopper-v5"],
                                    prob_improvement=[0.3], prob_improvement_low=[0.1],
                                    prob_improvement_high=[0.6]))
    text = "\n".join(bench.ranking(aggregates, comparisons))
    assert "pgscope's order trpo-paper > ppo-paper (no complete run yet: ppo-m-paper)" in text
    assert "published order ppo-paper > ppo-m-paper > trpo-paper" in text
    assert "| 1 | trpo-paper | 2500 | 0.70 [0.40, 0.90] |" in text
    assert "| 2 | ppo-paper | 2000 |  |" in text and "ppo-m-paper | nan" not in text


def _study_of(tmp_path, name, scores, metrics=None):
    """A hand-written study: per label, per seed, 10 iterations whose return is the score
    (so the papers' score is that number); ``metrics`` adds keys per (label, seed) as
    lists over the iterations."""
    spec = parse_spec(dict(name=name, envs=["CartPole-v1"], seeds=sorted(
        {k for per in scores.values() for k in per}), total_steps=10 * 256,
        set=dict(steps_per_iter=256, minibatches=4), score="paper",
        configs=[dict(label=label, preset="ppo") for label in scores]))
    out = tmp_path / name
    prepare_study_dir(out, spec)
    for r in spec.runs():
        if r.seed not in scores[r.label]:
            continue
        run, _lock = RunDir.create(out / r.rel_path, r.config)
        extra = (metrics or {}).get((r.label, r.seed), {})
        for i in range(10):
            run.append_metrics(dict(iteration=i + 1, env_steps=256 * (i + 1),
                                    return_mean=scores[r.label][r.seed],
                                    **{k: v[i] for k, v in extra.items()}))
        run.write_status("complete")
    return out


def test_variant_table_against_the_reference_runs_by_hand(tmp_path):
    """--variants: each variant's mean, its per-seed scores, the reference's mean on the
    same seeds, P(reference > variant) over all reference seeds and the Mann-Whitney p,
    checked against the definitions and SciPy."""
    from scipy.stats import mannwhitneyu

    ref = {0: 2000.0, 1: 3000.0, 2: 1000.0, 3: 2500.0}
    main_study = _study_of(tmp_path, "main", {"trpo-paper": ref, "ppo-paper": {0: 9.0}})
    variants = _study_of(tmp_path, "var", {"no-norm": {0: 1500.0, 1: 2200.0},
                                           "lr": {0: 2600.0, 1: 2600.0}})
    lines = _bench().variants_table(variants, main_study)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {"no-norm", "lr"}
    cells = [c.strip() for c in rows["no-norm"].strip("|").split("|")]
    assert cells[1] == "2" and cells[2].startswith("1850 [") and cells[3] == "1500, 2200"
    assert cells[4] == "2500 (2 runs)"  # seeds 0 and 1 of trpo-paper: (2000 + 3000) / 2
    # P(ref > variant) by hand: pairs (ref, var) with ref > var, of 4 x 2
    wins = sum(a > b for a in ref.values() for b in (1500.0, 2200.0))
    assert cells[5].startswith(f"{wins / 8:.2f} [")
    p = mannwhitneyu(list(ref.values()), [1500.0, 2200.0], alternative="two-sided").pvalue
    assert cells[6] == f"{p:.3f}"
    lr = [c.strip() for c in rows["lr"].strip("|").split("|")]
    lr_wins = sum(a > 2600.0 for a in ref.values()) / len(ref)  # 3000 only: 0.25
    assert lr[2].startswith("2600 [2600, 2600]") and lr[5].startswith(f"{lr_wins:.2f} [")


def test_variants_that_are_not_studies_are_refused_before_any_compute(tmp_path, monkeypatch,
                                                                      capsys):
    bench = _bench()
    monkeypatch.setattr(bench, "report", lambda out: pytest.fail("computed before checking"))
    monkeypatch.setattr("sys.argv", ["implementation_matters.py", "--summary-only", "--out",
                                     str(tmp_path / "main"), "--variants", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--variants: '{tmp_path}' is not a pgscope study directory" in err
    assert "Traceback" not in err


def test_trust_region_table_by_hand(tmp_path):
    """The study's trust-region table: the median over every iteration of every run, then
    the range of the runs' largest values; a key no run logged is said to be missing."""
    ratio = {0: [1.0 + i / 10 for i in range(10)], 1: [3.0] * 9 + [7.5]}
    metrics = {("ppo-paper", s): dict(ratio_max=ratio[s], ratio_max_after=[2.0] * 10,
                                      kl_mean=[0.01 * (s + 1)] * 10) for s in (0, 1)}
    metrics[("trpo-paper", 0)] = dict(ratio_max_after=[5.0] * 10, kl_mean=[0.1] * 10)
    out = _study_of(tmp_path, "tr", {"ppo-paper": {0: 1.0, 1: 1.0}, "trpo-paper": {0: 1.0}},
                    metrics)
    rows = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in _bench().trust_region_table(out)[2:]}
    pooled = sorted(ratio[0] + ratio[1])
    assert rows["ppo-paper"][2] == "2"
    assert rows["ppo-paper"][3] == f"{np.median(pooled):.2f}, {max(ratio[0]):.2f}-7.50"
    assert rows["ppo-paper"][4] == "2.00, 2.00-2.00"
    assert rows["ppo-paper"][5] == "0.0150, 0.0100-0.0200"
    assert rows["trpo-paper"][3] == "- (not logged)" and rows["trpo-paper"][4] == "5.00, 5.00-5.00"


def test_trpo_paper_variants_each_set_one_key_back_to_trpo():
    """bench/studies/trpo_paper_variants.toml: every config is trpo-paper with exactly one
    key at trpo's value, and together they cover every key where the two presets differ
    (but total_steps, 999,424 against 1M, and max_kl_final, a constant limit in both)."""
    from pathlib import Path

    from pgscope.study import load_spec

    spec = load_spec(Path(__file__).parent.parent / "bench" / "studies"
                     / "trpo_paper_variants.toml")
    env = spec.envs[0]
    paper, own = (make_config(p, env).to_dict() for p in ("trpo-paper", "trpo"))
    differ = {k for k in paper if paper[k] != own[k]} - {"preset", "total_steps",
                                                          "max_kl_final"}
    assert differ == {"obs_norm", "value_lr", "action_clip"}
    assert make_config("trpo", env).max_kl_final in (0, paper["max_kl"])
    covered = set()
    for label in spec.labels:
        run = next(r for r in spec.runs() if r.label == label)
        variant = run.config.to_dict()
        changed = {k for k in paper if variant[k] != paper[k]} - {"seed"}
        assert len(changed) == 1, (label, changed)
        (key,) = changed
        assert variant[key] == own[key]
        covered.add(key)
    assert covered == differ
    assert spec.total_steps == builtin_study("implementation-matters-hopper").total_steps
    assert spec.seeds == (0, 1, 2, 3, 4) and spec.score.rule == "paper"
    # the control: trpo itself, measured the same way
    control = load_spec(Path(__file__).parent.parent / "bench" / "studies"
                        / "trpo_control.toml")
    assert [(c.label, c.preset, c.overrides) for c in control.configs] == [("trpo", "trpo", {})]
    assert (control.envs, control.seeds, control.total_steps, control.score) == (
        spec.envs, spec.seeds, spec.total_steps, spec.score)


# --- the annealed KL limit ----------------------------------------------------------------
def test_their_kl_increment_never_reaches_the_step_that_reads_the_limit():
    """The pattern of their agent.py, written here from its description: a trainer whose
    __getattr__ falls through to a parameters object with its own __getattr__ and
    __setattr__ (a dict keyed by lower-case names), and no __setattr__ of its own. The
    augmented assignment ``trainer.MAX_KL += inc`` reads through to the parameters but
    writes an attribute of the trainer, so what the TRPO step reads (params.MAX_KL) stays
    at its start: trpo+-paper runs a constant limit, trpo+-paper-files the schedule."""
    class Params(dict):
        def __getattr__(self, name):
            return self[name.lower()]

        def __setattr__(self, name, value):
            self[name.lower()] = value

    class Trainer:
        def __init__(self, params):
            self.params = params

        def __getattr__(self, name):
            return getattr(self.params, name)

    trainer = Trainer(Params(max_kl=0.04, max_kl_increment=0.03 / 488))
    seen = []
    for _ in range(488):
        trainer.MAX_KL += trainer.MAX_KL_INCREMENT
        seen.append(trainer.params.MAX_KL)  # what trpo_step(..., params, ...) reads
    assert set(seen) == {0.04} and trainer.MAX_KL == pytest.approx(0.07)


def test_trpo_plus_paper_runs_a_constant_limit_and_the_files_variant_moves_it(monkeypatch):
    """Over training runs: every update's KL limit, as the TRPO update asks for it."""
    limits: list[float] = []
    real = trpo_mod.kl_limit
    monkeypatch.setattr(trpo_mod, "kl_limit",
                        lambda cfg, u: limits.append(real(cfg, u)) or limits[-1])
    small = dict(total_steps=4 * 64, steps_per_iter=64, minibatches=2, epochs=1,
                 hidden=(8,), cg_iters=3)
    for preset, want in (("trpo+-paper", [0.04] * 4),
                         ("trpo+-paper-files", [0.04 + 0.03 * k / 4 for k in (1, 2, 3, 4)])):
        limits.clear()
        cfg = make_config(preset, "Hopper-v5", small)
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, Path(tmp) / "run", progress=False)
        assert limits == pytest.approx(want), preset


def test_kl_limit_schedule_first_last_and_linear():
    cfg = make_config("trpo+-paper-files", "Hopper-v5")  # 0.04 -> 0.07 over 488 updates
    limits = np.array([trpo_mod.kl_limit(cfg, k) for k in range(488)])
    assert limits[0] == pytest.approx(0.04 + 0.03 / 488)  # raised before the first update
    assert limits[-1] == pytest.approx(0.07) and trpo_mod.kl_limit(cfg, 600) == limits[-1]
    assert np.allclose(np.diff(limits), 0.03 / 488)
    walker = make_config("trpo+-paper-files", "Walker2d-v5")  # downwards: 0.07 -> 0.04
    assert trpo_mod.kl_limit(walker, 487) == pytest.approx(0.04)
    for cfg in (make_config("trpo", "Hopper-v5"), make_config("trpo-paper", "Hopper-v5")):
        assert {trpo_mod.kl_limit(cfg, k) for k in (0, 100, 487)} == {0.13}
    plus = make_config("trpo+-paper", "Hopper-v5")  # as their code ran: constant
    assert {trpo_mod.kl_limit(plus, k) for k in (0, 100, 487)} == {0.04}


def _synthetic(cfg, seed=0):
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
    torch.manual_seed(seed)
    agent = build_agent(cfg, obs_space, act_space)
    gen = torch.Generator().manual_seed(seed)
    n = cfg.steps_per_iter
    obs = torch.randn(n, 3, generator=gen)
    with torch.no_grad():
        dist = agent.policy.dist(obs)
        actions = dist.mean + dist.stddev * torch.randn(n, 2, generator=gen)
        logp = agent.policy.log_prob(dist, actions)
        values = agent.value_net(obs)
    adv = torch.randn(n, generator=gen)
    batch = Batch(obs=obs, actions=actions, logp=logp, values=values, advantages=adv,
                  returns=values + adv, rewards=torch.zeros(n),
                  terminated=torch.zeros(n, dtype=torch.bool),
                  done=torch.zeros(n, dtype=torch.bool), next_obs=obs)
    return agent, batch


def test_trpo_steps_to_the_annealed_limit_of_each_update():
    # Small limits, exact Fisher (all samples), little damping: the full step is accepted
    # and its KL is just below the limit of that update.
    cfg = make_config("trpo", "Hopper-v5", dict(
        max_kl=1e-5, max_kl_final=4e-5, total_steps=4 * 256, steps_per_iter=256,
        minibatches=4, epochs=1, hidden=(8,), fisher_fraction=1.0, cg_damping=1e-3))
    kls = []
    for update in range(4):
        agent, batch = _synthetic(cfg)
        old = copy.deepcopy(agent.policy)
        state = {"updates": float(update)}
        m = update_one(cfg, agent.policy, agent.value_net,
                                 make_optimizer(cfg, agent.policy, agent.value_net), batch,
                                 torch.Generator().manual_seed(1), state)
        assert m["step_fraction"] == 1.0 and state["updates"] == update + 1
        with torch.no_grad():
            kls.append(float(agent.policy.kl(old.dist(batch.obs),
                                             agent.policy.dist(batch.obs)).mean()))
    for update, kl in enumerate(kls):
        limit = 1e-5 + 3e-5 * (update + 1) / 4
        assert 0.9 * limit < kl <= limit, (update, kl, limit)


def test_training_counts_the_updates_across_iterations(tmp_path, monkeypatch):
    seen: list[int] = []
    real = trpo_mod.kl_limit

    def spy(cfg, update):
        seen.append(update)
        return real(cfg, update)

    monkeypatch.setattr(trpo_mod, "kl_limit", spy)
    cfg = make_config("trpo", "Pendulum-v1", dict(
        max_kl=0.01, max_kl_final=0.02, total_steps=3 * 128, steps_per_iter=128,
        minibatches=2, epochs=1, hidden=(8,)))
    train(cfg, tmp_path / "run", progress=False)
    assert seen == [0, 1, 2]


def test_intervals_over_few_runs_are_flagged_in_the_console_and_the_tables(tmp_path):
    """3 seeds gave 'P(ppo-m > ppo) 0.00 [0.00, 0.00]' without a word: every interval over
    fewer than FEW_SAMPLES scored runs is flagged (console '!' and a footnote, and a
    few_samples column in the CSV/JSON tables)."""
    from pgscope.seed_statistics import FEW_SAMPLES
    from pgscope.study.analysis import format_summary, summarize

    _, out = _hand_study(tmp_path, "last-10")
    result = summarize(out)
    assert list(result["tables"]["aggregates"]["few_samples"]) == [True]
    text = format_summary(result)
    assert any(line.startswith("a!") for line in text.splitlines())
    assert f"! = intervals over fewer than {FEW_SAMPLES} scored runs" in text


def test_the_study_report_flags_intervals_over_few_runs(tmp_path):
    from pgscope.report.study_page import study_page

    _, out = _hand_study(tmp_path, "last-10")
    html = study_page(out).render()
    assert "Intervals over fewer than 10 scored runs (a (CartPole-v1))" in html


def test_the_study_report_links_each_seed_to_its_run_report(tmp_path):
    from pgscope.report.study_page import study_page

    _, out = _hand_study(tmp_path, "last-10")
    run = Path("runs/a/CartPole-v1/seed_1")
    (out / run / "report.html").write_text("<html></html>")  # only seed 1 has a report
    html = study_page(out).render()
    assert f'<a href="{run / "report.html"}">1</a>' in html
    assert f'title="pgscope report {out / "runs/a/CartPole-v1/seed_0"}">0</span>' in html
