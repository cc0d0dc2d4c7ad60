"""Critic-feature statistics (pgscope.features) against hand-computed cases, the value net's
features, the ``features`` probe, the per-iteration feature metrics and the DR3 switch."""

import math

import pytest
import torch

from pgscope.algos import update_one
from pgscope.engine.rollout import collect_one
from pgscope.features import feature_cosine, feature_dot, feature_norm, srank


# -- the pure functions ------------------------------------------------------------------
def test_feature_dot_cosine_norm_hand_computed():
    phi = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    nxt = torch.tensor([[2.0, 0.0, 1.0], [-3.0, 0.0, -4.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(feature_dot(phi, nxt), torch.tensor([4.0, -25.0, 0.0]))
    torch.testing.assert_close(feature_norm(phi), torch.tensor([3.0, 5.0, 0.0]))
    # 4 / (3 sqrt 5); exactly opposite; a zero vector has cosine 0
    torch.testing.assert_close(feature_cosine(phi, nxt),
                               torch.tensor([4.0 / (3.0 * math.sqrt(5.0)), -1.0, 0.0]))


def test_feature_functions_keep_leading_dimensions():
    phi, nxt = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert feature_dot(phi, nxt).shape == (3, 5)
    assert feature_cosine(phi, nxt).shape == (3, 5)
    assert feature_norm(phi).shape == (3, 5)
    torch.testing.assert_close(feature_dot(phi, nxt)[1, 2], phi[1, 2] @ nxt[1, 2])


def test_feature_pair_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        feature_dot(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        feature_cosine(torch.zeros(4, 3), torch.zeros(3, 3))


def test_srank_orthonormal_rows_is_full_rank():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert srank(q[:5]) == 5  # five orthonormal rows: five equal singular values
    assert srank(torch.eye(6)) == 6


def test_srank_rank_deficient():
    # Phi = U diag(3, 2, 1) V^T: 50 x 16 of rank 3; cumulative shares 1/2, 5/6, 1
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 3, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 3, generator=gen, dtype=torch.float64))
    low = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    assert srank(low) == 3                   # rounding directions carry ~1e-16 of the mass
    assert srank(low, delta=0.2) == 2        # 5/6 >= 0.8
    assert srank(low, delta=0.6) == 1        # 1/2 >= 0.4
    assert srank(torch.ones(10, 4)) == 1
    assert srank(torch.zeros(10, 4)) == 0


def test_srank_threshold_hit_exactly_and_just_missed():
    # singular values 3 and 1: the first carries 3/4 of the mass
    phi = torch.diag(torch.tensor([3.0, 1.0]))
    assert srank(phi, delta=0.25) == 1       # 3/4 >= 1 - 0.25: hit exactly
    assert srank(phi, delta=0.2499) == 2     # 3/4 <  0.7501: just missed
    # 98, 1, 1 of 100: delta 0.01 needs 99% of the mass
    phi = torch.diag(torch.tensor([98.0, 1.0, 1.0]))
    assert srank(phi) == 2                   # 99/100 >= 0.99 exactly
    assert srank(phi, delta=0.02) == 1       # 98/100 >= 0.98 exactly
    assert srank(phi, delta=0.0099) == 3     # 99/100 < 0.9901


def test_srank_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        srank(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="delta"):
        srank(torch.eye(3), delta=1.0)


# -- the value net's features ------------------------------------------------------------
@pytest.mark.parametrize("hidden, act", [((64, 64), "tanh"), ((8,), "relu"), ((), "tanh")])
def test_value_net_forward_is_last_layer_of_features(hidden, act):
    from pgscope.networks import ValueNet

    net = ValueNet(5, hidden, act, ortho_init=True)
    obs = torch.randn(7, 5)
    phi = net.features(obs)
    assert phi.shape == (7, hidden[-1] if hidden else 5)
    torch.testing.assert_close(net.last_layer(phi).squeeze(-1), net(obs), rtol=0, atol=0)
    if hidden and act == "tanh":
        assert phi.abs().max() <= 1.0  # after the activation, not before it


# -- the DR3 penalty ---------------------------------------------------------------------
def _direct_dr3(net, obs, next_obs, valid, coef, form="abs"):
    """DR3 written out: hidden layers by hand, sum over valid pairs of |phi . phi'| (abs)
    or phi . phi' (signed) / their count."""
    total, count = 0.0, 0
    for i in range(len(obs)):
        if not valid[i]:
            continue
        a, b = obs[i], next_obs[i]
        for layer in list(net.net)[:-1]:
            a, b = layer(a), layer(b)
        dot = torch.dot(a, b)
        total = total + (dot.abs() if form == "abs" else dot)
        count += 1
    return coef * total / count


@pytest.mark.parametrize("form", [None, "abs", "signed"])
def test_dr3_penalty_value_and_gradient_match_direct_implementation(form):
    from pgscope.networks import ValueNet
    from pgscope.optimizations import dr3_penalty

    torch.manual_seed(0)
    net = ValueNet(3, (6, 5), "tanh", ortho_init=True).double()
    obs, nxt = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    with torch.no_grad():  # tanh features: some valid pairs have negative dot products
        dots = feature_dot(net.features(obs), net.features(nxt))[valid]
    assert (dots < 0).any() and (dots > 0).any()
    params = list(net.parameters())
    got = (dr3_penalty(net.features, obs, nxt, valid, 0.3) if form is None else
           dr3_penalty(net.features, obs, nxt, valid, 0.3, form))
    want = _direct_dr3(net, obs, nxt, valid, 0.3, form or "abs")  # the default: abs
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, params, allow_unused=True),
                    torch.autograd.grad(want, params, allow_unused=True), strict=True):
        if w is None:  # the output layer does not touch the features
            assert g is None or torch.all(g == 0)
        else:
            torch.testing.assert_close(g, w)


def test_dr3_penalty_is_exactly_zero_when_off_or_without_pairs():
    from pgscope.networks import ValueNet
    from pgscope.optimizations import dr3_penalty

    net = ValueNet(3, (4,), "tanh", ortho_init=True)
    obs = torch.randn(5, 3)
    every, none = torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)
    assert float(dr3_penalty(net.features, obs, obs, every, 0.0)) == 0.0
    assert float(dr3_penalty(net.features, obs, obs, none, 1.0)) == 0.0
    # phi(s) . phi(s) = |phi(s)|^2 > 0
    assert float(dr3_penalty(net.features, obs, obs, every, 1.0).detach()) > 0


def test_dr3_pair_values_forms_hand_computed():
    from pgscope.features import DR3_FORMS, dr3_mean, dr3_pair_values

    phi = torch.tensor([[1.0, 2.0], [1.0, 0.0], [0.5, -1.0]])
    nxt = torch.tensor([[3.0, -4.0], [2.0, 5.0], [2.0, 1.0]])
    # dots: 3 - 8 = -5, 2, 1 - 1 = 0
    assert dr3_pair_values(phi, nxt, "signed").tolist() == [-5.0, 2.0, 0.0]
    assert dr3_pair_values(phi, nxt, "abs").tolist() == [5.0, 2.0, 0.0]
    assert dr3_pair_values(phi, nxt).tolist() == [5.0, 2.0, 0.0]  # the default is abs
    assert DR3_FORMS[0] == "abs"
    keep = torch.tensor([True, True, False])
    assert float(dr3_mean(phi, nxt, keep, "abs")) == 3.5
    assert float(dr3_mean(phi, nxt, keep, "signed")) == -1.5
    assert float(dr3_mean(phi, nxt, torch.zeros(3, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="abs, signed"):
        dr3_pair_values(phi, nxt, "squared")


def test_dr3_pairs_rule_on_a_hand_made_batch():
    """Which pairs enter the on-policy term: every transition whose next state is not
    terminal; a truncation (next_obs = the true final observation, the GAE target
    bootstraps there) stays in, a termination (no V(s') in the target) goes, and a step
    both terminated and truncated goes. The penalty is the mean over exactly those."""
    from pgscope.engine.nets import StackedBatch
    from pgscope.optimizations import dr3_penalty
    from pgscope.rollout import Batch

    terminated = torch.tensor([False, False, True, False, True, False])
    truncated = torch.tensor([False, True, False, False, True, False])
    done = terminated | truncated
    obs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [1.0, 1.0], [4.0, 4.0],
                        [0.0, -1.0]])
    nxt = torch.tensor([[2.0, 0.0], [0.0, -3.0], [5.0, 5.0], [1.0, 2.0], [4.0, 4.0],
                        [7.0, 1.0]])
    # per-pair dot products with phi = identity: 2, -6, 50, 3, 32, -1
    n = len(obs)
    batch = Batch(obs=obs, actions=torch.zeros(n, 1), logp=torch.zeros(n),
                  values=torch.zeros(n), advantages=torch.zeros(n), returns=torch.zeros(n),
                  rewards=torch.zeros(n), terminated=terminated, done=done, next_obs=nxt)
    stacked = StackedBatch.stack([batch, batch])
    assert stacked.valid.tolist() == [[True, True, False, True, False, True]] * 2
    got = dr3_penalty(lambda x: x, stacked.obs, stacked.next_obs, stacked.valid, 0.5)
    assert got.tolist() == [0.5 * (2 + 6 + 3 + 1) / 4] * 2  # pairs 0, 1, 3, 5; |dot|
    signed = dr3_penalty(lambda x: x, stacked.obs, stacked.next_obs, stacked.valid, 0.5,
                         "signed")
    assert signed.tolist() == [0.5 * (2 - 6 + 3 - 1) / 4] * 2


# -- value_dr3_coef in the updates -------------------------------------------------------
@pytest.fixture(scope="module")
def cartpole_batch():
    """A CartPole agent and one collected batch (two envs, episode ends inside)."""
    from pgscope import make_config
    from pgscope.agent import build_agent
    from pgscope.envs import make_vector_env
    from pgscope.rollout import RolloutCollector

    cfg = make_config("ppo", "CartPole-v1", dict(num_envs=2, steps_per_iter=128,
                                                  hidden=(16, 16), total_steps=1280))
    envs = make_vector_env("CartPole-v1", 2)
    torch.manual_seed(0)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    batch, _ = collect_one(RolloutCollector(cfg, envs, agent.preprocessor, seed=0),
        agent.policy, agent.value_net)
    envs.close()
    assert batch.done.any() and not batch.done.all()
    return agent, batch


def _update(agent, batch, preset, coef, **extra):
    """One update of a copy of ``agent``; returns the copy."""
    import copy

    from pgscope import make_config
    from pgscope.algos.common import make_optimizer

    overrides = dict(num_envs=2, steps_per_iter=128, hidden=(16, 16), total_steps=1280,
                     value_dr3_coef=coef, value_lr=3e-3, **extra)
    overrides.update(dict(epochs=1, minibatches=1) if preset == "a2c" else
                     dict(epochs=2, minibatches=4))
    cfg = make_config(preset, "CartPole-v1", overrides)
    agent = copy.deepcopy(agent)
    optimizer = make_optimizer(cfg, agent.policy, agent.value_net)
    update_one(cfg, agent.policy, agent.value_net, optimizer, batch,
                               torch.Generator().manual_seed(1), {})
    return agent


def _mean_dot(agent, batch, absolute=True):
    valid = ~batch.terminated
    with torch.no_grad():
        dots = feature_dot(agent.value_net.features(batch.obs[valid]),
                           agent.value_net.features(batch.next_obs[valid]))
        return float((dots.abs() if absolute else dots).mean())


@pytest.mark.parametrize("preset", ["ppo", "trpo", "a2c"])
def test_value_dr3_coef_moves_only_the_value_net_down_the_feature_dot(
        cartpole_batch, preset, monkeypatch):
    agent, batch = cartpole_batch
    off, on = _update(agent, batch, preset, 0.0), _update(agent, batch, preset, 1.0)
    for a, b in zip(off.policy.parameters(), on.policy.parameters(), strict=True):
        assert torch.equal(a, b)  # the penalty is on the value loss only
    assert not all(torch.equal(a, b) for a, b in zip(off.value_net.parameters(),
                                                      on.value_net.parameters(), strict=True))
    assert _mean_dot(on, batch) < _mean_dot(off, batch)  # it pushes |phi(s).phi(s')| down
    # coef 0 is exactly the update without the term
    import pgscope.algos.ppo
    import pgscope.algos.trpo

    for module in (pgscope.algos.ppo, pgscope.algos.trpo):
        monkeypatch.setattr(module, "dr3_penalty", lambda *args: 0.0)
    without = _update(agent, batch, preset, 0.0)
    for a, b in zip(off.value_net.parameters(), without.value_net.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset", ["ppo", "trpo"])
def test_value_dr3_form_reaches_the_update(cartpole_batch, preset):
    """Pairs whose features point in opposite directions (next_obs = -obs: the tanh net has
    zero biases at init, so phi(-s) = -phi(s) and every dot product is -|phi(s)|^2 < 0).
    The default (abs) update shrinks |phi(s).phi(s')|; value_dr3_form=signed pushes the
    dot products further below zero, making |phi(s).phi(s')| larger than without the
    term: minimizing the signed form rewards opposite directions."""
    import dataclasses

    from pgscope import make_config

    agent, batch = cartpole_batch
    n = len(batch)
    opposite = dataclasses.replace(batch, next_obs=-batch.obs,
                                   terminated=torch.zeros(n, dtype=torch.bool),
                                   done=torch.zeros(n, dtype=torch.bool))
    assert make_config(preset, "CartPole-v1").value_dr3_form == "abs"
    off = _update(agent, opposite, preset, 0.0)
    assert _mean_dot(off, opposite, absolute=False) < 0
    default = _update(agent, opposite, preset, 1.0)
    absolute = _update(agent, opposite, preset, 1.0, value_dr3_form="abs")
    signed = _update(agent, opposite, preset, 1.0, value_dr3_form="signed")
    for a, b in zip(default.value_net.parameters(), absolute.value_net.parameters(),
                    strict=True):
        assert torch.equal(a, b)
    assert _mean_dot(absolute, opposite) < _mean_dot(off, opposite) < _mean_dot(
        signed, opposite)
    assert _mean_dot(signed, opposite, absolute=False) < _mean_dot(off, opposite,
                                                                   absolute=False)


# -- the per-iteration feature metrics ----------------------------------------------------
def test_feature_metrics_logged_every_features_every_iteration(tmp_path):
    import json

    from pgscope import Callback, make_config, train
    from pgscope.features import FEATURE_KEYS

    seen = {}
    first = []

    class Watch(Callback):
        def on_iteration_end(self, event):
            net, b = event.agent.value_net, event.batch
            first.append(b.obs.clone()) if not first else None
            with torch.no_grad():
                phi, nxt = _direct_features(net, b.obs), _direct_features(net, b.next_obs)
                fixed = _direct_features(net, first[0])
            keep = ~b.done
            seen[event.iteration] = dict(
                feature_dot=float((phi[keep] * nxt[keep]).sum(1).mean()),
                feature_cosine=float(((phi[keep] * nxt[keep]).sum(1)
                                      / phi[keep].norm(dim=1) / nxt[keep].norm(dim=1)).mean()),
                feature_norm=float(phi.norm(dim=1).mean()),
                # the srank of the first batch's states (64 < 2048: all of them), every time
                feature_srank=srank(fixed), feature_srank_rows=64)

    tiny = dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=(8, 8), total_steps=4 * 64)
    cfg = make_config("ppo", "CartPole-v1", dict(tiny, features_every=2))
    run = train(cfg, tmp_path / "run", progress=False, callbacks=[Watch()])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if line["iteration"] % 2:
            assert not set(FEATURE_KEYS) & set(line)
            continue
        assert set(FEATURE_KEYS) <= set(line)
        for key, want in seen[line["iteration"]].items():
            assert line[key] == pytest.approx(want, rel=1e-5), key
        assert 1 <= line["feature_srank"] <= 8
    off = train(make_config("ppo", "CartPole-v1", dict(tiny, features_every=0)),
                tmp_path / "off", progress=False)
    for line in (off / "metrics.jsonl").read_text().splitlines():
        assert not set(FEATURE_KEYS) & set(json.loads(line))


def _direct_features(net, obs):
    x = obs
    for layer in list(net.net)[:-1]:
        x = layer(x)
    return x


def _iteration_end(run_dir, net, obs, seed=0, iteration=1):
    """The parts of an IterationEnd the critic-features sink reads."""
    from types import SimpleNamespace

    n = len(obs)
    batch = SimpleNamespace(obs=obs, next_obs=obs.flip(0), done=torch.zeros(n, dtype=torch.bool))
    return SimpleNamespace(iteration=iteration, batch=batch, run_dir=run_dir,
                           agent=SimpleNamespace(value_net=net),
                           config=SimpleNamespace(seed=seed), metrics={})


def test_feature_srank_is_measured_on_the_fixed_evaluation_set(tmp_path):
    """feature_srank is the srank of the run's fixed evaluation states (2,048 drawn with
    the run's seed from its first batch, kept in the run directory), whatever the size of
    the batch at hand: the same network on batches of 3,000, 8 and 500 states gives the
    same srank; a resumed run (a new sink on the same directory) keeps the set."""
    from pgscope.features import SRANK_EVAL_ROWS
    from pgscope.networks import ValueNet
    from pgscope.sinks import FEATURE_EVAL_FILE, CriticFeatures

    torch.manual_seed(0)
    net = ValueNet(6, (64, 64), "tanh", ortho_init=True)
    first = torch.randn(3000, 6)
    sink = CriticFeatures(1)
    results = []
    for i, obs in enumerate((first, torch.randn(8, 6), torch.randn(500, 6))):
        event = _iteration_end(tmp_path, net, obs, seed=4, iteration=i + 1)
        sink.on_iteration_end(event)
        results.append(event.metrics)
    fixed = torch.load(tmp_path / FEATURE_EVAL_FILE, weights_only=True)
    assert fixed.shape == (SRANK_EVAL_ROWS, 6) == (2048, 6)
    g = torch.Generator().manual_seed(4)  # the seeded draw, in batch order
    assert torch.equal(fixed, first[torch.randperm(3000, generator=g)[:2048].sort().values])
    with torch.no_grad():
        want = srank(net.features(fixed))
    assert want > 8  # an srank over the 8-state batch could not reach it
    for metrics in results:
        assert metrics["feature_srank"] == want
        assert metrics["feature_srank_rows"] == 2048
    resumed = CriticFeatures(1)
    event = _iteration_end(tmp_path, net, torch.randn(100, 6), seed=4, iteration=4)
    resumed.on_iteration_end(event)
    assert event.metrics["feature_srank"] == want and event.metrics["feature_srank_rows"] == 2048
    # a first batch of at most 2,048 states is the set itself; the count is logged
    small = CriticFeatures(1)
    event = _iteration_end(tmp_path / "small", net, first[:300], iteration=1)
    (tmp_path / "small").mkdir()
    small.on_iteration_end(event)
    assert event.metrics["feature_srank_rows"] == 300
    with torch.no_grad():
        assert event.metrics["feature_srank"] == srank(net.features(first[:300]))


def test_feature_srank_does_not_depend_on_the_minibatch_settings(tmp_path):
    """Two one-iteration runs that differ only in their minibatches and epochs, with
    learning rates too small to move a weight (1e-30), end with the same networks (to
    1e-20) and log the same feature_srank on the same 2,048 fixed states."""
    import json

    from pgscope import make_config, train
    from pgscope.run import load_checkpoint

    lines, nets = [], []
    for minibatches, epochs in ((1, 1), (32, 3)):
        cfg = make_config("ppo", "CartPole-v1", dict(
            total_steps=2048, hidden=(32, 32), minibatches=minibatches, epochs=epochs,
            policy_lr=1e-30, value_lr=1e-30, lr_anneal=False))
        run = train(cfg, tmp_path / f"mb{minibatches}", progress=False)
        lines.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]))
        nets.append(load_checkpoint(run / "checkpoints" / "last.pt")["value_net"])
    for k in nets[0]:  # zero biases move by ~1e-28 at most
        torch.testing.assert_close(nets[0][k], nets[1][k], rtol=0, atol=1e-20)
    assert lines[0]["feature_srank_rows"] == lines[1]["feature_srank_rows"] == 2048
    assert lines[0]["feature_srank"] == lines[1]["feature_srank"]


def test_srank_from_gram_eigenvalues_equals_srank():
    from pgscope.features import srank_from_singular_values

    gen = torch.Generator().manual_seed(3)
    phi = torch.randn(200, 12, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -3, 12, dtype=torch.float64))
    sigma = torch.linalg.eigvalsh(phi.T @ phi).clamp(min=0).sqrt()  # ascending order
    for delta in (0.0, 0.01, 0.1, 0.5):
        assert srank_from_singular_values(sigma, delta) == srank(phi, delta)


# -- the features probe ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    """Two iterations on the tabular MDP (one-hot observations of 6 states), with
    observation normalization so that frozen statistics matter."""
    from pgscope import make_config, train
    from pgscope.envs.tabular import ENV_ID

    cfg = make_config("ppo", ENV_ID, dict(steps_per_iter=128, minibatches=2, epochs=1,
                                         hidden=(16, 16), total_steps=256, obs_norm=True,
                                         checkpoint_every=1))
    return train(cfg, tmp_path_factory.mktemp("feat") / "run", progress=False)


def test_features_probe_against_a_direct_computation(tabular_run):
    from pgscope import load_agent
    from pgscope.probes.features import features_probe
    from pgscope.probes.sampling import batch_chunks

    agent = load_agent(tabular_run)
    before = {k: {n: t.clone() for n, t in v.items()}
              for k, v in agent.preprocessor.state_dict().items()}
    result = features_probe(agent, 600, seed=5, n_boot=200, progress=False)
    # the same fresh samples, computed directly
    parts = list(batch_chunks(agent, 600, 5 + 13, exact=False))
    obs = torch.cat([b.obs for b in parts])
    nxt = torch.cat([b.next_obs for b in parts])
    done = torch.cat([b.done for b in parts])
    with torch.no_grad():
        phi, phi_next = _direct_features(agent.value_net, obs), _direct_features(
            agent.value_net, nxt)
    keep = ~done
    dots = (phi[keep] * phi_next[keep]).sum(1)
    assert result["states"] == len(obs) >= 600
    assert result["pairs"] == int(keep.sum()) and result["pairs_excluded_episode_end"] == int(
        done.sum()) > 0
    assert result["feature_dot"]["mean"] == pytest.approx(float(dots.mean()), rel=1e-5)
    cos = dots / phi[keep].norm(dim=1) / phi_next[keep].norm(dim=1)
    assert result["feature_cosine"]["mean"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert result["feature_norm"]["mean"] == pytest.approx(float(phi.norm(dim=1).mean()),
                                                          rel=1e-5)
    assert result["srank"]["mean"] == srank(phi)
    assert 1 <= result["srank"]["mean"] <= 6  # one-hot observations of 6 states
    for key in ("feature_dot", "feature_cosine", "feature_norm", "srank"):
        r = result[key]
        assert r["ci_low"] <= r["mean"] <= r["ci_high"], key
    # the agent's frozen statistics were used and are unchanged
    after = agent.preprocessor.state_dict()
    for k, v in before.items():
        for n, t in v.items():
            assert torch.equal(after[k][n], t)


def test_features_probe_command_and_schedule(tabular_run, tmp_path, capsys):
    import json

    from pgscope import make_config, train
    from pgscope.cli import EXIT_ERROR, main
    from pgscope.envs.tabular import ENV_ID

    out = tmp_path / "probe"
    assert main(["probe", "features", str(tabular_run), "--out", str(out), "--pairs", "300",
                 "--quiet"]) == 0
    data = json.loads((out / "features.json").read_text())
    assert (out / "features.png").read_bytes()[:4] == b"\x89PNG"
    assert data["over_training"]["iteration"] == [1, 2]  # the run's feature metrics
    assert data["settings"]["feature_dim"] == 16
    assert "features: phi(s).phi(s')" in capsys.readouterr().err
    # checked before anything is computed
    assert main(["probe", "features", str(tabular_run), "--out", str(tmp_path / "bad"),
                 "--pairs", "1", "--quiet"]) == EXIT_ERROR
    assert not (tmp_path / "bad").exists()
    # scheduled during training
    run = train(make_config("ppo", ENV_ID, dict(
        steps_per_iter=64, minibatches=2, epochs=1, hidden=(8,), total_steps=128,
        probe_every=2, probe_kinds="features", probe_value_pairs=128)), tmp_path / "sched",
        progress=False)
    scheduled = json.loads((run / "probes" / "iter_000002" / "features.json").read_text())
    assert scheduled["states"] >= 128 and scheduled["over_training"]["iteration"] == [1, 2]


# -- the doctor's feature-coadaptation alarm ---------------------------------------------
def _feature_run(values):
    from pgscope.doctor import RunData

    return RunData([{"iteration": i + 1, "feature_dot": v} for i, v in enumerate(values)])


def test_feature_coadaptation_alarm():
    import numpy as np

    from pgscope.doctor import ALARM_BY_NAME

    alarm = ALARM_BY_NAME["feature-coadaptation"]

    growing = list(np.geomspace(1.0, 1000.0, 40))  # last half: x14 (medians), still rising
    (f,) = alarm.check(_feature_run(growing), alarm)
    assert f.alarm == "feature-coadaptation" and f.ranges == [(21, 40)]
    assert f.values["growth"] == pytest.approx(np.median(growing[-5:]) / np.median(growing[20:25]))
    assert f.values["growth"] > 10 and f"{f.values['end']:.3g}" in f.evidence
    assert not alarm.check(_feature_run([5.0] * 40), alarm)  # flat
    assert not alarm.check(_feature_run(list(np.geomspace(1.0, 300.0, 40))), alarm)  # x9
    plateau = list(np.geomspace(1.0, 1e5, 30)) + [1e5] * 10  # x16, then stopped rising
    assert not alarm.check(_feature_run(plateau), alarm)
    falling = list(np.geomspace(1.0, 1e5, 30)) + list(np.linspace(1e5, 9e4, 10))
    assert not alarm.check(_feature_run(falling), alarm)
    assert not alarm.check(_feature_run(growing[-19:]), alarm)  # too few iterations
    with_nulls = [None if i % 7 == 0 else v for i, v in enumerate(growing)]
    assert alarm.check(_feature_run(with_nulls), alarm)


def test_run_report_has_a_features_panel_when_the_metrics_have_the_keys(tabular_run):
    import json

    from pgscope.report.run_page import run_page

    html = run_page(tabular_run).render()
    assert 'id="panel-features"' in html and 'id="panel-feature-rank"' in html
    # the same run without the feature keys: no panel
    lines = (tabular_run / "metrics.jsonl").read_text().splitlines()
    stripped = [json.dumps({k: v for k, v in json.loads(x).items()
                            if not k.startswith("feature_")}) for x in lines]
    (tabular_run / "metrics.jsonl").write_text("\n".join(stripped) + "\n")
    try:
        html = run_page(tabular_run).render()
    finally:
        (tabular_run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert 'id="panel-features"' not in html
