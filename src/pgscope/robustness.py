"""Robustness curves of a policy: its return under each perturbation kind of
:mod:`pgscope.perturb` at several levels, normalized by its unperturbed return, with
confidence intervals over episodes and an area-under-the-curve summary
(``pgscope evaluate RUN --perturb KIND=LEVEL[,LEVEL...]``; docs/robustness.md).

Every level plays the same ``episodes`` episodes as the unperturbed evaluation
(:func:`pgscope.evaluate.play_episodes`: episode ``i`` starts from ``env.reset(seed=seed +
i)``, a frozen copy of the agent's preprocessor, the same sampling stream), on an env of
its own made for that level; the perturbation noise comes from generators of its own,
re-seeded with each episode's reset seed (:mod:`pgscope.envs.perturbations`). The nominal
level of a kind is the unperturbed evaluation itself, bit for bit (the same returns as
``pgscope evaluate`` without ``--perturb``).

- normalized return at a level: :data:`NORMALIZATION`;
- intervals: a paired percentile bootstrap over episodes (one resample of episode indices
  serves every level of a kind, since episode ``i`` starts from the same state at every
  level), :data:`REPS` resamples seeded with the evaluation seed, the very resamples of
  :func:`pgscope.evaluate.bootstrap_ci` (the nominal point's interval is the unperturbed
  evaluation's);
- AUC: :data:`AUC_DEFINITION` (:func:`auc`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pgscope.errors import PgscopeError
from pgscope.evaluate import PlayedEpisodes, Watch, _summary, format_evaluation, play_episodes
from pgscope.perturb import (
    KINDS,
    Perturbation,
    PerturbContext,
    apply_perturbations,
    check_applicable,
    make_kwargs,
    parse_perturbations,
)

if TYPE_CHECKING:
    from pgscope.agent import Agent

#: Bootstrap resamples of the intervals of a robustness curve and of its AUC.
REPS = 10_000
#: How a curve is normalized (stated in every result).
NORMALIZATION = (
    "normalized return = mean return at the level / mean return of the unperturbed "
    "evaluation (the kind's nominal level: the same episodes, unperturbed); defined only "
    "when the unperturbed mean return is positive (otherwise null)")
#: The area-under-the-curve summary (stated in every result).
AUC_DEFINITION = (
    "AUC = trapezoid area under the normalized curve over its levels x_0 < ... < x_m (the "
    "given levels and the nominal one), divided by the level range x_m - x_0: "
    "sum_j (x_{j+1} - x_j) (y_j + y_{j+1}) / 2 / (x_m - x_0); 1 for a policy the "
    "perturbation does not affect, lower for one it hurts")


def auc(levels: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """:data:`AUC_DEFINITION`: the trapezoid area under ``values`` over the increasing
    ``levels``, divided by ``levels[-1] - levels[0]`` (NaN if any value is NaN)."""
    x = np.asarray(levels, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError("auc needs two or more levels, one value each.")
    if not (np.diff(x) > 0).all():
        raise ValueError(f"auc needs increasing levels, got {list(x)}.")
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    return area / float(x[-1] - x[0])


def _auc_rows(levels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """:func:`auc` of each row of ``values`` (rows: bootstrap resamples)."""
    widths = np.diff(levels)
    return ((values[:, 1:] + values[:, :-1]) / 2 * widths).sum(axis=1) / (
        levels[-1] - levels[0])


def observation_std(agent: Agent, observations: Sequence[np.ndarray] | None = None
                    ) -> tuple[np.ndarray | None, str]:
    """The unit of ``obs-noise``: per observation coordinate, ``sqrt(var + eps)`` of the
    agent's frozen observation normalizer (the divisor it normalizes with), or, for a run
    without ``obs_norm``, the std (ddof 0) of ``observations`` (the evaluation's
    unperturbed episodes, every observation including the resets'); and where it came
    from. (None, reason) when neither is available."""
    norm = agent.preprocessor.obs_norm
    if norm is not None:
        return (np.sqrt(np.asarray(norm.rms.var, dtype=np.float64) + norm.epsilon),
                "the run's frozen observation normalization statistics (sqrt(var + eps))")
    if observations:
        return (np.asarray(observations, dtype=np.float64).std(axis=0),
                "the std of the observations of the evaluation's unperturbed episodes "
                "(the run has no obs_norm)")
    return None, "unavailable"


def make_perturbed_env(env_id: str, settings: Sequence[tuple[str, float]],
                       context: PerturbContext) -> Any:
    """A fresh env of ``env_id`` under the ``(kind, level)`` settings: made with the
    kinds' ``gymnasium.make`` arguments, then wrapped
    (:func:`pgscope.perturb.apply_perturbations`). Close it to undo model changes."""
    from pgscope.envs import make_env

    limit = None
    if any(KINDS.get(name).make_kwargs is not None for name, _ in settings):
        plain = make_env(env_id)  # its spec, as made (also for 'module:Env-v0' ids)
        limit = getattr(plain.spec, "max_episode_steps", None)
        plain.close()
    env = make_env(env_id, **make_kwargs(settings, limit))
    try:
        return apply_perturbations(env, settings, context)
    except BaseException:
        env.close()
        raise


def play_perturbed(agent: Agent, settings: Sequence[tuple[str, float]], episodes: int, *,
                   context: PerturbContext, deterministic: bool = True, seed: int = 0,
                   watch: Watch | None = None) -> PlayedEpisodes:
    """:func:`pgscope.evaluate.play_episodes` on a fresh env of the agent's env id under
    the ``(kind, level)`` settings (all at once); the env is closed (and its model
    restored) afterwards, also on an error."""
    env = make_perturbed_env(agent.config.env_id, settings, context)
    try:
        return play_episodes(agent, env, episodes, deterministic=deterministic, seed=seed,
                             watch=watch)
    finally:
        env.close()


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def curve(perturbation: Perturbation, played: dict[float, PlayedEpisodes], *,
          level: float = 0.95, seed: int = 0, reps: int = REPS) -> dict[str, Any]:
    """The robustness curve of one kind from the episodes played at each of its
    :attr:`~pgscope.perturb.Perturbation.curve_levels`: per level the mean return and the
    normalized return (:data:`NORMALIZATION`) with paired percentile-bootstrap intervals
    over episodes (``level``), the mean length, the returns and lengths; and the
    :func:`auc` with its interval."""
    k = KINDS.get(perturbation.kind)
    levels = perturbation.curve_levels
    returns = np.array([played[x].returns for x in levels], dtype=np.float64)  # (L, n)
    n = returns.shape[1]
    means = returns.mean(axis=1)
    nominal = levels.index(k.nominal)
    if n >= 2:  # the resamples of bootstrap_ci(returns, seed=seed), shared by every level
        idx = np.random.default_rng(seed).integers(0, n, size=(reps, n))
        boot = np.stack([row[idx].mean(axis=1) for row in returns], axis=1)  # (reps, L)
    else:
        boot = np.repeat(means[None], 2, axis=0)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, alpha, axis=0), np.quantile(boot, 1 - alpha, axis=0)
    defined = means[nominal] > 0
    if defined:
        norm = means / means[nominal]
        with np.errstate(divide="ignore", invalid="ignore"):
            norm_boot = boot / boot[:, [nominal]]
        norm_low = np.quantile(norm_boot, alpha, axis=0)
        norm_high = np.quantile(norm_boot, 1 - alpha, axis=0)
        x = np.asarray(levels, dtype=np.float64)
        area = auc(x, norm)
        area_boot = _auc_rows(x, norm_boot)
        area_low, area_high = (float(np.quantile(area_boot, q)) for q in (alpha, 1 - alpha))
    else:
        norm = norm_low = norm_high = np.full(len(levels), np.nan)
        area = area_low = area_high = math.nan
    points = []
    for j, x_j in enumerate(levels):
        p = played[x_j]
        points.append(dict(
            level=x_j, mean_return=float(means[j]), ci_low=float(low[j]),
            ci_high=float(high[j]), normalized=_finite(float(norm[j])),
            normalized_low=_finite(float(norm_low[j])),
            normalized_high=_finite(float(norm_high[j])),
            mean_length=float(np.mean(p.lengths)), episodes_cut=p.cut,
            returns=[float(r) for r in p.returns], lengths=list(p.lengths)))
    note = None if defined else (
        f"the unperturbed mean return ({means[nominal]:.4g}) is not positive: the "
        "normalized curve and its AUC are not defined (the returns are)")
    return dict(kind=k.name, unit=k.unit, definition=k.definition, undone=k.undone,
                nominal=k.nominal, levels=list(levels), points=points,
                auc=_finite(area), auc_low=_finite(area_low), auc_high=_finite(area_high),
                note=note)


def robustness_of_agent(agent: Agent, perturb: Iterable[str | Perturbation],
                        episodes: int = 10, deterministic: bool = True, seed: int = 0,
                        level: float = 0.95, reps: int = REPS) -> dict[str, Any]:
    """The unperturbed evaluation of a live ``agent`` (the fields of
    :func:`pgscope.evaluate.evaluate_agent`) and, under ``"robustness"``, one
    :func:`curve` per perturbation (strings ``KIND=LEVEL[,LEVEL...]`` or
    :class:`~pgscope.perturb.Perturbation` objects; each kind varied alone, the others
    nominal). Every perturbation is checked against the env before any episode is
    played. The agent is never changed."""
    from pgscope.envs import make_env
    from pgscope.envs.perturbations import ObservationRecorder

    perturbations = parse_perturbations(perturb)
    if episodes < 1:
        raise PgscopeError(f"episodes (--episodes) must be at least 1, got {episodes}.")
    env_id = agent.config.env_id
    obs_std, source = observation_std(agent)
    record = obs_std is None and any(p.kind == "obs-noise" for p in perturbations)
    env = make_env(env_id)
    try:
        check_applicable(env, perturbations, PerturbContext(seed, agent.config.action_clip),
                         env_id)
        recorder = ObservationRecorder(env) if record else None
        base = play_episodes(agent, recorder or env, episodes, deterministic=deterministic,
                             seed=seed)
    finally:
        env.close()
    if recorder is not None:
        obs_std, source = observation_std(agent, recorder.observations)
    context = PerturbContext(seed=seed, action_clip=agent.config.action_clip,
                             obs_std=obs_std, obs_std_source=source)
    curves = []
    for p in perturbations:
        nominal = KINDS.get(p.kind).nominal
        played = {x: base if x == nominal else play_perturbed(
            agent, [(p.kind, x)], episodes, context=context, deterministic=deterministic,
            seed=seed) for x in p.curve_levels}
        c = curve(p, played, level=level, seed=seed, reps=reps)
        if p.kind == "obs-noise":
            c["obs_std"] = None if obs_std is None else [float(s) for s in obs_std]
            c["obs_std_source"] = source
        curves.append(c)
    result = _summary(base, deterministic, seed, level)
    result["robustness"] = dict(
        perturbations=[str(p) for p in perturbations], normalization=NORMALIZATION,
        auc_definition=AUC_DEFINITION, reps=reps, ci_level=level,
        intervals=f"{100 * level:g}% paired percentile bootstrap over the {episodes} "
                  f"episodes ({reps} resamples, seed {seed})",
        statistics="frozen: a copy of the agent's preprocessor, never updated", curves=curves)
    return result


def evaluate_robustness(run_dir: str | Path, perturb: Iterable[str | Perturbation],
                        checkpoint: int | None = None, episodes: int = 10,
                        deterministic: bool = True, seed: int = 0, level: float = 0.95,
                        out: str | Path | None = None, reps: int = REPS) -> dict[str, Any]:
    """:func:`robustness_of_agent` for a run's checkpoint (``checkpoint``: a kept
    iteration, default the latest), with the fields of :func:`pgscope.evaluate.evaluate`
    (run, env, preset, checkpoint); written as JSON to ``out`` when given. The
    perturbation strings are checked before the checkpoint is read."""
    from pgscope import load_agent
    from pgscope.run import atomic_write_json, load_checkpoint, resolve_checkpoint

    perturbations = parse_perturbations(perturb)
    if episodes < 1:
        raise PgscopeError(f"episodes (--episodes) must be at least 1, got {episodes}.")
    agent = load_agent(run_dir, checkpoint)
    iteration = checkpoint if checkpoint is not None else int(
        load_checkpoint(resolve_checkpoint(Path(run_dir)))["iteration"])
    cfg = agent.config
    result: dict[str, Any] = dict(
        run=str(run_dir), env_id=cfg.env_id, preset=cfg.preset, checkpoint=iteration,
        **robustness_of_agent(agent, perturbations, episodes=episodes,
                              deterministic=deterministic, seed=seed, level=level,
                              reps=reps))
    if out is not None:
        atomic_write_json(Path(out), result)
        result["written"] = str(out)
    return result


def default_output(run_dir: str | Path) -> Path:
    """Where ``pgscope evaluate --perturb`` writes its JSON by default:
    ``RUN/robustness.json`` for a run directory, ``<checkpoint>.robustness.json`` beside a
    checkpoint file."""
    path = Path(run_dir)
    return path / "robustness.json" if path.is_dir() else path.with_suffix(".robustness.json")


def _iv(mid: float | None, low: float | None, high: float | None, digits: int) -> str:
    if mid is None:
        return "-"
    return f"{mid:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_robustness(r: dict[str, Any]) -> str:
    """What ``pgscope evaluate --perturb`` prints: the unperturbed evaluation, then one
    table per kind (level, mean return, normalized return, mean length) and its AUC."""
    rob = r["robustness"]
    lines = [format_evaluation(r) if "env_id" in r else "", "",
             f"robustness curves ({rob['intervals']}); {rob['normalization']}."]
    for c in rob["curves"]:
        lines += ["", f"{c['kind']}: level = {c['unit']}"]
        if "obs_std_source" in c:
            lines.append(f"  std from {c['obs_std_source']}")
        lines.append(f"  {'level':>8}  {'mean return [CI]':>30}  {'normalized [CI]':>24}  "
                     f"{'mean length':>11}")
        for p in c["points"]:
            mark = " (nominal)" if p["level"] == c["nominal"] else ""
            lines.append(f"  {p['level']:>8g}  "
                         f"{_iv(p['mean_return'], p['ci_low'], p['ci_high'], 2):>30}  "
                         f"{_iv(p['normalized'], p['normalized_low'], p['normalized_high'], 3):>24}"
                         f"  {p['mean_length']:>11.1f}{mark}")
        lines.append(f"  AUC (levels {c['levels'][0]:g}..{c['levels'][-1]:g}): "
                     f"{_iv(c['auc'], c['auc_low'], c['auc_high'], 3)}")
        if c["note"]:
            lines.append(f"  note: {c['note']}")
    lines += ["", f"AUC: {rob['auc_definition']}."]
    if "written" in r:
        lines.append(f"written: {r['written']}")
    return "\n".join(lines).lstrip("\n")
