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
periodic-      adds the ``eval_*`` keys to the metrics line config ``eval_every``
eval           when it evaluates (registered by             (before the metrics file)
               :mod:`pgscope.periodic_eval`)
metrics-file   ``metrics.jsonl``, one line per iteration    always (the line is on disk
                                                            before anything else sees
                                                            it)
progress       a tqdm progress bar on stderr                ``train(progress=True)``
tensorboard    event files in ``tensorboard/`` (tags:       config ``tensorboard``
               :func:`pgscope.metrics.tensorboard_tag`)
csv            ``metrics.csv``                              config ``csv``
wandb          a W&B run (``wandb.json`` records which)     config ``wandb``
scheduled-     ``probes/iter_XXXXXX/`` (registered by       config ``probe_every``
probes         :mod:`pgscope.probes.schedule`)
============== ============================================ ===========================

Every file a sink writes is derived from ``metrics.jsonl``: when a run starts (or
resumes, after resume has dropped the lines past its checkpoint) the TensorBoard and CSV
sinks rewrite their files from the kept lines, so neither ever holds an iteration twice
or one that ``metrics.jsonl`` does not. The W&B sink cannot rewrite a W&B run, so each
(re)start makes a new W&B run that first logs the kept lines. ``pgscope export``
(:mod:`pgscope.export`) writes the same files and W&B runs for a finished run with these
sinks' own code.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from pgscope.callbacks import Callback, IterationEnd, RunEnd, RunStart
from pgscope.config import Config
from pgscope.errors import DependencyError
from pgscope.features import SRANK_EVAL_ROWS, feature_metrics
from pgscope.metrics import GLOBAL_STEP, metrics_for, tensorboard_tag
from pgscope.registry import Registry
from pgscope.run import RunDir, atomic_write_bytes, atomic_write_json

#: ``factory(cfg, run, progress)`` -> the run's sink, or None when the run does not want it.
SinkFactory = Callable[[Config, RunDir, bool], Callback | None]

#: The sink factories by name, in the order their sinks receive events.
SINKS: Registry[SinkFactory] = Registry("sink")


def register_sink(name: str, factory: SinkFactory, *, before: str | None = None) -> None:
    """Add a sink that :func:`default_sinks` makes for every run its factory accepts, last
    or just before the sink ``before`` (``before="metrics-file"``: a sink that adds keys
    to the metrics line, as the evaluation during training does)."""
    SINKS.register(name, factory, before=before)


def default_sinks(cfg: Config, run: RunDir, progress: bool) -> list[Callback]:
    """The sinks of every registered factory that this run asks for, in order."""
    made = (factory(cfg, run, progress) for factory in SINKS.values())
    return [sink for sink in made if sink is not None]


#: The file in a run directory holding the fixed states ``feature_srank`` is measured on.
FEATURE_EVAL_FILE = "feature_eval_states.pt"


def feature_eval_states(run_dir: Path, obs: torch.Tensor, seed: int) -> torch.Tensor:
    """The run's fixed evaluation states for ``feature_srank``: read from
    :data:`FEATURE_EVAL_FILE` when the run has one (a resumed run keeps its set), else
    drawn from ``obs`` (the first batch the sink sees: every state when it has at most
    :data:`pgscope.features.SRANK_EVAL_ROWS`, else that many drawn without replacement
    with a generator seeded by ``seed`` alone, in batch order) and written there. The
    rows are preprocessed observations, the value net's input vectors, kept as they are."""
    path = Path(run_dir) / FEATURE_EVAL_FILE
    if path.exists():
        saved: torch.Tensor = torch.load(path, map_location="cpu", weights_only=True)
        return saved
    states = obs.detach()
    if len(states) > SRANK_EVAL_ROWS:
        g = torch.Generator().manual_seed(seed)
        states = states[torch.randperm(len(states), generator=g)[:SRANK_EVAL_ROWS].sort().values]
    states = states.clone()
    buffer = io.BytesIO()
    torch.save(states, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return states


class CriticFeatures(Callback):
    """Adds the critic-feature metrics to every ``features_every``-th metrics line, before
    the metrics file writes it: feature_dot, feature_cosine and feature_norm of the
    iteration's batch (pairs ``(obs, next_obs)`` without an episode end between),
    feature_srank of the run's fixed evaluation states (:func:`feature_eval_states`,
    drawn from the first iteration's batch) with their count, feature_srank_rows. Reads the
    agent, changes nothing in training."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.eval_obs: torch.Tensor | None = None

    def on_iteration_end(self, event: IterationEnd) -> None:
        batch = event.batch
        if self.eval_obs is None:
            self.eval_obs = feature_eval_states(event.run_dir, batch.obs, event.config.seed)
        if event.iteration % self.every:
            return
        values = feature_metrics(event.agent.value_net, batch.obs, batch.next_obs, ~batch.done,
                                 eval_obs=self.eval_obs)
        event.metrics.update({k: v if math.isfinite(v) else None for k, v in values.items()})


class MetricsFile(Callback):
    """Appends each iteration's line to ``metrics.jsonl`` (flushed and fsynced)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_iteration_end(self, event: IterationEnd) -> None:
        self.run.append_metrics(event.metrics)


#: The training bar: tqdm's own without its rate (the postfix has the run's sps).
TRAINING_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class ProgressBar(Callback):
    """A tqdm bar over the run's env steps, with the last return and steps per second."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.steps = 0

    def on_run_start(self, event: RunStart) -> None:
        cfg = event.config
        self.steps = event.env_steps
        # the speed shown is the run's own (sps: env steps per second of rollout and
        # update), not tqdm's rate, which would count the time of scheduled probes
        self.bar = tqdm(total=cfg.num_iterations * cfg.steps_per_iter, initial=self.steps,
                        unit="step", desc=f"{cfg.preset} {cfg.env_id} s{cfg.seed}",
                        dynamic_ncols=True, bar_format=TRAINING_BAR)

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


def tagged_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics line as the TensorBoard and W&B sinks log it: every finite number under
    :func:`pgscope.metrics.tensorboard_tag` (SB3's tag name where SB3 logs the same
    quantity, else ``pgscope/<key>``) times that tag's scale; the global step
    (``env_steps``, :data:`pgscope.metrics.GLOBAL_STEP`) is the step, not a scalar."""
    out: dict[str, float] = {}
    for key, value in _numbers(record).items():
        if key != GLOBAL_STEP:
            tag, scale = tensorboard_tag(key)
            out[tag] = scale * value
    return out


def config_hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config as TensorBoard hparams: every key, a sequence (``hidden``,
    ``probe_sizes``) written as ``--set`` takes it (``64,64``)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in cfg.to_dict().items():
        out[key] = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) \
            else value
    return out


#: The metric the TensorBoard HParams dashboard shows beside each run's hyperparameters.
HPARAMS_METRIC = "return_mean"


def write_hparams(writer: Any, cfg: Config) -> None:
    """Write the config (:func:`config_hparams`) as TensorBoard hparams (the HParams
    plugin's summaries) into the logdir of ``writer``, a ``SummaryWriter``, itself: unlike
    ``SummaryWriter.add_hparams``, no sub-run and no extra scalar is made."""
    from torch.utils.tensorboard.summary import hparams

    metric = tensorboard_tag(HPARAMS_METRIC)[0]
    summaries = hparams(config_hparams(cfg), {metric: 0.0})  # type: ignore[no-untyped-call]
    for summary in summaries:  # experiment, session start, session end
        writer.file_writer.add_summary(summary)


class TensorBoard(Callback):
    """Writes every number of every metrics line to TensorBoard event files in
    ``RUN/tensorboard/`` (or ``logdir``) under :func:`pgscope.metrics.tensorboard_tag`
    (SB3's tag names where SB3 logs the same quantity, else ``pgscope/<key>``), with the env
    steps as the global step, and the config as hparams (:func:`write_hparams`). On
    (re)start the event files are rewritten from ``metrics.jsonl``, so a resumed run never
    holds a step twice."""

    SUBDIR = "tensorboard"

    def __init__(self, run: RunDir, logdir: Path | None = None) -> None:
        self.run = run
        self.logdir = Path(logdir) if logdir is not None else run.path / self.SUBDIR
        self.writer: Any = None

    def on_run_start(self, event: RunStart) -> None:
        self.rewrite(event.config, self.run.read_metrics())

    def rewrite(self, cfg: Config, records: Iterable[dict[str, Any]]) -> None:
        """Replace the event files of the logdir with the config's hparams and ``records``
        (metrics lines); the writer stays open for more lines until :meth:`close`."""
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        for old in self.logdir.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        write_hparams(self.writer, cfg)
        for record in records:
            self._write(record)
        self.writer.flush()

    def _write(self, record: dict[str, Any]) -> None:
        step = int(record[GLOBAL_STEP])
        for tag, value in tagged_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def on_iteration_end(self, event: IterationEnd) -> None:
        self._write(event.metrics)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event files."""
        if self.writer is not None:
            self.writer.close()

    def on_run_end(self, event: RunEnd) -> None:
        self.close()


def csv_columns(cfg: Config, discrete: bool | None) -> list[str]:
    """The columns of ``metrics.csv``: every key the run's algorithm may log with this
    action space (``discrete``; ``None``: either) and PPO loss, in registry order."""
    return [m.name for m in metrics_for(cfg.algo, discrete=discrete, ppo_loss=cfg.ppo_loss)]


class CsvWriter(Callback):
    """``RUN/metrics.csv`` (or ``path``): one row per metrics line, one column per key the
    run's algorithm may log (:func:`csv_columns`); empty cells for null or absent values;
    floats at full precision. Rewritten from ``metrics.jsonl`` when the run (re)starts."""

    FILE = "metrics.csv"

    def __init__(self, run: RunDir, path: Path | None = None) -> None:
        self.run = run
        self.path = Path(path) if path is not None else run.path / self.FILE
        self.columns: list[str] = []
        self.file: IO[str] | None = None

    def on_run_start(self, event: RunStart) -> None:
        self.rewrite(csv_columns(event.config, event.agent.policy.discrete),
                     self.run.read_metrics())
        self.file = open(self.path, "a", newline="")

    def rewrite(self, columns: list[str], records: Iterable[dict[str, Any]]) -> None:
        """Replace the file (atomically) with the header ``columns`` and ``records``."""
        self.columns = columns
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_bytes(self.path, text.getvalue().encode())

    def on_iteration_end(self, event: IterationEnd) -> None:
        assert self.file is not None
        csv.DictWriter(self.file, self.columns, lineterminator="\n").writerow(event.metrics)
        self.file.flush()

    def on_run_end(self, event: RunEnd) -> None:
        if self.file is not None:
            self.file.close()


#: The file in a run directory that lists the W&B runs made of it (by the sink or an export).
WANDB_RECORD = "wandb.json"
#: How to install what the W&B sink needs.
WANDB_INSTALL = "pip install wandb"


def wandb_missing(what: str) -> DependencyError | None:
    """The error to raise when ``what`` needs the ``wandb`` package and it is not
    installed (checked without importing it), else ``None``."""
    if importlib.util.find_spec("wandb") is not None:
        return None
    return DependencyError(f"{what} needs the wandb package, which is not installed; "
                           f"install it with '{WANDB_INSTALL}'.")


def check_sinks(cfg: Config) -> None:
    """Raise :class:`pgscope.errors.DependencyError` when a sink the config asks for
    cannot work here (a missing optional package); training calls it before it writes or
    computes anything."""
    if cfg.wandb:
        error = wandb_missing("config key 'wandb' (pgscope train --wandb)")
        if error is not None:
            raise error


def wandb_dir(default: Path) -> Path:
    """Where W&B writes its local files (``DIR/wandb/``): ``$WANDB_DIR`` when set, else
    ``default``."""
    return Path(os.environ.get("WANDB_DIR") or default)


def start_wandb_run(cfg: Config, run_dir: Path, directory: Path, job_type: str) -> Any:
    """Start a W&B run for the pgscope run in ``run_dir``: project ``$WANDB_PROJECT`` or
    ``pgscope``, the config as W&B config, local files under ``directory`` (W&B's own
    settings apply: ``WANDB_MODE=offline`` makes an offline run). Records it in
    ``RUN/wandb.json`` and returns it; several may be open at once (a batch of seeds)."""
    error = wandb_missing("W&B logging")
    if error is not None:
        raise error
    import wandb

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    wrun = wandb.init(project=os.environ.get("WANDB_PROJECT") or "pgscope",
                      name=f"{cfg.preset} {cfg.env_id} seed {cfg.seed}",
                      notes=f"pgscope run directory {Path(run_dir).resolve()}",
                      job_type=job_type, config=cfg.to_dict(), dir=str(directory),
                      reinit="create_new")
    record_wandb_run(Path(run_dir), wrun, job_type)
    return wrun


def record_wandb_run(run_dir: Path, wrun: Any, job_type: str) -> None:
    """Append the W&B run ``wrun`` (id, project, url, local files) to ``RUN/wandb.json``."""
    path = run_dir / WANDB_RECORD
    runs: list[Any] = []
    if path.exists():
        try:
            runs = list(json.loads(path.read_text())["runs"])
        except (ValueError, KeyError, TypeError):
            runs = []  # a damaged record is replaced; the W&B runs themselves stay
    entry: dict[str, Any] = {"job_type": job_type,
                             "time": datetime.datetime.now().isoformat(timespec="seconds")}
    for key in ("id", "project", "url", "dir"):
        value = getattr(wrun, key, None)
        entry[key] = None if value is None else str(value)
    runs.append(entry)
    atomic_write_json(path, {"runs": runs})


def wandb_exit_code(state: str) -> int:
    """The exit code a W&B run is finished with for a run in ``state`` (``status.json``):
    1 (W&B: failed) when it diverged or failed, else 0."""
    return 1 if state in ("diverged", "failed") else 0


def log_to_wandb(wrun: Any, record: dict[str, Any]) -> None:
    """Log a metrics line to the W&B run ``wrun`` as the TensorBoard sink writes it:
    :func:`tagged_scalars` at step = env steps."""
    wrun.log(tagged_scalars(record), step=int(record[GLOBAL_STEP]))


class WandB(Callback):
    """Logs every metrics line to a W&B run (:func:`start_wandb_run`: the config as W&B
    config) under the TensorBoard sink's tags (:func:`tagged_scalars`) at step = env
    steps, and finishes the W&B run when the run ends (:func:`wandb_exit_code`). A W&B
    run cannot be rewritten, so each (re)start makes a new one that first logs the kept
    lines of ``metrics.jsonl``; ``RUN/wandb.json`` lists them all."""

    def __init__(self, run: RunDir, directory: Path | None = None) -> None:
        self.run = run
        self.directory = directory
        self.wrun: Any = None

    def on_run_start(self, event: RunStart) -> None:
        directory = self.directory or wandb_dir(self.run.path)
        self.wrun = start_wandb_run(event.config, self.run.path, directory, "train")
        for record in self.run.read_metrics():
            log_to_wandb(self.wrun, record)

    def on_iteration_end(self, event: IterationEnd) -> None:
        log_to_wandb(self.wrun, event.metrics)

    def on_run_end(self, event: RunEnd) -> None:
        if self.wrun is not None:
            self.wrun.finish(exit_code=wandb_exit_code(event.state))
            self.wrun = None


register_sink("critic-features", lambda cfg, run, progress: CriticFeatures(cfg.features_every)
              if cfg.features_every else None)
register_sink("metrics-file", lambda cfg, run, progress: MetricsFile(run))
register_sink("progress", lambda cfg, run, progress: ProgressBar() if progress else None)
register_sink("tensorboard", lambda cfg, run, progress: TensorBoard(run)
              if cfg.tensorboard else None)
register_sink("csv", lambda cfg, run, progress: CsvWriter(run) if cfg.csv else None)
register_sink("wandb", lambda cfg, run, progress: WandB(run) if cfg.wandb else None)

__all__ = ["CriticFeatures", "CsvWriter", "FEATURE_EVAL_FILE", "MetricsFile", "ProgressBar",
           "SINKS", "SinkFactory", "TensorBoard", "WandB", "check_sinks", "config_hparams",
           "csv_columns", "default_sinks", "feature_eval_states", "register_sink",
           "start_wandb_run", "tagged_scalars", "write_hparams"]
