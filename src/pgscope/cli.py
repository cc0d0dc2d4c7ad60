"""Command line: ``pgscope train | status | selftest | demo | probe | study | doctor |
report | evaluate | export | dr3 | presets`` (``pgscope --help`` lists them with what each
does).

Every :class:`pgscope.errors.PgscopeError` becomes one ``error: ...`` line on stderr and a
non-zero exit status; nothing already written is removed.

Building the parser imports neither torch nor gymnasium (``pgscope --help`` is quick): each
command's function imports what it needs, and what the parser shows comes from light
modules (the probes' options from :data:`pgscope.probes.KINDS`). Every option's help names
its default (:func:`option_help`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgscope.config import make_config, parse_overrides
from pgscope.errors import DivergenceError, PgscopeError
from pgscope.perturb import KINDS as PERTURBATION_KINDS
from pgscope.probes import KINDS, ProbeSettings, setting_options

if TYPE_CHECKING:
    from pgscope.agent import Agent

EXIT_ERROR = 2
EXIT_DIVERGED = 3
#: Errors that re-running a study cannot fix (the run's own input is wrong).
PERMANENT_ERRORS = ("ConfigError", "EnvError", "CheckpointError", "ProbeError",
                    "DependencyError")


def count(text: str) -> int:
    """An argparse type for counts that accepts ``1000000``, ``1e6`` and ``1_000_000``."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'")
    return int(value)


def _train(args: argparse.Namespace) -> int:
    from pgscope.train import resume, train

    if args.seeds is not None:
        return _train_seeds(args)
    if args.batch_size is not None:
        raise PgscopeError("--batch-size applies to --seeds only.")
    if args.resume:
        given = [flag for flag, value in (("--preset", args.preset), ("--env", args.env),
                                          ("--seed", args.seed), ("--set", args.set),
                                          ("--out", args.out),
                                          ("--tensorboard", args.tensorboard),
                                          ("--wandb", args.wandb)) if value]
        if given:
            sinks = [flag for flag in given if flag in ("--tensorboard", "--wandb")]
            raise PgscopeError(
                f"{', '.join(given)} cannot be combined with --resume: a resumed run keeps "
                "its own config (only --steps N, to extend it, and --repair are allowed)."
                + (f" To add {' or '.join(sinks)} output to the run, use 'pgscope export "
                   f"{args.resume} {' '.join(sinks)}'." if sinks else ""))
        out = resume(args.resume, progress=not args.quiet, total_steps=args.steps,
                     repair=args.repair)
    else:
        if args.out is None:
            raise PgscopeError("--out DIR is required (or --resume DIR to continue a run).")
        if args.repair:
            raise PgscopeError("--repair applies to --resume only.")
        overrides = parse_overrides(args.set or [])
        for key, value in (("seed", args.seed), ("total_steps", args.steps)):
            if value is not None:
                overrides[key] = value
        if args.tensorboard:
            overrides["tensorboard"] = True
        if args.wandb:
            overrides["wandb"] = True
        cfg = make_config(args.preset or "ppo", args.env or "Hopper-v5", overrides)
        out = train(cfg, args.out, progress=not args.quiet)
    print(f"run complete: {out}  (metrics: {out / 'metrics.jsonl'}, "
          f"checkpoints: {out / 'checkpoints'})")
    return 0


def _train_seeds(args: argparse.Namespace) -> int:
    """``train --seeds``: the seeds trained together (batches of ``--batch-size``)."""
    from pgscope.train import DEFAULT_BATCH_SIZE, parse_seeds, train_seeds

    seeds = parse_seeds(args.seeds)
    if args.seed is not None or args.repair:
        raise PgscopeError("--seeds cannot be combined with --seed or --repair.")
    size = args.batch_size or DEFAULT_BATCH_SIZE
    if args.resume:
        if args.preset or args.env or args.set or args.out or args.tensorboard or args.wandb:
            raise PgscopeError("with --resume DIR --seeds, the runs keep their own configs "
                               "(only --steps N, to extend them, is allowed).")
        members = train_seeds(None, seeds, args.resume, batch_size=size, resume=True,
                              progress=not args.quiet, total_steps=args.steps)
    else:
        if args.out is None:
            raise PgscopeError("--out DIR is required: each seed trains into DIR/seed_<s>/.")
        overrides = parse_overrides(args.set or [])
        if args.steps is not None:
            overrides["total_steps"] = args.steps
        if args.tensorboard:
            overrides["tensorboard"] = True
        if args.wandb:
            overrides["wandb"] = True
        cfg = make_config(args.preset or "ppo", args.env or "Hopper-v5", overrides)
        members = train_seeds(cfg, seeds, args.out, batch_size=size, progress=not args.quiet)
    for m in members:
        print(f"{m.path}: {m.state}" + (f" ({m.error})" if m.error else ""))
    states = {m.state for m in members}
    return 0 if states == {"complete"} else EXIT_DIVERGED if "diverged" in states \
        else EXIT_ERROR


def _status(args: argparse.Namespace) -> int:
    from pgscope.status import collect_status, format_status

    rows = collect_status(args.path)
    print(format_status(rows))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from pgscope.selftest import run_selftest

    results = run_selftest(algos=args.algo or ("ppo", "trpo"), verbose=True)
    failed = [r for r in results if not r.passed]
    print(f"selftest: {len(results) - len(failed)}/{len(results)} passed")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from pgscope.metrics import metric_value
    from pgscope.train import train

    out = Path(args.out)
    iterations = -(-args.steps // 2048)
    cfg = make_config("ppo", "Hopper-v5", {"total_steps": args.steps, "seed": 0,
                                           "probe_every": iterations,
                                           "probe_kinds": "gradients,values",
                                           "checkpoint_every": max(1, iterations // 4)})
    print(f"pgscope demo: PPO on Hopper-v5 for {args.steps} env steps, then the gradient "
          f"and value probes on the final agent and the trust-region probe on an update "
          f"from the middle of training -> {out}")
    if (out / "config.json").exists():
        train(cfg, out, resume=True)
    else:
        train(cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{'iter':>5} {'steps':>8} {'return':>9} {'KL':>8} {'max ratio':>9} {'clip%':>6} "
          f"{'EV':>6}")
    shown = records[:: max(1, len(records) // 12)]
    for r in shown + ([records[-1]] if shown[-1] is not records[-1] else []):
        ret = "-" if r["return_mean"] is None else f"{r['return_mean']:.1f}"
        ev = "-" if r["explained_variance"] is None else f"{r['explained_variance']:.2f}"
        print(f"{r['iteration']:>5} {r['env_steps']:>8} {ret:>9} {r['kl_mean']:>8.4f} "
              f"{metric_value(r, 'ratio_max_after'):>9.2f} "
              f"{100 * metric_value(r, 'clip_fraction_after'):>5.1f}% {ev:>6}")
    probes = out / "probes" / f"iter_{iterations:06d}"
    grads = json.loads((probes / "gradients.json").read_text())
    values = json.loads((probes / "values.json").read_text())
    print("\nprobes of the final policy (95% bootstrap CIs):")
    note = grads["settings"].get("few_samples_note")
    if note:
        print(f"  (intervals over K estimates per size: {note})")
    for row in grads["policy"]:
        pc, ct = row["pairwise_cosine"], row["cosine_to_true"]
        print(f"  {row['n']:>6} pairs: gradient pairwise cosine {pc['mean']:.2f} "
              f"[{pc['ci_low']:.2f}, {pc['ci_high']:.2f}], cosine to 'true' gradient "
              f"{ct['mean']:.2f} [{ct['ci_low']:.2f}, {ct['ci_high']:.2f}]")
    for key, label in (("vs_gae_targets", "its GAE targets"), ("vs_true_returns", "true returns")):
        e = values[key]["relative_error"]
        print(f"  value net relative error vs {label}: {e['mean']:.2f} "
              f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]")
    from pgscope.probes import scheduled_probes
    from pgscope.probes.trust_region import representative_checkpoint
    from pgscope.report.probes import reading

    middle = scheduled_probes(out, representative_checkpoint(out), kinds="trust-region")
    if (middle / "trust-region.json").exists():  # (a one-iteration run has no middle)
        trust = json.loads((middle / "trust-region.json").read_text())
        print(f"\ntrust region: {reading('trust-region', trust)}")
    print(f"\nresults: {out.resolve()}\n  config.json, metrics.jsonl (one line per iteration), "
          f"checkpoints/, probes/ (JSON + PNG)")
    from pgscope.doctor import diagnose
    from pgscope.report import write_report

    alarms = ", ".join(f.alarm for f in diagnose(out)) or "healthy, no alarm fired"
    print(f"doctor: {alarms} (details: pgscope doctor {out})")
    clip = out / "videos" / "final.mp4"
    if not clip.exists():
        try:
            from pgscope.evaluate import evaluate

            evaluate(out, episodes=1, deterministic=True, video=clip)
        except Exception as exc:  # noqa: BLE001 - the clip is optional (needs EGL)
            print(f"(no clip of the final policy: {type(exc).__name__}: {exc})")
    report = write_report(out)
    print(f"report: {report.resolve()}  (one HTML file; open it in a browser)")
    return 0


def _external_agent(args: argparse.Namespace) -> Agent | None:
    """The agent of ``--sb3`` or ``--cleanrl`` (None for a pgscope run)."""
    if args.sb3 is None and args.cleanrl is None:
        if args.run_dir is None:
            raise PgscopeError("give a run directory, --sb3 MODEL.zip or --cleanrl CHECKPOINT.")
        if args.vecnormalize or args.obs_stats or args.set or args.env:
            raise PgscopeError("--env, --vecnormalize, --obs-stats and --set apply to --sb3 "
                               "and --cleanrl agents only.")
        return None
    if args.run_dir is not None or (args.sb3 is not None and args.cleanrl is not None):
        raise PgscopeError("give one of a run directory, --sb3 and --cleanrl.")
    if args.env is None:
        raise PgscopeError("--sb3 and --cleanrl need --env ENV_ID (the env the agent was "
                           "trained on).")
    from pgscope.adapters import load_cleanrl, load_sb3

    overrides = parse_overrides(args.set or [])
    if args.sb3 is not None:
        if args.obs_stats:
            raise PgscopeError("--obs-stats is for --cleanrl; SB3 statistics come with "
                               "--vecnormalize STATS.pkl --trust-pickle.")
        return load_sb3(args.sb3, args.env, vecnormalize=args.vecnormalize,
                        trust_pickle=args.trust_pickle, overrides=overrides,
                        clip_range=overrides.get("clip_eps"))
    if args.cleanrl_arch is None:
        raise PgscopeError("--cleanrl needs --cleanrl-arch continuous|discrete.")
    if args.vecnormalize:
        raise PgscopeError("--vecnormalize is for --sb3; CleanRL statistics come with "
                           "--obs-stats STATS.npz.")
    return load_cleanrl(args.cleanrl, args.env, args.cleanrl_arch, obs_stats=args.obs_stats,
                        overrides=overrides)


def _probe(args: argparse.Namespace) -> int:
    from pgscope.probes import run_probes

    agent = _external_agent(args)
    reads = _probe_settings(args.kind)
    settings: dict[str, Any] = {}
    for name, option in setting_options().items():
        dest = _dest(option.flag)
        if not hasattr(args, dest):  # another probe's option, not given
            continue
        value = getattr(args, dest)
        if name not in reads:
            print(f"note: the {args.kind} probe does not read {option.flag}; it has no "
                  "effect here.", file=sys.stderr)
        if value is not None:
            settings[name] = tuple(value) if isinstance(value, list) else value
    results = run_probes(args.kind, args.run_dir, args.out, agent=agent,
                         checkpoint=args.checkpoint, seed=args.seed, progress=not args.quiet,
                         **settings)
    from pgscope.html_format import text_tables
    from pgscope.report.probes import numbers, reading

    for kind, result in results.items():  # each probe's own reading and table
        print(f"\n{kind}: {reading(kind, result)}\n{text_tables(numbers(kind, result))}")
    print(f"\nprobe results: {Path(args.out).resolve()}")
    return 0


def _study_run(args: argparse.Namespace) -> int:
    from pgscope.study import builtin_study, load_spec, run_study

    if (args.spec is None) == (args.preset is None):
        raise PgscopeError("give a study spec (STUDY.toml) or --preset NAME, not both or "
                           "neither; 'pgscope study presets' lists the built-in studies.")
    if args.quick and args.preset is None:
        raise PgscopeError("--quick applies to built-in studies (--preset NAME) only.")
    spec = builtin_study(args.preset, args.quick) if args.preset else load_spec(args.spec)
    if args.address and args.backend != "ray":
        raise PgscopeError("--address needs --backend ray.")
    if args.workers is not None and args.workers < 1:
        raise PgscopeError("--workers must be >= 1.")
    out = args.out or Path("runs") / spec.name
    if out.exists() and not out.is_dir():
        raise PgscopeError(f"--out '{out}' is a file; a study needs a directory.")
    n_runs = len(spec.configs) * len(spec.envs) * len(spec.seeds)
    print(f"study {spec.name}: {len(spec.configs)} configs x {len(spec.envs)} envs x "
          f"{len(spec.seeds)} seeds = {n_runs} runs of {spec.total_steps} steps -> {out}")
    for flag, value in (("--batch-size", args.batch_size), ("--ship-every", args.ship_every)):
        if value is not None and value < 1:
            raise PgscopeError(f"{flag} must be >= 1.")
    if args.ship_every is not None and args.backend != "ray":
        raise PgscopeError("--ship-every needs --backend ray.")
    outcome = run_study(spec, out, backend=args.backend, workers=args.workers,
                        address=args.address, progress=not args.quiet,
                        batch_size=args.batch_size, ship_every=args.ship_every or 1)
    print(f"{outcome.runs} runs: {outcome.skipped} already finished, "
          f"{len(outcome.complete)} completed now, {len(outcome.diverged)} diverged, "
          f"{len(outcome.failed)} failed")
    for key, err in outcome.failed.items():
        print(f"  failed: {key}: {err}", file=sys.stderr)
    if outcome.failed:
        permanent = [key for key, err in outcome.failed.items()
                     if err.split(":")[0] in PERMANENT_ERRORS]
        if permanent:
            print(f"{len(permanent)} run(s) failed on bad input or an unusable env/checkpoint "
                  "(above): re-running as is will fail again; fix the cause first.",
                  file=sys.stderr)
        if len(permanent) < len(outcome.failed):
            print("re-run the same command to retry the other failed runs (they resume from "
                  "their checkpoints).", file=sys.stderr)
        return 1
    print(f"next: pgscope study summary {out}")
    return 0


def _study_summary(args: argparse.Namespace) -> int:
    from pgscope.study.analysis import format_summary, write_summary
    from pgscope.study.robustness import format_study_robustness, load_study_robustness

    result = write_summary(args.dir, args.out, plots=not args.no_plots, score=args.score)
    print(format_summary(result))
    robustness = load_study_robustness(args.dir)
    if robustness is not None:
        print(f"\nrobustness (pgscope study robustness, from "
              f"{robustness['files'][0]}):\n{format_study_robustness(robustness, False)}")
    print(f"\nwritten: {', '.join(p.name for p in result['files'])} in "
          f"{Path(result['files'][0]).parent}")
    return 0


def _study_robustness(args: argparse.Namespace) -> int:
    from pgscope.study.robustness import format_study_robustness, print_progress, study_robustness

    result = study_robustness(args.dir, args.perturb, episodes=args.episodes,
                              deterministic=args.deterministic, seed=args.seed, out=args.out,
                              progress=None if args.quiet else print_progress,
                              workers=args.workers)
    print(format_study_robustness(result))
    return 0


def _study_presets(args: argparse.Namespace) -> int:
    from pgscope.study import BUILTIN_STUDIES, builtin_study

    for name in BUILTIN_STUDIES:
        for quick in (False, True):
            spec = builtin_study(name, quick)
            print(f"{name + (' --quick' if quick else ''):38s} {len(spec.configs):2d} configs x "
                  f"{len(spec.envs)} envs x {len(spec.seeds):2d} seeds x "
                  f"{spec.total_steps:>9,} steps  ({', '.join(spec.envs)})")
        print(f"{'':38s} {spec.description}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from pgscope.presets_view import format_preset_list, format_presets

    if not args.names:
        if args.diff:
            raise PgscopeError("--diff compares two presets: pgscope presets A B --diff.")
        print(format_preset_list())
        return 0
    print(format_presets(args.names, args.env, diff_only=args.diff))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from pgscope.doctor import (
        RunData,
        check,
        diagnose_study,
        format_findings,
        format_study,
        is_study,
    )

    if is_study(args.path):
        rows = diagnose_study(args.path)
        fired = any(r["findings"] for r in rows)
        if args.json:
            print(json.dumps([dict(r, findings=[f.to_dict() for f in r["findings"]])
                              for r in rows], indent=2))
        else:
            print(format_study(rows))
        return 1 if fired else 0
    data = RunData.load(args.path)
    findings = check(data)
    if args.json:
        print(json.dumps({"run": str(args.path), "state": data.status.get("state"),
                          "iterations": len(data.records),
                          "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        print(format_findings(findings, str(args.path)))
    return 1 if findings else 0


def _report(args: argparse.Namespace) -> int:
    from pgscope.report import write_report

    out = write_report(args.path, args.out, video=args.video)
    print(f"report: {out.resolve()}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pgscope.evaluate import evaluate, format_evaluation

    if args.perturb or args.out:
        return _evaluate_robustness(args)
    result = evaluate(args.run_dir, checkpoint=args.checkpoint, episodes=args.episodes,
                      deterministic=args.deterministic, seed=args.seed, video=args.video,
                      video_episodes=args.video_episodes)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    return EXIT_ERROR if "video_error" in result else 0


def _evaluate_robustness(args: argparse.Namespace) -> int:
    """``pgscope evaluate --perturb``: the perturbation strings are checked first."""
    from pgscope.perturb import parse_perturbations

    if not args.perturb:
        raise PgscopeError("--out applies to --perturb only.")
    perturbations = parse_perturbations(args.perturb)
    if args.video is not None:
        raise PgscopeError("--video cannot be combined with --perturb: evaluate once with "
                           "--video, once with --perturb.")
    from pgscope.robustness import default_output, evaluate_robustness, format_robustness

    result = evaluate_robustness(args.run_dir, perturbations, checkpoint=args.checkpoint,
                                 episodes=args.episodes, deterministic=args.deterministic,
                                 seed=args.seed, out=args.out or default_output(args.run_dir))
    print(json.dumps(result, indent=2) if args.json else format_robustness(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pgscope.export import export, format_export

    formats = [name for name in ("tensorboard", "csv", "wandb") if getattr(args, name)]
    if not formats:
        raise PgscopeError("say what to export: --tensorboard, --csv and/or --wandb.")
    print(format_export(export(args.path, formats, out=args.out, force=args.force)))
    return 0


def _shown(value: object) -> str:
    """A default as it is typed on the command line (a list: its values, space-separated)."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def option_help(action: argparse.Action) -> str:
    """The help ``--help`` shows for ``action``: its help string, then ``(default: ...)``
    when it has a default (not None, False or empty) that the help does not name itself."""
    text = action.help or ""
    default = action.default
    if (default is None or default is False or default is argparse.SUPPRESS
            or (isinstance(default, (list, tuple)) and not default)
            or text == argparse.SUPPRESS or "default" in text):
        return text
    return f"{text} (default: {_shown(default).replace('%', '%%')})"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, with each option's default (:func:`option_help`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return option_help(action)


class _Parser(argparse.ArgumentParser):
    """The parser of ``pgscope`` and of every subcommand (argparse makes a subcommand's
    parser of its parent's class): its help names every option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _probe_settings(kind: str) -> tuple[str, ...]:
    """The settings that ``pgscope probe KIND`` offers: those its probe reads; ``all``:
    every setting."""
    if kind == "all":
        return tuple(setting_options())
    return next(k.settings for k in KINDS if k.name == kind)


def _dest(flag: str) -> str:
    """The attribute argparse stores an option in (``--true-pairs`` -> ``true_pairs``)."""
    return flag.lstrip("-").replace("-", "_")


#: How the values of a probe setting are parsed (:attr:`pgscope.probes.SettingOption.value`).
_SETTING_TYPES: dict[str, Callable[[str], Any]] = {"count": count, "float": float,
                                                   "path": Path}


def _add_probe_parser(sub: Any) -> None:
    """``pgscope probe KIND``: one parser per built-in probe (:data:`pgscope.probes.KINDS`)
    and ``all``. Each shows the options of the settings its probe reads; it accepts the
    other probes' options too, unlisted (a command line may pass the same options to every
    probe), and :func:`_probe` notes that they have no effect."""
    pb = sub.add_parser("probe", help="run a Closer-Look probe on a run's checkpoint",
                        description="Run a probe on a run's checkpoint (or on an SB3 or "
                        "CleanRL agent) and write DIR/<probe>.json and DIR/<probe>.png "
                        "(--out DIR). 'pgscope probe KIND --help' lists a probe's options.")
    kinds = pb.add_subparsers(dest="kind", required=True, metavar="KIND", title="probes")
    defaults = ProbeSettings()
    names = ", ".join(k.name for k in KINDS)
    every = [*((k.name, k.summary) for k in KINDS),
             ("all", f"every probe above, in this order ({names})")]
    for name, summary in every:
        kp = kinds.add_parser(name, help=summary, description=f"{name}: {summary}. Writes "
                              "DIR/<probe>.json and DIR/<probe>.png (--out DIR).")
        kp.add_argument("run_dir", metavar="RUN", type=Path, nargs="?",
                        help="a pgscope run directory or checkpoint file (or use --sb3 / "
                             "--cleanrl)")
        kp.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the folder for the results (created)")
        kp.add_argument("--checkpoint", type=int, metavar="ITER",
                        help="a kept checkpoint's iteration (default: the latest)")
        kp.add_argument("--seed", type=int, default=0,
                        help="seed of the fresh rollouts and random draws")
        kp.add_argument("--quiet", action="store_true", help="no progress bars")
        reads = _probe_settings(name)
        own = kp.add_argument_group("settings of " + ("the probes" if name == "all" else
                                                      f"the {name} probe"))
        for setting, option in setting_options().items():
            value = getattr(defaults, setting)
            spec: dict[str, Any] = dict(type=_SETTING_TYPES[option.value], nargs=option.nargs,
                                        metavar=option.metavar)
            if setting in reads:
                if isinstance(value, tuple):
                    value = list(value) or None
                own.add_argument(option.flag, default=value,
                                 help=option.help.replace("%", "%%"), **spec)
            else:  # another probe's: accepted, not listed, absent unless given
                kp.add_argument(option.flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                **spec)
        _add_agent_options(kp)
        kp.set_defaults(func=_probe)


def _add_agent_options(parser: argparse.ArgumentParser) -> None:
    """``pgscope probe``'s options for an agent trained elsewhere (docs/adapters.md)."""
    ext = parser.add_argument_group(
        "agents trained elsewhere (docs/adapters.md)",
        "probe an SB3 or CleanRL agent instead of a pgscope run; the landscape and "
        "trust-region probes then replay pgscope's PPO update with the agent's "
        "hyperparameters from a fresh optimizer, and have no training metrics")
    ext.add_argument("--sb3", type=Path, metavar="MODEL.zip",
                     help="a Stable-Baselines3 PPO or A2C model (MlpPolicy); its weights "
                          "load without unpickling")
    ext.add_argument("--vecnormalize", type=Path, metavar="STATS.pkl",
                     help="the model's VecNormalize statistics (VecNormalize.save). This "
                          "file is a pickle: loading it can run arbitrary code, so it is "
                          "read only with --trust-pickle")
    ext.add_argument("--trust-pickle", action="store_true",
                     help="allow unpickling --vecnormalize (only for files you trust)")
    ext.add_argument("--cleanrl", type=Path, metavar="CHECKPOINT",
                     help="a CleanRL ppo / ppo_continuous_action agent saved with "
                          "torch.save(agent.state_dict())")
    ext.add_argument("--cleanrl-arch", choices=["continuous", "discrete"],
                     help="CleanRL layout: continuous (critic, actor_mean, actor_logstd) or "
                          "discrete (critic, actor)")
    ext.add_argument("--obs-stats", type=Path, metavar="STATS.npz",
                     help="CleanRL normalization statistics: mean, var, count (and "
                          "optionally return_var, return_count)")
    ext.add_argument("--env", help="the env the agent was trained on (gymnasium id)")
    ext.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value the agent's files do not hold (e.g. "
                          "gamma, steps_per_iter, clip_eps); repeatable")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pgscope", description="PPO and TRPO with every implementation detail as a "
        "switch, and the probes, statistics and health checks to see what each does. "
        "'pgscope COMMAND --help' describes a command.")
    from pgscope import __version__

    p.add_argument("--version", action="version", version=f"pgscope {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands")

    t = sub.add_parser("train", help="train an agent into a run directory")
    t.add_argument("--preset", "--algo", dest="preset", metavar="PRESET",
                   help="the preset, as 'pgscope presets' lists them (--algo is an alias; "
                        "default: ppo)")
    t.add_argument("--env", help="any gymnasium id, or module:EnvName-v0 (default: "
                   "Hopper-v5)")
    t.add_argument("--steps", type=count,
                   help="total env steps, 1e6 works (default: the preset's total_steps); "
                        "with --resume: extend the run to this")
    t.add_argument("--seed", type=int, help="the run's seed (default: 0)")
    t.add_argument("--seeds", metavar="LIST",
                   help="train these seeds together (e.g. 0-15 or 0,1,2) into "
                        "OUT/seed_<s>/ (each seed's numbers are those it gets alone)")
    t.add_argument("--batch-size", type=int, metavar="N",
                   help="with --seeds: seeds per batch (default: 16)")
    t.add_argument("--out", type=Path, help="the new run directory (required unless "
                   "--resume)")
    t.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue a killed or finished run from its last checkpoint")
    t.add_argument("--repair", action="store_true",
                   help="with --resume: drop damaged metrics lines (a backup is kept)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/tensorboard/ (SB3 tag "
                        "names; the same as --set tensorboard=true)")
    t.add_argument("--wandb", action="store_true",
                   help="also log to a Weights & Biases run (SB3 tag names, the config as W&B "
                        "config; needs 'pip install wandb'; WANDB_MODE=offline works; the "
                        "same as --set wandb=true)")
    t.set_defaults(func=_train)

    stp = sub.add_parser("status", help="state of a run or of every run of a study")
    stp.add_argument("path", metavar="PATH", type=Path,
                     help="a run directory or a study directory")
    stp.set_defaults(func=_status)

    s = sub.add_parser("selftest", help="run the sanity-env selftest")
    s.add_argument("--algo", action="append", choices=["ppo", "trpo"],
                   help="test only this algorithm; repeatable (default: ppo and trpo)")
    s.set_defaults(func=_selftest)

    d = sub.add_parser("demo", help="short PPO run on Hopper-v5 with a summary")
    d.add_argument("--out", default="runs/demo", metavar="RUN",
                   help="the run directory (an existing one is resumed)")
    d.add_argument("--steps", type=count, default=100_000, help="total env steps")
    d.set_defaults(func=_demo)

    _add_probe_parser(sub)  # pgscope probe KIND: one parser per probe

    st = sub.add_parser("study", help="run and summarize studies (configs x envs x seeds)")
    st_sub = st.add_subparsers(dest="study_command", required=True, metavar="COMMAND",
                               title="commands")
    sr = st_sub.add_parser("run", help="run or resume a study")
    sr.add_argument("spec", metavar="SPEC", nargs="?", type=Path,
                    help="a study TOML file (or --preset NAME)")
    sr.add_argument("--preset", help="a built-in study instead of a TOML file ('pgscope "
                    "study presets' lists them)")
    sr.add_argument("--quick", action="store_true", help="the built-in study's small size")
    sr.add_argument("--out", type=Path, metavar="STUDY",
                    help="the study directory (default: runs/<the study's name>)")
    sr.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="where the runs train: processes on this machine, or Ray")
    sr.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    sr.add_argument("--workers", type=int, help="parallel runs (default: one per core)")
    sr.add_argument("--batch-size", type=int,
                    help="at most this many seeds of a config trained as one batch (default: "
                         "the spec's batch_size, else 16; 1: every run alone)")
    sr.add_argument("--ship-every", type=int, help="Ray: ship each run to the study "
                    "directory after every N-th checkpoint (default: 1)")
    sr.add_argument("--quiet", action="store_true", help="no progress output")
    sr.set_defaults(func=_study_run)
    ss = st_sub.add_parser("summary", help="tables (CSV, JSON) and plots (PNG) of a study")
    ss.add_argument("dir", metavar="STUDY", type=Path, help="a study directory")
    ss.add_argument("--out", type=Path, metavar="DIR",
                    help="where to write (default: STUDY/summary)")
    ss.add_argument("--no-plots", action="store_true", help="tables only, no PNG plots")
    ss.add_argument("--score", metavar="RULE", help="a named score rule instead of the "
                    "spec's [score] (the default): 'engstrom-code' = each run's mean return "
                    "over its last 5 iterations (the authors' run.py), 'last-10' (alias "
                    "'paper') over its last 10, 'eval-last' its last evaluation during "
                    "training (eval_every); then the mean over runs with a CI")
    ss.set_defaults(func=_study_summary)
    sb = st_sub.add_parser("robustness", help="robustness curves of every complete run "
                           "(pgscope evaluate --perturb per seed), averaged over seeds with "
                           "CIs, into STUDY/summary and the study report")
    sb.add_argument("dir", metavar="STUDY", type=Path, help="a study directory")
    sb.add_argument("--perturb", action="append", required=True,
                    metavar="KIND=LEVEL[,LEVEL...]", help="a perturbation and its levels; "
                    f"repeatable; KIND: {', '.join(PERTURBATION_KINDS.names())}")
    sb.add_argument("--episodes", type=count, default=10, help="episodes per level and run")
    sb.add_argument("--workers", type=count, default=1,
                    help="runs evaluated at once, each in its own process (default: 1; the "
                         "tables are the same for any number)")
    sb.add_argument("--seed", type=int, default=0,
                    help="episode i starts from env.reset(seed=SEED + i)")
    sb.add_argument("--stochastic", dest="deterministic", action="store_false",
                    help="sample actions (default: the policy's mean/mode)")
    sb.add_argument("--out", type=Path, metavar="DIR",
                    help="where to write (default: STUDY/summary, where the report looks)")
    sb.add_argument("--quiet", action="store_true", help="no progress lines")
    sb.set_defaults(func=_study_robustness)
    sp = st_sub.add_parser("presets", help="list the built-in studies")
    sp.set_defaults(func=_study_presets)

    dr = sub.add_parser("doctor", help="health checks of a run or of every run of a study "
                        "(exit status 1 when an alarm fires)")
    dr.add_argument("path", metavar="PATH", type=Path,
                    help="a run directory or a study directory")
    dr.add_argument("--json", action="store_true", help="findings as JSON")
    dr.set_defaults(func=_doctor)

    rp = sub.add_parser("report", help="one self-contained HTML report of a run, a probe "
                        "output folder or a study")
    rp.add_argument("path", metavar="PATH", type=Path,
                    help="a run directory, a probe output folder or a study directory")
    rp.add_argument("--out", type=Path, metavar="FILE",
                    help="the HTML file (default: PATH/report.html)")
    rp.add_argument("--video", type=Path, metavar="FILE", help="a clip (mp4/gif) to embed "
                    "(default: the newest in PATH/videos/)")
    rp.set_defaults(func=_report)

    ev = sub.add_parser("evaluate", help="mean return of a checkpoint with a bootstrap CI "
                        "(frozen normalization), optionally a video")
    ev.add_argument("run_dir", metavar="RUN", type=Path,
                    help="a run directory or checkpoint file")
    ev.add_argument("--checkpoint", type=int, metavar="ITER",
                    help="a kept checkpoint's iteration (default: the latest)")
    ev.add_argument("--episodes", type=count, default=10, help="episodes to play")
    mode = ev.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true",
                      default=True, help="the policy's mean/mode (the default, as "
                      "Agent.act and SB3's evaluate_policy)")
    mode.add_argument("--stochastic", dest="deterministic", action="store_false",
                      help="sample actions from the policy, as training does")
    ev.add_argument("--seed", type=int, default=0,
                    help="episode i starts from env.reset(seed=SEED + i)")
    ev.add_argument("--video", type=Path, metavar="FILE",
                    help="render episodes offscreen to FILE (.mp4 or .gif)")
    ev.add_argument("--video-episodes", type=int, default=1,
                    help="episodes in the video (default: 1)")
    ev.add_argument("--json", action="store_true", help="the result as JSON")
    ev.add_argument("--perturb", action="append", metavar="KIND=LEVEL[,LEVEL...]",
                    help="robustness curve: the return at each level of a perturbation, "
                         "normalized by the unperturbed return, with CIs and an AUC; "
                         f"repeatable; KIND: {', '.join(PERTURBATION_KINDS.names())} "
                         "(docs/robustness.md)")
    ev.add_argument("--out", type=Path, metavar="FILE",
                    help="with --perturb: the curves as JSON (default: RUN/robustness.json)")
    ev.set_defaults(func=_evaluate)

    ex = sub.add_parser("export", help="write TensorBoard, CSV or W&B output of a finished "
                        "run (or every run of a study) from its metrics.jsonl, as the "
                        "training sinks would have")
    ex.add_argument("path", metavar="PATH", type=Path,
                    help="a run directory or a study directory")
    ex.add_argument("--tensorboard", action="store_true",
                    help="event files in RUN/tensorboard/ (SB3 tag names at step = env "
                         "steps; the config as hparams)")
    ex.add_argument("--csv", action="store_true", help="RUN/metrics.csv")
    ex.add_argument("--wandb", action="store_true",
                    help="a W&B run (the config as W&B config; WANDB_MODE=offline works; "
                         "needs 'pip install wandb'), recorded in RUN/wandb.json")
    ex.add_argument("--out", type=Path, metavar="DIR",
                    help="write here instead: the TensorBoard logdir and the CSV go to DIR "
                         "(a study's runs: DIR/<run's path in the study>/), W&B's local "
                         "files to DIR/wandb/")
    ex.add_argument("--force", action="store_true",
                    help="replace an earlier export (W&B: make another W&B run)")
    ex.set_defaults(func=_export)

    from pgscope.dr3.commands import add_dr3_parser  # pgscope dr3 dataset | train | summary

    add_dr3_parser(sub)

    pr = sub.add_parser("presets", help="list presets and what they switch; with NAME every "
                        "key of that preset, with two names both side by side")
    pr.add_argument("names", nargs="*", metavar="NAME", help="one or two presets")
    pr.add_argument("--env", default="Hopper-v5", help="resolve for this env (default: "
                    "Hopper-v5): per-env values differ")
    pr.add_argument("--diff", action="store_true", help="only the keys where two presets "
                    "differ")
    pr.set_defaults(func=_presets)
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and --version end here, light
    from pgscope import load_components

    load_components()  # the registries every command may read are complete, as always
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a kill(1) records 'interrupted' too
    try:
        return args.func(args)
    except DivergenceError as exc:
        print(f"error: training diverged: {exc} The last good checkpoint is kept; see "
              "status.json in the run directory.", file=sys.stderr)
        return EXIT_DIVERGED
    except PgscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130


def _after_interrupt(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C, by command: only what trains can be resumed."""
    if args.command == "train":
        where = args.resume or (args.out if args.seeds is None else None)
        target = f"'pgscope train --resume {where}'" if where else (
            "the same 'pgscope train --seeds ... --resume OUT'")
        return f"to resume, run {target}."
    if args.command == "study" and getattr(args, "study_command", None) == "run":
        return "to resume, re-run the same 'pgscope study run' command."
    if args.command == "dr3":
        return "to resume, re-run the same 'pgscope dr3 train' command."
    return "this command does not resume: run it again to start over."


if __name__ == "__main__":
    sys.exit(main())
