"""The Ray executor: batches of runs as Ray tasks, with no shared filesystem.

The driver (``pgscope study run --backend ray``) owns the study directory and starts one
:class:`~pgscope.study.shipping.StudyStore` actor on its own node (zero CPUs, pinned with
``NodeAffinitySchedulingStrategy``): the only process that writes the study's runs while
the study runs. A task gets the runs' paths relative to the study, never the study
directory itself, and for each run

1. asks the store for the run's last shipped state (a new lease) and writes it into
   node-local storage, :func:`node_storage` (``$PGSCOPE_NODE_STORAGE``, else
   ``<tempdir>/pgscope-ray``, then ``node-<node id>/<study key>/<run>``);
2. trains there (resuming from the restored checkpoint, exactly), shipping the changed
   files when the run starts, after every ``ship_every``-th checkpoint and at the end;
3. deletes its node-local copy once the end is shipped.

When a node is lost, Ray re-executes its task (``max_retries``) on another node, which
restores the runs from the study directory and resumes them from their last shipped
checkpoints; the lost attempt's lease is void, so nothing it might still send is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pgscope.errors import PgscopeError
from pgscope.study.runner import Event, execute_batch
from pgscope.study.shipping import Shipment, ShippedFiles, Shipper, StudyStore

#: Environment variable naming the root of node-local storage on every node.
STORAGE_ENV = "PGSCOPE_NODE_STORAGE"


def node_storage(study_key: str, node_id: str) -> Path:
    """Where runs of the study ``study_key`` are trained on node ``node_id``."""
    root = os.environ.get(STORAGE_ENV) or os.path.join(tempfile.gettempdir(), "pgscope-ray")
    return Path(root) / f"node-{node_id[:12]}" / study_key


def train_shipped(store: Any, study_key: str, items: list[tuple[str, dict[str, Any]]],
                  ship_every: int) -> list[dict[str, Any]]:
    """The Ray task: train the runs ``items`` ((path in the study, config dict) pairs) in
    node-local storage and ship them to ``store``; one result per run as
    :func:`~pgscope.study.runner.execute_batch` returns them."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    local = node_storage(study_key, node)

    def send(shipments: list[Shipment]) -> None:
        ray.get(store.ship_all.remote(shipments))

    copies: dict[Path, ShippedFiles] = {}
    for run, _ in items:
        lease, files = ray.get(store.restore.remote(run, node))
        copy = ShippedFiles(run, local / run, lease)
        copy.restore(files)
        copies[copy.local] = copy
    shipper = Shipper(copies, send, ship_every)
    try:
        results = execute_batch([(str(local / run), config) for run, config in items],
                                callbacks=[shipper])
    finally:  # what changed after the last checkpoint: the final status, logs, sinks
        shipper.ship(compare_contents=True)
    for path in copies:
        shutil.rmtree(path, ignore_errors=True)
    return results


def ray_backend(configs: dict[str, dict[str, Any]], batches: list[list[str]], out: Path,
                study_key: str, *, workers: int, max_retries: int,
                address: str | None = None, ship_every: int = 1,
                poll: float = 1.0) -> Iterator[Event]:
    """Run ``batches`` (lists of runs, keys of ``configs``: paths relative to the study
    directory ``out``) as Ray tasks. Without a running Ray, one is started (``address``,
    or a local one with ``workers`` CPUs) and shut down at the end."""
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError:
        raise PgscopeError("--backend ray needs the 'ray' package: pip install 'pgscope[ray]' "
                           "(or pip install ray).") from None
    if address and address.startswith("ray://"):
        raise PgscopeError(
            f"--address {address}: the study directory is written on the driver's node, so "
            "run pgscope on a node of the cluster (e.g. on the head after 'ray attach') with "
            "--address auto, not through Ray Client (ray://).")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    store: Any = None
    try:
        here = ray.get_runtime_context().get_node_id()
        actor: Any = ray.remote(StudyStore)
        store = actor.options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(str(out))
        ray.get(store.ping.remote())
        remote = ray.remote(num_cpus=1, max_retries=max_retries)(train_shipped)
        refs = {remote.remote(store, study_key, [(run, configs[run]) for run in batch],
                              ship_every): batch for batch in batches}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll)
            if not ready:
                yield None
            for ref in ready:
                batch = refs.pop(ref)
                try:
                    results: list[Any] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    results = [exc] * len(batch)
                ray.get(store.release.remote(batch))
                yield from zip(batch, results, strict=True)
    finally:
        if store is not None:
            ray.kill(store)  # drops the locks it still holds
        if started:
            ray.shutdown()


__all__ = ["STORAGE_ENV", "node_storage", "ray_backend", "train_shipped"]
