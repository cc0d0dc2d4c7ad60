"""``pgscope export`` (pgscope.export) and the W&B sink: the TensorBoard event files of an
export, read back with TensorBoard's own reader, hold every metrics.jsonl number under the
TensorBoard sink's tags at step = env steps and the config as hparams, exactly as the live
sink's; the CSV is byte for byte what a live CsvWriter writes; W&B runs (offline, read back
from the .wandb file, and through a recording stand-in for the wandb module) get the
config, the SB3 tags at step = env steps, and are finished; a study exports every run; a
second export is refused unless --force; bad paths give one clear error."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import struct
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pgscope import make_config, train
from pgscope.cli import EXIT_ERROR, main
from pgscope.errors import DependencyError, DivergenceError, RunDirError
from pgscope.export import export
from pgscope.metrics import GLOBAL_STEP, REGISTRY, tensorboard_tag
from pgscope.run import RunDir

TINY = dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=(8,), checkpoint_every=1)


def _tiny(iterations: int = 3, **overrides: Any) -> dict[str, Any]:
    return dict(TINY, total_steps=64 * iterations, **overrides)


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tagged(record: dict) -> dict[str, float]:
    """What a metrics line must become: every number under its TensorBoard tag, scaled."""
    out = {}
    for key, value in record.items():
        if key == GLOBAL_STEP or value is None or isinstance(value, bool):
            continue
        tag, scale = tensorboard_tag(key)
        out[tag] = scale * value
    return out


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny PPO run per action space, trained with the live TensorBoard and CSV sinks."""
    root = tmp_path_factory.mktemp("live")
    return {env: train(make_config("ppo", env, _tiny(3, tensorboard=True, csv=True)),
                       root / env, progress=False)
            for env in ("CartPole-v1", "Pendulum-v1")}


@pytest.fixture
def run(live_runs, tmp_path) -> Path:
    """A copy of the CartPole run without any sink output (a run trained without sinks)."""
    copy = tmp_path / "run"
    shutil.copytree(live_runs["CartPole-v1"], copy,
                    ignore=shutil.ignore_patterns("tensorboard", "metrics.csv"))
    return copy


# --- TensorBoard ---------------------------------------------------------------------------
def _accumulator(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = _accumulator(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    want: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for tag, value in _tagged(r).items():  # float32: TensorBoard's precision
            want.setdefault(tag, []).append((r[GLOBAL_STEP], float(np.float32(value))))
    return want


def _hparams(logdir: Path) -> dict[str, Any]:
    """The hparams of the logdir's session-start summary, as plain values."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = _accumulator(logdir).PluginTagToContent("hparams")
    data = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {k: v.string_value if v.HasField("string_value") else v.number_value
            for k, v in data.session_start_info.hparams.items()}


def _config_as_hparams(run: Path) -> dict[str, Any]:
    """Every config key as the hparams must hold it (sequences as --set takes them)."""
    cfg = RunDir(run).read_config().to_dict()
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple))
            else v if isinstance(v, str) else float(v) for k, v in cfg.items()}


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_tensorboard_export_equals_the_live_sink_and_the_metrics_lines(live_runs, tmp_path,
                                                                         env):
    live = live_runs[env]
    out = tmp_path / "tb"
    result = export(live, ["tensorboard"], out=out)
    assert [(e.format, e.target, e.iterations) for e in result.written] == \
        [("tensorboard", out, 3)]
    got, records = _scalars(out), _lines(live)
    assert got == _expected_scalars(records)
    assert got == _scalars(live / "tensorboard")  # what the live sink wrote
    assert [s for s, _ in got["train/approx_kl"]] == [64, 128, 192]  # step = env steps
    assert {"train/value_loss", "train/entropy_loss", "time/fps"} <= set(got)
    assert _hparams(out) == _config_as_hparams(live)
    assert _hparams(live / "tensorboard") == _config_as_hparams(live)  # the live sink too
    assert _hparams(out)["hidden"] == "8" and _hparams(out)["env_id"] == env


def test_tensorboard_export_goes_into_the_run_by_default(run):
    export(run, ["tensorboard"])
    assert _scalars(run / "tensorboard") == _expected_scalars(_lines(run))


# --- CSV -----------------------------------------------------------------------------------
@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_csv_export_is_byte_for_byte_the_live_csv_writer(live_runs, tmp_path, env):
    live = live_runs[env]
    export(live, ["csv"], out=tmp_path / "csv")
    exported = (tmp_path / "csv" / "metrics.csv").read_bytes()
    assert exported == (live / "metrics.csv").read_bytes()
    header = exported.decode().splitlines()[0].split(",")
    assert ("policy_std" in header) == (env == "Pendulum-v1")  # the action space's columns


def test_csv_export_without_the_policy_keys_reads_the_checkpoint(live_runs, tmp_path):
    """A line without the keys that tell the action space: the checkpoint's spaces do."""
    src = live_runs["Pendulum-v1"]
    copy = tmp_path / "run"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("tensorboard", "metrics.csv"))
    by_policy = {m.name for m in REGISTRY.values() if {"gaussian", "discrete"} &
                 set(m.requires)}
    lines = [{k: v for k, v in r.items() if k not in by_policy} for r in _lines(copy)]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    export(copy, ["csv"])
    assert (copy / "metrics.csv").read_text().splitlines()[0] == \
        (src / "metrics.csv").read_text().splitlines()[0]


# --- W&B -----------------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(monkeypatch, tmp_path) -> Path:
    """W&B in offline mode, every file of it under tmp_path/wandb-dir."""
    directory = tmp_path / "wandb-dir"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return directory


def _wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's .wandb file: a LevelDB-style log (7-byte file
    header, 32 KiB blocks of chunks: crc32 4 bytes, length 2, type 1; FULL=1, FIRST=2,
    MIDDLE=3, LAST=4) of wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, parts, out = header, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # the rest of a block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 or pos + header + length > len(data):  # the end, or still being written
            break
        parts += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def _offline_run(directory: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The config, history rows (with their step) and exit code of the one offline run in
    ``directory``. W&B's service may write the file after ``finish`` returns (it does for
    all but a process's first run), so this waits for the run's exit record."""
    files = list(directory.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(files[0])):
        assert time.monotonic() < deadline, "the offline W&B run was never finished"
        time.sleep(0.1)
    run: dict[str, Any] = {"history": [], "config": {}}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update
                             if i.key != "_wandb"}
            run["project"] = record.run.project
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in record.history.item}  # "train/approx_kl" comes as nested_key
            run["history"].append((record.history.step.num, row))
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def _expected_history(records: list[dict]) -> list[tuple[int, dict[str, float]]]:
    return [(r[GLOBAL_STEP], _tagged(r)) for r in records]


def _logged(history: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return [(step, {k: v for k, v in row.items() if not k.startswith("_")})
            for step, row in history]


def test_wandb_export_offline_holds_the_config_and_every_line(run, wandb_offline):
    result = export(run, ["wandb"])
    assert [(e.format, e.target) for e in result.written] == [("wandb", run / "wandb.json")]
    logged = _offline_run(wandb_offline)
    cfg = RunDir(run).read_config().to_dict()
    assert logged["config"] == json.loads(json.dumps(cfg))  # the config as W&B config
    assert logged["project"] == "pgscope" and logged["exit_code"] == 0
    assert _logged(logged["history"]) == _expected_history(_lines(run))
    assert [row["_step"] for _, row in logged["history"]] == [64, 128, 192]
    record = json.loads((run / "wandb.json").read_text())["runs"]
    assert len(record) == 1 and record[0]["job_type"] == "export"
    assert Path(record[0]["dir"]).is_relative_to(wandb_offline)


def test_live_wandb_sink_offline_and_a_new_wandb_run_on_resume(tmp_path, wandb_offline):
    cfg = make_config("ppo", "CartPole-v1", _tiny(3, wandb=True))
    out = train(cfg, tmp_path / "run", progress=False)
    logged = _offline_run(wandb_offline)
    assert logged["config"]["wandb"] is True and logged["exit_code"] == 0
    assert _logged(logged["history"]) == _expected_history(_lines(out))
    # killed after iteration 2's checkpoint, then resumed: the new W&B run has every line
    (out / "checkpoints" / "last.pt").write_bytes(
        (out / "checkpoints" / "iter_000002.pt").read_bytes())
    shutil.rmtree(wandb_offline)
    train(cfg, out, resume=True, progress=False, total_steps=64 * 4)
    resumed = _offline_run(wandb_offline)
    assert _logged(resumed["history"]) == _expected_history(_lines(out))
    assert [s for s, _ in resumed["history"]] == [64, 128, 192, 256]
    assert [r["job_type"] for r in json.loads((out / "wandb.json").read_text())["runs"]] == \
        ["train", "train"]


class FakeWandb(types.ModuleType):
    """A stand-in for the wandb module that records every call."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls: list[tuple[str, Any, Any]] = []

    def init(self, **kwargs: Any) -> Any:
        self.calls.append(("init", kwargs, None))
        calls = self.calls

        class Run:
            id, project, url, dir = f"fake{len(calls)}", kwargs["project"], None, None

            def log(self, data: dict, step: int | None = None) -> None:
                calls.append(("log", data, step))

            def finish(self, exit_code: int | None = None) -> None:
                calls.append(("finish", exit_code, None))

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return fake


def _expected_calls(run: Path, job_type: str, directory: Path) -> list[tuple[str, Any, Any]]:
    cfg = RunDir(run).read_config()
    init = dict(project="pgscope", name=f"ppo CartPole-v1 seed {cfg.seed}",
                notes=f"pgscope run directory {run.resolve()}", job_type=job_type,
                config=cfg.to_dict(), dir=str(directory.resolve()), reinit="create_new")
    return [("init", init, None),
            *[("log", _tagged(r), r[GLOBAL_STEP]) for r in _lines(run)],
            ("finish", 0, None)]


def test_wandb_export_calls(run, fake_wandb):
    export(run, ["wandb"])
    assert fake_wandb.calls == _expected_calls(run, "export", run)


def test_live_wandb_sink_calls(tmp_path, fake_wandb):
    out = train(make_config("ppo", "CartPole-v1", _tiny(3, wandb=True)), tmp_path / "run",
                progress=False)
    assert fake_wandb.calls == _expected_calls(out, "train", out)
    assert [c[2] for c in fake_wandb.calls if c[0] == "log"] == [64, 128, 192]


def test_live_wandb_sink_finishes_a_diverged_run_as_failed(tmp_path, fake_wandb):
    import helper_envs  # noqa: F401 - registers helper_envs/NanAfter-v0

    cfg = make_config("ppo", "helper_envs:helper_envs/NanAfter-v0",
                      dict(TINY, steps_per_iter=128, total_steps=128 * 4, wandb=True))
    with pytest.raises(DivergenceError):  # NaN observations after 300 env steps
        train(cfg, tmp_path / "run", progress=False)
    assert [c[2] for c in fake_wandb.calls if c[0] == "log"] == [128, 256]
    assert fake_wandb.calls[-1] == ("finish", 1, None)


def test_missing_wandb_is_one_line_before_anything_is_trained(tmp_path, monkeypatch, capsys,
                                                              run):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    out = tmp_path / "new"
    assert main(["train", "--env", "CartPole-v1", "--steps", "64", "--out", str(out),
                 "--quiet", "--wandb"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install wandb" in err
    assert not out.exists()  # refused before anything was written or computed
    with pytest.raises(DependencyError, match="pip install wandb"):
        export(run, ["tensorboard", "wandb"])
    assert not (run / "tensorboard").exists()  # nothing of the other format either


# --- studies -------------------------------------------------------------------------------
def test_study_export_covers_every_run(tmp_path):
    from pgscope.study import parse_spec
    from pgscope.study.runner import prepare_study_dir

    spec = parse_spec(dict(name="t", envs=["CartPole-v1"], seeds=2, total_steps=128,
                           set=dict(steps_per_iter=64, minibatches=2, epochs=1),
                           configs=[dict(label="a", preset="ppo", hidden=[8]),
                                    dict(label="b", preset="ppo", hidden=[4])]))
    study = tmp_path / "study"
    prepare_study_dir(study, spec)
    runs = spec.runs()
    for r in runs[:3]:  # the fourth is not started
        train(r.config, study / r.rel_path, progress=False)
    out = tmp_path / "exported"
    result = export(study, ["tensorboard", "csv"], out=out)
    assert sorted(e.run for e in result.written) == sorted(
        study / r.rel_path for r in runs[:3] for _ in range(2))
    assert result.skipped == [(study / runs[3].rel_path, "not started")]
    for r in runs[:3]:
        records = _lines(study / r.rel_path)
        assert _scalars(out / r.rel_path) == _expected_scalars(records)
        assert _hparams(out / r.rel_path)["seed"] == r.seed
        assert len((out / r.rel_path / "metrics.csv").read_text().splitlines()) == 3
    # by default into each run, as the live sinks write
    assert main(["export", str(study), "--tensorboard"]) == 0
    for r in runs[:3]:
        assert _scalars(study / r.rel_path / "tensorboard") == \
            _expected_scalars(_lines(study / r.rel_path))
    with pytest.raises(RunDirError, match="--force") as refused:
        export(study, ["tensorboard"])
    assert str(refused.value).count("already holds TensorBoard event files") == 3


# --- a second export, bad input ------------------------------------------------------------
def test_a_second_export_is_refused_unless_force(run, capsys, fake_wandb):
    assert main(["export", str(run), "--csv"]) == 0
    csv_before = (run / "metrics.csv").read_bytes()
    # one target taken: nothing of the call is written
    assert main(["export", str(run), "--tensorboard", "--csv"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: nothing exported") and err.count("\n") == 1
    assert "metrics.csv' exists" in err and "--force" in err
    assert not (run / "tensorboard").exists()
    assert main(["export", str(run), "--tensorboard", "--csv", "--force"]) == 0
    assert (run / "metrics.csv").read_bytes() == csv_before
    assert main(["export", str(run), "--tensorboard", "--force"]) == 0
    assert _scalars(run / "tensorboard") == _expected_scalars(_lines(run))  # each step once
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # W&B: a run already logged (by an export or by the live sink) is refused too
    assert main(["export", str(run), "--wandb"]) == 0
    assert main(["export", str(run), "--wandb"]) == EXIT_ERROR
    assert "already logged to W&B" in capsys.readouterr().err
    assert main(["export", str(run), "--wandb", "--force"]) == 0
    assert len(json.loads((run / "wandb.json").read_text())["runs"]) == 2
    assert [c[0] for c in fake_wandb.calls].count("init") == 2


def test_bad_paths_give_one_clear_error(tmp_path, run, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    empty_run = tmp_path / "empty-run"
    shutil.copytree(run, empty_run)
    (empty_run / "metrics.jsonl").write_text("")
    cases = {str(tmp_path / "missing"): "does not exist; give a run directory",
             str(tmp_path / "file"): "is a file; give a run directory",
             str(tmp_path / "empty"): "neither a pgscope run directory",
             str(empty_run): "has no metrics to export"}
    for path, message in cases.items():
        assert main(["export", path, "--csv"]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert main(["export", str(run)]) == EXIT_ERROR
    assert "--tensorboard, --csv and/or --wandb" in capsys.readouterr().err
    assert main(["export", str(run), "--csv", "--out", str(tmp_path / "file")]) == EXIT_ERROR
    assert "is a file; give a directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--wandb"]) == EXIT_ERROR
    assert "--wandb cannot be combined with --resume" in capsys.readouterr().err
