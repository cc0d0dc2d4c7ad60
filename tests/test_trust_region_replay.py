"""The trust-region probe's replay says which update it replayed and at which learning
rate (the one training set for that update, read back from the run's own metrics), and
its reading never contradicts the run's own metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgscope import make_config, train
from pgscope.probes import headline, scheduled_probes
from pgscope.probes.trust_region import replay_update, representative_checkpoint
from pgscope.report.probes import reading

ITERATIONS = 5
TINY = dict(steps_per_iter=64, minibatches=2, epochs=2, hidden=(8,),
            total_steps=ITERATIONS * 64, checkpoint_every=1, lr_anneal=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(make_config("ppo", "CartPole-v1", TINY),
                 tmp_path_factory.mktemp("tr") / "run", progress=False)


def _logged_lr(run: Path) -> dict[int, float]:
    """The learning rate each iteration's update used, as training logged it."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["lr"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("checkpoint", [1, 3])
def test_a_replay_runs_the_next_update_at_the_learning_rate_training_used(run, checkpoint):
    logged = _logged_lr(run)
    rep = replay_update(run, checkpoint)
    assert rep["checkpoint_iteration"] == checkpoint
    assert rep["replayed_iteration"] == checkpoint + 1 and not rep["after_last_update"]
    assert rep["learning_rates"]["lr"] == logged[checkpoint + 1]
    assert rep["lr_fraction"]["lr"] == pytest.approx(1 - checkpoint / ITERATIONS)


def test_a_replay_after_the_last_update_says_so_and_uses_its_learning_rate(run):
    logged = _logged_lr(run)
    rep = replay_update(run, ITERATIONS)
    assert rep["after_last_update"] and rep["replayed_iteration"] == ITERATIONS
    assert rep["learning_rates"]["lr"] == logged[ITERATIONS]
    assert rep["lr_fraction"]["lr"] == pytest.approx(1 / ITERATIONS)


def test_the_representative_checkpoint_is_the_one_nearest_the_middle(run):
    assert representative_checkpoint(run) == 2  # of 1..5 kept, middle 2.5: the earlier


def test_the_written_result_names_the_update_and_its_learning_rate(run):
    folder = scheduled_probes(run, 2, kinds="trust-region")
    assert [p.name for p in folder.glob("*.json")] == ["trust-region.json"]
    result = json.loads((folder / "trust-region.json").read_text())
    lr = _logged_lr(run)[3]
    for text in (reading("trust-region", result), headline("trust-region", result)):
        assert "iteration 3" in text and f"{lr:.3g}" in text, text


def _result(replay_ratio: float, training_ratios: list[float]) -> dict:
    phase = {"ratio_max_after": replay_ratio, "kl_mean": 0.01}
    return {"replay": {"phase": phase, "clip_range": 0.2, "checkpoint_iteration": 9,
                       "replayed_iteration": 10, "after_last_update": True,
                       "learning_rates": {"lr": 6e-6}, "lr_fraction": {"lr": 0.02}},
            "runs": [{"series": {"ratio_max_after": training_ratios}}]}


def test_the_reading_does_not_call_the_run_inside_the_clip_range_when_training_left_it():
    """The demo's case: a replay at an annealed lr stays inside while the run's own updates
    reached 1.4-2.2."""
    inside = reading("trust-region", _result(1.1, [1.1, 1.15]))
    assert inside.endswith("The ratios stay within the clip range.")
    mixed = reading("trust-region", _result(1.1, [1.4, 2.2, 1.1]))
    assert "training's updates do not" in mixed and "2 of 3 iterations" in mixed
    assert "median 1.4" in mixed and "maximum 2.2" in mixed
    assert "after the run's last update" in mixed and "2% of the initial" in mixed
    outside = reading("trust-region", _result(1.5, [1.4]))
    assert outside.endswith("does not keep the ratios within the clip range.")
    assert "max 2.2" in headline("trust-region", _result(1.1, [1.4, 2.2, 1.1]))
