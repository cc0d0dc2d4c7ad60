"""The training loop's events and the callback API.

:func:`pgscope.train.train` emits five events; everything that watches a run subscribes
to them: the metrics file, the progress bar, TensorBoard, the CSV writer, the scheduled
probes (:mod:`pgscope.sinks`) and any callback a user passes::

    from pgscope import Callback, make_config, train

    class StopAt(Callback):
        def on_iteration_end(self, event):
            print(event.iteration, event.metrics["return_mean"])
            return event.metrics["return_mean"] is None or event.metrics["return_mean"] < 500

    train(make_config("ppo", "CartPole-v1"), "runs/cp", callbacks=[StopAt()])

The events, in the order a run emits them:

``on_run_start(RunStart)``
    once, after the run directory is ready (a resume has restored the checkpoint and
    dropped the metrics lines past it), before the first iteration.
``on_iteration_end(IterationEnd)``
    after every iteration's update, with its metrics line (the dict written to
    ``metrics.jsonl``: NaN/Inf already written as ``None``), before its checkpoint.
    Returning ``False`` stops training once this iteration is checkpointed (the run's
    status is then ``interrupted``; ``train(..., resume=True)`` continues it).
``on_checkpoint(CheckpointSaved)``
    after every iteration's checkpoint is on disk and the status records it.
``on_divergence(Divergence)``
    when a NaN/Inf in a loss, a parameter or the env's output stops training (the last
    good checkpoint stays; ``on_run_end`` follows).
``on_run_end(RunEnd)``
    once, however the run ends: ``complete``, ``interrupted`` (SIGINT/SIGTERM or a
    callback), ``diverged`` or ``failed``.

The built-in subscribers run first, in a fixed order (the metrics line is on disk before
any user callback sees it), then the user's callbacks in the order given. A callback
that raises stops training like any other error (status ``failed``). Events carry the
live agent: a callback may read it (evaluate, save) but must not change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgscope.agent import Agent
    from pgscope.config import Config
    from pgscope.rollout import Batch


@dataclass(frozen=True)
class RunStart:
    """A run is about to train from ``iteration`` (completed iterations, 0 for a new
    run) and ``env_steps``; ``resumed`` when it continues from a checkpoint."""

    run_dir: Path
    config: Config
    agent: Agent
    iteration: int
    env_steps: int
    resumed: bool


@dataclass(frozen=True)
class IterationEnd:
    """Iteration ``iteration`` (from 1) has been trained; ``metrics`` is its metrics line."""

    run_dir: Path
    config: Config
    agent: Agent
    iteration: int
    env_steps: int
    metrics: dict[str, Any]
    batch: Batch


@dataclass(frozen=True)
class CheckpointSaved:
    """The checkpoint of ``iteration`` is on disk: ``path`` (``last.pt``) and ``kept``, the
    copy kept under ``checkpoints/iter_XXXXXX.pt`` (None when this one is not kept)."""

    run_dir: Path
    config: Config
    iteration: int
    env_steps: int
    path: Path
    kept: Path | None


@dataclass(frozen=True)
class Divergence:
    """Training stopped at ``iteration`` because ``where`` became NaN/Inf."""

    run_dir: Path
    config: Config
    iteration: int
    where: str
    error: str


@dataclass(frozen=True)
class RunEnd:
    """The run ended in ``state`` (as ``status.json`` records it) after ``iteration``."""

    run_dir: Path
    config: Config
    state: str
    iteration: int
    error: str | None = None


class Callback:
    """Subscribe to training events: override the methods you need (each does nothing
    by default). One instance serves one run."""

    def on_run_start(self, event: RunStart) -> None:
        """Before the first iteration."""

    def on_iteration_end(self, event: IterationEnd) -> bool | None:
        """After each iteration's update; return ``False`` to stop training."""
        return None

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        """After each iteration's checkpoint."""

    def on_divergence(self, event: Divergence) -> None:
        """When NaN/Inf stops training."""

    def on_run_end(self, event: RunEnd) -> None:
        """Once, however the run ends."""


@dataclass
class CallbackList(Callback):
    """Dispatches each event to every callback in order. ``on_iteration_end`` asks every
    callback and stops training when any of them returns ``False``; ``stopped_by`` then
    names the first that did."""

    callbacks: Sequence[Callback] = field(default_factory=list)
    stopped_by: str | None = None

    def on_run_start(self, event: RunStart) -> None:
        for cb in self.callbacks:
            cb.on_run_start(event)

    def on_iteration_end(self, event: IterationEnd) -> bool | None:
        go_on = True
        for cb in self.callbacks:
            if cb.on_iteration_end(event) is False and go_on:
                go_on = False
                self.stopped_by = type(cb).__name__
        return go_on

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(event)

    def on_divergence(self, event: Divergence) -> None:
        for cb in self.callbacks:
            cb.on_divergence(event)

    def on_run_end(self, event: RunEnd) -> None:
        """Every callback gets the event even if one of them raises (the first error is
        raised afterwards), so that every sink can close its files."""
        first: BaseException | None = None
        for cb in self.callbacks:
            try:
                cb.on_run_end(event)
            except Exception as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first


__all__ = ["Callback", "CallbackList", "CheckpointSaved", "Divergence", "IterationEnd",
           "RunEnd", "RunStart"]
