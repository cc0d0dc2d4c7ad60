"""The command line's shape: a parser built without torch (``pgscope --help`` is quick), every
option's help naming its default, ``pgscope probe KIND`` with only that probe's options,
and one name per kind of positional path."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

import pgscope.cli as cli
from pgscope.cli import EXIT_ERROR, build_parser, main
from pgscope.probes import KINDS, Probe, probe_names, probes, register_probe, setting_options

#: What building the parser must not import (each takes a noticeable part of a second).
HEAVY = ("torch", "gymnasium", "numpy", "pandas", "plotly", "matplotlib", "scipy")


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser under it, with the command words."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _flat(text: str) -> str:
    """``text`` without whitespace (argparse wraps help lines where it likes)."""
    return "".join(text.split())


# --- item: a light parser ------------------------------------------------------------------
def test_building_the_parser_imports_no_torch():
    out = _python("import sys, pgscope.cli\n"
                  "pgscope.cli.build_parser()\n"
                  f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.split() == []


def test_the_package_loads_its_components_on_first_use():
    """``import pgscope`` is light, yet a preset read through the config registers every
    component (the probe schedule's check and sink, the algorithms), and the function
    ``pgscope.train`` survives an import of the module ``pgscope.train``."""
    out = _python(
        "import importlib, sys\n"
        "import pgscope\n"
        "assert 'torch' not in sys.modules\n"
        "from pgscope.config import make_config\n"
        "from pgscope.errors import ConfigError\n"
        "try:\n"
        "    make_config('ppo', 'CartPole-v1', {'probe_kinds': 'gradient'})\n"
        "except ConfigError as exc:\n"
        "    print('refused:', 'probe_kinds' in str(exc))\n"
        "from pgscope.sinks import SINKS\n"
        "print('sink:', 'scheduled-probes' in SINKS)\n"
        "module = importlib.import_module('pgscope.train')\n"
        "print('function:', pgscope.train is module.train)\n"
        "from pgscope import train, load_agent\n"
        "print('same:', train is module.train, callable(load_agent))\n")
    assert out.split() == ["refused:", "True", "sink:", "True", "function:", "True", "same:",
                           "True", "True"]


def test_version_and_help_exit_before_any_command_runs(capsys):
    for argv in (["--version"], ["--help"], ["probe", "values", "--help"],
                 ["study", "summary", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "pgscope 0." in capsys.readouterr().out


# --- item: help and defaults ---------------------------------------------------------------
def test_every_option_has_help_that_names_its_default():
    checked = 0
    for path, parser in _parsers(build_parser()):
        text = _flat(parser.format_help())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:  # another probe's option (its own test)
                assert path[:1] == ("probe",), (path, action.dest)
                continue
            where = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where}: no help"
            default = action.default
            if default in (None, False, [], argparse.SUPPRESS):  # no default to name
                continue
            shown = cli.option_help(action)
            assert "default" in shown, f"{where}: its help does not name its default"
            if "default" not in action.help:  # the formatter named it, in every --help
                assert _flat(f"(default: {cli._shown(default)})") in text, where
            checked += 1
    assert checked > 40


def test_a_default_is_shown_as_it_is_typed():
    help_text = _flat(dict(_parsers(build_parser()))[("probe", "gradients")].format_help())
    assert _flat("(default: 100 1000 2048 10000 100000)") in help_text
    percent = argparse.Action(["--x"], "x", default="5%", help="a share")
    assert cli.option_help(percent) == "a share (default: 5%%)"  # argparse expands % once


# --- item: one parser per probe --------------------------------------------------------------
def _probe_help(kind: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main(["probe", kind, "--help"])
    return capsys.readouterr().out


def test_probe_kind_help_lists_only_that_probes_options(capsys):
    gradients = _probe_help("gradients", capsys)
    landscape = _probe_help("landscape", capsys)
    assert "--true-pairs" in gradients and "--sizes" in gradients
    assert "--landscape-grid" not in gradients and "--compare" not in gradients
    assert "--landscape-grid" in landscape and "--landscape-directions" in landscape
    assert "--true-pairs" not in landscape and "--sizes" not in landscape
    for shared in ("--out", "--checkpoint", "--seed", "--sb3", "--cleanrl"):
        assert shared in gradients and shared in landscape
    every = _probe_help("all", capsys)
    assert all(option.flag in every for option in setting_options().values())
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    listing = capsys.readouterr().out
    assert all(f"\n    {kind.name}" in listing for kind in KINDS)


def test_todays_probe_command_lines_still_parse():
    parse = build_parser().parse_args
    args = parse(["probe", "gradients", "runs/x", "--k", "4", "--sizes", "64", "256",
                  "--out", "p", "--true-pairs", "1e4"])
    assert (args.kind, str(args.run_dir), args.k, args.sizes, args.true_pairs) == \
        ("gradients", "runs/x", 4, [64, 256], 10_000)
    args = parse(["probe", "all", "--sb3", "m.zip", "--env", "Hopper-v5", "--out", "o",
                  "--compare", "a", "b", "--landscape-grid", "0", "1"])
    assert args.run_dir is None and [str(c) for c in args.compare] == ["a", "b"]
    # another probe's option (as bench/probes_hopper.py --extra passes to every probe)
    args = parse(["probe", "gradients", "r", "--out", "o", "--landscape-grid", "0", "1"])
    assert args.landscape_grid == [0.0, 1.0] and not hasattr(args, "fit_pairs")
    with pytest.raises(SystemExit):
        parse(["probe", "gradient", "r", "--out", "o"])


def test_another_probes_option_is_noted_as_having_no_effect(tmp_path, capsys):
    code = main(["probe", "gradients", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--landscape-grid", "0", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "the gradients probe does not read --landscape-grid" in err
    assert "--k" not in err  # its own options are not noted


def test_the_probe_kinds_the_cli_offers_are_the_registered_probes():
    assert tuple(kind.name for kind in KINDS) == probe_names()
    for kind in KINDS:
        assert set(kind.settings) == set(probes().get(kind.name).settings), kind.name
        assert kind.summary
    built_in = probes().get("values")
    with pytest.raises(ValueError, match="KINDS"):
        register_probe(Probe(**{**vars(built_in), "name": "values",
                                "settings": ("sizes",)}))
    assert probes().get("values") is built_in


# --- item: one name per kind of positional path --------------------------------------------
#: The names of positional arguments: RUN a run directory (or a checkpoint file), PATH a run
#: or a study (or a probe folder), and the directories of one kind each.
POSITIONAL_NAMES = {"RUN", "PATH", "STUDY", "SPEC", "DATASET", "EXPERIMENT", "NAME", "KIND",
                    "COMMAND"}


def test_positional_paths_have_one_name_per_kind():
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.metavar in POSITIONAL_NAMES, (path, action.dest, action.metavar)


def test_the_score_option_names_every_score_rule():
    from pgscope.study.spec import SCORE_RULES

    parsers = dict(_parsers(build_parser()))
    summary = parsers[("study", "summary")]
    score = next(a for a in summary._actions if "--score" in a.option_strings)
    for rule in SCORE_RULES:
        assert f"'{rule}'" in _flat(score.help or ""), rule
