"""The sanity-env selftest is part of the suite: every sanity env, PPO and TRPO."""

import pytest

from pgscope.cli import main
from pgscope.selftest import CHECKS, run_check


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
@pytest.mark.parametrize("env_id", list(CHECKS))
def test_probe(env_id, algo, tmp_path):
    result = run_check(env_id, algo, workdir=tmp_path)
    assert result.passed, result.details


def test_selftest_command_reports_pass(capsys):
    assert main(["selftest", "--algo", "trpo"]) == 0
    out = capsys.readouterr().out
    assert "selftest: 7/7 passed" in out
