"""``pgscope export``: what the logging sinks would have written, for a run that trained
without them (or a study's every run).

From a run's ``metrics.jsonl`` and ``config.json`` it writes, with the sinks' own code
(:mod:`pgscope.sinks`), so the output is the same as a live sink's:

========= ============================================ =================================
format    writes (default location)                    as the live sink
========= ============================================ =================================
tensorboard event files in ``RUN/tensorboard/``: every  :class:`pgscope.sinks.TensorBoard`
          number under SB3's tag names at step = env
          steps, the config as hparams
csv       ``RUN/metrics.csv``                          :class:`pgscope.sinks.CsvWriter`
wandb     a W&B run (the config as W&B config, the     :class:`pgscope.sinks.WandB`
          SB3 tags at step = env steps), recorded in
          ``RUN/wandb.json``
========= ============================================ =================================

``out`` moves the files: the TensorBoard logdir is ``OUT`` (a study's run:
``OUT/<run's path in the study>``), the CSV ``OUT/metrics.csv`` (likewise), W&B's local
files go under ``OUT/wandb/`` (default ``$WANDB_DIR``, else the run directory).

Exporting never duplicates data silently: an existing target (event files in the logdir,
the CSV file, a run already logged to W&B: ``RUN/wandb.json``, which the live W&B sink
writes too) is refused, for every run of the call before anything is written, unless
``force``: then the event files and the CSV file are replaced, and W&B gets another run
(a W&B run cannot be replaced from here; the earlier ones stay, listed in
``RUN/wandb.json``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgscope.config import Config
from pgscope.errors import CheckpointError, PgscopeError, RunDirError
from pgscope.metrics import GLOBAL_STEP, REGISTRY
from pgscope.run import RunDir, load_checkpoint
from pgscope.sinks import (
    WANDB_RECORD,
    CsvWriter,
    TensorBoard,
    csv_columns,
    log_to_wandb,
    start_wandb_run,
    wandb_dir,
    wandb_exit_code,
    wandb_missing,
)

#: The formats, in the order they are written.
FORMATS: tuple[str, ...] = ("tensorboard", "csv", "wandb")


@dataclass(frozen=True)
class Exported:
    """One format of one run written: where, and how many metrics lines."""

    run: Path
    format: str
    target: Path
    iterations: int
    note: str = ""


@dataclass
class ExportResult:
    """What :func:`export` wrote, and the runs of a study it left out (with why)."""

    written: list[Exported] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Source:
    """A run to export: its directory, its path inside the study (``None``: not a
    study's), config and metrics lines."""

    run: RunDir
    rel: str | None
    config: Config
    records: list[dict[str, Any]]


def _sources(path: Path) -> tuple[list[_Source], list[tuple[Path, str]]]:
    """The runs under ``path`` (a run directory, or a study directory: its every run that
    has metrics) and the study's runs left out, with why."""
    if not path.exists():
        raise RunDirError(f"'{path}' does not exist; give a run directory (with config.json) "
                          "or a study directory (with study.json).")
    if not path.is_dir():
        raise RunDirError(f"'{path}' is a file; give a run directory (with config.json) or a "
                          "study directory (with study.json).")
    if (path / "config.json").exists():
        return [_source(RunDir.open(path), None)], []
    from pgscope.study.runner import STUDY_FILE, open_study
    from pgscope.study.spec import is_study_dir

    if not is_study_dir(path):  # (the seed runs of `train --seeds` are a study too)
        raise RunDirError(f"'{path}' is neither a pgscope run directory (no config.json) nor "
                          f"a study directory (no {STUDY_FILE}, no seed_<s>/ runs); give one "
                          "of them.")
    sources: list[_Source] = []
    skipped: list[tuple[Path, str]] = []
    for spec in open_study(path).runs():
        run_path = path / spec.rel_path
        if not (run_path / "config.json").exists():
            skipped.append((run_path, "not started"))
            continue
        run = RunDir.open(run_path)
        if not run.read_metrics():
            skipped.append((run_path, "no metrics yet"))
            continue
        sources.append(_source(run, spec.rel_path))
    if not sources:
        raise RunDirError(f"no run of the study '{path}' has metrics to export yet; run it "
                          f"first ('pgscope study run ... --out {path}').")
    return sources, skipped


def _source(run: RunDir, rel: str | None) -> _Source:
    records = run.read_metrics()
    if not records:
        raise RunDirError(
            f"'{run.path}' has no metrics to export ({run.metrics_path.name} has no complete "
            f"line); train it first ('pgscope train --resume {run.path}').")
    for record in records:
        if not isinstance(record.get(GLOBAL_STEP), int):
            raise RunDirError(
                f"'{run.metrics_path}': the line of iteration {record['iteration']} has no "
                f"'{GLOBAL_STEP}' (the step of every export); it cannot be exported.")
    return _Source(run, rel, run.read_config(), records)


def _discrete(source: _Source) -> bool | None:
    """Whether the run's policy is categorical: from the keys only one kind of policy logs,
    else from its last checkpoint's spaces; ``None`` when neither tells."""
    keys = {k for record in source.records for k in record}
    for key in keys:
        metric = REGISTRY.get(key)
        if metric is not None and "discrete" in metric.requires:
            return True
        if metric is not None and "gaussian" in metric.requires:
            return False
    try:
        spaces = load_checkpoint(source.run.last_checkpoint)["spaces"]
        return bool(spaces["action"]["type"] == "discrete")
    except (CheckpointError, KeyError, TypeError):
        return None


def target(source: _Source, fmt: str, out: Path | None) -> Path:
    """Where format ``fmt`` of ``source`` goes: the TensorBoard logdir, the CSV file, or for
    W&B the record of the W&B runs made of the run (``RUN/wandb.json``)."""
    base = None if out is None else out / source.rel if source.rel else out
    if fmt == "tensorboard":
        return base if base is not None else source.run.path / TensorBoard.SUBDIR
    if fmt == "csv":
        return (base if base is not None else source.run.path) / CsvWriter.FILE
    if fmt == "wandb":
        return source.run.path / WANDB_RECORD
    raise PgscopeError(f"unknown export format '{fmt}'; expected one of {', '.join(FORMATS)}.")


def _taken(fmt: str, path: Path) -> str | None:
    """Why ``path`` cannot take an export of ``fmt`` without ``force``, or ``None``."""
    if fmt == "tensorboard":
        if path.exists() and not path.is_dir():
            return f"'{path}' is a file, not a TensorBoard logdir"
        if path.is_dir() and any(path.glob("events.out.tfevents.*")):
            return f"'{path}' already holds TensorBoard event files"
    elif fmt == "csv" and path.exists():
        return f"'{path}' exists"
    elif fmt == "wandb" and path.exists():
        return (f"'{path.parent}' was already logged to W&B (its W&B runs are listed in "
                f"'{path}')")
    return None


def export(path: str | Path, formats: Sequence[str], *, out: str | Path | None = None,
           force: bool = False) -> ExportResult:
    """Export the run or study at ``path`` to ``formats`` (some of :data:`FORMATS`); see
    the module's docstring for what and where. Every target is checked (and the wandb
    package, for ``"wandb"``) before anything is written; an existing one raises
    :class:`pgscope.errors.RunDirError` unless ``force``."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise PgscopeError(f"export formats must be some of {', '.join(FORMATS)}; "
                           f"got {', '.join(unknown) or 'none'}.")
    formats = [f for f in FORMATS if f in formats]
    out_dir = None if out is None else Path(out)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"--out '{out_dir}' is a file; give a directory.")
    sources, skipped = _sources(Path(path))
    if "wandb" in formats:
        missing = wandb_missing("pgscope export --wandb")
        if missing is not None:
            raise missing
    if not force:
        taken = [why for s in sources for f in formats
                 if (why := _taken(f, target(s, f, out_dir))) is not None]
        if taken:
            more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
            raise RunDirError(
                f"nothing exported: {'; '.join(taken[:3])}{more}. Exporting again would "
                "duplicate what is there; add --force to replace the files (and, for W&B, to make "
                "another W&B run; the earlier ones stay).")
    result = ExportResult(skipped=skipped)
    for source in sources:
        note = "being trained: the lines so far" if source.run.writer() is not None else ""
        for fmt in formats:
            dest = target(source, fmt, out_dir)
            _write(source, fmt, dest, out_dir)
            result.written.append(Exported(source.run.path, fmt, dest, len(source.records),
                                           note))
    return result


def _write(source: _Source, fmt: str, dest: Path, out: Path | None) -> None:
    """Write one format of one run (the target is known to be free, or ``force``)."""
    if fmt == "tensorboard":
        if dest.exists() and not dest.is_dir():
            raise RunDirError(f"'{dest}' is a file, not a TensorBoard logdir; remove it.")
        tensorboard = TensorBoard(source.run, logdir=dest)
        try:
            tensorboard.rewrite(source.config, source.records)
        finally:
            tensorboard.close()
    elif fmt == "csv":
        dest.parent.mkdir(parents=True, exist_ok=True)
        CsvWriter(source.run, path=dest).rewrite(
            csv_columns(source.config, _discrete(source)), source.records)
    else:
        directory = out if out is not None else wandb_dir(source.run.path)
        wrun = start_wandb_run(source.config, source.run.path, directory, "export")
        state = "failed"  # what the W&B run says if logging it fails
        try:
            for record in source.records:
                log_to_wandb(wrun, record)
            state = str(source.run.current_status().get("state"))
        finally:
            wrun.finish(exit_code=wandb_exit_code(state))


def format_export(result: ExportResult) -> str:
    """What was written, one line per run and format, and how to look at it."""
    lines = []
    for e in result.written:
        note = f"; {e.note}" if e.note else ""
        what = "W&B run recorded in" if e.format == "wandb" else "->"
        lines.append(f"{e.format}: {e.run} {what} {e.target} ({e.iterations} iterations{note})")
    for run, why in result.skipped:
        lines.append(f"skipped: {run} ({why})")
    if any(e.format == "tensorboard" for e in result.written):
        lines.append("view with: tensorboard --logdir DIR (a directory above the event files)")
    if any(e.format == "wandb" for e in result.written) and \
            os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
        lines.append("offline W&B runs: upload each with 'wandb sync' on its offline-run-* "
                     "directory (RUN/wandb.json gives its files' path inside it)")
    return "\n".join(lines)


__all__ = ["FORMATS", "ExportResult", "Exported", "export", "format_export", "target"]
