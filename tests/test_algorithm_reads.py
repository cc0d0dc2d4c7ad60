"""Each registered algorithm's ``reads`` is what its optimizer, learning-rate schedule,
update and surrogate actually read: recorded from a config that notes every key read,
over its presets, Box and Discrete actions and the switches that gate other keys; and the
report shows which keys a run's algorithm does not read."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import pgscope.algos.a2c as a2c_mod
from pgscope.agent import build_agent
from pgscope.algos import ALGORITHMS, algorithm, presets, unread_keys, update_one
from pgscope.algos.common import make_optimizer, set_learning_rates
from pgscope.config import Config, make_config
from pgscope.report.run_page import config_html
from pgscope.rollout import Batch

FIELDS = {f.name for f in dataclasses.fields(Config)}
#: Frames whose reads copy a config rather than use it.
COPYING = ("replace", "_replace", "to_dict", "__eq__", "__repr__")
SEEN: set[str] = set()


class Recording(Config):
    """A config that notes each key read (but not the keys a ``replace`` fixed: those the
    algorithm chose, not the user)."""

    def __getattribute__(self, name: str) -> Any:
        forced = object.__getattribute__(self, "__dict__").get("_forced", ())
        if name in FIELDS and name not in forced and \
                sys._getframe(1).f_code.co_name not in COPYING:
            SEEN.add(name)
        return object.__getattribute__(self, name)


def _replace(obj: Config, **changes: Any) -> Config:
    new = dataclasses.replace(obj, **changes)
    new.__dict__["_forced"] = set(changes) | obj.__dict__.get("_forced", set())
    return new


def _reads(preset: str, discrete: bool, **switches: Any) -> set[str]:
    small = {} if preset == "a2c" else {"minibatches": 2, "epochs": 2}
    cfg = make_config(preset, "Hopper-v5", {"steps_per_iter": 64, "hidden": (8,), **small,
                                            **switches})
    rec = Recording(**{k: getattr(cfg, k) for k in FIELDS})
    act_space = (gym.spaces.Discrete(3) if discrete
                 else gym.spaces.Box(-1, 1, (2,), np.float32))
    torch.manual_seed(0)
    agent = build_agent(cfg, gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), act_space)
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(64, 4, generator=gen)
    with torch.no_grad():
        dist = agent.policy.dist(obs)
        actions = dist.sample()
        logp = agent.policy.log_prob(dist, actions)
        values = agent.value_net(obs)
    adv = torch.randn(64, generator=gen)
    batch = Batch(obs=obs, actions=actions, logp=logp, values=values, advantages=adv,
                  returns=values + adv, rewards=torch.zeros(64),
                  terminated=torch.zeros(64, dtype=torch.bool),
                  done=torch.zeros(64, dtype=torch.bool), next_obs=obs)
    SEEN.clear()
    optimizer = make_optimizer(rec, agent.policy, agent.value_net)
    set_learning_rates(optimizer, rec, 1)
    old = copy.deepcopy(agent.policy)
    update_one(rec, agent.policy, agent.value_net, optimizer, batch,
               torch.Generator().manual_seed(1), {}, heldout_obs=obs)
    algo = algorithm(rec.algo)
    algo.surrogate(rec, agent.policy, old, batch, {})
    algo.clip_range(rec)
    return set(SEEN)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_an_algorithms_reads_are_the_keys_it_reads(monkeypatch, name):
    monkeypatch.setattr(a2c_mod, "replace", _replace)
    seen: set[str] = set()
    for preset in (p for p, values in presets().items() if values.get("algo") == name):
        trpo = name == "trpo"
        for discrete, value_clip, grad_clip, kl_stop in itertools.product([False, True],
                                                                          repeat=4):
            seen |= _reads(preset, discrete, value_clip=value_clip, grad_clip=grad_clip,
                           kl_stop=kl_stop and not trpo, ent_coef=0.0 if trpo else 0.01,
                           value_dr3_coef=0.01)
    assert seen == set(algorithm(name).reads)


def test_unread_keys_are_another_algorithms_reads():
    assert {"clip_eps", "ppo_loss", "policy_lr", "ent_coef"} <= set(unread_keys("trpo"))
    assert {"max_kl", "cg_iters", "backtrack_coef"} <= set(unread_keys("ppo"))
    assert "clip_eps" in unread_keys("a2c") and "policy_lr" not in unread_keys("a2c")
    assert unread_keys("no-such-algorithm") == ()
    for name in ALGORITHMS.names():
        assert not set(unread_keys(name)) & set(algorithm(name).reads)


def test_the_report_config_lists_the_keys_the_algorithm_reads_apart():
    cfg = json_like(make_config("trpo", "Hopper-v5"))
    page = config_html(cfg, {})
    head, _, rest = page.partition("Every key")
    assert "Not read by trpo" in page
    read_part, _, unread_part = rest.partition("Not read by trpo")
    for key in unread_keys("trpo"):
        assert f">{key}<" in unread_part and f">{key}<" not in read_part, key
    for key in ("max_kl", "cg_iters", "gamma"):
        assert f">{key}<" in read_part, key


def json_like(cfg: Config) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(cfg.to_dict()))


def test_a_changed_key_the_algorithm_does_not_read_says_so():
    cfg = json_like(make_config("trpo", "Hopper-v5"))
    cfg["clip_eps"] = 0.1
    changed = config_html(cfg, {}).partition("Every key")[0]
    assert "clip_eps <em>(not read by this algorithm)</em>" in changed
