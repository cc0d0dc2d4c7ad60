"""The "Closer Look at Deep Policy Gradients" probes (docs/design.md section 3).

Every probe takes a saved agent, draws fresh samples from its current policy with its
statistics frozen, and never changes it. ``run_probes`` computes what was asked and only
then writes ``DIR/<kind>.json`` and ``DIR/<kind>.png``, so a failure leaves nothing
half-written.

A probe is a :class:`Probe` that its module registers with :func:`register_probe` (its
name, what it computes from a :class:`ProbeInput`, the settings it reads, its checks, the
top-level keys of its result, its plot, its one-line headline, and its section of the HTML
report: a reading in plain words and its table); :func:`run_probes` and the report look
probes up by name and never branch on one. Every module of this package is
imported when the registry is first asked for, so adding a probe is one new file here
and its line in :data:`KINDS`, which the command line reads without importing any probe
(docs/architecture.md, "How to add a probe"). :mod:`pgscope.probes.schedule` runs probes
during training as a subscriber of the training events (:func:`pgscope.load_components`
imports it; this package itself imports neither it nor torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgscope.errors import ProbeError
from pgscope.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from pgscope.agent import Agent
    from pgscope.config import Config


#: The gradient grid's default sample sizes (state-action pairs): the paper's log grid
#: 1e2 .. 1e5 plus 2,048, the batch of one PPO update there (its "usual regime").
DEFAULT_SIZES: tuple[int, ...] = (100, 1000, 2048, 10_000, 100_000)


@dataclass(frozen=True)
class SettingOption:
    """How ``pgscope probe`` takes one :class:`ProbeSettings` field (the field's
    ``metadata["option"]``): its flag, its help, the type of each value (``"count"``: a
    whole number, ``1e6`` and ``1_000_000`` accepted; ``"float"``; ``"path"``), ``nargs``
    (None: one value; ``"+"``: one or more; ``"*"``: any number) and ``metavar``."""

    flag: str
    help: str
    value: str = "count"
    nargs: str | None = None
    metavar: str | None = None


def _option(flag: str, help: str, value: str = "count", nargs: str | None = None,
            metavar: str | None = None) -> dict[str, SettingOption]:
    return {"option": SettingOption(flag, help, value, nargs, metavar)}


@dataclass(frozen=True)
class ProbeSettings:
    """Every setting of a probe request (``pgscope probe`` options, each declared with its
    field: :func:`setting_options`); each probe reads its own (:attr:`Probe.settings`)."""

    sizes: tuple[int, ...] = field(default=DEFAULT_SIZES, metadata=_option(
        "--sizes", "sample sizes (state-action pairs) of the gradient grid", nargs="+",
        metavar="N"))
    k: int = field(default=10, metadata=_option(
        "--k", "independent estimates per sample size", metavar="K"))
    true_pairs: int = field(default=1_000_000, metadata=_option(
        "--true-pairs", "state-action pairs of the 'true' gradient the estimates are "
        "compared with", metavar="N"))
    value_pairs: int = field(default=100_000, metadata=_option(
        "--pairs", "fresh state-action pairs the value net is judged on (the features "
        "probe: states)", metavar="N"))
    fit_pairs: int = field(default=500_000, metadata=_option(
        "--fit-pairs", "pairs of Monte Carlo returns for the 'true' value baseline (the "
        "paper used 5e6)", metavar="N"))
    compare: tuple[str, ...] = field(default=(), metadata=_option(
        "--compare", "more runs whose per-iteration trust-region statistics are plotted "
        "with this one's", value="path", nargs="*", metavar="RUN"))
    landscape_counts: tuple[int, ...] = field(default=(2_000, 20_000, 100_000), metadata=_option(
        "--landscape-counts", "env steps of fresh rollouts per landscape grid point",
        nargs="+", metavar="N"))
    landscape_grid: tuple[float, ...] = field(default=(0, 0.75, 1.5, 2.25, 3.0),
                                              metadata=_option(
        "--landscape-grid", "multiples of the step and of the random direction",
        value="float", nargs="+", metavar="X"))
    landscape_directions: int = field(default=5, metadata=_option(
        "--landscape-directions", "random directions of the landscape (the paper used 1); "
        "means and 95% t-intervals over them", metavar="N"))


def setting_options() -> dict[str, SettingOption]:
    """Each :class:`ProbeSettings` field's command-line option, by field name."""
    return {f.name: f.metadata["option"] for f in fields(ProbeSettings)}


@dataclass(frozen=True)
class ProbeKind:
    """A built-in probe as the command line knows it without importing it (the probe
    modules import torch): its name, a one-line summary and the :class:`ProbeSettings` it
    reads, so that ``pgscope probe NAME`` offers exactly their options.
    :func:`register_probe` refuses a built-in probe whose settings differ from its kind's."""

    name: str
    summary: str
    settings: tuple[str, ...]


#: The built-in probes, in the order of ``all`` (:attr:`Probe.order`). A new probe module
#: of this package adds its line here too, so that ``pgscope probe`` offers it (a test
#: checks that the two agree).
KINDS: tuple[ProbeKind, ...] = (
    ProbeKind("gradients", "how well sampled policy gradients agree with each other and "
              "with a 'true' gradient, per sample size", ("sizes", "k", "true_pairs")),
    ProbeKind("values", "the value net's error against its GAE targets and against true "
              "returns", ("value_pairs",)),
    ProbeKind("baselines", "gradient variance with the agent's value net, a 'true' value "
              "net and no baseline", ("sizes", "k", "fit_pairs")),
    ProbeKind("landscape", "the surrogate objective vs the true return along the step and "
              "random directions", ("landscape_counts", "landscape_grid",
                                    "landscape_directions")),
    ProbeKind("trust-region", "ratios, KL and clip fractions per iteration and per epoch "
              "of a replayed update", ("compare",)),
    ProbeKind("features", "co-adaptation of the value net's penultimate features (DR3)",
              ("value_pairs",)),
)


@dataclass
class ProbeInput:
    """What a probe computes from: the run (or checkpoint file), the checkpoint's
    iteration (None: the latest), its config, the loaded agent, the settings, the seed."""

    run_dir: Path
    checkpoint: int | None
    config: Config
    agent: Agent
    settings: ProbeSettings
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Probe:
    """A probe as :func:`run_probes` sees it.

    ``compute(input)`` returns the JSON-ready result, whose top-level keys ``schema``
    describes; ``plot(result, path)`` writes its PNG; ``headline(result)`` is the line
    printed when it finishes; ``check(settings, config)`` raises :class:`ProbeError` for
    settings it cannot use, before anything is computed; ``settings`` names the
    :class:`ProbeSettings` fields it reads; ``order`` places it in ``all``.

    Its section of the HTML report (``pgscope report``): ``reading(result)`` is one
    sentence saying in plain words what the numbers mean, ``table(result)`` the main
    numbers as HTML (written with :mod:`pgscope.html_format`'s ``table``, ``fmt`` and
    ``interval_text``, every value escaped). Either may raise ``KeyError``, ``IndexError``,
    ``TypeError``, ``ValueError`` or ``ZeroDivisionError`` on a result it cannot read; the
    report then shows a generic sentence or a note. A probe without them (None, e.g. a
    plug-in's) gets the report's generic reading and table."""

    name: str
    description: str
    compute: Callable[[ProbeInput], dict[str, Any]]
    plot: Callable[[dict[str, Any], Path], None]
    headline: Callable[[dict[str, Any]], str]
    schema: Mapping[str, str]
    settings: tuple[str, ...] = ()
    check: Callable[[ProbeSettings, Config], None] | None = None
    order: int = 100
    reading: Callable[[dict[str, Any]], str] | None = None
    table: Callable[[dict[str, Any]], str] | None = None


_PROBES: Registry[Probe] = Registry("probe")
#: Modules of this package that hold shared pieces, not probes (not imported on discovery).
HELPER_MODULES = ("bootstrap", "plots", "sampling", "schedule")


def register_probe(probe: Probe) -> Probe:
    """Register ``probe`` under its name (``pgscope probe NAME``, config ``probe_kinds``);
    a built-in probe must read the settings its :data:`KINDS` entry declares."""
    unknown = set(probe.settings) - {f for f in ProbeSettings.__dataclass_fields__}
    if unknown:
        raise ValueError(f"probe '{probe.name}' reads unknown settings {sorted(unknown)}.")
    declared = {kind.name: kind.settings for kind in KINDS}.get(probe.name)
    if declared is not None and set(declared) != set(probe.settings):
        raise ValueError(f"probe '{probe.name}' reads settings {list(probe.settings)}, but "
                         f"pgscope.probes.KINDS (the command line's options) declares "
                         f"{list(declared)}.")
    return _PROBES.register(probe.name, probe)


def probe(name: str, *, order: int, settings: tuple[str, ...],
          plot: str | Callable[[dict[str, Any], Path], None],
          headline: Callable[[dict[str, Any]], str], schema: Mapping[str, str],
          check: Callable[[ProbeSettings, Config], None] | None = None,
          reading: Callable[[dict[str, Any]], str] | None = None,
          table: Callable[[dict[str, Any]], str] | None = None
          ) -> Callable[[Callable[[ProbeInput], dict[str, Any]]],
                        Callable[[ProbeInput], dict[str, Any]]]:
    """Register the decorated ``compute(input)`` as probe ``name`` (its docstring is the
    description; ``plot`` may name a function of :mod:`pgscope.probes.plots`; ``reading``
    and ``table`` are its section of the HTML report, see :class:`Probe`)."""
    def register(compute: Callable[[ProbeInput], dict[str, Any]]
                 ) -> Callable[[ProbeInput], dict[str, Any]]:
        description = " ".join((compute.__doc__ or name).split())
        plotter = plots_function(plot) if isinstance(plot, str) else plot
        register_probe(Probe(name, description, compute, plotter, headline, schema, settings,
                             check, order, reading, table))
        return compute

    return register


def probes() -> Registry[Probe]:
    """The probe registry, after importing every probe module of this package."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in HELPER_MODULES:
            importlib.import_module(f"{__name__}.{info.name}")
    return _PROBES


def probe_names() -> tuple[str, ...]:
    """Every registered probe, in the order of ``all``."""
    return tuple(p.name for p in sorted(probes().values(), key=lambda p: p.order))


def parse_kinds(kind: str) -> tuple[str, ...]:
    """'all', one kind, or a comma-separated list of kinds."""
    return _kinds(kind, probe_names())


def check_kinds(kind: str) -> None:
    """What :func:`parse_kinds` refuses, refused without importing a probe module (the
    config's check of ``probe_kinds`` runs for every config, and the probe modules import
    SciPy): the names are the built-ins' (:data:`KINDS`) and those registered since."""
    builtin = tuple(k.name for k in KINDS)
    _kinds(kind, (*builtin, *(n for n in _PROBES if n not in builtin)))


def _kinds(kind: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """``kind`` ('all', one kind or a comma-separated list) as names among ``names``;
    :class:`ValueError` naming the unknown ones."""
    kinds = names if kind == "all" else tuple(k.strip() for k in kind.split(",") if k.strip())
    bad = [k for k in kinds if k not in names]
    if bad or not kinds:
        raise ValueError(f"unknown probe '{', '.join(bad) or kind}'; choose from "
                         f"{', '.join(names)}, all (or a comma-separated list).")
    return kinds


def _check_settings(kinds: tuple[str, ...], run_dir: Path, out: Path | None,
                    checkpoint: int | None, settings: ProbeSettings) -> Config:
    """Every check that can fail, before any rollout or directory is made: the settings
    all probes share, then each probe's own. Returns the checkpoint's config."""
    from pgscope.config import Config
    from pgscope.run import RunDir, load_checkpoint, resolve_checkpoint

    _check_common(out, settings)
    ckpt_path = resolve_checkpoint(run_dir, checkpoint)  # a run directory or a file
    for other in settings.compare:
        RunDir.open(Path(other))
        if not RunDir(Path(other)).read_metrics():
            raise ProbeError(f"--compare '{other}' has no metrics lines yet.")
    cfg = Config.from_dict(load_checkpoint(ckpt_path)["config"])
    _check_each(kinds, settings, cfg)
    return cfg


def _check_common(out: Path | None, settings: ProbeSettings) -> None:
    """The settings every probe shares and the output folder (None: nothing written)."""
    if not settings.sizes or min(settings.sizes) < 2 or settings.k < 2:
        raise ProbeError("sample sizes and k must be at least 2.")
    for name, value in (("--true-pairs", settings.true_pairs), ("--pairs", settings.value_pairs),
                        ("--fit-pairs", settings.fit_pairs)):
        if value < 1:
            raise ProbeError(f"{name} must be a positive number of pairs, got {value}.")
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--out '{out}' is a file; probe results need a directory.")
    parent = next((q for q in (out, *out.parents) if q.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ProbeError(f"cannot write probe results under '{parent}'; choose another --out.")


def _check_each(kinds: tuple[str, ...], settings: ProbeSettings, cfg: Config) -> None:
    """Each probe's own check of the settings against the agent's config."""
    registry = probes()
    for name in kinds:
        check = registry.get(name).check
        if check is not None:
            check(settings, cfg)


def headline(kind: str, result: dict[str, Any]) -> str:
    """One line with the probe's main numbers (printed as each probe finishes)."""
    try:
        return probes().get(kind).headline(result)
    except (KeyError, IndexError, TypeError, UnknownNameError):
        return f"{kind}: done"


def plots_function(name: str) -> Callable[[dict[str, Any], Path], None]:
    """``plot(result, path)`` calling :mod:`pgscope.probes.plots`'s function ``name``, which
    is imported on the first call (matplotlib loads only when a probe plots)."""
    def plot(result: dict[str, Any], path: Path) -> None:
        from pgscope.probes import plots

        getattr(plots, name)(result, path)

    return plot


def interval(d: Mapping[str, float]) -> str:
    """``mean [ci_low, ci_high]`` of a bootstrap summary, for headlines."""
    return f"{d['mean']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"


def run_probes(kind: str, run_dir: str | Path | None, out: str | Path | None, *,
               agent: Agent | None = None,
               checkpoint: int | None = None, seed: int = 0, progress: bool = True,
               sizes: tuple[int, ...] = DEFAULT_SIZES, k: int = 10,
               true_pairs: int = 1_000_000, value_pairs: int = 100_000,
               compare: tuple[str | Path, ...] = (), fit_pairs: int = 500_000,
               landscape_counts: tuple[int, ...] = (2_000, 20_000, 100_000),
               landscape_grid: tuple[float, ...] = (0, 0.75, 1.5, 2.25, 3.0),
               landscape_directions: int = 5,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run probe ``kind`` (a registered probe, 'all', or a comma-separated list) on a
    run's checkpoint and write each probe's JSON and PNG into ``out`` as soon as that probe
    finishes (each file atomically). Every setting is checked before anything is computed.
    Each JSON records what was measured: the run, the checkpoint's iteration and env
    steps, the pgscope version and every setting. ``log(line)`` (default: print to
    stderr) receives one headline per finished probe. Returns the results by kind.

    ``agent`` (any object of the agent protocol, :class:`pgscope.adapters.ProbeAgent`,
    e.g. an SB3 or CleanRL model loaded by :mod:`pgscope.adapters`) replaces the run:
    ``run_dir`` is then None, and the probes that read a run directory (a replayed update,
    metrics) get a temporary one holding the agent as its iteration-0 checkpoint (see
    :func:`agent_run_dir`). ``out`` None computes without writing files."""
    import sys
    import tempfile

    from pgscope import __version__
    from pgscope.run import load_agent, load_checkpoint, resolve_checkpoint

    try:
        kinds = parse_kinds(kind)
    except ValueError as exc:
        raise ProbeError(str(exc)) from None
    if (agent is None) == (run_dir is None):
        raise ProbeError("give a run directory or an agent, not both or neither.")
    settings = ProbeSettings(tuple(sizes), k, true_pairs, value_pairs, fit_pairs,
                             tuple(str(c) for c in compare), tuple(landscape_counts),
                             tuple(landscape_grid), landscape_directions)
    out = None if out is None else Path(out)
    recorded = {"kinds": list(kinds), "checkpoint": checkpoint, "seed": seed,
                **{key: list(value) if isinstance(value, tuple) else value
                   for key, value in asdict(settings).items()}}
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr)

    if agent is not None:
        from pgscope.run import RunDir

        cfg = agent.config
        _check_common(out, settings)
        for other in settings.compare:
            RunDir.open(Path(other))
        _check_each(kinds, settings, cfg)
        with tempfile.TemporaryDirectory(prefix="pgscope-agent-") as tmp:
            request = ProbeInput(agent_run_dir(agent, Path(tmp) / "run"), None, cfg, agent,
                                 settings, seed, progress)
            measured: dict[str, Any] = {"run": None, "agent": type(agent).__name__,
                                        "env_id": cfg.env_id, "iteration": None,
                                        "env_steps": None}
            return _compute_all(kinds, request, out, measured, recorded, log, __version__)

    assert run_dir is not None
    run_dir = Path(run_dir)
    cfg = _check_settings(kinds, run_dir, out, checkpoint, settings)
    ckpt_path = resolve_checkpoint(run_dir, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    measured = {"run": str(run_dir), "checkpoint_file": str(ckpt_path),
                "iteration": int(ckpt["iteration"]), "env_steps": int(ckpt["env_steps"])}
    del ckpt
    request = ProbeInput(run_dir, checkpoint, cfg, load_agent(run_dir, checkpoint), settings,
                         seed, progress)
    return _compute_all(kinds, request, out, measured, recorded, log, __version__)


def _compute_all(kinds: tuple[str, ...], request: ProbeInput, out: Path | None,
                 measured: dict[str, Any], recorded: dict[str, Any],
                 log: Callable[[str], None], version: str) -> dict[str, Any]:
    """Compute each probe of ``kinds`` and (with ``out``) write its JSON and PNG."""
    registry = probes()
    results: dict[str, Any] = {}
    for name in kinds:
        probe = registry.get(name)
        result = probe.compute(request)
        result["checkpoint"] = measured
        result["pgscope_version"] = version
        result["probe_settings"] = recorded
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            _atomic_text(out / f"{name}.json", json.dumps(result, indent=2, default=float))
            tmp = out / f".{name}.tmp.png"
            probe.plot(result, tmp)
            os.replace(tmp, out / f"{name}.png")
        results[name] = result
        log(headline(name, result))
    return results


def agent_run_dir(agent: Agent, path: Path) -> Path:
    """A run directory at ``path`` whose only checkpoint (iteration 0, 0 env steps, a fresh
    optimizer) holds ``agent`` and whose metrics file is empty: what the probes that read
    a run (the trust-region and landscape probes replay pgscope's update rule for the
    agent's config from it) get for an agent that was not trained by pgscope."""
    from pgscope.agent import spaces_signature
    from pgscope.algos.common import make_optimizer
    from pgscope.config import config_hash
    from pgscope.envs import make_env
    from pgscope.run import RunDir, atomic_write_json, save_checkpoint

    cfg = agent.config
    run = RunDir(path)
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.config_path, {"config": cfg.to_dict(),
                                        "config_hash": config_hash(cfg)})
    run.metrics_path.touch()
    env = make_env(cfg.env_id)
    try:
        spaces = spaces_signature(env.observation_space, env.action_space)
    finally:
        env.close()
    save_checkpoint(run.last_checkpoint, agent, iteration=0, env_steps=0,
                    optimizer=make_optimizer(cfg, agent.policy, agent.value_net), extra={},
                    spaces=spaces)
    return path


def run(kind: str, *, agent: Agent, env: str | None = None, out: str | Path | None = None,
        **settings: Any) -> dict[str, Any]:
    """Run probe ``kind`` (a registered probe, 'all', or a comma-separated list) on
    ``agent``: any object of the agent protocol (:class:`pgscope.adapters.ProbeAgent`),
    e.g. ``pgscope.adapters.load_sb3("model.zip", "Hopper-v5")``. ``env`` (default: the
    agent's ``config.env_id``) is the env the fresh rollouts use; ``out`` a folder for
    the JSON and PNG files (None: only return the results); ``settings`` are
    :func:`run_probes`'s keywords (``sizes``, ``k``, ``true_pairs``, ``seed``, ...)."""
    import copy
    from dataclasses import replace

    if env is not None and env != agent.config.env_id:
        agent = copy.copy(agent)  # the caller's agent keeps its env
        agent.config = replace(agent.config, env_id=env)
    return run_probes(kind, None, out, agent=agent, **settings)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def scheduled_probe_failures(run_dir: Path) -> set[int]:
    """Iterations whose scheduled probes failed during training (``probes/failures.jsonl``);
    training does not retry them, 'pgscope probe' can."""
    path = Path(run_dir) / "probes" / "failures.jsonl"
    if not path.exists():
        return set()
    failed = set()
    for line in path.read_text().splitlines():
        try:
            failed.add(int(json.loads(line)["iteration"]))
        except (ValueError, KeyError, TypeError):
            continue
    return failed


def scheduled_probes(run_dir: Path, iteration: int, progress: bool = False,
                     kinds: str | None = None) -> Path:
    """The probes a config schedules with ``probe_every`` (or ``kinds``), on the run's
    checkpoint of ``iteration``, written to ``run_dir/probes/iter_XXXXXX/`` (built in a
    temporary folder, then renamed, so a folder that exists is complete)."""
    import shutil

    from pgscope.run import RunDir

    cfg = RunDir.open(run_dir).read_config()
    final = run_dir / "probes" / f"iter_{iteration:06d}"
    if final.exists():
        return final
    tmp = run_dir / "probes" / f".iter_{iteration:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run_probes(kinds or cfg.probe_kinds, run_dir, tmp, checkpoint=iteration,
               seed=cfg.seed + iteration,
               progress=progress, log=lambda line: None,
               sizes=cfg.probe_sizes, k=cfg.probe_k, true_pairs=cfg.probe_true_pairs,
               value_pairs=cfg.probe_value_pairs, fit_pairs=cfg.probe_true_pairs,
               landscape_counts=(2_000,), landscape_grid=(0, 1, 2))
    os.replace(tmp, final)
    return final


__all__ = ["HELPER_MODULES", "KINDS", "Probe", "ProbeInput", "ProbeKind", "ProbeSettings",
           "SettingOption", "agent_run_dir", "check_kinds",
           "headline", "interval", "parse_kinds", "plots_function", "probe", "probe_names",
           "probes", "register_probe", "setting_options",
           "run", "run_probes",
           "scheduled_probe_failures", "scheduled_probes"]
