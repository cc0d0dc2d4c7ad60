"""The output of ``pgscope train --seeds ... --out D`` (D/seed_<s>/ runs of one config) is a
study of one config: status, doctor, study summary and report accept D and see every
seed, with the config the runs trained (preset and changed keys)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pgscope import make_config
from pgscope.cli import main
from pgscope.doctor import diagnose_study, is_study
from pgscope.errors import ConfigError, RunDirError
from pgscope.report import write_report
from pgscope.run import RunDir
from pgscope.status import collect_status
from pgscope.study.analysis import load_study
from pgscope.study.runner import open_study, prepare_study_dir
from pgscope.study.spec import is_study_dir, seeds_study
from pgscope.train import train_seeds

SEEDS = (0, 2, 5)
TINY = dict(steps_per_iter=64, minibatches=2, epochs=1, hidden=(8,), total_steps=2 * 64,
            ent_coef=0.01)


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seeds") / "D"
    train_seeds(make_config("ppo", "CartPole-v1", TINY), SEEDS, out, batch_size=2,
                progress=False)
    return out


def test_the_seed_runs_are_a_study_of_their_config(seeds_dir):
    assert is_study_dir(seeds_dir) and is_study(seeds_dir)
    assert not is_study_dir(seeds_dir / "seed_0")  # a run is not a study
    spec = open_study(seeds_dir)
    assert spec == seeds_study(seeds_dir)
    assert spec.seeds == SEEDS and spec.envs == ("CartPole-v1",)
    assert spec.total_steps == TINY["total_steps"] and spec.labels == ["ppo"]
    assert [r.rel_path for r in spec.runs()] == [f"seed_{s}" for s in SEEDS]
    # the spec rebuilds each run's own config exactly
    for r in spec.runs():
        saved = RunDir(seeds_dir / r.rel_path).read_config()
        assert r.config.to_dict() == saved.to_dict()
        assert r.config.ent_coef == 0.01 and r.config.seed == r.seed


def test_status_doctor_summary_and_report_accept_it(seeds_dir, capsys):
    assert [row.run for row in collect_status(seeds_dir)] == [f"seed_{s}" for s in SEEDS]
    assert [row["seed"] for row in diagnose_study(seeds_dir)] == list(SEEDS)
    frame = load_study(seeds_dir)
    assert sorted(set(frame["seed"])) == list(SEEDS) and set(frame["label"]) == {"ppo"}
    page = write_report(seeds_dir, seeds_dir.parent / "report.html").read_text()
    for s in SEEDS:
        assert f"seed_{s}" in page
    for argv in (["status", str(seeds_dir)], ["doctor", str(seeds_dir)],
                 ["study", "summary", str(seeds_dir), "--no-plots"]):
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "neither" not in out and "seed_5" in out


def test_export_takes_it_as_a_study(seeds_dir, tmp_path):
    from pgscope.export import export

    export(seeds_dir, ["csv"], out=tmp_path / "csv")
    assert sorted(p.parent.name for p in (tmp_path / "csv").rglob("metrics.csv")) == [
        f"seed_{s}" for s in SEEDS]


def test_seed_runs_of_different_configs_are_refused_naming_the_key(seeds_dir, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(seeds_dir, mixed)
    cfg_path = mixed / "seed_2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["ent_coef"] = 0.5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="seed_2 differs from seed_0 in 'ent_coef'"):
        open_study(mixed)


def test_a_study_run_into_it_and_an_empty_folder_are_refused(seeds_dir, tmp_path):
    with pytest.raises(RunDirError, match="train --seeds"):
        prepare_study_dir(seeds_dir, open_study(seeds_dir))
    (tmp_path / "empty").mkdir()
    assert not is_study_dir(tmp_path / "empty")
    with pytest.raises(RunDirError, match="not a pgscope study directory"):
        open_study(tmp_path / "empty")


def test_a_run_stopped_before_its_first_status_reads_interrupted(seeds_dir, tmp_path):
    """A run directory made but stopped before it wrote status.json (e.g. a study stopped
    while its workers started) is shown as interrupted, with what to do, not 'unknown'."""
    from pgscope.status import run_status

    run = tmp_path / "early"
    shutil.copytree(seeds_dir / "seed_0", run)
    (run / "status.json").unlink()
    (run / "writer.lock").unlink(missing_ok=True)
    row = run_status(run)
    assert row.state == "interrupted" and "resuming continues it" in (row.error or "")
