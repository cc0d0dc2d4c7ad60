"""Run a study: every (config, env, seed) as an ordinary run directory under the study's.

Layout::

    DIR/study.json                          the spec, its hash, library versions
    DIR/runs/<label>/<env>/seed_<k>/        one ``pgscope train`` run directory each

Re-running the same command resumes: finished runs are skipped, killed runs continue from
their last checkpoint (``pgscope.train.train(resume=True)``), so nothing is run twice.
Two executors run the same unit of work, :func:`execute_run`: local worker processes (one
per core) and a Ray cluster (``backend="ray"``). Both retry a run whose worker died; the
retry resumes from the run's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pgscope.config import Config
from pgscope.errors import DivergenceError, PgscopeError, RunDirError
from pgscope.run import RunDir, atomic_write_json, library_versions
from pgscope.study.spec import StudySpec

STUDY_FILE = "study.json"
STUDY_FORMAT = "pgscope-study"
FINISHED = ("complete", "diverged")
#: A run whose training raised an error (``status.json`` says "failed"): not finished, so
#: the next ``pgscope study run`` resumes it, but the summary counts it as a failure.
FAILED = "failed"

Task = tuple[str, dict[str, Any]]  # (run directory, config dict)
Event = tuple[str, Any] | None  # (task key, result dict or exception); None: nothing yet


@dataclass
class StudyOutcome:
    """What a call of :func:`run_study` found and did."""

    path: Path
    runs: int
    skipped: int  # already finished before this call
    complete: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# --- the study directory ------------------------------------------------------------------
def prepare_study_dir(out: Path, spec: StudySpec) -> bool:
    """Create ``out`` for ``spec``, or accept it if it holds the same study. Returns True
    when the study existed (a resume). Raises :class:`RunDirError` for anything else."""
    marker = out / STUDY_FILE
    if marker.exists():
        other = open_study(out)
        if other.hash() != spec.hash():
            raise RunDirError(
                f"'{out}' holds a different study ('{other.name}': {len(other.configs)} "
                f"configs, envs {', '.join(other.envs)}, {len(other.seeds)} seeds, "
                f"{other.total_steps} steps); choose another --out directory.")
        atomic_write_json(marker, _study_record(spec))  # analysis settings may change
        return True
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"'{out}' is not empty and is not a pgscope study; choose another "
                          "--out directory.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, _study_record(spec))
    return False


def _study_record(spec: StudySpec) -> dict[str, Any]:
    return {"format": STUDY_FORMAT, "spec": spec.to_dict(), "spec_hash": spec.hash(),
            "versions": library_versions()}


def open_study(path: str | Path) -> StudySpec:
    """The spec of the study in directory ``path`` (clear errors if it is not one)."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"study directory '{path}' does not exist.")
    marker = path / STUDY_FILE
    if not marker.exists():
        raise RunDirError(f"'{path}' is not a pgscope study directory (no {STUDY_FILE}); "
                          "create one with 'pgscope study run'.")
    try:
        data = json.loads(marker.read_text())
        if data.get("format") != STUDY_FORMAT:
            raise ValueError("not a pgscope study file")
        return StudySpec.from_dict(data["spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"'{marker}' is not a valid pgscope study file ({exc}).") from None


def run_state(path: Path) -> str:
    """'new', 'partial' (started, not finished: running or interrupted), 'failed' (stopped
    by an error; resumed like a partial run), 'complete' or 'diverged'."""
    run = RunDir(path)
    if not run.config_path.exists():
        return "new"
    try:
        state = run.read_status().get("state")
    except (OSError, ValueError):
        return "partial"
    return state if state in (*FINISHED, FAILED) else "partial"


def steps_done(path: Path) -> int:
    """Env steps of the last complete metrics line (read from the end of the file)."""
    try:
        with open(path / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["env_steps"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


# --- the unit of work ---------------------------------------------------------------------
def execute_run(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Train one run to completion, resuming it if it was started. Idempotent: this is what
    a worker executes, and what a retry after a dead worker executes again."""
    from pgscope.train import train

    path = Path(run_dir)
    state = run_state(path)
    if state in FINISHED:
        return {"state": state}
    cfg = Config.from_dict(config)
    try:
        if state in ("partial", FAILED):
            train(cfg, path, resume=True, progress=False)
        else:
            _remove_empty_tree(path)  # a kill between mkdir and config.json leaves one
            train(cfg, path, progress=False)
    except DivergenceError as exc:
        return {"state": "diverged", "error": str(exc)}
    return {"state": "complete"}


def _remove_empty_tree(path: Path) -> None:
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir()
        path.rmdir()


# --- executors ----------------------------------------------------------------------------
def local_backend(tasks: dict[str, Task], workers: int, max_retries: int,
                  poll: float = 1.0) -> Iterator[Event]:
    """Worker processes (spawned, one run at a time each). A dead worker breaks the pool:
    the runs it held are resubmitted to a fresh pool and resume from their checkpoints."""
    ctx = multiprocessing.get_context("spawn")
    attempts = dict.fromkeys(tasks, 0)
    todo = list(tasks)
    with _single_threaded_blas():
        while todo:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                     mp_context=ctx) as pool:
                futures = {pool.submit(execute_run, *tasks[key]): key for key in todo}
                todo = []
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
                    if not done:
                        yield None
                    for fut in done:
                        key = futures[fut]
                        try:
                            yield key, fut.result()
                        except BrokenProcessPool:
                            attempts[key] += 1
                            if attempts[key] > max_retries:
                                yield key, RuntimeError(f"worker died {attempts[key]} times")
                            else:
                                todo.append(key)
                        except Exception as exc:  # noqa: BLE001 - reported per run
                            yield key, exc


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Spawned workers inherit the environment: one BLAS/OpenMP thread each, so that one
    worker per core does not oversubscribe the cores (measured: ~12% slower per run with
    two workers on 2 cores otherwise). Values the user set are kept."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_backend(tasks: dict[str, Task], workers: int, max_retries: int,
                address: str | None = None, poll: float = 1.0) -> Iterator[Event]:
    """The same work as Ray tasks. Ray re-executes a task whose worker died (``max_retries``);
    :func:`execute_run` then resumes from the checkpoint. On a multi-node cluster the study
    directory must be on storage that every node sees at the same path."""
    try:
        import ray
    except ImportError:
        raise PgscopeError("--backend ray needs the 'ray' package: pip install 'pgscope[ray]' "
                          "(or pip install ray).") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=max_retries)(execute_run)
        refs = {remote.remote(*tasks[key]): key for key in tasks}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll)
            if not ready:
                yield None
            for ref in ready:
                key = refs.pop(ref)
                try:
                    yield key, ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield key, exc
    finally:
        if started:
            ray.shutdown()


# --- the driver ---------------------------------------------------------------------------
def run_study(spec: StudySpec, out: str | Path, *, backend: str = "local",
              workers: int | None = None, address: str | None = None,
              progress: bool = True, max_retries: int = 3) -> StudyOutcome:
    """Run (or resume) every run of ``spec`` under ``out``; returns what happened.

    A run that raises is reported in ``failed`` and the others go on; a diverged run
    (NaN/Inf) is finished, with its cause in its ``status.json``.
    """
    if backend not in ("local", "ray"):
        raise PgscopeError(f"unknown backend '{backend}'; use 'local' or 'ray'.")
    out = Path(out)
    runs = spec.runs()  # validates every config before anything is written
    from pgscope.envs import check_env_id

    for env in spec.envs:
        check_env_id(env)
    prepare_study_dir(out, spec)
    workers = workers or os.cpu_count() or 1
    budget = {r.rel_path: r.config.num_iterations * r.config.steps_per_iter for r in runs}
    tasks = {r.rel_path: (str(out / r.rel_path), r.config.to_dict()) for r in runs
             if run_state(out / r.rel_path) not in FINISHED}
    outcome = StudyOutcome(out, len(runs), skipped=len(runs) - len(tasks))
    running = set(tasks)  # runs of this call not yet reported back

    def done_steps() -> int:
        return sum(min(steps, steps_done(out / k)) if k in running else steps
                   for k, steps in budget.items())

    bar = tqdm(total=sum(budget.values()), initial=done_steps(), unit="step",
               desc=f"study {spec.name}", disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str(f"runs {outcome.skipped}/{len(runs)} done")
    events = (local_backend(tasks, workers, max_retries) if backend == "local"
              else ray_backend(tasks, workers, max_retries, address))
    try:
        for event in events:
            if event is not None:
                key, result = event
                running.discard(key)
                if isinstance(result, BaseException):
                    outcome.failed[key] = f"{type(result).__name__}: {result}"
                    bar.write(f"run {key} failed: {outcome.failed[key]}")
                elif result["state"] == "diverged":
                    outcome.diverged.append(key)
                    bar.write(f"run {key} diverged: {result.get('error', '')}")
                else:
                    outcome.complete.append(key)
            bar.update(done_steps() - bar.n)
            n_done = outcome.skipped + len(outcome.complete) + len(outcome.diverged)
            bar.set_postfix_str(f"runs {n_done}/{len(runs)} done"
                                + (f", {len(outcome.failed)} failed" if outcome.failed else ""))
    finally:
        bar.close()
    return outcome
