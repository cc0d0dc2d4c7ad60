"""The probes against exact answers on the tabular MDP (pgscope/Tabular-v0), and their
command-line interface."""

import json

import numpy as np
import pytest
import torch

import pgscope.probes as probes_mod
from pgscope import load_agent, make_config, train
from pgscope.cli import EXIT_ERROR, main
from pgscope.envs.tabular import (
    ENV_ID,
    default_mdp,
    exact_expected_gradient,
    exact_values,
    expected_gae_advantage,
    policy_matrix,
    stationary_distribution,
    value_vector,
)
from pgscope.metrics import TIMING_KEYS
from pgscope.probes.baselines import fit_true_value, monte_carlo_dataset
from pgscope.probes.gradients import gradient_probe
from pgscope.probes.landscape import episode_returns, landscape_probe, nested_means
from pgscope.probes.sampling import sample_batch
from pgscope.probes.values import effective_horizon, returns_to_go

# Raw rewards and unnormalized advantages keep the exact answers exact.
EXACT = dict(steps_per_iter=256, num_envs=1, minibatches=4, epochs=2, total_steps=512,
             reward_scale=False, reward_clip=False, obs_norm=False, obs_clip=False,
             adv_norm=False, gamma=0.9, gae_lambda=0.95, checkpoint_every=1)


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tab") / "run"
    return train(make_config("ppo", ENV_ID, EXACT), out, progress=False)


def _exact_gradients(agent):
    mdp, cfg = default_mdp(), agent.config
    v_hat = value_vector(agent.value_net, mdp)
    policy_grad = exact_expected_gradient(agent.policy, mdp, cfg.gamma, cfg.gae_lambda, v_hat)
    pi = policy_matrix(agent.policy, mdp)
    mu = stationary_distribution(mdp, pi)
    mean_adv = (pi * expected_gae_advantage(mdp, pi, v_hat, cfg.gamma, cfg.gae_lambda)).sum(1)
    # value loss (V - (V_old + A))^2 at V = V_old has gradient -2 A grad V
    v = agent.value_net(torch.as_tensor(mdp.observations(), dtype=torch.float32))
    weights = torch.as_tensor(-2 * mu * mean_adv, dtype=torch.float32)
    value_grad = torch.autograd.grad((weights * v).sum(), list(agent.value_net.parameters()))
    return {"policy": policy_grad.double().numpy(),
            "value": torch.cat([g.reshape(-1) for g in value_grad]).double().numpy()}


def test_gradient_probe_converges_to_exact_expected_gradient(tabular_run):
    agent = load_agent(tabular_run)
    exact = _exact_gradients(agent)
    result = gradient_probe(agent, sizes=(64, 1024, 16384), k=6, true_pairs=200_000,
                            progress=False, reference=exact)
    assert result["true"]["policy_cosine_to_reference"] > 0.99
    assert result["true"]["value_cosine_to_reference"] > 0.99
    for net in ("policy", "value"):
        to_exact = [row["cosine_to_reference"]["mean"] for row in result[net]]
        pairwise = [row["pairwise_cosine"]["mean"] for row in result[net]]
        traces = [row["covariance_trace"]["mean"] for row in result[net]]
        assert to_exact[-1] > 0.95 and to_exact[-1] > to_exact[0], (net, to_exact)
        assert pairwise[-1] > pairwise[0], (net, pairwise)
        assert traces[0] > 10 * traces[-1], (net, traces)  # variance ~ 1/N: 256x more pairs
        for row in result[net]:
            for stat in ("pairwise_cosine", "cosine_to_true", "covariance_trace"):
                ci = row[stat]
                assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]


def test_true_returns_of_the_value_probe_match_exact_values(tabular_run):
    agent = load_agent(tabular_run)
    cfg, mdp = agent.config, default_mdp()
    H = effective_horizon(cfg.gamma, 0.01)
    keep = 256
    batch = sample_batch(agent, 64 * (keep + H), seed=5, horizon=keep + H, max_envs=64)
    shape = (keep + H, 64)
    G = returns_to_go(batch.rewards.numpy().reshape(shape), batch.done.numpy().reshape(shape),
                      cfg.gamma)[:keep].reshape(-1)
    states = batch.obs.numpy().reshape(*shape, -1)[:keep].reshape(-1, mdp.n_states).argmax(1)
    exact = exact_values(mdp, policy_matrix(agent.policy, mdp), cfg.gamma)
    for s in range(mdp.n_states):
        g = G[states == s]
        assert len(g) > 200
        se = g.std() / np.sqrt(len(g)) * 3  # within-episode correlation: be generous
        assert abs(g.mean() - exact[s]) < 4 * se + 0.02 * abs(exact[s]), (s, g.mean(), exact[s])


def test_probe_command_writes_json_and_png_and_refuses_bad_settings(tabular_run, tmp_path,
                                                                    capsys):
    out = tmp_path / "probes"
    code = main(["probe", "all", str(tabular_run), "--out", str(out), "--sizes", "64", "256",
                 "--k", "3", "--true-pairs", "4096", "--pairs", "2048", "--fit-pairs", "4096",
                 "--landscape-counts", "200", "--landscape-grid", "0", "1", "--quiet"])
    assert code == 0
    for kind in ("gradients", "values", "baselines", "landscape", "trust-region", "features"):
        data = json.loads((out / f"{kind}.json").read_text())
        assert data["checkpoint"]["run"] == str(tabular_run)
        assert (out / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    grads = json.loads((out / "gradients.json").read_text())
    assert [r["n"] for r in grads["policy"]] == [64, 256]
    tr = json.loads((out / "trust-region.json").read_text())
    assert len(tr["replay"]["per_epoch"]) == EXACT["epochs"]
    assert tr["replay"]["per_epoch"][-1]["kl_mean"] >= 0
    values = json.loads((out / "values.json").read_text())
    assert values["states_with_true_return"] > 0

    bad = tmp_path / "bad"
    assert main(["probe", "gradients", str(tabular_run), "--out", str(bad), "--sizes", "1000",
                 "--true-pairs", "2000", "--quiet"]) == EXIT_ERROR
    assert "too small for the grid" in capsys.readouterr().err
    assert not bad.exists()
    assert main(["probe", "values", str(tmp_path / "missing"), "--out", str(bad)]) == EXIT_ERROR
    assert "neither a checkpoint file nor a run directory" in capsys.readouterr().err
    assert main(["probe", "values", str(tabular_run), "--checkpoint", "7", "--out",
                 str(bad)]) == EXIT_ERROR
    assert "no checkpoint of iteration 7" in capsys.readouterr().err
    assert not bad.exists()


def test_true_value_baseline_fit_approaches_exact_values(tabular_run):
    agent = load_agent(tabular_run)
    mdp = default_mdp()
    obs, returns = monte_carlo_dataset(agent, 60_000, seed=1)
    net, fit = fit_true_value(agent, obs, returns, seed=1)
    exact = exact_values(mdp, policy_matrix(agent.policy, mdp), agent.config.gamma)
    fitted = value_vector(net, mdp)
    assert np.abs(fitted - exact).max() < 0.08, (fitted, exact)
    assert np.abs(fitted - exact).mean() < 0.04, (fitted, exact)
    # the agent's own critic (two short iterations) is much further from the truth
    assert np.abs(value_vector(agent.value_net, mdp) - exact).max() > 0.1
    assert fit["states"] == len(obs)


def test_recomputed_advantages_with_the_agent_value_net_equal_the_batch(tabular_run):
    agent = load_agent(tabular_run)
    batch = sample_batch(agent, 4 * 256, seed=3, max_envs=4)
    redo = batch.recompute_advantages(agent.value_net, agent.config.gamma,
                                      agent.config.gae_lambda)
    torch.testing.assert_close(redo, batch.advantages, rtol=1e-5, atol=1e-6)


def test_nested_means_use_first_started_episodes():
    eps = [(0, 10, 1.0), (0, 30, 2.0), (10, 5, 3.0), (15, 50, 4.0)]
    # cumulative lengths 10, 40, 45, 95: 20 steps need the first two episodes
    assert nested_means(eps, [5, 20, 45, 1000]) == [1.0, 1.5, 2.0, 2.5]


def test_episode_returns_run_every_started_episode_to_its_end(tabular_run):
    agent = load_agent(tabular_run)
    eps = episode_returns(agent, 3000, seed=0, n_envs=8)
    assert sum(e[1] for e in eps) >= 3000
    assert all(e[1] >= 1 for e in eps)
    starts = [e[0] for e in eps]
    assert starts == sorted(starts) and max(starts) < 3000
    mdp = default_mdp()
    exact = exact_values(mdp, policy_matrix(agent.policy, mdp), 1.0) @ mdp.rho
    rets = np.array([e[2] for e in eps])
    assert abs(rets.mean() - exact) < 4 * rets.std() / np.sqrt(len(rets))


def test_landscape_probe_on_tabular(tabular_run):
    result = landscape_probe(tabular_run, steps=(0, 1, 2), directions=(0, 1), counts=(200, 800),
                             progress=False, random_directions=2)
    surr = np.array(result["surrogate"])
    assert surr.shape == (3, 2)
    assert surr[1, 0] > surr[0, 0]  # the actual step improves the surrogate it optimized
    assert set(result["true_return"]) == {"200", "800"}
    assert result["delta_norm"] > 0
    with pytest.raises(Exception, match="grid"):
        landscape_probe(tabular_run, steps=(0,), directions=(0,), counts=(100,))
    with pytest.raises(Exception, match="parameter range"):
        landscape_probe(tabular_run, steps=(0, 1e6), directions=(0,), counts=(100,))


def test_probes_scheduled_during_training_do_not_change_training(tmp_path):
    base = dict(EXACT, total_steps=256 * 4, checkpoint_every=100)
    plain = train(make_config("ppo", ENV_ID, base), tmp_path / "plain", progress=False)
    probed = train(make_config("ppo", ENV_ID, dict(
        base, probe_every=2, probe_sizes=(32, 64), probe_true_pairs=1024,
        probe_value_pairs=512, probe_kinds="gradients,values")), tmp_path / "probed",
        progress=False)
    assert sorted(p.name for p in (probed / "probes").iterdir()) == ["iter_000002",
                                                                    "iter_000004"]
    for it in ("iter_000002", "iter_000004"):
        assert {p.name for p in (probed / "probes" / it).iterdir()} == {
            "gradients.json", "gradients.png", "values.json", "values.png"}

    def strip(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items()
                 if k not in TIMING_KEYS} for x in lines]

    assert strip(plain) == strip(probed)


def test_bad_probe_schedule_is_a_config_error():
    with pytest.raises(Exception, match="probe_kinds"):
        make_config("ppo", ENV_ID, dict(probe_every=2, probe_kinds="gradients,landscpe"))
    with pytest.raises(Exception, match="probe_true_pairs"):
        make_config("ppo", ENV_ID, dict(probe_every=2, probe_sizes=(1000,),
                                        probe_true_pairs=2000))


def test_probe_refuses_a_checkpoint_of_another_run(tabular_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tabular_run, run)
    other = train(make_config("ppo", "CartPole-v1", dict(steps_per_iter=64, total_steps=64,
                                                         minibatches=2, epochs=1)),
                  tmp_path / "other", progress=False)
    shutil.copy(other / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    out = tmp_path / "out"
    assert main(["probe", "values", str(run), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert "belongs to a different run" in capsys.readouterr().err
    assert not out.exists()


def test_episodes_that_start_together_are_not_ordered_by_length(tabular_run):
    """The first episodes of all envs start at step 0; nested_means counts the first-started
    ones, so among those the order must not depend on the episode (sorting them by length
    put the shortest first and biased small-count landscape estimates low)."""
    agent = load_agent(tabular_run)
    orders = []
    for seed in range(3):
        eps = episode_returns(agent, 200, seed=seed, n_envs=8)
        first = [length for start, length, _ in eps if start == 0]
        assert len(first) == 8
        orders.append(first == sorted(first))
    assert not all(orders)


def test_the_value_probe_bar_counts_the_pairs_it_draws(tabular_run, monkeypatch):
    """The bar's total is what the probe draws (whole chunks), so it never overshoots:
    the demo showed '20480pair' of a total of 20000."""
    import pgscope.probes.values as values_mod

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(values_mod, "tqdm", Bar)
    agent = load_agent(tabular_run)
    segments = list(values_mod.true_return_segments(agent, 1000, seed=0, progress_desc="v"))
    drawn = sum(s.batch.obs.shape[0] for s in segments)
    assert bars and bars[0].n == bars[0].total == drawn >= 1000


def test_the_values_headline_says_how_many_states_each_error_rests_on(tabular_run):
    """'vs true returns 0.0188' was printed beside 'vs cut returns 1.18' without saying
    that most states were excluded from the first."""
    from pgscope.probes import probes
    from pgscope.probes.values import value_probe

    result = value_probe(load_agent(tabular_run), n_pairs=1000, seed=0, n_boot=50,
                         progress=False)
    line = probes().get("values").headline(result)
    states, kept = result["states"], result["states_with_true_return"]
    assert f"({kept} of the {states} states" in line and f"{states - kept} excluded" in line
    assert f"vs GAE targets {line.split('vs GAE targets ')[1].split(' (')[0]} ({states} " \
           "states)" in line


def test_scheduled_probes_print_lines_not_bars_and_the_bar_shows_the_runs_own_speed(
        tmp_path, capsys):
    """During training, scheduled probes say one line before and after (above the
    training bar) instead of drawing bars of their own, and the training bar shows the
    run's sps, not tqdm's rate (which would count the probes' time)."""
    train(make_config("ppo", ENV_ID, dict(
        EXACT, total_steps=256 * 2, probe_every=2, probe_sizes=(32, 64),
        probe_true_pairs=1024, probe_value_pairs=512, probe_kinds="gradients,values")),
        tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "iteration 2: scheduled probes (gradients,values) ..." in err
    assert "iteration 2: scheduled probes done in" in err
    assert "pair/s" not in err and "probe:" not in err  # no probe bar
    assert "sps=" in err and "step/s" not in err and "it/s" not in err


def test_a_failed_scheduled_probe_advises_commands_the_cli_accepts(tmp_path, monkeypatch,
                                                                  capsys):
    from pgscope.cli import build_parser

    def fail(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(probes_mod, "scheduled_probes", fail)
    run = train(make_config("ppo", ENV_ID, dict(
        EXACT, total_steps=256 * 2, probe_every=2, probe_kinds="gradients,values")),
        tmp_path / "run", progress=False)
    advice = capsys.readouterr().err.split("Re-run them with: ")[1].strip()
    commands = advice.split(" && ")
    assert [c.split()[2] for c in commands] == ["gradients", "values"]
    for command in commands:
        args = build_parser().parse_args(command.split()[1:])
        assert args.kind == command.split()[2] and str(args.run_dir) == str(run)
