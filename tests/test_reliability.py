"""Runs that cannot be corrupted: one writer per run, truthful status, resume that never
destroys data and continues exactly, extendable runs, scheduled probes that cannot make a
run stuck, every bad input caught before compute, envs that misbehave, probe outputs that
say what they measured. The table in docs/reliability.md points to these tests."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helper_envs  # noqa: F401 - registers the helper_envs/* ids
from pgscope import make_config, train
from pgscope.cli import EXIT_DIVERGED, EXIT_ERROR, build_parser, main
from pgscope.errors import ProbeError, RunDirError
from pgscope.metrics import TIMING_KEYS
from pgscope.probes import run_probes
from pgscope.run import RunDir
from pgscope.status import collect_status, format_status

TESTS = Path(__file__).parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
SMALL = dict(steps_per_iter=256, minibatches=4, epochs=2, hidden=(16, 16), checkpoint_every=2)


def _metrics(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgscope.cli", *args]


def _train_cmd(out: Path, env_id: str, iterations: int, **sets) -> list[str]:
    cfg = dict(SMALL, **sets)
    set_args = [a for k, v in cfg.items() for a in
                ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}")]
    return _cli_cmd("train", "--algo", "ppo", "--env", env_id, "--steps",
                    str(256 * iterations), "--out", str(out), "--quiet", *set_args)


def _wait_for(predicate, timeout: float = 120.0, poll: float = 0.005) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError("condition not reached in time")


def _lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _kill_when(cmd: list[str], predicate, delay: float = 0.0) -> None:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: predicate() or proc.poll() is not None)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def _resume(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli_cmd("train", "--resume", str(run), "--quiet", *extra),
                          env=ENV, capture_output=True, text=True)


# --- one writer per run -----------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out, "CartPole-v1", 400), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _lines(out) >= 1)
        lines_before = _lines(out)
        second = _resume(out)
        assert second.returncode == EXIT_ERROR
        assert f"pid {proc.pid}" in second.stderr and "another process" in second.stderr
        assert "Traceback" not in second.stderr
        fresh = subprocess.run(_train_cmd(out, "CartPole-v1", 400), env=ENV,
                               capture_output=True, text=True)
        assert fresh.returncode == EXIT_ERROR and "Traceback" not in fresh.stderr
        assert RunDir(out).current_status()["state"] == "running"
        assert _lines(out) >= lines_before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the OS dropped the dead holder's lock: never stale
    assert RunDir(out).writer() is None
    assert RunDir(out).current_status()["state"] == "interrupted"
    iterations = [r["iteration"] for r in _metrics(out)]
    assert iterations == list(range(1, len(iterations) + 1))


def test_two_fresh_writers_racing_on_one_directory(tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(out, "CartPole-v1", 6)
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    codes = sorted(p.wait() for p in procs)
    errors = [p.stderr.read() for p in procs]
    assert codes == [0, EXIT_ERROR], errors
    assert not any("Traceback" in e for e in errors)
    assert [r["iteration"] for r in _metrics(out)] == list(range(1, 7))
    assert RunDir(out).read_status()["state"] == "complete"


# --- status -------------------------------------------------------------------------------
def test_status_file_and_status_command(tmp_path, capsys):
    out = tmp_path / "run"
    train(make_config("ppo", "CartPole-v1", dict(SMALL, total_steps=512)), out, progress=False)
    status = RunDir(out).read_status()
    assert status["state"] == "complete" and status["iteration"] == 2
    assert status["pid"] == os.getpid() and status["host"] and status["heartbeat"] > 0
    assert status["total_iterations"] == 2
    # a 'running' status whose writer is gone reads as interrupted
    RunDir(out).write_status("running", iteration=1)
    assert RunDir(out).current_status()["state"] == "interrupted"
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "interrupted" in text and "2/2" in text and "running" not in text.split("\n")[1]
    # a study directory: one row per planned run
    from pgscope.study import builtin_study
    from pgscope.study.runner import prepare_study_dir

    spec = builtin_study("seed-lottery", quick=True)
    prepare_study_dir(tmp_path / "study", spec)
    rows = collect_status(tmp_path / "study")
    assert len(rows) == len(spec.runs()) and {r.state for r in rows} == {"new"}
    assert f"{len(rows)} new" in format_status(rows)
    assert main(["status", str(tmp_path / "nothing")]) == EXIT_ERROR


def test_sigterm_records_interrupted(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out, "CartPole-v1", 400), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _lines(out) >= 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 130
    assert "to resume" in proc.stderr.read()
    status = RunDir(out).read_status()
    assert status["state"] == "interrupted"
    assert status["iteration"] in (len(_metrics(out)), len(_metrics(out)) - 1)


# --- resume never destroys data -----------------------------------------------------------
def test_damaged_line_before_the_checkpoint_stops_resume_unless_repair(tmp_path, capsys):
    out = tmp_path / "run"
    train(make_config("ppo", "CartPole-v1", dict(SMALL, total_steps=1024)), out, progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:40] + "\n"  # iteration 2 damaged in the middle of the file
    (out / "metrics.jsonl").write_text("".join(lines))
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(out), "--steps", "1536", "--quiet"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "damaged line(s) 2" in err and "--repair" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing changed
    assert RunDir(out).read_metrics()[1]["iteration"] == 3  # readers skip, never truncate
    assert main(["train", "--resume", str(out), "--steps", "1536", "--repair", "--quiet"]) == 0
    backups = list(out.glob("metrics.jsonl.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    assert [r["iteration"] for r in _metrics(out)] == [1, 3, 4, 5, 6]
    assert "repair" in (out / "events.log").read_text()


def test_duplicated_iteration_before_the_checkpoint_is_reported(tmp_path):
    out = tmp_path / "run"
    cfg = make_config("ppo", "CartPole-v1", dict(SMALL, total_steps=768))
    train(cfg, out, progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join([lines[0], lines[0], *lines[1:]]))
    with pytest.raises(RunDirError, match="duplicate iteration line"):
        train(cfg, out, resume=True, progress=False)


# --- exact resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("env_id,sets", [
    ("CartPole-v1", {}),
    ("Pendulum-v1", {"reward_scale": True, "obs_norm": True}),
    ("Hopper-v5", {}),
])
def test_kill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, env_id, sets):
    iterations = 8
    ref = train(make_config("ppo", env_id, dict(SMALL, total_steps=256 * iterations, **sets)),
                tmp_path / "ref", progress=False)
    out = tmp_path / "run"
    cmd = _train_cmd(out, env_id, iterations, **sets)
    _kill_when(cmd, lambda: _lines(out) >= 2)  # right after a metrics line
    _kill_when(_cli_cmd("train", "--resume", str(out), "--quiet"),
               lambda: _lines(out) >= 5, delay=0.05)  # inside the next iteration
    assert RunDir(out).current_status()["state"] == "interrupted"
    done = _resume(out)
    assert done.returncode == 0, done.stderr
    assert _strip(_metrics(out)) == _strip(_metrics(ref))
    assert "episodes continue exactly" in (out / "events.log").read_text()


def test_kill_during_a_scheduled_probe_then_resume_is_exact(tmp_path):
    probe = dict(probe_every=3, probe_kinds="gradients", probe_sizes=(20, 40), probe_k=2,
                 probe_true_pairs=4000)
    iterations = 7
    ref = train(make_config("ppo", "CartPole-v1",
                            dict(SMALL, total_steps=256 * iterations, **probe)),
                tmp_path / "ref", progress=False)
    # (that probes never change the run they watch: tests/test_probes.py)
    out = tmp_path / "run"
    tmp_probe = out / "probes" / ".iter_000003.tmp"
    _kill_when(_train_cmd(out, "CartPole-v1", iterations, **probe), tmp_probe.exists)
    assert not (out / "probes" / "iter_000003").exists()
    done = _resume(out)
    assert done.returncode == 0, done.stderr
    assert (out / "probes" / "iter_000003" / "gradients.json").exists()
    assert (out / "probes" / "iter_000006" / "gradients.json").exists()
    assert _strip(_metrics(out)) == _strip(_metrics(ref))


def test_env_that_cannot_be_saved_restarts_its_episodes_with_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_config("ppo", "helper_envs/Unsavable-v0", dict(SMALL, total_steps=768))
    train(cfg, out, progress=False)
    (out / "checkpoints" / "last.pt").write_bytes(
        (out / "checkpoints" / "iter_000002.pt").read_bytes())
    train(cfg, out, resume=True, progress=False)
    assert [r["iteration"] for r in _metrics(out)] == [1, 2, 3]
    assert "episodes restart" in capsys.readouterr().err
    assert "WARNING" in (out / "events.log").read_text()


# --- extending a run ------------------------------------------------------------------------
def test_resume_with_more_steps_extends_and_replans_lr_annealing(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_config("ppo", "CartPole-v1", dict(SMALL, total_steps=768))
    train(cfg, out, progress=False)
    assert main(["train", "--resume", str(out), "--steps", "1536", "--quiet"]) == 0
    records = _metrics(out)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    base = cfg.policy_lr
    lrs = [r["lr"] for r in records]
    assert lrs[:3] == pytest.approx([base * (1 - k / 3) for k in range(3)])
    assert lrs[3:] == pytest.approx([base * (1 - k / 6) for k in range(3, 6)])
    data = json.loads((out / "config.json").read_text())
    assert data["config"]["total_steps"] == 1536
    assert data["extensions"][0]["from_total_steps"] == 768
    assert RunDir(out).read_status()["state"] == "complete"
    # probes and load_agent still accept the checkpoints written before the extension
    from pgscope import load_agent

    load_agent(out, iteration=2)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "512"]) == EXIT_ERROR
    assert "can only be extended" in capsys.readouterr().err
    for flags in (["--set", "epochs=3"], ["--seed", "3"], ["--env", "Pendulum-v1"],
                  ["--preset", "trpo"], ["--out", str(tmp_path / "x")]):
        assert main(["train", "--resume", str(out), *flags]) == EXIT_ERROR
        assert f"{flags[0]} cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--algo", "trpo"]) == EXIT_ERROR  # alias
    assert "--preset cannot be combined with --resume" in capsys.readouterr().err
    assert [r["iteration"] for r in _metrics(out)] == [1, 2, 3, 4, 5, 6]


# --- scheduled probes that fail ----------------------------------------------------------
def test_a_failing_scheduled_probe_never_makes_a_run_stuck(tmp_path, monkeypatch, capsys):
    import pgscope.probes

    calls = []

    def broken(run_dir, iteration, progress=False):
        calls.append(iteration)
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(pgscope.probes, "scheduled_probes", broken)
    out = tmp_path / "run"
    cfg = make_config("ppo", "CartPole-v1", dict(SMALL, total_steps=1024, probe_every=2))
    train(cfg, out, progress=False)
    assert calls == [2, 4]
    assert RunDir(out).read_status()["state"] == "complete"
    failures = [json.loads(line) for line in
                (out / "probes" / "failures.jsonl").read_text().splitlines()]
    assert [f["iteration"] for f in failures] == [2, 4]
    assert "probe exploded" in failures[0]["error"]
    err = capsys.readouterr().err
    for kind in ("gradients", "values", "trust-region"):  # one command the CLI takes each
        assert f"pgscope probe {kind} {out} --checkpoint 2" in err
    assert (out / "checkpoints" / "iter_000002.pt").exists()  # the re-run needs it
    # resuming (here: extending) does not retry the recorded failures
    train(cfg, out, resume=True, progress=False, total_steps=1536)
    assert calls == [2, 4, 6]


# --- bad input: one clear error before any compute -------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    train(make_config("ppo", "CartPole-v1", dict(SMALL, total_steps=512)), out, progress=False)
    return out


def _bad_cases(tmp_path: Path, run: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    new = str(tmp_path / "new")
    train_args = ["train", "--out", new, "--quiet"]
    return [
        ([*train_args, "--env", "helper_envs/ImageObs-v0"], "image-like observation space"),
        ([*train_args, "--env", "helper_envs/MatrixAction-v0"], "1-D Box (continuous)"),
        ([*train_args, "--env", "helper_envs/ScalarObs-v0"], "need a 1-D Box observation"),
        ([*train_args, "--env", "nosuchmod:Thing-v0"], "module 'nosuchmod' is not importable"),
        ([*train_args, "--env", "Walker2D-v5"], "Did you mean Walker2d-v5"),
        ([*train_args, "--env", ":Hopper-v5"], "malformed"),
        ([*train_args, "--seed", str(2**32)], "below 2**32"),
        ([*train_args, "--seed", "-1"], "'seed' must be >= 0"),
        ([*train_args, "--set", "ent_coef=inf"], "'ent_coef' must be a finite number"),
        ([*train_args, "--set", "init_log_std=nan"], "'init_log_std' must be a finite"),
        ([*train_args, "--set", "cg_damping=inf"], "'cg_damping' must be a finite number"),
        (["train", "--out", str(a_file), "--env", "CartPole-v1"], "is a file"),
        (["probe", "values", str(run), "--out", str(a_file)], "is a file"),
        (["probe", "trust-region", str(run), "--out", new, "--compare",
          str(tmp_path / "missing")], "does not exist"),
        (["probe", "values", str(run), "--out", new, "--checkpoint", "999"],
         "no checkpoint of iteration 999"),
        (["probe", "gradients", str(run), "--out", new, "--sizes", "0"], "at least 2"),
        (["probe", "values", str(run), "--out", new, "--pairs", "0"], "--pairs must be"),
        (["probe", "landscape", str(run), "--out", new, "--landscape-counts", "0"],
         "--landscape-counts must be positive"),
        (["study", "run", "--preset", "seed-lottery", "--quick", "--out", str(a_file)],
         "is a file"),
    ]


def test_every_bad_input_gets_one_clear_error_and_nothing_is_written(tmp_path, tiny_run,
                                                                     capsys):
    run_files = sorted(p.name for p in tiny_run.rglob("*"))
    for args, message in _bad_cases(tmp_path, tiny_run):
        code = main(args)
        err = capsys.readouterr().err
        assert code == EXIT_ERROR, (args, err)
        assert message in err, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (args, err)
        assert not (tmp_path / "new").exists(), args
        assert (tmp_path / "a_file").read_text() == "precious"
    assert sorted(p.name for p in tiny_run.rglob("*")) == run_files


def test_counts_accept_scientific_notation():
    args = build_parser().parse_args(["train", "--steps", "1e6", "--out", "x"])
    assert args.steps == 1_000_000
    args = build_parser().parse_args(["probe", "values", "r", "--out", "o", "--pairs", "2e4"])
    assert args.pairs == 20_000
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--steps", "1.5"])


# --- envs that misbehave ----------------------------------------------------------------
@pytest.mark.parametrize("env_id,value", [("helper_envs/NanReward-v0", "nan"),
                                          ("helper_envs/InfReward-v0", "inf")])
def test_non_finite_env_reward_is_reported_as_such(tmp_path, capsys, env_id, value):
    out = tmp_path / "run"
    code = main(["train", "--env", env_id, "--steps", "1024", "--out", str(out), "--quiet",
                 "--set", "steps_per_iter=128", "--set", "minibatches=2"])
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert f"non-finite reward ({value}) at env step 300" in err and "iteration 3" in err
    status = RunDir(out).read_status()
    assert status["state"] == "diverged" and status["where"] == "env reward"
    assert status["iteration"] == 3
    assert [r["iteration"] for r in _metrics(out)] == [1, 2]


def test_non_finite_env_observation_is_reported_as_such(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--env", "helper_envs/NanAfter-v0", "--steps", "1024", "--out",
                 str(out), "--quiet", "--set", "steps_per_iter=128"]) == EXIT_DIVERGED
    assert "non-finite observation (nan) at env step 301" in capsys.readouterr().err
    assert RunDir(out).read_status()["where"] == "env observation"


def test_value_probe_refuses_a_time_limit_shorter_than_the_horizon(tmp_path):
    out = tmp_path / "run"
    train(make_config("ppo", "helper_envs/ShortCartPole-v0", dict(SMALL, total_steps=256)),
          out, progress=False)
    for kind in ("values", "baselines"):
        with pytest.raises(ProbeError, match="time limit of 50 steps, shorter than the effect"):
            run_probes(kind, out, tmp_path / "p", value_pairs=1000, fit_pairs=1000,
                       sizes=(10, 20), k=2, progress=False)
    assert not (tmp_path / "p").exists()


def test_landscape_episodes_that_never_end_are_capped_with_a_count(tmp_path):
    from pgscope.agent import build_agent
    from pgscope.envs import make_env
    from pgscope.probes.landscape import episode_returns

    cfg = make_config("ppo", "helper_envs/NeverEnds-v0", SMALL)
    env = make_env(cfg.env_id)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    capped: list[int] = []
    episodes = episode_returns(agent, 200, seed=0, n_envs=4, cap=30, capped=capped)
    assert episodes and all(length == 30 for _, length, _ in episodes)
    assert capped == [len(episodes)]


# --- probe outputs ----------------------------------------------------------------------
def test_probe_outputs_record_what_was_measured_and_arrive_one_by_one(tiny_run, tmp_path):
    out = tmp_path / "probes"
    seen = []

    def log(line: str) -> None:
        seen.append((line, sorted(p.name for p in out.glob("*.json"))))

    run_probes("gradients,trust-region", tiny_run, out, checkpoint=2, sizes=(20, 40), k=2,
               true_pairs=400, progress=False, log=log)
    assert seen[0][0].startswith("gradients: at 40 pairs, pairwise cosine")
    assert seen[0][1] == ["gradients.json"]  # written before the next probe started
    assert seen[1][1] == ["gradients.json", "trust-region.json"]
    data = json.loads((out / "gradients.json").read_text())
    assert data["checkpoint"]["iteration"] == 2 and data["checkpoint"]["env_steps"] == 512
    from pgscope import __version__

    assert data["pgscope_version"] == __version__
    assert data["probe_settings"]["sizes"] == [20, 40] and data["probe_settings"]["k"] == 2


def test_a_fresh_run_into_a_directory_being_written_names_the_writer(tmp_path):
    """A fresh train --out D while another process writes D was refused with the advice to
    --resume it (which the writer lock would then refuse): it must say who writes D."""
    import os

    from pgscope.errors import RunDirError
    from pgscope.run import RunDir

    cfg = make_config("ppo", "Pendulum-v1", dict(total_steps=128, steps_per_iter=64))
    out = tmp_path / "run"
    run, lock = RunDir.create(out, cfg)  # the other writer, mid-run
    run.write_status("running")
    try:
        with pytest.raises(RunDirError, match=f"being written by another process \\(pid "
                                              f"{os.getpid()} ") as info:
            train(cfg, out, progress=False)
        assert "--resume" not in str(info.value)
    finally:
        lock.release()
    with pytest.raises(RunDirError, match="already holds this run; continue it with"):
        train(cfg, out, progress=False)  # nobody writes it now: resuming is the advice
