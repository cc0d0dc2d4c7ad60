"""The offline DR3 experiment (pgscope.dr3) against exact answers on the tabular MDP.

A linear Q on the one-hot of (s, a) (encoding 'outer', no hidden layer) is a table, so
offline SARSA and offline TD must both converge to the behaviour policy's exact Q^pi
(dynamic programming, pgscope.envs.tabular) up to the dataset's sampling error. The MDP is
played with a time limit of 6 steps, so the dataset holds terminations (about 10% a step)
and truncations, which must not terminate the backup.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from pgscope.agent import build_agent
from pgscope.config import make_config
from pgscope.dr3 import TrainSettings, make_dataset, parse_variants, train_offline
from pgscope.dr3.dataset import OfflineError, load_dataset, save_dataset
from pgscope.dr3.summary import summarize
from pgscope.dr3.trainer import encode, init_params, member_losses, q_forward
from pgscope.envs.tabular import TabularEnv, default_mdp, exact_q, policy_matrix

LIMITED = "pgscope-test/TabularLimited-v0"
LIMIT = 6
GAMMA = 0.9

if LIMITED not in gym.registry:
    gym.register(LIMITED, entry_point=TabularEnv, max_episode_steps=LIMIT,
                 disable_env_checker=True)


def behaviour_agent():
    """A categorical policy on the tabular MDP, far enough from uniform to matter."""
    cfg = make_config("ppo", LIMITED, dict(obs_norm=False, obs_clip=False, hidden=(8,)))
    env = gym.make(LIMITED)
    torch.manual_seed(0)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    env.close()
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.mul_(30)
    return agent


@pytest.fixture(scope="module")
def tabular():
    agent = behaviour_agent()
    data = make_dataset(agent, transitions=12_000, seed=0, gamma=GAMMA, heldout_episodes=10,
                        reference_stride=1, reference_rollouts=30, horizon=150,
                        progress=False)
    mdp = default_mdp()
    pi = policy_matrix(agent.policy, mdp)
    return data, exact_q(mdp, pi, GAMMA)


def table(params, members: int) -> np.ndarray:
    """Q[s, a] of every member of a linear 'outer' network: ``(M, 6, 3)``."""
    x = encode(torch.eye(6).repeat_interleave(3, 0), torch.eye(3).repeat(6, 1), "outer")
    q, _ = q_forward(params, x.expand(members, *x.shape))
    return q.double().numpy().reshape(members, 6, 3)


def sampling_tolerance(data) -> np.ndarray:
    """Per (s, a): 5 standard errors of a Monte Carlo estimate of Q from the dataset's own
    episodes (the std of the discounted return-to-go over sqrt(visits)), plus 0.02 for
    the optimizer's noise. TD and SARSA estimates are no noisier than Monte Carlo ones here
    (tabular, same data). Returns are cut by the time limit, which makes their spread an
    underestimate of the infinite-horizon one; hence 5, not 3, standard errors."""
    t = data.tensors
    s, a = t["obs"].argmax(1).numpy(), t["action"].numpy()
    r = t["reward"].double().numpy()
    ends = (t["terminated"] | t["truncated"]).numpy()
    g = np.zeros(len(r))
    running = 0.0
    for i in range(len(r) - 1, -1, -1):
        running = r[i] + (0.0 if ends[i] else GAMMA * running)
        g[i] = running
    tol = np.zeros((6, 3))
    for si in range(6):
        for ai in range(3):
            sel = (s == si) & (a == ai)
            tol[si, ai] = 5 * g[sel].std() / np.sqrt(sel.sum()) + 0.02
    return tol


def test_dataset_boundaries_and_truncation(tabular):
    data, _ = tabular
    t = data.tensors
    n = len(data)
    term, trunc = t["terminated"].numpy(), t["truncated"].numpy()
    ends = term | trunc
    assert term.sum() > 500 and trunc.sum() > 500  # both kinds of episode end occur
    # both at once: a termination on the time limit's last step; termination wins
    assert (term & trunc).sum() < 0.2 * trunc.sum()
    # within an episode s' is the next row's s and a' the next row's a; ids and steps count
    cont = ~ends[:-1]
    assert torch.equal(t["next_obs"][:-1][cont], t["obs"][1:][cont])
    assert torch.equal(t["next_action"][:-1][cont], t["action"][1:][cont])
    assert (np.diff(t["episode"].numpy()) == ends[:-1]).all()
    steps = t["step"].numpy()
    assert (steps[1:][cont] == steps[:-1][cont] + 1).all() and (steps[1:][ends[:-1]] == 0).all()
    assert (steps[trunc] == LIMIT - 1).all()
    # a' is sampled exactly where the episode does not go on in the dataset
    sampled = t["next_action_sampled"].numpy()
    assert (sampled[:-1] == ends[:-1]).all() and sampled[-1]
    # after a truncation s' is the true last state (one-hot), not the reset one; after a
    # termination the env's all-zero observation
    assert (t["next_obs_raw"][torch.from_numpy(trunc & ~term)].sum(1) == 1).all()
    assert (t["next_obs_raw"][torch.from_numpy(term)].sum(1) == 0).all()
    # the behaviour policy at s' is stored for TD's fresh samples
    assert t["next_logits"].shape == (n, 3)


def test_monte_carlo_reference_matches_dynamic_programming(tabular):
    """The reference rollouts ignore the 6-step time limit (module doc's truncation rule),
    so they estimate the infinite-horizon Q^pi: the errors in units of their standard
    errors have a mean square near 1 (the returns are skewed, so a t statistic from 30
    rollouts has heavier tails than a normal one) and a pooled mean within 3 pooled
    standard errors of 0."""
    data, q_exact = tabular
    ref = data.reference
    s, a = ref["obs"].argmax(1).numpy(), ref["action"].numpy()
    err = ref["q"].numpy() - q_exact[s, a]
    se = ref["q_se"].numpy()
    assert len(err) > 30
    assert ((err / se) ** 2).mean() < 2.5
    assert abs(err.mean()) < 3 * np.sqrt((se ** 2).mean() / len(err))


def test_sarsa_and_td_converge_to_exact_q(tabular):
    """Both backups reach DP's Q^pi of the behaviour policy within sampling error; so does
    DR3 here, whose term has no gradient when phi is the fixed one-hot input."""
    data, q_exact = tabular
    settings = TrainSettings(variants=("sarsa", "td", "dr3:0.1"), seeds=(0,), steps=500,
                             hidden=(), lr=0.02, batch=512, target="polyak:0.2",
                             encoding="outer", log_every=500, checkpoint_every=500,
                             q_mean_pairs=64)
    result = train_offline(data, settings, progress=False)
    tol = sampling_tolerance(data)
    assert tol.max() < 0.3  # the test means something: Q^pi spreads by ~1 per state
    q = table(result.params, 3)
    for i, member in enumerate(result.members):
        err = np.abs(q[i] - q_exact)
        assert (err <= tol).all(), (member.name, err.max(), tol[err > tol])
    np.testing.assert_allclose(q[1], q[2], atol=1e-6)  # no DR3 gradient on one-hot phi


def empirical_q(data, pi: np.ndarray) -> np.ndarray:
    """Q of policy ``pi`` in the dataset's own (certainty-equivalent) MDP: the rewards and
    transitions counted from its rows (a termination ends the backup, a truncation does
    not). Offline TD on a table converges to this, not to the true MDP's Q."""
    t = data.tensors
    s, a = t["obs"].argmax(1).numpy(), t["action"].numpy()
    s_next = t["next_obs_raw"].argmax(1).numpy()
    live = ~t["terminated"].numpy().astype(bool)
    n_s, n_a = pi.shape
    counts = np.zeros((n_s, n_a))
    np.add.at(counts, (s, a), 1)
    reward = np.zeros((n_s, n_a))
    np.add.at(reward, (s, a), t["reward"].double().numpy())
    P = np.zeros((n_s, n_a, n_s))
    np.add.at(P, (s[live], a[live], s_next[live]), 1)
    assert counts.min() > 100  # every pair is covered
    reward, P = reward / counts[..., None][..., 0], P / counts[..., None]
    # Q = R + gamma P Pi Q, with (Pi Q)[s'] = sum_a' pi(a'|s') Q(s', a')
    P_pi = np.einsum("sat,tb->satb", P, pi).reshape(n_s * n_a, n_s * n_a)
    q = np.linalg.solve(np.eye(n_s * n_a) - GAMMA * P_pi, reward.reshape(-1))
    return q.reshape(n_s, n_a)


def test_td_from_another_policy_converges_to_that_policys_q(tabular):
    """``td:K`` evaluates the behaviour policy with its temperature times K off-policy from
    the same data: ``td:0`` the behaviour policy's argmax policy and ``td:0.25`` ``pi^4``
    renormalized. A table trained by TD reaches the target policy's Q in the dataset's
    own MDP (up to the minibatch noise), which lies within sampling error of DP's exact
    Q of that policy and far from the behaviour policy's Q."""
    data, q_behaviour = tabular
    mdp = default_mdp()
    pi = policy_matrix(behaviour_agent().policy, mdp)
    greedy = np.eye(3)[pi.argmax(1)]
    sharper = pi ** 4 / (pi ** 4).sum(1, keepdims=True)
    settings = TrainSettings(variants=("td:0", "td:0.25", "td"), seeds=(0,), steps=500,
                             hidden=(), lr=0.02, batch=512, target="polyak:0.2",
                             encoding="outer", log_every=500, checkpoint_every=500,
                             q_mean_pairs=64)
    result = train_offline(data, settings, progress=False)
    assert [m.name for m in result.members] == ["td0_s0", "td0.25_s0", "td_s0"]
    q = table(result.params, 3)
    tol = sampling_tolerance(data)
    for i, target in enumerate((greedy, sharper, pi)):
        q_dataset = empirical_q(data, target)
        assert np.abs(q[i] - q_dataset).max() < 0.1, result.members[i].name
        q_exact = exact_q(mdp, target, GAMMA)
        assert (np.abs(q_dataset - q_exact) <= 1.5 * tol).all()
        if i < 2:  # another answer than the behaviour policy's, by 3x the tolerance
            assert np.abs(q_dataset - empirical_q(data, pi)).max() > 0.3


def test_td_spread_scales_the_gaussian_noise():
    """Continuous actions: ``a' = mean + K std noise`` (clipped to the bounds) with the
    member's own generator, so K = 0 gives the mean and K = 2 twice K = 1's deviation."""
    from pgscope.dr3.trainer import TrainingData

    td = object.__new__(TrainingData)
    td.discrete, td.n_actions = False, 2
    td.behaviour = {"next_mean": torch.tensor([[0.1, -0.2], [0.3, 0.4]]),
                    "std": torch.tensor([0.5, 0.2]),
                    "low": torch.tensor([-5.0, -5.0]), "high": torch.tensor([5.0, 0.42])}
    idx = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1]] * 3)

    def draw(spread):
        gens = [torch.Generator().manual_seed(7) for _ in range(3)]
        return td.sample_next_actions(idx, gens, torch.tensor(spread))

    a = draw([0.0, 1.0, 2.0])
    mean = td.behaviour["next_mean"][idx[0]]
    torch.testing.assert_close(a[0], mean)
    dev1, dev2 = a[1] - mean, a[2] - mean
    free = a[2] < td.behaviour["high"]  # components the upper bound did not clip
    assert free.any() and not free.all()
    torch.testing.assert_close(dev2[free], 2 * dev1[free])
    assert (a[2][~free] == td.behaviour["high"].expand_as(a[2])[~free]).all()


def mlp_from(ws) -> torch.nn.Sequential:
    """A plain torch.nn ReLU MLP holding one member's weights (``(in, out)`` stacked
    layout -> ``nn.Linear``'s ``(out, in)``)."""
    layers: list[torch.nn.Module] = []
    for k in range(0, len(ws), 2):
        linear = torch.nn.Linear(*ws[k].shape).double()
        with torch.no_grad():
            linear.weight.copy_(ws[k].T)
            linear.bias.copy_(ws[k + 1][0])
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def direct_loss(net, target_net, x, x_next, reward, not_terminated, coef):
    """The DR3 loss written out for one member: TD error against a no-gradient target,
    plus coef * mean phi(s, a) . phi(s', a') over the pairs whose s' is not terminal, phi
    the input of the last layer. Signed: the trainer's |.| is the same on ReLU features."""
    features = net[:-1]
    with torch.no_grad():
        y = reward + GAMMA * not_terminated * target_net(x_next).squeeze(-1)
    td = ((net(x).squeeze(-1) - y) ** 2).mean()
    live = not_terminated > 0
    return td + coef * (features(x[live]) * features(x_next[live])).sum(-1).mean()


@pytest.mark.parametrize("coefs", [(0.0, 0.3, 1.5), (0.3, 1.5)])
def test_dr3_gradient_equals_autograd_of_direct_loss(coefs):
    torch.manual_seed(1)
    M, B = len(coefs), 32
    params = [p.double().requires_grad_() for p in init_params([5, 7, 6, 1], range(M))]
    target = [(p.detach() + 0.1 * torch.randn_like(p)).double() for p in params]
    x, x_next = torch.randn(M, B, 5).double(), torch.randn(M, B, 5).double()
    reward, not_term = torch.randn(M, B).double(), (torch.rand(M, B) > 0.2).double()
    loss, _, _ = member_losses(params, target, x, x_next, reward, not_term, GAMMA,
                               torch.tensor(coefs, dtype=torch.float64))
    grads = torch.autograd.grad(loss, params)
    for m, c in enumerate(coefs):
        net = mlp_from([p[m].detach() for p in params])
        direct = direct_loss(net, mlp_from([p[m] for p in target]), x[m], x_next[m],
                             reward[m], not_term[m], c)
        expected = torch.autograd.grad(direct, list(net.parameters()))
        for k, g in enumerate(grads):  # W (in, out) <-> weight (out, in); b (1, out)
            e = expected[k].T if k % 2 == 0 else expected[k][None]
            torch.testing.assert_close(g[m], e, rtol=1e-10, atol=1e-12)


def test_dr3_term_leaves_out_terminal_pairs_on_a_hand_made_batch():
    """Which pairs enter the offline term, exactly: those whose s' is not terminal
    (truncated ones included: the target bootstraps there). Without hidden layers phi is
    the input itself, so the term's share of the loss is known by hand."""
    from pgscope.features import dr3_pairs

    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 1.0], [2.0, 0.0]]])
    x_next = torch.tensor([[[4.0, 0.0], [0.0, -1.0], [3.0, 3.0], [2.0, 1.0], [-1.0, 5.0]]])
    # per-pair dot products: 4, -2, 18, 3, -2; pair 2 ends in a terminal state and pair 4
    # in a truncation (not terminal)
    not_terminated = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    reward = torch.zeros(1, 5)
    params = init_params([2, 1], [0])
    with_term, _, _ = member_losses(params, params, x, x_next, reward, not_terminated, GAMMA,
                                    torch.tensor([0.5]))
    without, _, _ = member_losses(params, params, x, x_next, reward, not_terminated, GAMMA,
                                  torch.tensor([0.0]))
    want = 0.5 * (4 + 2 + 3 + 2) / 4  # pairs 0, 1, 3, 4; |phi . phi'|
    assert float(with_term - without) == pytest.approx(want, rel=1e-6)
    assert dr3_pairs(torch.tensor([False, True, False])).tolist() == [True, False, True]


def test_dataset_dr3_pairs_are_its_non_terminal_transitions(tabular):
    from pgscope.dr3.trainer import TrainingData

    data, _ = tabular
    td = TrainingData(data, "concat", 64)
    terminated = data.tensors["terminated"].bool()
    assert terminated.any() and data.tensors["truncated"].bool().any()
    assert torch.equal(td.dr3_pairs, ~terminated)


def test_offline_feature_srank_is_on_a_fixed_set_whatever_the_batch(tabular):
    """feature_srank is measured on min(transitions, 2048) fixed dataset pairs: the same
    network (a learning rate of 1e-30 moves no weight beyond 1e-20) trained with --batch 2
    and --batch 128 logs the same srank and row count; an srank of the 2-pair minibatch
    could not exceed 2."""
    from pgscope.dr3.trainer import TrainingData
    from pgscope.features import SRANK_EVAL_ROWS, srank

    data, _ = tabular
    runs = [train_offline(data, TrainSettings(variants=("td",), seeds=(0,), steps=1,
                                              hidden=(32, 32), lr=1e-30, batch=batch,
                                              log_every=1, checkpoint_every=1),
                          progress=False) for batch in (2, 128)]
    for p, q in zip(runs[0].params, runs[1].params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-20)
    lines = [r.last["td_s0"] for r in runs]
    rows = min(len(data), SRANK_EVAL_ROWS)
    assert lines[0]["feature_srank_rows"] == lines[1]["feature_srank_rows"] == rows == 2048
    td = TrainingData(data, "concat", 64)
    _, phi = q_forward(runs[0].params, td.srank_x[None])
    assert lines[0]["feature_srank"] == lines[1]["feature_srank"] == srank(phi[0]) > 2


def test_batched_members_equal_single_member_training(tabular):
    """Each member of a batch trains exactly as it would alone (same seed): its weights and
    log lines agree to 1e-5 whatever else is in the batch."""
    data, _ = tabular
    common = dict(steps=60, hidden=(16,), lr=3e-3, batch=64, target="polyak:0.05",
                  encoding="concat", log_every=30, checkpoint_every=30, q_mean_pairs=64)
    batched = train_offline(data, TrainSettings(variants=("sarsa", "td", "dr3:0.3"),
                                                seeds=(0, 1), **common), progress=False)
    names = [m.name for m in batched.members]
    assert len(set(names)) == 6
    for i, member in enumerate(batched.members):
        alone = train_offline(data, TrainSettings(variants=(member.variant.name,),
                                                  seeds=(member.seed,), **common),
                              progress=False)
        for p, q in zip(batched.params, alone.params, strict=True):
            torch.testing.assert_close(p[i], q[0], rtol=1e-5, atol=1e-6)
        for key in ("td_loss", "feature_dot", "q_abs_error", "q_mean"):
            assert batched.last[member.name][key] == pytest.approx(
                alone.last[member.name][key], rel=1e-5, abs=1e-7)
    # distinct seeds and variants really differ (the comparison is not vacuous)
    assert not torch.equal(batched.params[0][0], batched.params[0][1])
    assert batched.last[names[0]]["td_loss"] != batched.last[names[2]]["td_loss"]


def test_killed_experiment_resumes_to_the_uninterrupted_result(tabular, tmp_path):
    data, _ = tabular
    path = tmp_path / "data"
    save_dataset(data, path)
    settings = TrainSettings(variants=("sarsa", "dr3:0.3"), seeds=(0, 1), steps=40,
                             hidden=(8,), lr=3e-3, batch=32, log_every=10,
                             checkpoint_every=20, q_mean_pairs=64)
    whole = train_offline(path, settings, tmp_path / "whole", progress=False)

    def kill(step, lines):
        if step == 30:  # after the checkpoint of step 20 and the log lines of step 30
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_offline(path, settings, tmp_path / "killed", progress=False, on_log=kill)
    resumed = train_offline(path, settings, tmp_path / "killed", progress=False)
    for p, q in zip(whole.params, resumed.params, strict=True):
        assert torch.equal(p, q)
    for m in whole.members:
        a = (tmp_path / "whole" / "members" / f"{m.name}.jsonl").read_text().splitlines()
        b = (tmp_path / "killed" / "members" / f"{m.name}.jsonl").read_text().splitlines()
        strip = [{k: v for k, v in json.loads(x).items() if k != "steps_per_s"} for x in a]
        assert strip == [{k: v for k, v in json.loads(x).items() if k != "steps_per_s"}
                         for x in b]
        assert [json.loads(x)["step"] for x in b] == [10, 20, 30, 40]
    # another experiment in the same directory is refused
    with pytest.raises(OfflineError, match="other settings"):
        train_offline(path, TrainSettings(variants=("td",), seeds=(0, 1), steps=40,
                                          log_every=10, checkpoint_every=20),
                      tmp_path / "whole", progress=False)
    result = summarize(tmp_path / "whole")
    row = {r["variant"]: r for r in result["table"]}["dr3:0.3"]
    assert row["seeds"] == 2 and row["step"] == 40
    d = row["feature_dot"]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert (tmp_path / "whole" / "summary" / "dr3-offline.png").stat().st_size > 10_000


@pytest.mark.parametrize("variants, message", [
    ("sarsa,q", "unknown variant 'q'"), ("dr3", "unknown variant 'dr3'"),
    ("dr3:-1", "coefficient C > 0"), ("td,td", "repeat"), ("td,td:1", "repeat"),
    ("td:-0.5", "spread K >= 0"), ("td:x", "unknown variant 'td:x'"), ("", "at least one")])
def test_bad_variants_are_refused(variants, message):
    with pytest.raises(OfflineError, match=message):
        parse_variants(variants)


def test_bad_input_fails_before_compute(tmp_path, capsys):
    from pgscope.cli import main

    assert main(["dr3", "train", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--variants", "sarsa,dr3:0"]) == 2
    assert "coefficient C > 0" in capsys.readouterr().err
    assert main(["dr3", "train", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--target", "polyak:2"]) == 2
    assert "--target 'polyak:2'" in capsys.readouterr().err
    assert main(["dr3", "train", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a DR3 dataset directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(OfflineError, match="not a DR3 dataset"):
        load_dataset(tmp_path)
    assert main(["dr3", "dataset", str(tmp_path / "norun"), "--out", str(tmp_path / "d"),
                 "--transitions", "1"]) == 2
    assert "--transitions must be at least 2" in capsys.readouterr().err
