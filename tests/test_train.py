"""Training end to end: run directory contents, metrics keys, determinism, checkpoint
loading, kill -9 and resume, and every bad-input path of the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import helper_envs  # noqa: F401 - registers helper_envs/NanAfter-v0
from pgscope import load_agent, make_config, train
from pgscope.cli import EXIT_DIVERGED, EXIT_ERROR, main
from pgscope.run import RunDir
from pgscope.train import TIMING_KEYS

REQUIRED_KEYS = {
    "iteration", "env_steps", "return_mean", "return_min", "return_max", "episodes",
    "episode_length", "policy_loss", "value_loss", "entropy", "kl_mean", "kl_max",
    "ratio_max_after", "ratio_min_after", "clip_fraction_after", "explained_variance",
    "policy_grad_norm", "value_lr", "sps",
}
PPO_REQUIRED_KEYS = {"ratio_max", "ratio_min", "clip_fraction", "lr"}
FAST = dict(steps_per_iter=256, minibatches=4, epochs=2, total_steps=256 * 4,
            checkpoint_every=2)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize("preset,env", [("ppo", "Pendulum-v1"), ("trpo", "CartPole-v1"),
                                        ("ppo-kl", "CartPole-v1"), ("trpo+", "Pendulum-v1")])
def test_run_directory_and_metrics(tmp_path, preset, env):
    run = train(make_config(preset, env, FAST), tmp_path / "run", progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["preset"] == preset
    assert set(config["versions"]) >= {"python", "torch", "gymnasium", "mujoco", "pgscope"}
    records = _metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["env_steps"] for r in records] == [256, 512, 768, 1024]
    required = REQUIRED_KEYS | (PPO_REQUIRED_KEYS if preset.startswith("ppo") else set())
    for r in records:
        assert required <= set(r), required - set(r)
        assert r["ratio_first_minibatch_dev"] < 1e-5  # on-policy first minibatch
        assert r["ratio_min_after"] <= 1.0 <= r["ratio_max_after"]
        assert 0.0 <= r["clip_fraction_after"] <= 1.0
        if preset.startswith("ppo"):
            assert r["ratio_min"] <= 1.0 <= r["ratio_max"]
            assert 0.0 <= r["clip_fraction"] <= 1.0
        assert r["kl_mean"] >= 0 and r["kl_max"] >= r["kl_mean"]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["iter_000000.pt", "iter_000002.pt", "iter_000004.pt", "last.pt"]
    assert RunDir(run).read_status()["state"] == "complete"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"policy", "value_net", "optimizer", "preprocessor"} <= set(ckpt)
    agent = load_agent(run)
    obs = np.zeros((2, *agent.preprocessor.obs(np.zeros((1, 3 if env == "Pendulum-v1" else 4)),
                                                False).shape[1:]), np.float32)
    assert agent.act(obs).shape[0] == 2


@pytest.mark.parametrize("preset,env", [("ppo", "Hopper-v5"), ("trpo", "Hopper-v5"),
                                        ("ppo", "CartPole-v1")])
def test_same_seed_same_metrics(tmp_path, preset, env):
    cfg = make_config(preset, env, dict(FAST, total_steps=512, seed=3))
    a = _strip_timing(_metrics(train(cfg, tmp_path / "a", progress=False)))
    b = _strip_timing(_metrics(train(cfg, tmp_path / "b", progress=False)))
    assert a == b
    other = make_config(preset, env, dict(FAST, total_steps=512, seed=4))
    c = _strip_timing(_metrics(train(other, tmp_path / "c", progress=False)))
    assert c != a


def test_lr_annealing_and_policy_lr_in_metrics(tmp_path):
    run = train(make_config("ppo", "Pendulum-v1", FAST), tmp_path / "r", progress=False)
    lrs = [r["lr"] for r in _metrics(run)]
    np.testing.assert_allclose(lrs, [3e-4 * (1 - i / 4) for i in range(4)])


def test_module_colon_env_id_form(tmp_path):
    cfg = make_config("ppo", "helper_envs:helper_envs/NanAfter-v0",
                      dict(FAST, total_steps=256))
    # nan_after=300 > 256 steps: one clean iteration
    run = train(cfg, tmp_path / "r", progress=False)
    assert len(_metrics(run)) == 1


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cli(*args: str) -> int:
    return main(list(args))


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code = _cli("train", "--algo", "ppo", "--env", "helper_envs/NanAfter-v0", "--steps",
                "2048", "--out", str(out), "--quiet", "--set", "steps_per_iter=128",
                "--set", "minibatches=2", "--set", "epochs=1")
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "diverged" in err and "iteration 3" in err
    status = RunDir(out).read_status()
    assert status["state"] == "diverged" and status["iteration"] == 3
    assert [r["iteration"] for r in _metrics(out)] == [1, 2]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["policy"].values())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "Hoper-v5"], "Did you mean Hopper-v5"),
        (["--env", "nosuchmodule:Thing-v0"], "nosuchmodule"),
        (["--algo", "ppo2"], "unknown preset 'ppo2'"),
        (["--set", "polcy_lr=1e-3"], "Did you mean policy_lr"),
        (["--set", "epochs=ten"], "expects a value of type int"),
        (["--set", "gamma=1.5"], "'gamma' must lie in (0, 1]"),
        (["--set", "clip_eps=-1"], "'clip_eps' must be a positive"),
        (["--set", "activation=sigmoid"], "must be one of tanh, relu"),
        (["--set", "lr"], "--set expects key=value"),
    ],
)
def test_bad_input_clear_error_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = _cli("train", "--out", str(out), "--steps", "256", "--quiet", *args)
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_out_dir_holding_other_run_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli("train", "--env", "CartPole-v1", "--steps", "256", "--out", str(out), "--quiet",
                "--set", "steps_per_iter=256") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = _cli("train", "--env", "CartPole-v1", "--steps", "256", "--seed", "9", "--out",
                str(out), "--quiet", "--set", "steps_per_iter=256")
    assert code == EXIT_ERROR
    assert "already holds a different run" in capsys.readouterr().err
    code = _cli("train", "--env", "CartPole-v1", "--steps", "256", "--out", str(out), "--quiet",
                "--set", "steps_per_iter=256")
    assert code == EXIT_ERROR and "--resume" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    assert _cli("train", "--env", "CartPole-v1", "--out", str(tmp_path / "junk")) == EXIT_ERROR
    assert "not a pgscope run" in capsys.readouterr().err
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_missing_run_dir_and_corrupt_or_foreign_checkpoints(tmp_path, capsys):
    assert _cli("train", "--resume", str(tmp_path / "nope")) == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "run"
    train(make_config("ppo", "CartPole-v1", FAST), out, progress=False)
    metrics_before = (out / "metrics.jsonl").read_bytes()
    last = out / "checkpoints" / "last.pt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])  # truncated file
    assert _cli("train", "--resume", str(out)) == EXIT_ERROR
    assert "corrupt" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    with pytest.raises(Exception, match="corrupt"):
        load_agent(out)
    # a pickle that would run code when unpickled: refused by weights_only, never executed
    marker = tmp_path / "pwned"
    torch.save({"format": "pgscope-checkpoint", "evil": _Evil(marker)}, last)
    assert _cli("train", "--resume", str(out)) == EXIT_ERROR
    assert "corrupt or not a safe" in capsys.readouterr().err
    assert not marker.exists()
    # a checkpoint of another env (Pendulum) dropped into a CartPole run
    other = train(make_config("ppo", "Pendulum-v1", FAST), tmp_path / "other", progress=False)
    last.write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    assert _cli("train", "--resume", str(out)) == EXIT_ERROR
    assert "was made for spaces" in capsys.readouterr().err
    # torch.save of a random dict: foreign
    torch.save({"weights": torch.zeros(3)}, last)
    assert _cli("train", "--resume", str(out)) == EXIT_ERROR
    assert "not a pgscope checkpoint" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == metrics_before


def test_kill_dash_nine_and_resume_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "pgscope.cli", "train", "--algo", "ppo", "--env",
           "Pendulum-v1", "--steps", str(256 * 60), "--out", str(out), "--quiet",
           "--set", "steps_per_iter=256", "--set", "minibatches=4", "--set", "epochs=4"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = (out / "metrics.jsonl").read_text().count("\n") if (
            out / "metrics.jsonl").exists() else 0
        if lines >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_metrics(out))
    assert 5 <= done_before < 60, "the run must be killed mid-way"
    assert RunDir(out).read_status()["state"] == "running"
    resumed = subprocess.run(
        [sys.executable, "-m", "pgscope.cli", "train", "--resume", str(out), "--quiet"],
        env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    records = _metrics(out)
    assert [r["iteration"] for r in records] == list(range(1, 61))
    assert [r["env_steps"] for r in records] == [256 * i for i in range(1, 61)]
    assert RunDir(out).read_status()["state"] == "complete"
    # time_elapsed continues from the checkpoint rather than restarting at zero
    assert records[-1]["time_elapsed"] > records[done_before - 1]["time_elapsed"]


def test_resume_drops_metrics_lines_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = make_config("ppo", "CartPole-v1", FAST)
    train(cfg, out, progress=False)
    full = _metrics(out)
    # Simulate a kill after the metrics line of iteration 4 but before its checkpoint,
    # with a half-written line after it.
    (out / "checkpoints" / "last.pt").write_bytes(
        (out / "checkpoints" / "iter_000002.pt").read_bytes())
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "env_st')
    train(cfg, out, resume=True, progress=False)
    again = _metrics(out)
    assert [r["iteration"] for r in again] == [1, 2, 3, 4]
    assert again[:2] == full[:2]


def test_version_flag(capsys):
    from pgscope import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pgscope {__version__}"


def test_a_known_env_whose_package_is_missing_is_not_called_unknown(tmp_path, capsys):
    """LunarLander without Box2D was reported as 'unknown env id'."""
    pytest.importorskip("gymnasium")
    try:
        import Box2D  # noqa: F401
        pytest.skip("Box2D is installed here")
    except ImportError:
        pass
    assert main(["train", "--env", "LunarLander-v3", "--steps", "64", "--out",
                 str(tmp_path / "ll")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "needs a package that is not installed" in err and "unknown env id" not in err
    assert not (tmp_path / "ll").exists()


@pytest.mark.parametrize("argv, says", [
    (["train", "--out", "runs/x"], "pgscope train --resume runs/x"),
    (["train", "--resume", "runs/y"], "pgscope train --resume runs/y"),
    (["probe", "gradients", "runs/x", "--out", "p"], "does not resume: run it again"),
    (["evaluate", "runs/x"], "does not resume: run it again"),
    (["study", "run", "s.toml", "--out", "o"], "re-run the same 'pgscope study run'"),
])
def test_ctrl_c_advice_fits_the_command(argv, says):
    """Ctrl-C during a probe advised 'pgscope train --resume DIR'."""
    from pgscope.cli import _after_interrupt, build_parser

    advice = _after_interrupt(build_parser().parse_args(argv))
    assert says in advice and ("train --resume" not in advice or argv[0] == "train")


def test_top_level_help_lists_every_command(capsys):
    """The CLI's own description named 6 of its 11 commands."""
    import pgscope.cli as cli
    from pgscope.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0].choices
    assert len(commands) >= 11
    for name in commands:
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, name
        assert name in cli.__doc__.replace("|", " ").replace("`", " ").split(), name
