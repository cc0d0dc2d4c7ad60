"""``pgscope status PATH``: what each run of a run or study directory is doing now.

A run's state comes from its ``status.json`` checked against its writer lock
(:meth:`pgscope.run.RunDir.current_status`): a run whose status says ``running`` but whose
writer is gone shows as ``interrupted``, never as ``running``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pgscope.errors import RunDirError
from pgscope.run import RunDir


@dataclass
class RunStatus:
    """One run's line in ``pgscope status``."""

    run: str
    state: str  # new | running | complete | diverged | failed | interrupted | unknown
    iteration: int
    total_iterations: int | None
    return_mean: float | None
    age_s: float | None  # seconds since the writer's last heartbeat
    writer: str | None  # "pid@host" of a live writer
    error: str | None


def run_status(path: Path, name: str | None = None) -> RunStatus:
    """The status of one run directory (``new`` when it has not started)."""
    run = RunDir(path)
    name = name or str(path)
    if not run.config_path.exists():
        return RunStatus(name, "new", 0, None, None, None, None, None)
    status = run.current_status()
    records = run.read_metrics()
    last = records[-1] if records else {}
    total = status.get("total_iterations")
    if total is None:
        try:
            total = run.read_config().num_iterations
        except RunDirError:
            total = None
    heartbeat = status.get("heartbeat")
    holder = run.writer()
    state, error = status.get("state"), status.get("error")
    if not run.status_path.exists():  # made, but stopped before it wrote a status
        state = "running" if holder is not None else "interrupted"
        error = None if holder is not None else (
            "stopped before its first status was written; resuming continues it")
    return RunStatus(
        run=name, state=str(state),
        iteration=int(last.get("iteration", 0)), total_iterations=total,
        return_mean=last.get("return_mean"),
        age_s=None if heartbeat is None else max(0.0, time.time() - float(heartbeat)),
        writer=None if holder is None else f"{holder.get('pid')}@{holder.get('host')}",
        error=error)


def collect_status(path: str | Path) -> list[RunStatus]:
    """Every run of ``path``: a run directory (one row) or a study directory (one row per
    planned run, in the study's order)."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"'{path}' is not a directory (give a run or a study directory).")
    if (path / "config.json").exists():
        return [run_status(path)]
    from pgscope.study.runner import open_study
    from pgscope.study.spec import is_study_dir

    if is_study_dir(path):
        spec = open_study(path)
        return [run_status(path / r.rel_path, r.rel_path) for r in spec.runs()]
    raise RunDirError(f"'{path}' is neither a pgscope run directory (config.json) nor a "
                      "study directory (study.json, or the seed_<s>/ runs of "
                      "'pgscope train --seeds').")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def format_status(rows: list[RunStatus]) -> str:
    """A fixed-width table, one line per run, and a count per state."""
    width = max([3, *(len(r.run) for r in rows)])
    lines = [f"{'run':<{width}}  {'state':<11} {'iteration':>13} {'return':>9} {'age':>7}  "
             "writer / error"]
    for r in rows:
        it = f"{r.iteration}/{r.total_iterations if r.total_iterations else '?'}"
        ret = "-" if r.return_mean is None else f"{r.return_mean:.1f}"
        note = r.writer or (r.error or "")
        lines.append(f"{r.run:<{width}}  {r.state:<11} {it:>13} {ret:>9} {_age(r.age_s):>7}  "
                     f"{note[:80]}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)
