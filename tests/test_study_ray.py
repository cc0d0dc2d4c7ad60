"""Studies in batches of seeds, and on Ray without a shared filesystem.

The fast tests check the pieces without Ray: how pending runs are packed into batches,
and how a run trained in one directory is shipped into a study directory and restored
elsewhere (:mod:`pgscope.study.shipping`). One test starts a Ray cluster of three nodes on
this machine (``ray.cluster_utils.Cluster``): a head with the driver and no CPUs, and two
worker nodes; every worker process records each path it opens, creates, renames or
removes (a Python audit hook), the study runs in batches of two seeds (Pendulum: the
a seed's numbers do not depend on its batch), and one worker node is removed while it
trains a batch, once the batch's shipped checkpoints are past the first iteration and
before the last.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pgscope.callbacks import Callback
from pgscope.config import Config, make_config
from pgscope.errors import RunDirError
from pgscope.run import LOCK_FILE, RunDir, load_checkpoint
from pgscope.study import parse_spec, run_study
from pgscope.study.batching import pack_batches, resume_point, split_evenly
from pgscope.study.runner import batchable, execute_batch, execute_run
from pgscope.study.shipping import (
    Shipment,
    ShippedFiles,
    Shipper,
    ShippingError,
    StudyStore,
    shipped_names,
    write_order,
)
from pgscope.train import TIMING_KEYS, train

FAST = dict(steps_per_iter=256, minibatches=4, epochs=2)


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in RunDir(path).read_metrics()]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in shipped_names(run_dir)}


# --- packing runs into batches --------------------------------------------------------------
def _tasks(configs: dict[str, int], **extra) -> dict:
    """label -> number of seeds; tasks keyed like a study's runs."""
    out = {}
    for label, seeds in configs.items():
        for seed in range(seeds):
            cfg = dict(label=label, seed=seed, **extra)
            out[f"runs/{label}/seed_{seed}"] = (f"/s/runs/{label}/seed_{seed}", cfg)
    return out


def test_split_evenly_keeps_order_and_sizes_within_one():
    assert split_evenly(list("abcdefg"), 3) == [list("abc"), list("de"), list("fg")]
    assert split_evenly(list("ab"), 4) == [["a"], ["b"]]


def test_batches_hold_seeds_of_one_config_and_one_start_point():
    tasks = _tasks({"a": 5, "b": 3})
    starts = dict.fromkeys(tasks, None)
    starts["runs/a/seed_4"] = 6  # resumed from iteration 6: never with new runs
    starts["runs/a/seed_3"] = 6
    starts["runs/b/seed_2"] = 0  # started, no checkpoint past 0
    got = pack_batches(tasks, batch_size=2, workers=1, starts=starts)
    assert got == [["runs/a/seed_0", "runs/a/seed_1"], ["runs/a/seed_2"],
                   ["runs/a/seed_3", "runs/a/seed_4"],
                   ["runs/b/seed_0", "runs/b/seed_1"], ["runs/b/seed_2"]]
    # batch_size caps the size; a group of 7 becomes near-equal batches (3+2+2, not 3+3+1)
    seven = _tasks({"a": 7})
    sizes = [len(b) for b in pack_batches(seven, 3, starts=dict.fromkeys(seven, None))]
    assert sizes == [3, 2, 2]
    # any other config difference separates runs
    mixed = {**_tasks({"a": 2}), **{k + "x": (d, {**c, "clip_eps": 0.1})
                                      for k, (d, c) in _tasks({"a": 2}).items()}}
    assert len(pack_batches(mixed, 8, starts=dict.fromkeys(mixed, None))) == 2


def test_batches_are_halved_until_every_worker_has_one_and_refused_groups_go_alone():
    tasks = _tasks({"a": 8})
    starts = dict.fromkeys(tasks, None)
    assert [len(b) for b in pack_batches(tasks, 8, workers=1, starts=starts)] == [8]
    assert [len(b) for b in pack_batches(tasks, 8, workers=3, starts=starts)] == [2, 2, 4]
    assert [len(b) for b in pack_batches(tasks, 8, workers=20, starts=starts)] == [1] * 8
    alone = pack_batches(tasks, 8, workers=1, starts=starts, batchable=lambda ts: False)
    assert alone == [[k] for k in tasks]
    with pytest.raises(ValueError, match="batch_size"):
        pack_batches(tasks, 0)


def test_resume_point_reads_the_last_checkpoint(tmp_path):
    cfg = make_config("ppo", "CartPole-v1", dict(FAST, total_steps=512))
    assert resume_point(tmp_path / "none") is None
    train(cfg, tmp_path / "r", progress=False)
    assert resume_point(tmp_path / "r") == 2
    (tmp_path / "r/checkpoints/last.pt").write_bytes(b"garbage")
    assert resume_point(tmp_path / "r") == -1  # trained alone; training reports it


def test_spec_batch_size_is_checked_and_not_part_of_the_identity():
    data = dict(name="t", envs=["CartPole-v1"], seeds=2, total_steps=768, set=dict(FAST),
                configs=[dict(label="ppo", preset="ppo")])
    spec = parse_spec({**data, "batch_size": 4})
    assert spec.batch_size == 4 and spec.hash() == parse_spec(data).hash()
    from pgscope.errors import ConfigError

    with pytest.raises(ConfigError, match="'batch_size' must be a whole number >= 1"):
        parse_spec({**data, "batch_size": 0})


def test_execute_batch_trains_seeds_together_and_regroups_mismatched_runs(
        tmp_path, monkeypatch):
    batched = importlib.import_module("pgscope.train")  # pgscope.train is also a function
    calls: list[list[int]] = []
    real = batched.train_batch

    def spy(cfgs, outs, **kw):
        calls.append([c.seed for c in cfgs])
        return real(cfgs, outs, **kw)

    monkeypatch.setattr(batched, "train_batch", spy)
    cfg = lambda algo, seed, env="Pendulum-v1": make_config(algo, env, dict(  # noqa: E731
        FAST if algo == "ppo" else dict(steps_per_iter=256), seed=seed,
        total_steps=512)).to_dict()
    tasks = [(str(tmp_path / f"ppo{s}"), cfg("ppo", s)) for s in (0, 1)]
    assert execute_batch(tasks) == [{"state": "complete"}] * 2 and calls == [[0, 1]]
    assert execute_batch(tasks) == [{"state": "complete"}] * 2 and calls == [[0, 1]]  # done
    # a2c and discrete actions train together too (the batched engine used to refuse them
    # and train each run alone); each member equals its run trained alone
    for name, configs in (("a2c", [cfg("a2c", s) for s in (0, 1)]),
                          ("cartpole", [cfg("ppo", s, "CartPole-v1") for s in (0, 1)])):
        together = [(str(tmp_path / f"{name}{s}"), c) for s, c in enumerate(configs)]
        assert batchable(together)
        assert len(pack_batches({str(i): t for i, t in enumerate(together)}, 8,
                                batchable=batchable)) == 1
        calls.clear()
        assert execute_batch(together) == [{"state": "complete"}] * 2 and calls == [[0, 1]]
        alone = train(Config.from_dict(configs[1]), tmp_path / f"{name}-alone",
                      progress=False)
        assert _metrics(Path(together[1][0])) == _metrics(alone)
    # the same seed twice cannot batch: packed one per batch, none lost
    twice = [(str(tmp_path / f"twice{k}"), cfg("ppo", 0)) for k in (0, 1)]
    assert not batchable(twice)
    assert len(pack_batches({str(i): t for i, t in enumerate(twice)}, 8,
                            batchable=batchable)) == 2
    # members found at different checkpoints (a retry): regrouped by start point
    mixed = [(str(tmp_path / f"m{s}"), cfg("ppo", s)) for s in (0, 1, 2)]
    train(Config.from_dict(mixed[2][1]), mixed[2][0], progress=False, callbacks=[
        _StopAfter(1)])
    calls.clear()
    assert execute_batch(mixed) == [{"state": "complete"}] * 3 and calls == [[0, 1], [2]]
    assert RunDir(Path(mixed[2][0])).read_status()["state"] == "complete"


# --- shipping runs between directories (no Ray) ---------------------------------------------
def test_write_order_keeps_every_prefix_of_a_shipment_resumable():
    names = ["status.json", "checkpoints/last.pt", "metrics.jsonl", "checkpoints/iter_000002.pt",
             "config.json", "events.log"]
    order = write_order(names)
    assert order[0] == "config.json" and order[-2:] == ["checkpoints/last.pt", "status.json"]
    assert order.index("metrics.jsonl") < order.index("checkpoints/iter_000002.pt")


class _StopAfter(Callback):
    """Stops training after ``n`` iterations, like a node that is lost there."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_iteration_end(self, event):
        return event.iteration < self.n


def test_a_run_shipped_from_one_dir_and_restored_in_another_resumes_exactly(tmp_path):
    cfg = make_config("ppo", "CartPole-v1", dict(FAST, total_steps=256 * 8,
                                                 checkpoint_every=4))
    study = tmp_path / "study"
    store = StudyStore(study)
    run = "runs/ppo/CartPole-v1/seed_0"
    sent: list[Shipment] = []

    def send(shipments):
        sent.extend(shipments)
        store.ship_all(shipments)

    # attempt 1 on "node a": ships at the start and after every 2nd checkpoint, then is
    # lost after iteration 5 (no final shipment)
    lease, files = store.restore(run, "node-a")
    assert files == {} and lease == 1
    first = ShippedFiles(run, tmp_path / "a" / run, lease)
    first.restore(files)
    shipper = Shipper({first.local: first}, send, every=2)
    execute_run(str(first.local), cfg.to_dict(), callbacks=[shipper, _StopAfter(5)])
    copy = RunDir(study / run)
    assert load_checkpoint(copy.last_checkpoint)["iteration"] == 4  # the last shipped one
    assert len(copy.read_metrics()) == 4 and len(RunDir(first.local).read_metrics()) == 5
    assert not (study / run / "checkpoints/iter_000008.pt").exists()
    # shipped at the start (empty), whole at iteration 2, then as the appended bytes
    grows = [s.appends["metrics.jsonl"] for s in sent if "metrics.jsonl" in s.appends]
    assert len(grows) == 1 and grows[0][1].startswith(b'{"iteration": 3,')
    # the store holds the run's writer lock: nobody else writes the study's copy
    with pytest.raises(RunDirError, match="being written by another process"):
        train(cfg, study / run, resume=True, progress=False)

    # attempt 2 on "node b": the old lease is void, the copy is restored and resumes
    lease2, files2 = store.restore(run, "node-b")
    assert lease2 == 2 and files2 == _files(study / run)
    with pytest.raises(ShippingError, match="superseded"):
        store.ship_all([Shipment(run, lease, files={"status.json": b"{}"})])
    second = ShippedFiles(run, tmp_path / "b" / run, lease2)
    second.restore(files2)
    shipper2 = Shipper({second.local: second}, send, every=2)
    execute_run(str(second.local), cfg.to_dict(), callbacks=[shipper2])
    final = shipper2.ship(compare_contents=True)  # as the Ray task does
    assert json.loads(final[0].files["status.json"])["state"] == "complete"
    assert _files(study / run) == _files(second.local)  # the copy is the run, file by file
    events = copy.events_path.read_text()
    assert "sent to node node-b" in events and "the checkpoint of iteration 4; attempt 2" \
        in events
    assert "resumed from the checkpoint of iteration 4: episodes continue exactly" in events
    ref = train(cfg, tmp_path / "ref", progress=False)
    assert _metrics(study / run) == _metrics(ref)  # exact resume: as if never interrupted
    assert copy.read_status()["state"] == "complete"
    store.release([run])
    assert copy.writer() is None and (study / run / LOCK_FILE).exists()


def test_shipments_that_do_not_fit_the_copy_are_refused(tmp_path):
    store = StudyStore(tmp_path / "study")
    lease, _ = store.restore("runs/a/seed_0")
    store.ship_all([Shipment("runs/a/seed_0", lease, files={"metrics.jsonl": b"line1\n"})])
    with pytest.raises(ShippingError, match="at byte 3 refused.*has 6 bytes"):
        store.ship_all([Shipment("runs/a/seed_0", lease,
                                 appends={"metrics.jsonl": (3, b"x")})])
    for name in ("../escape", "/abs", "a/../../b"):
        with pytest.raises(ShippingError, match="refused file name"):
            store.ship_all([Shipment("runs/a/seed_0", lease, files={name: b""})])
    with pytest.raises(ShippingError, match="refused file name"):
        store.restore("../outside")
    assert not (tmp_path / "escape").exists()


def test_changes_ship_only_what_changed(tmp_path):
    local = tmp_path / "run"
    files = ShippedFiles("r", local, 1)
    files.restore({"metrics.jsonl": b"a\n", "checkpoints/iter_1.pt": b"x" * 10})
    assert not files.changes() and not files.changes(compare_contents=True)
    with open(local / "metrics.jsonl", "ab") as f:
        f.write(b"b\n")
    (local / "status.json").write_text("{}")
    (local / "status.json.tmp").write_text("half")  # an atomic write in progress
    (local / LOCK_FILE).write_text("pid")
    out = files.changes()
    assert out.appends == {"metrics.jsonl": (2, b"b\n")} and set(out.files) == {"status.json"}
    (local / "metrics.jsonl").write_bytes(b"A\n")  # rewritten (a resume drops lines)
    (local / "checkpoints/iter_1.pt").unlink()
    out = files.changes()
    assert out.files == {"metrics.jsonl": b"A\n"} and out.removed == ["checkpoints/iter_1.pt"]


def test_a_batch_is_shipped_together_once_every_training_member_has_its_checkpoint(
        tmp_path):
    from pgscope.callbacks import CheckpointSaved, RunEnd, RunStart

    runs = {}
    for name in ("a", "b", "c"):
        runs[tmp_path / name] = ShippedFiles(name, tmp_path / name, 1)
        runs[tmp_path / name].restore({})
    sent: list[list[str]] = []
    shipper = Shipper(runs, lambda shipments: sent.append([s.run for s in shipments]),
                      every=2)

    def saved(name, iteration):
        (tmp_path / name / "metrics.jsonl").write_text(f"{iteration}\n")
        shipper.on_checkpoint(CheckpointSaved(tmp_path / name, None, iteration, 0,
                                              tmp_path / name / "last.pt", None))

    for name in "abc":  # the batched engine starts every member before the first iteration
        shipper.on_run_start(RunStart(tmp_path / name, None, None, 0, 0, False))
    assert sent == []  # nothing had changed since the copies were restored
    for name in "abc":
        saved(name, 1)  # not an iteration to ship
    assert sent == []
    saved("a", 2)
    saved("b", 2)
    assert sent == []  # c has not saved iteration 2 yet
    saved("c", 2)
    assert sent == [["a", "b", "c"]]
    saved("a", 4)
    shipper.on_run_end(RunEnd(tmp_path / "c", None, "diverged", 3))  # c leaves the batch
    assert len(sent) == 1  # b has not saved iteration 4 yet
    saved("b", 4)
    assert sent[-1] == ["a", "b"] and len(sent) == 2


def test_runs_trained_one_after_another_are_each_shipped_at_their_own_checkpoints(
        tmp_path):
    """A unit of work whose runs the engine refused trains them one by one: the run in
    training is shipped at its checkpoints without waiting for runs not started yet (or
    a lost node would lose all of its progress)."""
    from pgscope.callbacks import CheckpointSaved, RunEnd, RunStart

    runs = {}
    for name in ("a", "b"):
        runs[tmp_path / name] = ShippedFiles(name, tmp_path / name, 1)
        runs[tmp_path / name].restore({})
    sent: list[list[str]] = []
    shipper = Shipper(runs, lambda shipments: sent.append([s.run for s in shipments]))
    for name in "ab":
        shipper.on_run_start(RunStart(tmp_path / name, None, None, 0, 0, False))
        for iteration in (1, 2):
            (tmp_path / name / "metrics.jsonl").write_text(f"{iteration}\n")
            shipper.on_checkpoint(CheckpointSaved(tmp_path / name, None, iteration, 0,
                                                  tmp_path / name / "last.pt", None))
            assert sent[-1] == [name]  # shipped at once: the other run is not training
        shipper.on_run_end(RunEnd(tmp_path / name, None, "complete", 2))
    assert sent == [["a"], ["a"], ["b"], ["b"]]


# --- Ray: a cluster of three nodes on this machine ------------------------------------------
AUDIT_ENV = "PGSCOPE_TEST_AUDIT_DIR"


def _record_paths() -> None:
    """Ray's worker_process_setup_hook: every path this process opens (for reading or
    writing), creates, renames or removes under the test's directory is appended to
    ``$PGSCOPE_TEST_AUDIT_DIR/<node id>-<pid>.log`` (one JSON line each)."""
    import sys

    import ray

    audit = os.environ.get(AUDIT_ENV)
    if not audit:
        return
    root = str(Path(audit).parent)
    node = ray.get_runtime_context().get_node_id()
    fd = os.open(os.path.join(audit, f"{node}-{os.getpid()}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    events = {"open": 1, "os.rename": 2, "os.replace": 2, "os.remove": 1, "os.rmdir": 1,
              "os.mkdir": 1, "shutil.rmtree": 1, "os.truncate": 1}

    def hook(event, args):
        n = events.get(event)
        if n is None:
            return
        if event in ("os.remove", "os.rmdir", "os.mkdir") and args[-1] is not None:
            return  # relative to a directory fd (inside shutil.rmtree, recorded above)
        for arg in args[:n]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(arg))
                if path.startswith(root) and not path.startswith(audit):
                    mode = args[1] if event == "open" else event
                    flags = args[2] if event == "open" else 0
                    write = event != "open" or (isinstance(mode, str) and any(
                        c in mode for c in "wax+")) or bool(
                        flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                    os.write(fd, (json.dumps([path, write]) + "\n").encode())

    sys.addaudithook(hook)


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _shipped_iteration(run: Path) -> int | None:
    """The iteration of a run's last shipped checkpoint in the study directory (the store
    replaces ``last.pt`` atomically), None before the first."""
    last = RunDir(run).last_checkpoint
    return int(load_checkpoint(last)["iteration"]) if last.exists() else None


@pytest.mark.xdist_group("ray")  # `make test` runs two workers: one Ray at a time
def test_ray_cluster_without_a_shared_filesystem_ships_batches_and_resumes_a_lost_batch(
        tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    iterations = 16
    spec = parse_spec(dict(name="ray", envs=["Pendulum-v1"], seeds=2,
                           total_steps=256 * iterations, set=dict(FAST, checkpoint_every=4),
                           configs=[dict(label="ppo", preset="ppo"),
                                    dict(label="small", preset="ppo", hidden=[16])]))
    runs = [r.rel_path for r in spec.runs()]
    batches = [runs[:2], runs[2:]]  # the two seeds of each config (batch_size=2)
    study, nodes, audit = tmp_path / "study", tmp_path / "nodes", tmp_path / "audit"
    audit.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False,
        _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                        "health_check_initial_delay_ms": 0}))
    workers = {n.node_id: n for n in (cluster.add_node(num_cpus=1) for _ in range(2))}
    result: dict = {}
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PGSCOPE_NODE_STORAGE": str(nodes),
                                           AUDIT_ENV: str(audit),
                                           "PYTHONPATH": str(Path(__file__).parent)},
                              "worker_process_setup_hook": _record_paths})

        def drive():
            try:
                result["outcome"] = run_study(spec, study, backend="ray", progress=False,
                                              batch_size=2, workers=2)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                result["error"] = exc

        driver = threading.Thread(target=drive)
        driver.start()

        def batch_shipped_mid_run():
            """A batch whose members' shipped checkpoints all lie strictly between the
            first and the last iteration (with a margin: it is lost a moment later)."""
            assert driver.is_alive(), result
            for batch in batches:
                at = [_shipped_iteration(study / run) for run in batch]
                if None not in at and 2 <= min(at) and max(at) <= iterations // 2:
                    return batch, min(at)
            return None

        lost, seen_at = _wait(batch_shipped_mid_run, 150, "a batch shipped mid-way")
        node_id = next(i for i in workers if any(
            (nodes / f"node-{i[:12]}").glob(f"*/{lost[0]}/metrics.jsonl")))
        # a lost machine: its Ray workers die with it (remove_node stops only the raylet
        # and its services; a worker would train on until it notices)
        for log in audit.glob(f"{node_id}-*.log"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(log.stem.split("-")[1]), signal.SIGKILL)
        cluster.remove_node(workers.pop(node_id), allow_graceful=False)
        before = {run: (study / run / "metrics.jsonl").read_text().splitlines()
                  for run in lost}
        driver.join(240)
        assert not driver.is_alive() and "error" not in result, result
        outcome = result["outcome"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert sorted(outcome.complete) == sorted(runs)
    assert not outcome.failed and not outcome.diverged
    assert outcome.batches == batches

    # the lost batch resumed, as one batch, on the other node from the checkpoint last
    # shipped (both members at the same iteration: they are shipped together)
    other = next(iter(workers))
    resumed_at = set()
    for run in lost:
        events = (study / run / "events.log").read_text()
        assert f"sent to node {other[:12]}" in events, events
        resumed = [line for line in events.splitlines() if "resumed from the checkpoint" in line]
        assert len(resumed) == 1 and resumed[0].endswith(
            ": episodes continue exactly"), events
        at = int(resumed[0].split("iteration ")[1].split(":")[0])
        resumed_at.add(at)
        # resumed, not restarted: from (at least) the checkpoint seen before the loss
        assert seen_at <= at < iterations and at >= len(before[run]) - 1, (at, events)
        # its metrics up to that checkpoint are the lines shipped before the node was
        # lost, byte for byte (timing included: nothing was recomputed)
        lines = (study / run / "metrics.jsonl").read_text().splitlines()
        assert lines[:at] == before[run][:at]
    assert len(resumed_at) == 1

    # the study's runs are ordinary, complete runs, equal bit for bit to a local execution
    # with every run trained alone (batches of one): the engine's resume is exact and a
    # seed's numbers do not depend on its batch, its worker, its node or the backend
    local = run_study(spec, tmp_path / "local", workers=2, progress=False, batch_size=1)
    assert len(local.complete) == 4 and all(len(b) == 1 for b in local.batches)
    for run in runs:
        got = RunDir(study / run)
        status = got.read_status()
        assert status["state"] == "complete"
        assert got.writer() is None
        mine, theirs = _metrics(study / run), _metrics(tmp_path / "local" / run)
        assert mine == theirs, (run, [
            (a["iteration"], [k for k in a if a[k] != b.get(k)]) for a, b in zip(
                mine, theirs, strict=True) if a != b][:3])
        names = set(shipped_names(study / run)) - {"events.log"}
        assert names == set(shipped_names(tmp_path / "local" / run))

    # worker nodes touched only their own storage; only the head (the store) wrote the study
    seen: dict[str, list] = {}
    for log in audit.iterdir():
        node = log.name.split("-")[0]
        seen.setdefault(node, []).extend(json.loads(x) for x in log.read_text().splitlines())
    touched_study = set()
    for node, entries in seen.items():
        if node == cluster_head_id(seen, workers, node_id):
            assert all(p.startswith(str(study)) for p, write in entries if write)
            touched_study |= {p for p, write in entries if write}
        else:
            mine = str(nodes / f"node-{node[:12]}")
            assert all(p.startswith(mine) for p, _ in entries), [
                p for p, _ in entries if not p.startswith(mine)][:5]
    assert node_id in seen and other in seen  # both worker nodes trained and were recorded
    assert any(p.endswith("last.pt") for p in touched_study)  # the store wrote the study


def cluster_head_id(seen: dict, workers: dict, lost: str) -> str:
    """The one recorded node that is neither worker node."""
    heads = [n for n in seen if n not in workers and n != lost]
    assert len(heads) == 1, heads
    return heads[0]


# --- the command line -------------------------------------------------------------------------
def test_cli_study_run_batch_size_and_ship_every_reach_the_backend(tmp_path, monkeypatch,
                                                                     capsys):
    """``--batch-size`` sets the units of work and ``--ship-every`` the Ray shipping; the Ray
    backend is replaced by one that records its arguments and trains the units here."""
    from pgscope.cli import main
    from pgscope.study import ray_backend

    seen: list[dict] = []

    def fake_ray(configs, batches, out, study_key, *, ship_every, **kw):
        seen.append(dict(batches=batches, ship_every=ship_every))
        for batch in batches:
            yield from zip(batch, execute_batch([(str(out / key), configs[key])
                                                 for key in batch]), strict=True)

    monkeypatch.setattr(ray_backend, "ray_backend", fake_ray)
    spec = tmp_path / "s.toml"
    spec.write_text('name="cli"\nenvs=["Pendulum-v1"]\nseeds=2\ntotal_steps=512\n'
                    'set={steps_per_iter=256, minibatches=4, epochs=2}\n'
                    '[[configs]]\nlabel="ppo"\npreset="ppo"\n')
    runs = ["runs/ppo/Pendulum-v1/seed_0", "runs/ppo/Pendulum-v1/seed_1"]
    for flags, message in ((["--batch-size", "0"], "--batch-size must be >= 1"),
                           (["--ship-every", "2"], "--ship-every needs --backend ray"),
                           (["--backend", "ray", "--ship-every", "0"],
                            "--ship-every must be >= 1")):
        assert main(["study", "run", str(spec), "--out", str(tmp_path / "bad"), *flags]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert seen == []
    base = ["study", "run", str(spec), "--backend", "ray", "--workers", "1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "two"), "--batch-size", "2",
                 "--ship-every", "3"]) == 0
    assert seen == [dict(batches=[runs], ship_every=3)]
    assert main([*base, "--out", str(tmp_path / "one"), "--batch-size", "1"]) == 0
    assert seen[1] == dict(batches=[[r] for r in runs], ship_every=1)  # the default
    for r in runs:  # trained together or alone: the same numbers
        assert _metrics(tmp_path / "two" / r) == _metrics(tmp_path / "one" / r)
