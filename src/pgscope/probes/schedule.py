"""Probes during training: a subscriber of the training events (:mod:`pgscope.callbacks`)
that runs the probes a config schedules (``probe_every``, ``probe_kinds`` and the other
``probe_*`` keys) on the checkpoint of every K-th iteration, into
``RUN/probes/iter_XXXXXX/``.

It keeps that iteration's checkpoint (``checkpoints/iter_XXXXXX.pt``: a re-run needs it),
and never stops training: a probe that raises is recorded in ``probes/failures.jsonl`` and
``events.log`` and not retried on resume (the message says how to re-run it). A run
killed during a probe redoes it when resumed. This module also registers the check of
the ``probe_*`` keys with the config (:func:`pgscope.config.register_check`), so the config
never imports the probes.
"""

from __future__ import annotations

import json
import sys
import time

from tqdm import tqdm

import pgscope.probes as probes
from pgscope.callbacks import Callback, CheckpointSaved, RunStart
from pgscope.config import Config, register_check
from pgscope.errors import ConfigError
from pgscope.run import RunDir, atomic_write_bytes
from pgscope.sinks import register_sink


def probe_due(cfg: Config, iteration: int) -> bool:
    """Whether the schedule probes the checkpoint of ``iteration``."""
    return bool(cfg.probe_every) and iteration > 0 and iteration % cfg.probe_every == 0


class ScheduledProbes(Callback):
    """Runs the scheduled probes after each due checkpoint (and, on resume, the probes of
    the checkpoint it resumes from if they never finished)."""

    def __init__(self, run: RunDir, progress: bool) -> None:
        self.run = run
        self.progress = progress

    def on_run_start(self, event: RunStart) -> None:
        self._probe(event.config, event.iteration)  # a kill during the last probe: redo it

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        self._probe(event.config, event.iteration)

    def _probe(self, cfg: Config, iteration: int) -> None:
        if not probe_due(cfg, iteration):
            return
        kept = self.run.checkpoint_dir / f"iter_{iteration:06d}.pt"
        if not kept.exists():  # last.pt is this iteration's checkpoint
            atomic_write_bytes(kept, self.run.last_checkpoint.read_bytes())
        if iteration in probes.scheduled_probe_failures(self.run.path):
            return
        # no bars of their own: one line above the training bar before and after (a
        # probe's bar would interleave with it), and the training bar's speed is the
        # run's own steps per second, not tqdm's rate over a period that held the probes
        def say(line: str) -> None:
            if self.progress:
                tqdm.write(line, file=sys.stderr)  # the bar's stream

        say(f"iteration {iteration}: scheduled probes ({cfg.probe_kinds}) ...")
        start = time.perf_counter()
        try:
            folder = probes.scheduled_probes(self.run.path, iteration, progress=False)
        except Exception as exc:  # noqa: BLE001 - recorded; training goes on
            self._record_failure(cfg, iteration, f"{type(exc).__name__}: {exc}")
            return
        say(f"iteration {iteration}: scheduled probes done in "
            f"{time.perf_counter() - start:.0f} s -> {folder}")

    def _record_failure(self, cfg: Config, iteration: int, error: str) -> None:
        run = self.run
        record = {"iteration": iteration, "probes": cfg.probe_kinds, "error": error}
        (run.path / "probes").mkdir(exist_ok=True)
        with open(run.path / "probes" / "failures.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        out = run.path / "probes" / f"iter_{iteration:06d}"
        rerun = " && ".join(f"pgscope probe {kind} {run.path} --checkpoint {iteration} "
                            f"--out {out}" for kind in probes.parse_kinds(cfg.probe_kinds))
        run.log(f"scheduled probes of iteration {iteration} failed ({error}); re-run: {rerun}")
        print(f"warning: scheduled probes of iteration {iteration} failed ({error}); "
              f"training goes on. Re-run them with: {rerun}", file=sys.stderr)


def check_schedule(cfg: Config) -> None:
    """The ``probe_*`` keys (:class:`ConfigError` naming the key): ``probe_kinds`` always
    (a misspelt kind is refused even before ``probe_every`` schedules it), the sizes when
    ``probe_every`` schedules probes."""
    try:
        probes.check_kinds(cfg.probe_kinds)
    except ValueError as exc:
        raise ConfigError(f"config key 'probe_kinds': {exc}") from None
    if not cfg.probe_every:
        return
    if cfg.probe_k < 2:
        raise ConfigError("config key 'probe_k' must be >= 2.")
    if min(cfg.probe_sizes, default=0) < 2:
        raise ConfigError("config key 'probe_sizes' needs sizes >= 2.")
    if cfg.probe_true_pairs < 10 * max(cfg.probe_sizes):
        raise ConfigError("config key 'probe_true_pairs' must be at least 10x the largest "
                          "probe size.")


register_check(check_schedule)
register_sink("scheduled-probes", lambda cfg, run, progress: ScheduledProbes(run, progress)
              if cfg.probe_every else None)
