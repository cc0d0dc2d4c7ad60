"""The training events and their subscribers (pgscope.callbacks, pgscope.sinks): a user's
callback sees every event in order with the metrics line already on disk, can stop a run
that then resumes exactly; TensorBoard event files read back with TensorBoard's own
reader hold exactly the metrics.jsonl values under SB3's tag names, at env steps, once per
step even across a resume; the CSV file equals metrics.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import helper_envs  # noqa: F401 - registers helper_envs/NanAfter-v0
from pgscope import Callback, make_config, train
from pgscope.callbacks import CheckpointSaved, Divergence, IterationEnd, RunEnd, RunStart
from pgscope.errors import DivergenceError
from pgscope.metrics import GLOBAL_STEP, TIMING_KEYS, tensorboard_tag
from pgscope.run import RunDir

TINY = dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=(8,), checkpoint_every=1)


def _tiny(total_iterations: int = 3, **overrides) -> dict:
    return dict(TINY, total_steps=64 * total_iterations, **overrides)


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


class Recorder(Callback):
    """Records every event, and what metrics.jsonl holds when each arrives."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, object]] = []
        self.lines_on_disk: list[int] = []
        self.stop_after = stop_after

    def on_run_start(self, event: RunStart) -> None:
        self.events.append(("start", event))

    def on_iteration_end(self, event: IterationEnd) -> bool | None:
        self.events.append(("iteration", event))
        self.lines_on_disk.append(len(_lines(event.run_dir)))
        return self.stop_after is None or event.iteration < self.stop_after

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        self.events.append(("checkpoint", event))

    def on_divergence(self, event: Divergence) -> None:
        self.events.append(("divergence", event))

    def on_run_end(self, event: RunEnd) -> None:
        self.events.append(("end", event))


def test_user_callback_sees_every_event_in_order(tmp_path):
    cfg = make_config("ppo", "CartPole-v1", _tiny(3, checkpoint_every=2))
    rec = Recorder()
    run = train(cfg, tmp_path / "run", progress=False, callbacks=[rec])
    names = [name for name, _ in rec.events]
    assert names == ["start"] + ["iteration", "checkpoint"] * 3 + ["end"]
    start = rec.events[0][1]
    assert (start.iteration, start.env_steps, start.resumed) == (0, 0, False)
    assert start.agent.config == cfg
    lines = _lines(run)
    iterations = [e for n, e in rec.events if n == "iteration"]
    assert [e.iteration for e in iterations] == [1, 2, 3]
    assert [e.metrics for e in iterations] == lines  # exactly the lines written
    assert [e.env_steps for e in iterations] == [64, 128, 192]
    assert all(len(e.batch) == 64 for e in iterations)
    assert rec.lines_on_disk == [1, 2, 3]  # the line is on disk before a user sees it
    checkpoints = [e for n, e in rec.events if n == "checkpoint"]
    assert [e.iteration for e in checkpoints] == [1, 2, 3]
    assert all(e.path == run / "checkpoints" / "last.pt" for e in checkpoints)
    assert [e.kept for e in checkpoints] == [None, run / "checkpoints" / "iter_000002.pt",
                                             run / "checkpoints" / "iter_000003.pt"]
    end = rec.events[-1][1]
    assert (end.state, end.iteration, end.error) == ("complete", 3, None)


def test_callback_can_stop_a_run_that_then_resumes_exactly(tmp_path):
    cfg = make_config("ppo", "CartPole-v1", _tiny(4))
    full = train(cfg, tmp_path / "full", progress=False)
    rec = Recorder(stop_after=2)
    out = train(cfg, tmp_path / "stopped", progress=False, callbacks=[rec])
    assert [r["iteration"] for r in _lines(out)] == [1, 2]
    status = RunDir(out).read_status()
    assert status["state"] == "interrupted" and status["iteration"] == 2
    assert "stopped by the callback Recorder after iteration 2" in status["error"]
    assert [n for n, _ in rec.events][-3:] == ["iteration", "checkpoint", "end"]
    assert rec.events[-1][1].state == "interrupted"
    resumed = Recorder()
    train(cfg, out, resume=True, progress=False, callbacks=[resumed])
    start = resumed.events[0][1]
    assert (start.iteration, start.env_steps, start.resumed) == (2, 128, True)
    assert _strip(_lines(out)) == _strip(_lines(full))
    assert RunDir(out).read_status()["state"] == "complete"


def test_divergence_event_then_run_end(tmp_path):
    cfg = make_config("ppo", "helper_envs:helper_envs/NanAfter-v0",
                      dict(TINY, steps_per_iter=128, total_steps=128 * 4))
    rec = Recorder()
    with pytest.raises(DivergenceError):
        train(cfg, tmp_path / "run", progress=False, callbacks=[rec])
    names = [n for n, _ in rec.events]
    assert names[-2:] == ["divergence", "end"]
    div, end = rec.events[-2][1], rec.events[-1][1]
    assert div.iteration == 3 and "observation" in div.where  # NaN after 300 env steps
    assert (end.state, end.iteration) == ("diverged", 3)


def test_a_failing_callback_fails_the_run_and_every_sink_still_closes(tmp_path):
    class Broken(Callback):
        def on_iteration_end(self, event):
            raise RuntimeError("callback bug")

    cfg = make_config("ppo", "CartPole-v1", _tiny(3, csv=True))
    rec = Recorder()
    with pytest.raises(RuntimeError, match="callback bug"):
        train(cfg, tmp_path / "run", progress=False, callbacks=[rec, Broken()])
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and "callback bug" in status["error"]
    assert rec.events[-1][0] == "end" and rec.events[-1][1].state == "failed"


# --- TensorBoard -------------------------------------------------------------------------
def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files, read with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _expected_tensorboard(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    want: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key == GLOBAL_STEP or value is None:
                continue
            tag, scale = tensorboard_tag(key)
            want.setdefault(tag, []).append((r[GLOBAL_STEP], float(np.float32(scale * value))))
    return want


@pytest.mark.parametrize("preset", ["ppo", "trpo"])
def test_tensorboard_event_files_hold_the_metrics_lines(tmp_path, preset):
    cfg = make_config(preset, "CartPole-v1", _tiny(3, tensorboard=True))
    run = train(cfg, tmp_path / "run", progress=False)
    got, records = _tensorboard(run), _lines(run)
    assert got == _expected_tensorboard(records)  # float32 is TensorBoard's precision
    # SB3's names for the quantities SB3 logs, pgscope/ for the rest; global step = env steps
    sb3 = {"rollout/ep_rew_mean", "train/approx_kl", "train/entropy_loss",
           "train/explained_variance", "train/value_loss", "train/policy_gradient_loss",
           "time/fps"}
    assert sb3 <= set(got)
    if preset == "ppo":
        assert {"train/clip_fraction", "train/learning_rate"} <= set(got)
    assert "pgscope/kl_mean" in got and "pgscope/value_lr" in got
    assert [s for s, _ in got["train/approx_kl"]] == [64, 128, 192]
    entropy = [v for _, v in got["train/entropy_loss"]]
    assert entropy == pytest.approx([-r["entropy"] for r in records], rel=1e-6)  # SB3's sign
    assert not any(tag.endswith("env_steps") for tag in got)


def test_tensorboard_has_each_step_once_across_a_resume(tmp_path):
    """A kill after iteration 2's checkpoint, then a resume that extends the run (the lr
    annealing is re-planned, so iterations 3-4 differ from the first attempt's)."""
    cfg = make_config("ppo", "CartPole-v1", _tiny(4, tensorboard=True))
    out = train(cfg, tmp_path / "run", progress=False)
    (out / "checkpoints" / "last.pt").write_bytes(
        (out / "checkpoints" / "iter_000002.pt").read_bytes())
    first_attempt = _lines(out)
    train(cfg, out, resume=True, progress=False, total_steps=64 * 5)
    records = _lines(out)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["lr"] != first_attempt[2]["lr"]
    got = _tensorboard(out)
    assert got == _expected_tensorboard(records)
    for series in got.values():
        steps = [s for s, _ in series]
        assert steps == sorted(set(steps))  # each step once


# --- CSV -----------------------------------------------------------------------------------
def _csv(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _as_csv(record: dict, columns: list[str]) -> dict[str, str]:
    return {k: "" if record.get(k) is None else str(record[k]) for k in columns}


def test_csv_equals_metrics_jsonl_across_a_resume(tmp_path):
    cfg = make_config("ppo", "CartPole-v1", _tiny(4, csv=True))
    out = train(cfg, tmp_path / "run", progress=False)
    rows, records = _csv(out), _lines(out)
    columns = list(rows[0])
    assert set(records[-1]) <= set(columns) and "policy_std" not in columns  # discrete
    assert rows == [_as_csv(r, columns) for r in records]
    assert float(rows[1]["kl_mean"]) == records[1]["kl_mean"]  # full precision
    (out / "checkpoints" / "last.pt").write_bytes(
        (out / "checkpoints" / "iter_000002.pt").read_bytes())
    train(cfg, out, resume=True, progress=False, total_steps=64 * 5)
    rows, records = _csv(out), _lines(out)
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows == [_as_csv(r, columns) for r in records]


def test_sinks_are_off_unless_asked_for(tmp_path):
    run = train(make_config("ppo", "CartPole-v1", _tiny(1)), tmp_path / "run", progress=False)
    assert not (run / "tensorboard").exists() and not (run / "metrics.csv").exists()


def test_tensorboard_flag_of_the_command_line(tmp_path, capsys):
    from pgscope.cli import EXIT_ERROR, main

    out = tmp_path / "run"
    sets = [a for k, v in dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=8).items()
            for a in ("--set", f"{k}={v}")]
    assert main(["train", "--algo", "trpo", "--env", "CartPole-v1", "--steps", "128", "--out",
                 str(out), "--quiet", "--tensorboard", *sets]) == 0
    assert RunDir(out).read_config().tensorboard
    assert _tensorboard(out) == _expected_tensorboard(_lines(out))
    assert main(["train", "--resume", str(out), "--tensorboard"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--tensorboard cannot be combined with --resume" in err
    assert f"use 'pgscope export {out} --tensorboard'" in err  # what to do instead
