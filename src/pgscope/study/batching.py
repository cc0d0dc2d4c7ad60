"""Packing a study's pending runs into batches that one task trains together.

Runs that differ only in their seed can be trained as one batch by the training engine
(:func:`pgscope.train.train_batch`; a run's numbers do not depend on its batch): the
executors group the pending runs by (the whole config
without its seed, which includes the env; where a resumed run starts) and cut each group
into batches of at most ``batch_size`` runs, of near-equal sizes. New runs and runs
resumed from the checkpoint of the same iteration are never mixed. When that leaves fewer
batches than workers, the largest batches are halved until every worker has one (a batch
never waits for a worker that another batch could have used).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pgscope.errors import CheckpointError
from pgscope.run import RunDir, load_checkpoint
from pgscope.train import DEFAULT_BATCH_SIZE

__all__ = ["DEFAULT_BATCH_SIZE", "Task", "pack_batches", "resume_point"]

Task = tuple[str, dict[str, Any]]  # (run directory, config dict)


def resume_point(run_dir: str | Path) -> int | None:
    """Where a run starts: None for a new run (no ``config.json``), else the iteration of
    its last checkpoint (0 without one). An unreadable checkpoint gives -1 (the run is
    then trained alone, and training reports the problem)."""
    run = RunDir(Path(run_dir))
    if not run.config_path.exists():
        return None
    if not run.last_checkpoint.exists():
        return 0
    try:
        return int(load_checkpoint(run.last_checkpoint)["iteration"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return -1


def batch_key(task: Task, start: int | None) -> str:
    """What batch members share: the config without its seed, and the start point."""
    run_dir, config = task
    if start == -1:
        return f"alone:{run_dir}"
    rest = {k: v for k, v in config.items() if k != "seed"}
    return json.dumps([rest, start], sort_keys=True, default=str)


def split_evenly(keys: list[str], parts: int) -> list[list[str]]:
    """``keys`` cut, in order, into ``parts`` pieces whose sizes differ by at most one."""
    size, extra = divmod(len(keys), parts)
    out, i = [], 0
    for p in range(parts):
        n = size + (p < extra)
        out.append(keys[i:i + n])
        i += n
    return [b for b in out if b]


def pack_batches(tasks: dict[str, Task], batch_size: int, workers: int = 1,
                 starts: dict[str, int | None] | None = None,
                 batchable: Callable[[Sequence[Task]], bool] | None = None
                 ) -> list[list[str]]:
    """The keys of ``tasks`` in batches (lists of keys, in the tasks' order).

    ``starts`` gives each run's :func:`resume_point` (read from its directory when
    omitted). Each group of runs with the same :func:`batch_key` becomes
    ``ceil(n / batch_size)`` batches of near-equal size, or one batch per run when
    ``batchable`` says the group cannot be trained together; then, while there are fewer
    batches than ``workers``, the largest is halved."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if starts is None:
        starts = {key: resume_point(task[0]) for key, task in tasks.items()}
    groups: dict[str, list[str]] = {}
    for key, task in tasks.items():
        groups.setdefault(batch_key(task, starts[key]), []).append(key)
    batches: list[list[str]] = []
    for keys in groups.values():
        size = batch_size
        if len(keys) > 1 and batchable is not None and not batchable([tasks[k] for k in keys]):
            size = 1
        batches += split_evenly(keys, math.ceil(len(keys) / size))
    while len(batches) < workers:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]), default=None)
        if largest is None or len(batches[largest]) < 2:
            break
        batches[largest:largest + 1] = split_evenly(batches[largest], 2)
    return batches
