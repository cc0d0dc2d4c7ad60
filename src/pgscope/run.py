"""Run directories and checkpoints: crash-safe, append-only, loadable without unpickling.

Layout of a run directory::

    config.json          resolved config, its hash, library versions
    metrics.jsonl        one JSON object per finished iteration, flushed as it ends
    status.json          running | complete | diverged | failed | interrupted, with the
                         writer's pid and host, the last iteration and a heartbeat
    events.log           resumes, extensions, warnings and probe failures, one line each
    writer.lock          held (``fcntl.flock``) by the one process writing the run
    checkpoints/last.pt  the latest iteration (written atomically every iteration)
    checkpoints/iter_000010.pt ...   kept every ``checkpoint_every`` iterations

Order of writes per iteration: metrics line first, then checkpoint. A kill between the two
leaves one metrics line past the checkpoint, which ``--resume`` drops and recomputes, so no
iteration is ever duplicated or missing. Resume never drops anything else: a damaged line
before the checkpoint's iteration stops it unless ``--repair`` is given (which keeps a
backup).

One writer per run: a process that writes a run holds an exclusive OS lock on
``writer.lock`` for as long as it runs. A second writer fails at once with an error naming
the holder; the OS releases the lock when the holder dies (even by ``kill -9``), so a lock
is never stale, and a ``running`` status without a live holder reads as ``interrupted``.
"""

from __future__ import annotations

import datetime
import fcntl
import io
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from pgscope import __version__
from pgscope.agent import Agent, build_agent, spaces_signature
from pgscope.config import Config, config_hash
from pgscope.errors import CheckpointError, RunDirError

CHECKPOINT_FORMAT = "pgscope-checkpoint"
CHECKPOINT_VERSION = 1


def library_versions() -> dict[str, str]:
    import mujoco  # noqa: PLC0415 - optional at import time of pgscope
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gymnasium": gym.__version__,
        "mujoco": mujoco.__version__,
        "numpy": numpy.__version__,
        "pgscope": __version__,
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


LOCK_FILE = "writer.lock"


class _InRun:
    """A read-only attribute: the path ``parts`` inside the run directory."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, run: RunDir | None, owner: type | None = None) -> Path:
        if run is None:
            raise AttributeError(f"{'/'.join(self.parts)} is a path of a RunDir instance")
        return run.path.joinpath(*self.parts)


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    config_path = _InRun("config.json")
    metrics_path = _InRun("metrics.jsonl")
    status_path = _InRun("status.json")
    checkpoint_dir = _InRun("checkpoints")
    last_checkpoint = _InRun("checkpoints", "last.pt")
    lock_path = _InRun(LOCK_FILE)
    events_path = _InRun("events.log")

    @classmethod
    def create(cls, path: Path, cfg: Config) -> tuple[RunDir, WriterLock]:
        """Create a new run directory and become its writer; refuse a path that is a file,
        cannot be written, or holds anything else. Returns the run and its held lock."""
        run = cls(path)
        run._check_new(cfg)
        try:
            run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            lock = run.lock()
        except PermissionError as exc:
            raise RunDirError(f"cannot write the run directory '{path}' ({exc.strerror}); "
                              "choose another --out.") from None
        try:
            run._check_new(cfg)  # another process may have won the race to this directory
            atomic_write_json(run.config_path, {
                "config": cfg.to_dict(),
                "config_hash": config_hash(cfg),
                "versions": library_versions(),
            })
            run.metrics_path.touch()
        except BaseException:
            lock.release()
            raise
        return run, lock

    def _check_new(self, cfg: Config) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"'{path}' is a file, not a directory; choose another --out.")
        if not path.exists():
            parent = next((p for p in path.parents if p.exists()), Path("."))
            if not os.access(parent, os.W_OK):
                raise RunDirError(f"cannot create '{path}': '{parent}' is not writable; "
                                  "choose another --out.")
            return
        if self._entries():
            writer = self.writer()
            if writer is not None:
                raise RunDirError(
                    f"'{path}' is being written by another process (pid "
                    f"{writer.get('pid', '?')} on {writer.get('host', '?')}, since "
                    f"{writer.get('since', '?')}); a new run cannot start there. Wait for "
                    "it to finish or stop it first (watch it with 'pgscope status'), or "
                    "choose another --out.")
            if self.config_path.exists():
                other = self.read_config()
                if run_identity(other) == run_identity(cfg):
                    raise RunDirError(
                        f"'{path}' already holds this run; continue it with "
                        f"'pgscope train --resume {path}' (add --steps N to extend it) or "
                        "choose another --out.")
                raise RunDirError(
                    f"'{path}' already holds a different run (preset {other.preset}, env "
                    f"{other.env_id}, seed {other.seed}); choose another --out directory.")
            raise RunDirError(
                f"'{path}' is not empty and is not a pgscope run; choose another --out "
                "directory.")

    def _entries(self) -> list[Path]:
        """What the directory holds besides its lock file and an empty checkpoints/."""
        return [p for p in self.path.iterdir() if p.name != LOCK_FILE and not (
            p == self.checkpoint_dir and p.is_dir() and not any(p.iterdir()))]

    def extend(self, cfg: Config, total_steps: int) -> Config:
        """Raise the run's total to ``total_steps`` (it must not be below the steps of its
        last checkpoint); records the change in config.json and events.log."""
        from dataclasses import replace

        from pgscope.config import validate

        done = 0
        if self.last_checkpoint.exists():
            done = int(load_checkpoint(self.last_checkpoint)["env_steps"])
        if total_steps < max(done, 1):
            raise RunDirError(
                f"--steps {total_steps} is below the {done} env steps this run has done; "
                "a run can only be extended.")
        new = replace(cfg, total_steps=total_steps)
        validate(new)
        data = json.loads(self.config_path.read_text())
        history = data.get("extensions", [])
        history.append({"from_total_steps": cfg.total_steps, "to_total_steps": total_steps,
                        "at_env_steps": done,
                        "time": datetime.datetime.now().isoformat(timespec="seconds")})
        data.update(config=new.to_dict(), config_hash=config_hash(new), extensions=history)
        atomic_write_json(self.config_path, data)
        self.log(f"extended from {cfg.total_steps} to {total_steps} total env steps at "
                 f"{done} steps; lr annealing is re-planned over the new total")
        return new

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"run directory '{path}' does not exist.")
        if not run.config_path.exists():
            raise RunDirError(f"'{path}' is not a pgscope run directory (no config.json).")
        run.read_config()
        return run

    def read_config(self) -> Config:
        try:
            data = json.loads(self.config_path.read_text())
            return Config.from_dict(data["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RunDirError(f"'{self.config_path}' is not a valid pgscope config ({exc}).") \
                from None

    # --- metrics --------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def scan_metrics(self) -> MetricsScan:
        """Every metrics line parsed, and the line numbers (1-based) of damaged ones."""
        scan = MetricsScan([], [], [])
        if not self.metrics_path.exists():
            return scan
        scan.lines = self.metrics_path.read_text().splitlines()
        for number, line in enumerate(scan.lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
                    raise ValueError("no iteration")
                scan.records.append((number, record))
            except ValueError:
                scan.damaged.append(number)
        return scan

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every intact metrics line in file order. A damaged line (e.g. one cut short by a
        kill) is skipped; the lines after it are still read."""
        return [record for _, record in self.scan_metrics().records]

    def truncate_metrics(self, iterations_done: int, repair: bool = False) -> None:
        """Prepare ``metrics.jsonl`` for a resume from the checkpoint of iteration
        ``iterations_done``: drop the lines of later iterations (and damaged lines after
        the last kept one: a kill mid-write), keep everything else byte for byte.

        A damaged line before that point, or lines of iterations 1..iterations_done that
        are missing or duplicated, raise :class:`RunDirError` naming the line numbers,
        unless ``repair``: then a backup ``metrics.jsonl.bak-<time>`` is written first,
        damaged and duplicate lines are dropped (the first copy of an iteration is kept),
        and missing iterations are reported in ``events.log``."""
        scan = self.scan_metrics()
        kept = [(n, r) for n, r in scan.records if r["iteration"] <= iterations_done]
        last_kept = max((n for n, _ in kept), default=0)
        damaged = [n for n in scan.damaged if n < last_kept]
        seen: dict[int, int] = {}
        duplicates = []
        for n, r in kept:
            if r["iteration"] in seen:
                duplicates.append(n)
            else:
                seen[r["iteration"]] = n
        missing = [i for i in range(1, iterations_done + 1) if i not in seen]
        problems = []
        if damaged:
            problems.append(f"damaged line(s) {_numbers(damaged)}")
        if duplicates:
            problems.append(f"duplicate iteration line(s) {_numbers(duplicates)}")
        if missing:
            problems.append(f"no line for iteration(s) {_numbers(missing)}")
        if problems and not repair:
            raise RunDirError(
                f"'{self.metrics_path}' has {'; '.join(problems)} before the checkpoint of "
                f"iteration {iterations_done}; nothing was changed. Inspect the file, or "
                "resume with --repair to drop those lines (a backup is kept).")
        if problems:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            backup = self.metrics_path.with_name(f"metrics.jsonl.bak-{stamp}")
            shutil.copy2(self.metrics_path, backup)
            self.log(f"repair: {'; '.join(problems)}; backup {backup.name}")
        lines = scan.lines
        keep_numbers = set(seen.values())
        text = "".join(lines[n - 1] + "\n" for n, _ in kept if n in keep_numbers)
        atomic_write_bytes(self.metrics_path, text.encode())

    # --- status, events and the writer lock ---------------------------------------------
    def write_status(self, state: str, **extra: Any) -> None:
        """Write ``status.json``: the state, the writer (pid, host) and a heartbeat."""
        atomic_write_json(self.status_path, {
            "state": state, "pid": os.getpid(), "host": socket.gethostname(),
            "heartbeat": time.time(), **extra})

    def read_status(self) -> dict[str, Any]:
        """``status.json`` as written (``{"state": "unknown"}`` without one)."""
        if not self.status_path.exists():
            return {"state": "unknown"}
        try:
            status: dict[str, Any] = json.loads(self.status_path.read_text())
            return status
        except ValueError:
            return {"state": "unknown", "error": "status.json is not valid JSON"}

    def current_status(self) -> dict[str, Any]:
        """The status as it truly is now: a ``running`` status whose writer no longer holds
        the lock reads as ``interrupted``."""
        status = self.read_status()
        if status.get("state") == "running" and self.writer() is None:
            status = {**status, "state": "interrupted", "recorded_state": "running"}
        return status

    def writer(self) -> dict[str, Any] | None:
        """The live writer's record (pid, host, since), or None when nobody writes."""
        return WriterLock.holder(self.lock_path)

    def lock(self) -> WriterLock:
        """Become the one writer of this run (see :class:`WriterLock`)."""
        return WriterLock.acquire(self.lock_path)

    def log(self, message: str) -> None:
        """Append a time-stamped line to ``events.log``."""
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(self.events_path, "a") as f:
            f.write(f"{stamp} {message}\n")

    def checkpoints(self) -> dict[int, Path]:
        """Kept checkpoints by iteration number."""
        out = {}
        for p in self.checkpoint_dir.glob("iter_*.pt"):
            m = re.fullmatch(r"iter_(\d+)\.pt", p.name)
            if m:
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))


@dataclass
class MetricsScan:
    """``metrics.jsonl`` parsed: (line number, record) pairs, damaged line numbers, and
    the raw lines (so a rewrite keeps intact lines byte for byte)."""

    records: list[tuple[int, dict[str, Any]]]
    damaged: list[int]
    lines: list[str]


def _numbers(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")



class WriterLock:
    """An exclusive ``fcntl.flock`` on a run's lock file, held while a process writes the
    run. The file records the holder (pid, host, since, command) for error messages. The OS
    drops the lock when the holder exits or is killed, so it can never go stale."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> WriterLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = cls._read(path)
            raise RunDirError(
                f"'{path.parent}' is being written by another process (pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                f"{holder.get('since', '?')}); wait for it to finish or stop it first. "
                "Watch it with 'pgscope status'.") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return cls(path, fd)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            record: dict[str, Any] = json.loads(path.read_text() or "{}")
            return record
        except (OSError, ValueError):
            return {}

    @classmethod
    def holder(cls, path: Path) -> dict[str, Any] | None:
        """The holder's record if a live process holds the lock, else None."""
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return cls._read(path)
        finally:
            os.close(fd)  # closing drops a shared lock we may have taken
        return None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(path: Path, agent: Agent, *, iteration: int, env_steps: int,
                    optimizer: torch.optim.Optimizer, extra: dict[str, Any],
                    spaces: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + rename): policy, value net, optimizer,
    normalization state and whatever ``extra`` training state the trainer needs."""
    cfg = agent.config
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        "spaces": spaces,
        "iteration": iteration,
        "env_steps": env_steps,
        "policy": agent.policy.state_dict(),
        "value_net": agent.value_net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "preprocessor": agent.preprocessor.state_dict(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check it is pgscope's."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a safe pgscope checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a pgscope checkpoint.")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"'{path}' has checkpoint version {ckpt.get('version')}; this pgscope reads "
            f"version {CHECKPOINT_VERSION}."
        )
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: Path, spaces: dict[str, Any],
                     cfg: Config | None = None) -> None:
    """Refuse a checkpoint from another env/architecture (or, given ``cfg``, another run)."""
    if ckpt["spaces"] != spaces:
        raise CheckpointError(
            f"checkpoint '{path}' was made for spaces {ckpt['spaces']}, not {spaces} "
            f"(env {ckpt['config'].get('env_id')})."
        )
    if cfg is not None and checkpoint_identity(ckpt) != run_identity(cfg):
        raise CheckpointError(
            f"checkpoint '{path}' belongs to a different run (identity "
            f"{checkpoint_identity(ckpt)} != {run_identity(cfg)})."
        )


def run_identity(cfg: Config) -> str:
    """What makes two configs the same run: the config hash with ``total_steps`` left out
    (a run extended with ``--resume --steps`` stays the same run)."""
    from dataclasses import replace

    return config_hash(replace(cfg, total_steps=0))


def checkpoint_identity(ckpt: dict[str, Any]) -> str:
    """:func:`run_identity` of a checkpoint's config under the current schema (keys added
    to :class:`Config` since it was written take their defaults on both sides)."""
    return run_identity(Config.from_dict(ckpt["config"]))


def restore_agent(agent: Agent, ckpt: dict[str, Any], path: Path) -> None:
    try:
        agent.policy.load_state_dict(ckpt["policy"])
        agent.value_net.load_state_dict(ckpt["value_net"])
        agent.preprocessor.load_state_dict(ckpt["preprocessor"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this architecture: {str(exc).splitlines()[0]}"
        ) from None


def resolve_checkpoint(path: Path, iteration: int | None = None) -> Path:
    """A checkpoint file from a file path or a run directory (latest, or ``iteration``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise RunDirError(f"'{path}' is neither a checkpoint file nor a run directory.")
    run = RunDir(path)
    if iteration is None:
        if not run.last_checkpoint.exists():
            raise RunDirError(f"run directory '{path}' has no checkpoint yet.")
        return run.last_checkpoint
    kept = run.checkpoints()
    if iteration not in kept:
        raise RunDirError(
            f"run '{path}' has no checkpoint of iteration {iteration}; kept: "
            f"{', '.join(map(str, kept)) or 'none'}."
        )
    return kept[iteration]


def load_agent(path: str | Path, iteration: int | None = None) -> Agent:
    """Load an agent from a checkpoint file or a run directory (its latest checkpoint, or
    the one kept at ``iteration``). Nothing is unpickled."""
    from pgscope.envs import make_env

    ckpt_path = resolve_checkpoint(Path(path), iteration)
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config.from_dict(ckpt["config"])
    if Path(path).is_dir():  # a run directory: its checkpoints must be its own
        run_cfg = RunDir.open(Path(path)).read_config()
        if run_identity(run_cfg) != checkpoint_identity(ckpt):
            raise CheckpointError(
                f"checkpoint '{ckpt_path}' belongs to a different run (env {cfg.env_id}, "
                f"preset {cfg.preset}) than '{path}' (env {run_cfg.env_id}, preset "
                f"{run_cfg.preset})."
            )
    env = make_env(cfg.env_id)
    try:
        spaces = spaces_signature(env.observation_space, env.action_space)
        check_compatible(ckpt, ckpt_path, spaces)
        agent = build_agent(cfg, env.observation_space, env.action_space)
    finally:
        env.close()
    restore_agent(agent, ckpt, ckpt_path)
    return agent
