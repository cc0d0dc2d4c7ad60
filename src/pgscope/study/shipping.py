"""Shipping run directories from node-local storage to the driver's study directory.

On a cluster without a shared filesystem a worker trains a run in a directory on its own
node and ships the run's files to the driver, where one :class:`StudyStore` (a Ray actor on
the driver's node, see :mod:`pgscope.study.ray_backend`) writes them into the study
directory. The study directory stays the one truth: its runs are ordinary run directories,
and a run whose node was lost resumes elsewhere from what was last shipped.

The pieces, none of which needs Ray:

- :class:`ShippedFiles` (worker side) remembers what the driver's copy of one run holds
  and turns the local directory's changes into a :class:`Shipment`: whole files, or only
  the bytes appended to a file whose shipped content is still its prefix
  (``metrics.jsonl``, ``events.log``).
- :class:`Shipper`, a :class:`pgscope.callbacks.Callback`, ships every ``every``
  checkpoints (and when a run starts), the runs of a batch together; the executor ships
  once more, comparing contents, when training returns.
- :class:`StudyStore` (driver side) applies shipments atomically file by file, in an order
  that keeps the copy resumable at every instant (``config.json`` first, then logs and
  metrics, then kept checkpoints, ``last.pt``, and ``status.json`` last), and hands out
  the last shipped state of a run to the task that (re)starts it. Each start gets a new
  lease; a shipment under an older lease (a worker on a node given up for lost) is
  refused, so two attempts can never interleave their files.

The store holds each run's writer lock (:class:`pgscope.run.WriterLock`) from the start of
its task to its end: the driver-side copy has one writer, the store, and ``pgscope status``
shows the run as running while it trains on some node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pgscope.callbacks import Callback, CheckpointSaved, RunEnd, RunStart
from pgscope.errors import PgscopeError
from pgscope.run import LOCK_FILE, RunDir, WriterLock, atomic_write_bytes, load_checkpoint

#: Shipped after everything else of a shipment (in this order), so that the driver's copy
#: never holds a checkpoint newer than its metrics or a status newer than its checkpoint.
LAST_WRITTEN = ("checkpoints/last.pt", "status.json")


class ShippingError(PgscopeError):
    """A shipment does not fit the driver's copy of the run (an out-of-date attempt, or an
    append to a file that is not what the worker believes)."""


@dataclass(frozen=True)
class Stamp:
    """What changes when a file is written: a replaced file gets a new inode, an append a
    new size, a rewrite in place a new modification time."""

    inode: int
    size: int
    mtime_ns: int


@dataclass
class Shipment:
    """The changes of one run directory since the last shipment.

    ``files``: whole contents by name (relative POSIX paths inside the run directory);
    ``appends``: name -> (offset, bytes) for files that only grew; ``removed``: names that
    no longer exist locally."""

    run: str
    lease: int
    files: dict[str, bytes] = field(default_factory=dict)
    appends: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.files or self.appends or self.removed)

    @property
    def nbytes(self) -> int:
        return (sum(map(len, self.files.values()))
                + sum(len(b) for _, b in self.appends.values()))


def shipped_names(run_dir: Path) -> list[str]:
    """The files of a run directory that are shipped: everything but the writer lock and
    the temporary files of atomic writes (``*.tmp``)."""
    if not run_dir.is_dir():
        return []
    names = []
    for p in run_dir.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != LOCK_FILE \
                and not p.name.endswith(".tmp"):
            names.append(p.relative_to(run_dir).as_posix())
    return sorted(names)


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return Stamp(st.st_ino, st.st_size, st.st_mtime_ns)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_order(names: list[str] | set[str]) -> list[str]:
    """``config.json`` first, then the rest, then kept checkpoints, then
    :data:`LAST_WRITTEN`: any prefix of a shipment leaves a resumable run directory."""
    def rank(name: str) -> tuple[int, str]:
        if name == "config.json":
            return 0, name
        if name in LAST_WRITTEN:
            return 3 + LAST_WRITTEN.index(name), name
        if name.startswith("checkpoints/"):
            return 2, name
        return 1, name
    return sorted(names, key=rank)


class ShippedFiles:
    """Worker side: the driver's copy of one run as last shipped, by file (its local stamp
    when shipped, its size and the digest of its content)."""

    def __init__(self, run: str, local: Path, lease: int) -> None:
        self.run = run
        self.local = Path(local)
        self.lease = lease
        self.stamps: dict[str, Stamp | None] = {}
        self.sizes: dict[str, int] = {}
        self.digests: dict[str, str] = {}

    def restore(self, files: dict[str, bytes]) -> None:
        """Write the driver's copy (``files``) into the (emptied) local directory and
        remember it as shipped."""
        if self.local.exists():
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True)
        for name, data in files.items():
            path = self.local / _checked(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self._remember(name, data)

    def _remember(self, name: str, data: bytes) -> None:
        self.stamps[name] = _stamp(self.local / name)
        self.sizes[name] = len(data)
        self.digests[name] = _digest(data)

    def changes(self, *, compare_contents: bool = False) -> Shipment:
        """The local changes since the last call (remembered as shipped). A file counts as
        changed when its stamp changed, or with ``compare_contents`` when its content
        differs (catches a rewrite within the clock's resolution)."""
        out = Shipment(self.run, self.lease)
        names = shipped_names(self.local)
        for name in names:
            path = self.local / name
            stamp = _stamp(path)
            if stamp is None:
                continue
            if not compare_contents and stamp == self.stamps.get(name):
                continue
            data = path.read_bytes()
            old_size = self.sizes.get(name)
            if old_size is not None and _digest(data) == self.digests[name]:
                self.stamps[name] = stamp
                continue
            if old_size is not None and 0 < old_size <= len(data) \
                    and _digest(data[:old_size]) == self.digests[name]:
                out.appends[name] = (old_size, data[old_size:])
            else:
                out.files[name] = data
            self._remember(name, data)
        present = set(names)
        for name in [n for n in self.sizes if n not in present]:
            out.removed.append(name)
            del self.stamps[name], self.sizes[name], self.digests[name]
        return out


class Shipper(Callback):
    """Ships runs' changes to a store when they start and after every ``every``-th
    checkpoint. ``runs`` maps each local run directory to its :class:`ShippedFiles`;
    ``send`` delivers a list of :class:`Shipment` in one call (to the Ray actor, or
    straight to :meth:`StudyStore.ship_all` in tests).

    One instance serves the runs of a whole unit of work, and ships the runs training
    together: once every run that has started and not ended has saved the checkpoint of an
    iteration, so that the driver's copies of a batch's runs always stand at the same
    iteration (a retry then resumes the batch as one). Runs the engine refused, trained
    one after the other, are each shipped at their own checkpoints: a run that has not
    started yet is not waited for."""

    def __init__(self, runs: dict[Path, ShippedFiles], send: Any, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.runs = {Path(p).resolve(): s for p, s in runs.items()}
        self.send = send
        self.every = every
        self.training: set[Path] = set()  # runs that have started and not ended
        self.saved: dict[int, set[Path]] = {}  # iteration -> runs with its checkpoint

    def ship(self, *, compare_contents: bool = False) -> list[Shipment]:
        """Ship every run's changes now (in one call); returns what was sent."""
        shipments = [s for s in (files.changes(compare_contents=compare_contents)
                                 for files in self.runs.values()) if s]
        if shipments:
            self.send(shipments)
        return shipments

    def on_run_start(self, event: RunStart) -> None:
        self.training.add(Path(event.run_dir).resolve())
        self.ship()

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        if event.iteration % self.every == 0:
            self.saved.setdefault(event.iteration, set()).add(Path(event.run_dir).resolve())
            self._ship_saved()

    def on_run_end(self, event: RunEnd) -> None:
        self.training.discard(Path(event.run_dir).resolve())
        self._ship_saved()

    def _ship_saved(self) -> None:
        done = [it for it, runs in self.saved.items() if self.training <= runs]
        if done:
            for it in done:
                del self.saved[it]
            self.ship()


def _checked(name: str) -> str:
    """A shipped name must stay inside its run directory."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or name != pure.as_posix():
        raise ShippingError(f"refused file name '{name}' (not a plain relative path)")
    return name


class StudyStore:
    """Driver side: writes shipped runs into the study directory ``study_dir``. Only this
    object writes a run's driver-side copy while a task holds a lease on it; as a Ray actor
    its methods run one at a time."""

    def __init__(self, study_dir: str | Path) -> None:
        self.study_dir = Path(study_dir)
        self.leases: dict[str, int] = {}
        self.nodes: dict[str, str] = {}  # run -> the node of its current lease
        self.locks: dict[str, WriterLock] = {}

    def _run_path(self, run: str) -> Path:
        path = self.study_dir / _checked(run)
        if not path.resolve().is_relative_to(self.study_dir.resolve()):
            raise ShippingError(f"run '{run}' lies outside the study directory")
        return path

    def restore(self, run: str, node: str = "") -> tuple[int, dict[str, bytes]]:
        """Start (or restart) ``run`` on ``node``: a new lease, which voids earlier ones, and
        the files of the run's copy as last shipped (empty for a new run). The store
        becomes the run's writer (its lock) until :meth:`release`; a run that another
        process writes is refused with that process named."""
        path = self._run_path(run)
        if run not in self.locks:
            self.locks[run] = RunDir(path).lock()
        lease = self.leases.get(run, 0) + 1
        self.leases[run] = lease
        self.nodes[run] = node
        copy = RunDir(path)
        if copy.config_path.exists():  # a started run: say where it goes on
            at = "no checkpoint"
            if copy.last_checkpoint.exists():
                done = load_checkpoint(copy.last_checkpoint)["iteration"]
                at = f"the checkpoint of iteration {done}"
            copy.log(f"study: sent to node {node[:12] or '?'} from the study directory on "
                     f"{socket.gethostname()} ({at}; attempt {lease})")
        files = {name: (path / name).read_bytes() for name in shipped_names(path)}
        return lease, files

    def ship_all(self, shipments: list[Shipment]) -> int:
        """Apply shipments (of a batch's runs) in one call; returns the bytes written.
        Raises :class:`ShippingError`, before writing anything, for a stale lease."""
        for shipment in shipments:
            if self.leases.get(shipment.run) != shipment.lease:
                raise ShippingError(
                    f"shipment for '{shipment.run}' under lease {shipment.lease} refused: "
                    f"the run's current lease is {self.leases.get(shipment.run)} (this "
                    "attempt was superseded).")
        return sum(self._apply(shipment) for shipment in shipments)

    def _apply(self, shipment: Shipment) -> int:
        """Write one shipment; an append that does not continue the driver's copy raises
        :class:`ShippingError`."""
        run = shipment.run
        path = self._run_path(run)
        names = set(shipment.files) | set(shipment.appends)
        for name in write_order(names):
            target = path / _checked(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if name in shipment.files:
                atomic_write_bytes(target, shipment.files[name])
                continue
            offset, tail = shipment.appends[name]
            current = target.read_bytes() if target.exists() else b""
            if len(current) != offset:
                raise ShippingError(
                    f"append to '{run}/{name}' at byte {offset} refused: the study "
                    f"directory's copy has {len(current)} bytes.")
            atomic_write_bytes(target, current + tail)
        for name in shipment.removed:
            (path / _checked(name)).unlink(missing_ok=True)
        return shipment.nbytes

    def release(self, runs: list[str]) -> None:
        """The tasks of ``runs`` are over: void their leases and drop their locks."""
        for run in runs:
            self.leases[run] = self.leases.get(run, 0) + 1
            self.nodes.pop(run, None)
            lock = self.locks.pop(run, None)
            if lock is not None:
                lock.release()

    def where(self) -> dict[str, str]:
        """The node id each run with a live lease was last started on."""
        return dict(self.nodes)

    def ping(self) -> int:
        """The store's process id (it answers: it is up)."""
        return os.getpid()
