"""The built-in subscribers of the training events (:mod:`pgscope.callbacks`).

Each sink is a :class:`~pgscope.callbacks.Callback` made for a run by a factory registered
here by name; :func:`default_sinks` makes every sink a run's config asks for, in
registration order:

============== ============================================ ===========================
sink           writes                                       when
============== ============================================ ===========================
critic-        adds the ``feature_*`` keys to the metrics   config ``features_every``
features       line (:func:`pgscope.features.               (first: it completes the
               feature_metrics`)                            line before it is written)
metrics-file   ``metrics.jsonl``, one line per iteration    always (the line is on disk
                                                            before anything else sees
                                                            it)
progress       a tqdm progress bar on stderr                ``train(progress=True)``
tensorboard    event files in ``tensorboard/`` (tags:       config ``tensorboard``
               :func:`pgscope.metrics.tensorboard_tag`)
csv            ``metrics.csv``                              config ``csv``
scheduled-     ``probes/iter_XXXXXX/`` (registered by       config ``probe_every``
probes         :mod:`pgscope.probes.schedule`)
============== ============================================ ===========================

Every file a sink writes is derived from ``metrics.jsonl``: when a run starts (or
resumes, after resume has dropped the lines past its checkpoint) the TensorBoard and CSV
sinks rewrite their files from the kept lines, so neither ever holds an iteration twice
or one that ``metrics.jsonl`` does not.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from typing import IO, Any

from tqdm.auto import tqdm

from pgscope.callbacks import Callback, IterationEnd, RunEnd, RunStart
from pgscope.config import Config
from pgscope.features import feature_metrics
from pgscope.metrics import GLOBAL_STEP, metrics_for, tensorboard_tag
from pgscope.registry import Registry
from pgscope.run import RunDir, atomic_write_bytes

#: ``factory(cfg, run, progress)`` -> the run's sink, or None when the run does not want it.
SinkFactory = Callable[[Config, RunDir, bool], Callback | None]

#: The sink factories by name, in the order their sinks receive events.
SINKS: Registry[SinkFactory] = Registry("sink")


def register_sink(name: str, factory: SinkFactory) -> None:
    """Add a sink that :func:`default_sinks` makes for every run its factory accepts."""
    SINKS.register(name, factory)


def default_sinks(cfg: Config, run: RunDir, progress: bool) -> list[Callback]:
    """The sinks of every registered factory that this run asks for, in order."""
    made = (factory(cfg, run, progress) for factory in SINKS.values())
    return [sink for sink in made if sink is not None]


class CriticFeatures(Callback):
    """Adds the critic-feature metrics of the iteration's batch (feature_dot, ...; pairs
    ``(obs, next_obs)`` without an episode end between) to every ``features_every``-th
    metrics line, before the metrics file writes it. Reads the agent, changes nothing."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_iteration_end(self, event: IterationEnd) -> None:
        if event.iteration % self.every:
            return
        batch = event.batch
        values = feature_metrics(event.agent.value_net, batch.obs, batch.next_obs, ~batch.done)
        event.metrics.update({k: v if math.isfinite(v) else None for k, v in values.items()})


class MetricsFile(Callback):
    """Appends each iteration's line to ``metrics.jsonl`` (flushed and fsynced)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_iteration_end(self, event: IterationEnd) -> None:
        self.run.append_metrics(event.metrics)


class ProgressBar(Callback):
    """A tqdm bar over the run's env steps, with the last return and steps per second."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.steps = 0

    def on_run_start(self, event: RunStart) -> None:
        cfg = event.config
        self.steps = event.env_steps
        self.bar = tqdm(total=cfg.num_iterations * cfg.steps_per_iter, initial=self.steps,
                        unit="step", desc=f"{cfg.preset} {cfg.env_id} s{cfg.seed}",
                        dynamic_ncols=True)

    def on_iteration_end(self, event: IterationEnd) -> None:
        self.bar.update(event.env_steps - self.steps)
        self.steps = event.env_steps
        ret, sps = event.metrics.get("return_mean"), event.metrics.get("sps")
        self.bar.set_postfix(ret="-" if ret is None else f"{ret:.1f}",
                             sps="-" if sps is None else f"{sps:.0f}")

    def on_run_end(self, event: RunEnd) -> None:
        if self.bar is not None:
            self.bar.close()


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The keys of a metrics line with a finite number (``None`` and flags left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard(Callback):
    """Writes every number of every metrics line to TensorBoard event files in
    ``RUN/tensorboard/`` under :func:`pgscope.metrics.tensorboard_tag` (SB3's tag names
    where SB3 logs the same quantity, else ``pgscope/<key>``), with the env steps as the
    global step. On (re)start the event files are rewritten from ``metrics.jsonl``, so a
    resumed run never holds a step twice."""

    SUBDIR = "tensorboard"

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.writer: Any = None

    def on_run_start(self, event: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        logdir = self.run.path / self.SUBDIR
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(logdir))
        for record in self.run.read_metrics():
            self._write(record)
        self.writer.flush()

    def _write(self, record: dict[str, Any]) -> None:
        step = int(record[GLOBAL_STEP])
        for key, value in _numbers(record).items():
            if key != GLOBAL_STEP:
                tag, scale = tensorboard_tag(key)
                self.writer.add_scalar(tag, scale * value, global_step=step)

    def on_iteration_end(self, event: IterationEnd) -> None:
        self._write(event.metrics)
        self.writer.flush()

    def on_run_end(self, event: RunEnd) -> None:
        if self.writer is not None:
            self.writer.close()


class CsvWriter(Callback):
    """``RUN/metrics.csv``: one row per metrics line, one column per key the run's
    algorithm may log (registry order); empty cells for null or absent values; floats at
    full precision. Rewritten from ``metrics.jsonl`` when the run (re)starts."""

    FILE = "metrics.csv"

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.columns: list[str] = []
        self.file: IO[str] | None = None

    def on_run_start(self, event: RunStart) -> None:
        cfg = event.config
        self.columns = [m.name for m in metrics_for(
            cfg.algo, discrete=event.agent.policy.discrete, ppo_loss=cfg.ppo_loss)]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.run.read_metrics())
        path = self.run.path / self.FILE
        atomic_write_bytes(path, text.getvalue().encode())
        self.file = open(path, "a", newline="")

    def on_iteration_end(self, event: IterationEnd) -> None:
        assert self.file is not None
        csv.DictWriter(self.file, self.columns, lineterminator="\n").writerow(event.metrics)
        self.file.flush()

    def on_run_end(self, event: RunEnd) -> None:
        if self.file is not None:
            self.file.close()


register_sink("critic-features", lambda cfg, run, progress: CriticFeatures(cfg.features_every)
              if cfg.features_every else None)
register_sink("metrics-file", lambda cfg, run, progress: MetricsFile(run))
register_sink("progress", lambda cfg, run, progress: ProgressBar() if progress else None)
register_sink("tensorboard", lambda cfg, run, progress: TensorBoard(run)
              if cfg.tensorboard else None)
register_sink("csv", lambda cfg, run, progress: CsvWriter(run) if cfg.csv else None)

__all__ = ["CriticFeatures", "CsvWriter", "MetricsFile", "ProgressBar", "SINKS", "SinkFactory",
           "TensorBoard", "default_sinks", "register_sink"]
