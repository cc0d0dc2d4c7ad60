"""A study: configs x envs x seeds, read from a TOML file or built from a preset.

A spec is validated completely before anything is written: every (config, env) pair is
resolved with :func:`pgscope.config.make_config`, so a mistyped key or value fails with the
same message as on the ``pgscope train`` command line. The TOML format::

    name = "clip-vs-noclip"
    envs = ["Hopper-v5"]
    seeds = 5                    # or a list: [0, 1, 2, 3, 4]
    total_steps = 200_000
    set = { num_envs = 1 }       # optional overrides for every config
    batch_size = 8               # optional: at most this many seeds trained as one batch

    [[configs]]
    label = "ppo"                # a unique name; also the run directories' name
    preset = "ppo"
    [[configs]]
    label = "noclip"
    preset = "ppo"
    clip_eps = 1e32              # any config key overrides the preset

    [[configs]]
    label = "trpo"               # a family: one config per point of its grid, labelled
    preset = "trpo"              # trpo.max_kl=0.01, ... (pgscope.study.sweep)
    sweep = { max_kl = { log = [0.003, 0.3], points = 5 } }

    [factorial]                  # optional: all combinations of some switches
    base = "ppo"
    factors = { value_clip = [true, false], lr_anneal = [true, false] }

    # sweep = { policy_lr = [1e-4, 1e-3] }  # top level: sweeps every config without its own

    [score]                      # the final score of a run (recorded with the results)
    last_fraction = 0.1          # mean return over the last 10% of iterations
    # last_iterations = 10       # ... or over the last 10 iterations
    # rule = "paper"             # ... or a named rule (SCORE_RULES); score = "paper" too
    failure_threshold = { "Hopper-v5" = 1000.0 }

    [statistics]
    reps = 2000                  # bootstrap resamples
    level = 0.95
    seed = 0
    baseline = "ppo"             # compare every config with this one ("all": every pair)
    compare = "baseline"
    relative_difference = 0.1    # power analysis: detect a 10% difference in mean score ...
    alpha = 0.05
    power = 0.8                  # ... with this power
    lottery_splits = 0           # > 0: split each config's seeds at random into two halves
    sensitivity_fraction = 0.1   # sweeps: near-best = mean score >= best - 0.1 |best|

    [probes]                     # optional probe schedule during training
    every = 10
    kinds = "gradients,values"
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgscope.config import Config, make_config
from pgscope.errors import ConfigError
from pgscope.study.sweep import SweepSpec, parse_sweep

LABEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")
TOP_KEYS = ("name", "description", "envs", "seeds", "total_steps", "set", "configs",
            "factorial", "score", "statistics", "probes", "batch_size", "sweep")
PROBE_KEYS = {"every": "probe_every", "kinds": "probe_kinds", "sizes": "probe_sizes",
              "k": "probe_k", "true_pairs": "probe_true_pairs",
              "value_pairs": "probe_value_pairs"}


#: Named score rules (``score = "paper"`` in a spec, ``pgscope study summary --score
#: paper``): the [score] values each one fixes, and its description.
SCORE_RULES: dict[str, tuple[dict[str, Any], str]] = {
    "engstrom-code": (dict(last_fraction=None, last_iterations=5),
                      "the authors' code's score (MadryLab/implementation-matters, "
                      "src/run.py, final_results table, '5_rewards'): each run's mean "
                      "episode return over its last 5 iterations, then the mean over runs "
                      "with its CI (column mean)"),
    "last-10": (dict(last_fraction=None, last_iterations=10),
                "each run's mean episode return over its last 10 iterations, then the mean "
                "over runs with its CI (column mean); the rule pgscope first attributed to "
                "Engstrom et al. (2020), whose code computes the last 5 ('engstrom-code')"),
    "paper": (dict(last_fraction=None, last_iterations=10),
              "'last-10' under its earlier name (kept so that specs and commands written "
              "with it still read): each run's mean episode return over its last 10 "
              "iterations; the authors' code's own score is 'engstrom-code' (last 5)"),
    "eval-last": (dict(last_fraction=None, last_evaluations=1),
                  "each run's last evaluation during training (config eval_every): the mean "
                  "return of its eval_episodes episodes on separate envs with the final "
                  "policy (eval_return of the last iteration), then the mean over runs with "
                  "its CI (column mean)"),
}


@dataclass(frozen=True)
class ScoreSpec:
    """How a run's final score is computed from its learning curve."""

    last_fraction: float | None = 0.1
    last_iterations: int | None = None
    failure_threshold: dict[str, float] = field(default_factory=dict)
    rule: str | None = None  # the name in SCORE_RULES this score follows, if any
    # the mean of eval_return over the last N evaluations during training (eval_every)
    # instead of a window of iterations of return_mean
    last_evaluations: int | None = None

    @classmethod
    def named(cls, rule: str, failure_threshold: dict[str, float] | None = None
              ) -> ScoreSpec:
        """The score of rule ``rule`` of :data:`SCORE_RULES`."""
        if rule not in SCORE_RULES:
            close = difflib.get_close_matches(str(rule), list(SCORE_RULES), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown score rule '{rule}'.{hint} Rules: "
                              f"{', '.join(SCORE_RULES)}.")
        return cls(**SCORE_RULES[rule][0], failure_threshold=dict(failure_threshold or {}),
                   rule=rule)

    def window(self, num_iterations: int) -> int:
        """How many of the last iterations are averaged (of the last evaluations, for a
        score of ``eval_return``: :attr:`last_evaluations`)."""
        if self.last_evaluations is not None:
            return self.last_evaluations
        if self.last_iterations is not None:
            return min(self.last_iterations, num_iterations)
        return max(1, round(float(self.last_fraction or 0.1) * num_iterations))

    def describe(self) -> str:
        if self.rule is not None:
            return SCORE_RULES[self.rule][1]
        if self.last_evaluations is not None:
            return (f"mean of the evaluation return during training (eval_return) over the "
                    f"last {self.last_evaluations} evaluations")
        if self.last_iterations is not None:
            return (f"mean of the per-iteration mean episode return over the last "
                    f"{self.last_iterations} iterations")
        return (f"mean of the per-iteration mean episode return over the last "
                f"{100 * float(self.last_fraction or 0.1):g}% of iterations")


@dataclass(frozen=True)
class StatsSpec:
    """Settings of the statistics (all intervals are seeded, so reproducible)."""

    reps: int = 2000
    level: float = 0.95
    seed: int = 0
    baseline: str | None = None  # default: the first config
    compare: str = "baseline"  # or "all"
    relative_difference: float = 0.1
    alpha: float = 0.05
    power: float = 0.8
    lottery_splits: int = 0
    # a sweep's near-best region: points whose mean score >= best - f |best|
    sensitivity_fraction: float = 0.1


@dataclass(frozen=True)
class ConfigSpec:
    label: str
    preset: str
    overrides: dict[str, Any]


#: The file that marks a study directory (written by ``pgscope study run``).
STUDY_FILE = "study.json"
#: How a study lays out its run directories: ``study`` (``runs/<label>/<env>/seed_<s>``,
#: ``pgscope study run``) or ``seeds`` (``seed_<s>``: ``pgscope train --seeds ... --out``).
LAYOUTS = ("study", "seeds")


@dataclass(frozen=True)
class RunSpec:
    """One (config, env, seed) of a study and its run directory, relative to the study."""

    label: str
    env_id: str
    seed: int
    config: Config
    layout: str = "study"

    @property
    def rel_path(self) -> str:
        if self.layout == "seeds":
            return f"seed_{self.seed}"
        return f"runs/{self.label}/{safe_name(self.env_id)}/seed_{self.seed}"


@dataclass(frozen=True)
class StudySpec:
    name: str
    envs: tuple[str, ...]
    seeds: tuple[int, ...]
    total_steps: int
    configs: tuple[ConfigSpec, ...]
    score: ScoreSpec = ScoreSpec()
    statistics: StatsSpec = StatsSpec()
    factors: tuple[str, ...] = ()  # keys varied factorially (main-effect tables)
    description: str = ""
    batch_size: int | None = None  # runs per batch of seeds (None: the runner's default)
    layout: str = "study"  # of its run directories (LAYOUTS)
    # the swept families (pgscope.study.sweep); their points are among ``configs``, which
    # carry the swept values, so the identity hash covers them
    sweeps: tuple[SweepSpec, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.configs]

    @property
    def baseline(self) -> str:
        return self.statistics.baseline or self.configs[0].label

    def runs(self) -> list[RunSpec]:
        """Every run, configs outermost and seeds innermost."""
        out = []
        for c in self.configs:
            for env in self.envs:
                for seed in self.seeds:
                    cfg = make_config(c.preset, env, {**c.overrides, "seed": seed,
                                                      "total_steps": self.total_steps})
                    out.append(RunSpec(c.label, env, seed, cfg, self.layout))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        return cls(
            name=data["name"], envs=tuple(data["envs"]), seeds=tuple(data["seeds"]),
            total_steps=data["total_steps"],
            configs=tuple(ConfigSpec(c["label"], c["preset"], dict(c["overrides"]))
                          for c in data["configs"]),
            score=ScoreSpec(**data["score"]), statistics=StatsSpec(**data["statistics"]),
            factors=tuple(data.get("factors", ())), description=data.get("description", ""),
            batch_size=data.get("batch_size"), layout=data.get("layout", "study"),
            sweeps=tuple(SweepSpec.from_dict(s) for s in data.get("sweeps", ())))

    def hash(self) -> str:
        """Identity of what is run (name, envs, seeds, budget and configs); the analysis
        settings are left out, so they can change without invalidating finished runs."""
        what = {k: v for k, v in self.to_dict().items()
                if k in ("name", "envs", "seeds", "total_steps", "configs")}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()
                              ).hexdigest()[:16]


def seed_runs(path: str | Path) -> dict[int, Path]:
    """The run directories ``seed_<s>/`` (holding a config.json) directly under ``path``,
    by seed: what ``pgscope train --seeds ... --out PATH`` writes."""
    out = {}
    for child in Path(path).glob("seed_*"):
        m = re.fullmatch(r"seed_(\d+)", child.name)
        if m and (child / "config.json").exists():
            out[int(m.group(1))] = child
    return dict(sorted(out.items()))


def is_study_dir(path: str | Path) -> bool:
    """Whether ``path`` is a study: a ``pgscope study run`` directory (``study.json``) or
    the seed runs of ``pgscope train --seeds`` (a study of one config), not a run."""
    path = Path(path)
    if (path / "config.json").exists() or not path.is_dir():
        return False
    return (path / STUDY_FILE).exists() or bool(seed_runs(path))


def seeds_study(path: str | Path) -> StudySpec:
    """The study that the seed runs of ``pgscope train --seeds ... --out PATH`` are: one
    config (labelled by its preset, with the keys it changed from it as overrides), one
    env, the seeds found, laid out as ``seed_<s>/``. Runs whose configs differ in more
    than the seed are refused, naming the keys."""
    from pgscope.run import RunDir

    runs = seed_runs(path)
    if not runs:
        raise ConfigError(f"'{path}' holds no seed runs (seed_<s>/ with a config.json).")
    cfgs = {seed: RunDir(run).read_config() for seed, run in runs.items()}
    first = next(iter(cfgs.values()))
    values = first.to_dict()
    for seed, cfg in cfgs.items():
        differ = sorted(k for k, v in cfg.to_dict().items() if k != "seed" and v != values[k])
        if differ:
            raise ConfigError(
                f"'{path}' is read as a study of one config, but seed_{seed} differs from "
                f"seed_{first.seed} in {', '.join(repr(k) for k in differ)}.")
    preset = make_config(first.preset, first.env_id).to_dict()
    overrides = {k: v for k, v in values.items() if k not in (
        "preset", "env_id", "seed", "total_steps") and v != preset.get(k)}
    return StudySpec(name=Path(path).resolve().name, envs=(first.env_id,),
                     seeds=tuple(runs), total_steps=first.total_steps,
                     configs=(ConfigSpec(first.preset, first.preset, overrides),),
                     description=f"the seed runs of {first.preset} on {first.env_id} "
                                 f"(pgscope train --seeds)", layout="seeds")


def safe_name(text: str) -> str:
    """A directory-safe version of an env id ('ale_py:ALE/Pong-v5' -> 'ale_py_ALE_Pong-v5')."""
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", text)


# --- parsing ------------------------------------------------------------------------------
def _check_table_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key '{key}' in {where}.{hint} "
                              f"Allowed: {', '.join(allowed)}.")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _abbrev(key: str) -> str:
    return "".join(part[0] for part in key.split("_") if part)


def factorial_configs(base: str, factors: dict[str, list[Any]], common: dict[str, Any]
                      ) -> list[ConfigSpec]:
    """All combinations of the factors' values on top of preset ``base``. Labels read
    ``ppo+vc-rs`` for booleans (on/off, initials of the key) and ``ppo.rm=0.01`` otherwise."""
    _need(bool(factors), "[factorial] needs at least one factor in 'factors'.")
    for key, values in factors.items():
        _need(isinstance(values, list) and len(values) >= 1,
              f"[factorial] factor '{key}' needs a list of values, got {values!r}.")
    keys = list(factors)
    out = []
    for combo in itertools.product(*(factors[k] for k in keys)):
        label = base
        for key, value in zip(keys, combo, strict=True):
            if isinstance(value, bool):
                label += ("+" if value else "-") + _abbrev(key)
            else:
                label += f".{_abbrev(key)}={value:g}" if isinstance(value, float) \
                    else f".{_abbrev(key)}={value}"
        out.append(ConfigSpec(label, base, {**common, **dict(zip(keys, combo, strict=True))}))
    return out


def _expand_sweeps(configs: list[ConfigSpec], own: list[Any], top: Any, source: str
                   ) -> tuple[list[ConfigSpec], list[SweepSpec]]:
    """Each config with a sweep (its own, else the top-level ``sweep``) replaced by its
    grid points' configs; the sweeps in spec order."""
    out: list[ConfigSpec] = []
    sweeps: list[SweepSpec] = []
    for i, c in enumerate(configs):
        grid = own[i] if i < len(own) and own[i] is not None else top
        if grid is None:
            out.append(c)
            continue
        sweep, points = parse_sweep(c.label, c.preset, grid, c.overrides, source)
        sweeps.append(sweep)
        out += [ConfigSpec(label, c.preset, overrides) for label, overrides in points]
    return out, sweeps


def parse_spec(data: dict[str, Any], source: str = "study spec") -> StudySpec:
    """Validate a TOML-shaped dict into a :class:`StudySpec` (raises :class:`ConfigError`)."""
    _check_table_keys(data, TOP_KEYS, source)
    for key in ("name", "envs", "seeds", "total_steps"):
        _need(key in data, f"{source}: '{key}' is required.")
    name = data["name"]
    _need(isinstance(name, str) and bool(name.strip()), f"{source}: 'name' must be a text.")
    envs = data["envs"]
    _need(isinstance(envs, list) and bool(envs) and all(isinstance(e, str) for e in envs),
          f"{source}: 'envs' must be a non-empty list of env ids.")
    _need(len(set(envs)) == len(envs), f"{source}: 'envs' lists an env twice.")
    seeds = data["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        _need(seeds >= 1, f"{source}: 'seeds' must be >= 1, got {seeds}.")
        seeds = list(range(seeds))
    _need(isinstance(seeds, list) and bool(seeds) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
        f"{source}: 'seeds' must be a count or a list of seeds >= 0.")
    _need(len(set(seeds)) == len(seeds), f"{source}: 'seeds' lists a seed twice.")
    steps = data["total_steps"]
    _need(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
          f"{source}: 'total_steps' must be a positive integer, got {steps!r}.")

    common = dict(data.get("set", {}))
    probes = dict(data.get("probes", {}))
    _check_table_keys(probes, tuple(PROBE_KEYS), f"{source} [probes]")
    common.update({PROBE_KEYS[k]: v for k, v in probes.items()})
    for key in ("seed", "total_steps", "preset", "env_id"):
        _need(key not in common, f"{source}: '{key}' is set by the study, not by 'set'.")

    configs: list[ConfigSpec] = []
    own_sweeps: list[Any] = []  # per config: its own 'sweep' table, or None
    for i, entry in enumerate(data.get("configs", [])):
        where = f"{source} [[configs]] #{i + 1}"
        _need(isinstance(entry, dict), f"{where}: must be a table.")
        entry = dict(entry)
        label, preset = entry.pop("label", None), entry.pop("preset", None)
        _need(isinstance(label, str), f"{where}: 'label' (a unique name) is required.")
        _need(isinstance(preset, str), f"{where} ('{label}'): 'preset' is required.")
        own_sweeps.append(entry.pop("sweep", None))
        overrides = {**common, **entry.pop("set", {}), **entry}
        for key in ("seed", "total_steps", "preset", "env_id"):
            _need(key not in overrides, f"{where}: '{key}' is set by the study.")
        configs.append(ConfigSpec(label, preset, overrides))
    factors: tuple[str, ...] = ()
    if "factorial" in data:
        fact = dict(data["factorial"])
        _check_table_keys(fact, ("base", "factors"), f"{source} [factorial]")
        _need(isinstance(fact.get("base"), str), f"{source} [factorial]: 'base' preset needed.")
        _need(isinstance(fact.get("factors"), dict), f"{source} [factorial]: 'factors' needed.")
        configs += factorial_configs(fact["base"], fact["factors"], common)
        factors = tuple(fact["factors"])
    _need(bool(configs), f"{source}: no configs; add [[configs]] entries or a [factorial].")
    configs, sweeps = _expand_sweeps(configs, own_sweeps, data.get("sweep"), source)

    labels = [c.label for c in configs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    _need(not dup, f"{source}: duplicate config labels: {', '.join(dup)}. Labels name the "
                   "run directories and must be unique.")
    families = [s.family for s in sweeps]
    clash = sorted({f for f in families if families.count(f) > 1 or f in labels})
    _need(not clash, f"{source}: swept config label(s) {', '.join(clash)} also name another "
                     "config or sweep; the label of a swept config names its curve and must "
                     "be unique.")
    for label in labels:
        _need(bool(LABEL_RE.fullmatch(label)),
              f"{source}: label '{label}' may only use letters, digits and _ . + = - "
              "(and not start with . or -).")
    for c in configs:  # each config resolves on each env: an error names the config
        for env in data.get("envs", []):
            try:
                make_config(c.preset, env, {**c.overrides, "seed": 0,
                                            "total_steps": data["total_steps"]})
            except ConfigError as exc:
                raise ConfigError(f"{source}: config '{c.label}' (preset {c.preset}, env "
                                  f"{env}): {exc}") from None

    score_data = data.get("score", {})
    score_data = {"rule": score_data} if isinstance(score_data, str) else dict(score_data)
    _check_table_keys(score_data, ("last_fraction", "last_iterations", "failure_threshold",
                                   "rule"), f"{source} [score]")
    _need(not ("last_fraction" in score_data and "last_iterations" in score_data),
          f"{source} [score]: give last_fraction or last_iterations, not both.")
    _need("rule" not in score_data or set(score_data) <= {"rule", "failure_threshold"},
          f"{source} [score]: rule '{score_data.get('rule')}' fixes the window; drop "
          "last_fraction and last_iterations.")
    if "rule" in score_data:
        score = ScoreSpec.named(score_data["rule"], score_data.get("failure_threshold"))
    elif "last_iterations" in score_data:
        n = score_data["last_iterations"]
        _need(isinstance(n, int) and n >= 1, f"{source} [score]: last_iterations must be >= 1.")
        score = ScoreSpec(last_fraction=None, last_iterations=n,
                          failure_threshold=dict(score_data.get("failure_threshold", {})))
    else:
        frac = score_data.get("last_fraction", 0.1)
        _need(isinstance(frac, (int, float)) and 0 < frac <= 1,
              f"{source} [score]: last_fraction must lie in (0, 1], got {frac!r}.")
        score = ScoreSpec(last_fraction=float(frac),
                          failure_threshold=dict(score_data.get("failure_threshold", {})))
    for env, thr in score.failure_threshold.items():
        _need(env in envs, f"{source} [score]: failure_threshold names '{env}', which is not "
                           "one of the study's envs.")
        _need(isinstance(thr, (int, float)), f"{source} [score]: threshold of {env} must be "
                                             "a number.")

    stats_data = dict(data.get("statistics", {}))
    allowed = tuple(f.name for f in dataclasses.fields(StatsSpec))
    _check_table_keys(stats_data, allowed, f"{source} [statistics]")
    kinds = {"int": (int,), "float": (int, float), "str | None": (str,), "str": (str,)}
    for f in dataclasses.fields(StatsSpec):
        if f.name in stats_data:
            v = stats_data[f.name]
            _need(isinstance(v, kinds[str(f.type)]) and not isinstance(v, bool),
                  f"{source} [statistics]: '{f.name}' expects {f.type}, got {v!r}.")
    stats = StatsSpec(**stats_data)
    _need(stats.reps >= 100, f"{source} [statistics]: reps must be >= 100.")
    _need(0 < stats.level < 1 and 0 < stats.alpha < 1 and 0 < stats.power < 1,
          f"{source} [statistics]: level, alpha and power must lie in (0, 1).")
    _need(stats.relative_difference > 0, f"{source} [statistics]: relative_difference > 0.")
    _need(0 < stats.sensitivity_fraction < 1, f"{source} [statistics]: "
          f"sensitivity_fraction must lie in (0, 1), got {stats.sensitivity_fraction!r}.")
    _need(stats.compare in ("baseline", "all"),
          f"{source} [statistics]: compare must be 'baseline' or 'all'.")
    _need(stats.baseline is None or stats.baseline in labels,
          f"{source} [statistics]: baseline '{stats.baseline}' is not a config label "
          f"({', '.join(labels)}).")

    batch_size = data.get("batch_size")
    _need(batch_size is None or (isinstance(batch_size, int) and not isinstance(
        batch_size, bool) and batch_size >= 1),
        f"{source}: 'batch_size' must be a whole number >= 1 (runs trained together), got "
        f"{batch_size!r}.")

    spec = StudySpec(name=name.strip(), envs=tuple(envs), seeds=tuple(seeds),
                     total_steps=steps, configs=tuple(configs), score=score,
                     statistics=stats, factors=factors,
                     description=str(data.get("description", "")), batch_size=batch_size,
                     sweeps=tuple(sweeps))
    runs = spec.runs()  # resolves every (config, env): unknown keys and bad values fail here
    check_score_inputs(spec, runs, source)
    return spec


def check_score_inputs(spec: StudySpec, runs: list[RunSpec] | None = None,
                       source: str = "study spec") -> None:
    """A score of the evaluations during training needs every config to evaluate
    (``eval_every`` > 0): refuse one that never would, naming the configs."""
    if spec.score.last_evaluations is None:
        return
    off = sorted({r.label for r in (spec.runs() if runs is None else runs)
                  if not r.config.eval_every})
    _need(not off, f"{source}: the score ({spec.score.rule or '[score]'}) is the return of "
                   f"the evaluations during training, but config(s) {', '.join(off)} never "
                   "evaluate: set eval_every (e.g. set = { eval_every = 10 }).")


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec '{path}' does not exist.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"'{path}' is not valid TOML: {exc}.") from None
    return parse_spec(data, source=str(path))
