"""Run a study: every (config, env, seed) as an ordinary run directory under the study's.

Layout::

    DIR/study.json                          the spec, its hash, library versions
    DIR/runs/<label>/<env>/seed_<k>/        one ``pgscope train`` run directory each

Re-running the same command resumes: finished runs are skipped, killed runs continue from
their last checkpoint (``pgscope.train.train(resume=True)``), so nothing is run twice.
The pending runs are packed into batches of runs that differ only in their seed
(:mod:`pgscope.study.batching`); one batch is one unit of work, :func:`execute_batch`,
trained together by the one training engine (:func:`pgscope.train.train_batch`). Two
executors run the units: local worker processes (one per core) and a Ray cluster
(``backend="ray"``, :mod:`pgscope.study.ray_backend`: workers train in node-local storage
and ship the runs back to the study directory). Both retry a unit whose worker died; the
retry resumes each run from its last checkpoint.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pgscope.callbacks import Callback
from pgscope.config import Config
from pgscope.errors import ConfigError, DivergenceError, PgscopeError, RunDirError
from pgscope.run import RunDir, atomic_write_json, library_versions
from pgscope.study.batching import DEFAULT_BATCH_SIZE, Task, pack_batches, resume_point
from pgscope.study.spec import STUDY_FILE, StudySpec, safe_name, seed_runs, seeds_study

STUDY_FORMAT = "pgscope-study"
FINISHED = ("complete", "diverged")
#: A run whose training raised an error (``status.json`` says "failed"): not finished, so
#: the next ``pgscope study run`` resumes it, but the summary counts it as a failure.
FAILED = "failed"

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
    batches: list[list[str]] = field(default_factory=list)  # the units of work dispatched


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
    if out.exists() and seed_runs(out):
        raise RunDirError(f"'{out}' holds the seed runs of 'pgscope train --seeds' (extend "
                          "them with 'pgscope train --resume DIR --seeds ...'); choose "
                          "another --out directory.")
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
        if seed_runs(path) and not (path / "config.json").exists():
            return seeds_study(path)  # pgscope train --seeds: a study of one config
        raise RunDirError(f"'{path}' is not a pgscope study directory (no {STUDY_FILE}, "
                          "no seed_<s>/ runs); create one with 'pgscope study run' or "
                          "'pgscope train --seeds'.")
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
def execute_run(run_dir: str, config: dict[str, Any],
                callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
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
            train(cfg, path, resume=True, progress=False, callbacks=callbacks)
        else:
            _remove_empty_tree(path)  # a kill between mkdir and config.json leaves one
            train(cfg, path, progress=False, callbacks=callbacks)
    except DivergenceError as exc:
        return {"state": "diverged", "error": str(exc)}
    return {"state": "complete"}


def execute_batch(tasks: Sequence[Task], callbacks: Sequence[Callback] = ()
                  ) -> list[dict[str, Any]]:
    """Train a batch of runs (as :func:`pack_batches` groups them) to completion; one
    result per run, in order: ``{"state": "complete" | "diverged" | "failed", "error"?}``.
    Idempotent like :func:`execute_run`. Runs that start at the same point are trained
    together by the engine (:func:`pgscope.train.train_batch`; a run's numbers do not
    depend on its batch). An error of one run fails that run only; input the engine
    refuses before training fails each run of the group with the engine's message."""
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    pending = {}
    for i, (run_dir, config) in enumerate(tasks):
        state = run_state(Path(run_dir))
        if state in FINISHED:
            results[i] = {"state": state}
        else:
            pending[str(i)] = (run_dir, config)
    # a retry may find the members at different checkpoints: regroup by start point
    for group in pack_batches(pending, batch_size=max(1, len(pending)), batchable=batchable):
        members = [int(k) for k in group]
        trained = _train_together([tasks[i] for i in members], callbacks)
        for i, result in zip(members, trained, strict=True):
            results[i] = result
    return [r if r is not None else {"state": FAILED, "error": "not trained"} for r in results]


def _failure(exc: Exception) -> dict[str, Any]:
    return {"state": FAILED, "error": f"{type(exc).__name__}: {exc}"}


def batchable(tasks: Sequence[Task]) -> bool:
    """Whether these runs can train as one batch (:func:`pgscope.train.check_batchable`:
    configs that differ only in their distinct seeds); runs that cannot are packed one
    per batch."""
    from pgscope.train import check_batchable

    try:
        check_batchable([Config.from_dict(config) for _, config in tasks])
    except ConfigError:
        return False
    return True


def _train_together(tasks: list[Task], callbacks: Sequence[Callback]
                    ) -> list[dict[str, Any]]:
    """The runs of ``tasks`` (one start point) trained together by the engine, resumed
    when they were started; each run's result."""
    from pgscope.train import train_batch

    resume = run_state(Path(tasks[0][0])) != "new"
    if not resume:
        for run_dir, _ in tasks:
            _remove_empty_tree(Path(run_dir))  # a kill between mkdir and config.json
    try:
        members = train_batch([Config.from_dict(c) for _, c in tasks],
                              [Path(d) for d, _ in tasks], resume=resume, progress=False,
                              callbacks=callbacks)
    except PgscopeError as exc:  # refused before anything was trained: said for each run
        return [_failure(exc)] * len(tasks)
    out = []
    for member in members:
        if member.state in (*FINISHED, FAILED):
            out.append({"state": member.state, **({"error": member.error}
                                                  if member.error else {})})
        else:
            out.append({"state": FAILED, "error": member.error or
                        f"the engine ended the run as '{member.state}'"})
    return out


def _remove_empty_tree(path: Path) -> None:
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir()
        path.rmdir()


# --- executors ----------------------------------------------------------------------------
def local_backend(tasks: dict[str, Task], batches: list[list[str]], workers: int,
                  max_retries: int, poll: float = 1.0) -> Iterator[Event]:
    """Worker processes (spawned, one batch at a time each). A dead worker breaks the pool:
    the batches it held are resubmitted to a fresh pool and resume from their checkpoints.
    The workers end with the driver: when it is interrupted (SIGINT, or SIGTERM through
    the CLI) or stops reading the events, it tells them to stop, and a worker whose
    driver died (``kill -9``) stops by itself (:func:`_follow_driver`); either way their
    runs end ``interrupted`` with their locks released, ready to resume."""
    ctx = multiprocessing.get_context("spawn")
    attempts = [0] * len(batches)
    todo = list(range(len(batches)))
    with _single_threaded_blas():
        while todo:
            stop = ctx.Event()
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                     initializer=_follow_driver,
                                     initargs=(os.getpid(), stop)) as pool:
                futures = {pool.submit(_execute_unless_stopped,
                                       [tasks[key] for key in batches[b]]): b
                           for b in todo}
                todo = []
                pending = set(futures)
                try:
                    while pending:
                        done, pending = wait(pending, timeout=poll,
                                             return_when=FIRST_COMPLETED)
                        if not done:
                            yield None
                        for fut in done:
                            b = futures[fut]
                            try:
                                yield from zip(batches[b], fut.result(), strict=True)
                            except BrokenProcessPool:
                                attempts[b] += 1
                                if attempts[b] > max_retries:
                                    error = RuntimeError(f"worker died {attempts[b]} times")
                                    yield from ((key, error) for key in batches[b])
                                else:
                                    todo.append(b)
                            except Exception as exc:  # noqa: BLE001 - reported per run
                                yield from ((key, exc) for key in batches[b])
                except BaseException:  # interrupted, or the events no longer read
                    stop.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise


#: How often a local worker checks its driver, and how long a worker whose driver died
#: waits for its interrupted runs to close before it exits.
DRIVER_POLL_S, ORPHAN_GRACE_S = 0.5, 30.0


class WorkerStopped(RuntimeError):
    """A batch reached a local worker after its driver had stopped; it was not started."""


def _never() -> bool:
    return False


#: In a local worker: whether its driver has stopped or is gone (set by _follow_driver).
_driver_stopped: Callable[[], bool] = _never


def _execute_unless_stopped(tasks: list[Task]) -> list[Any]:
    """:func:`execute_batch` in a local worker, unless its driver has stopped: the pool
    hands a worker the batches it had already queued when the driver stopped (shutdown's
    ``cancel_futures`` cancels only those not yet queued), and such a batch must not start
    training (it would run to its end, holding its runs' locks, with nobody to report
    to); its runs stay as they were, to be resumed."""
    if _driver_stopped():
        raise WorkerStopped("the study was stopped before this batch started")
    return execute_batch(tasks)


def _follow_driver(driver: int, stop: Any) -> None:
    """Initializer of a local worker: a thread that interrupts the worker's training as
    Ctrl-C would (its runs end ``interrupted`` and release their locks) once ``stop`` is
    set or the driver process is gone, and, when the driver is gone, ends the worker
    :data:`ORPHAN_GRACE_S` later (nobody is left to collect its results). Ctrl-C
    interrupts a worker even where SIGINT was ignored (a study started in the
    background), since the thread raises it. From then on the worker starts no batch
    (:func:`_execute_unless_stopped`)."""
    global _driver_stopped
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def stopped() -> bool:
        return stop.is_set() or os.getppid() != driver

    _driver_stopped = stopped

    def follow() -> None:
        while not stopped():
            time.sleep(DRIVER_POLL_S)
        _thread.interrupt_main()
        if os.getppid() != driver:
            time.sleep(ORPHAN_GRACE_S)
            os._exit(1)

    threading.Thread(target=follow, name="pgscope-follow-driver", daemon=True).start()


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


# --- the driver ---------------------------------------------------------------------------
def run_study(spec: StudySpec, out: str | Path, *, backend: str = "local",
              workers: int | None = None, address: str | None = None,
              progress: bool = True, max_retries: int = 3, batch_size: int | None = None,
              ship_every: int = 1) -> StudyOutcome:
    """Run (or resume) every run of ``spec`` under ``out``; returns what happened.

    Pending runs that differ only in their seed are trained in batches of at most
    ``batch_size`` (default: the spec's ``batch_size``, else
    :data:`~pgscope.study.batching.DEFAULT_BATCH_SIZE`; 1 trains every run alone). With
    ``backend="ray"`` the workers train in node-local storage and ship each run to ``out``
    at its start, after every ``ship_every``-th checkpoint and at its end.

    A run that raises is reported in ``failed`` and the others go on; a diverged run
    (NaN/Inf) is finished, with its cause in its ``status.json``.
    """
    if backend not in ("local", "ray"):
        raise PgscopeError(f"unknown backend '{backend}'; use 'local' or 'ray'.")
    batch_size = batch_size or spec.batch_size or DEFAULT_BATCH_SIZE
    for name, value, least in (("batch_size", batch_size, 1), ("ship_every", ship_every, 1),
                               ("workers", workers, 1), ("max_retries", max_retries, 0)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise PgscopeError(f"{name} must be a whole number >= {least}, got {value!r}.")
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
    batches = pack_batches(tasks, batch_size, workers,
                           {key: resume_point(task[0]) for key, task in tasks.items()},
                           batchable)
    outcome = StudyOutcome(out, len(runs), skipped=len(runs) - len(tasks), batches=batches)
    running = set(tasks)  # runs of this call not yet reported back

    def done_steps() -> int:
        return sum(min(steps, steps_done(out / k)) if k in running else steps
                   for k, steps in budget.items())

    bar = tqdm(total=sum(budget.values()), initial=done_steps(), unit="step",
               desc=f"study {spec.name}", disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str(f"runs {outcome.skipped}/{len(runs)} done")
    if backend == "local":
        events = local_backend(tasks, batches, workers, max_retries)
    else:
        from pgscope.study.ray_backend import ray_backend

        events = ray_backend({key: task[1] for key, task in tasks.items()}, batches, out,
                             study_key(out, spec), workers=workers, max_retries=max_retries,
                             address=address, ship_every=ship_every)
    try:
        for event in events:
            if event is not None:
                key, result = event
                running.discard(key)
                if isinstance(result, BaseException):
                    outcome.failed[key] = f"{type(result).__name__}: {result}"
                    bar.write(f"run {key} failed: {outcome.failed[key]}")
                elif result["state"] == FAILED:
                    outcome.failed[key] = result.get("error", "failed")
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


def study_key(out: Path, spec: StudySpec) -> str:
    """A name for this study directory that is the same on every node (its node-local
    storage is named after it) and says nothing of the driver's paths."""
    text = f"{socket.gethostname()}:{out.resolve()}:{spec.hash()}"
    return f"{safe_name(spec.name)[:40]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
