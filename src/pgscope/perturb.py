"""Perturbation kinds for robustness evaluations: a registry, modelled on gymnasium's env
registry, in which every kind carries its own knowledge (its name, its unit, its nominal
level, which levels it accepts, which envs it applies to, how it applies and how it is
undone). :mod:`pgscope.robustness` plays episodes under them; docs/robustness.md defines
each kind.

``KIND=LEVEL[,LEVEL...]`` (``pgscope evaluate --perturb``, ``pgscope study robustness
--perturb``) is parsed by :func:`parse_perturbation`; every mistake in such a string is one
:class:`PerturbationError` before anything is computed. The *nominal* level of a kind (0
for the noises and the delay, 1 for the factors) is no perturbation: it applies no wrapper
at all, so its episodes are the unperturbed evaluation's, bit for bit.

Kinds, applied from the inside out in registry order (:func:`apply_perturbations`):

- ``time-limit``: a factor on the env's ``max_episode_steps`` (``gymnasium.make(...,
  max_episode_steps=...)``);
- ``mass``, ``friction``: MuJoCo model fields scaled for each episode and restored exactly
  (:class:`pgscope.envs.perturbations.ScaledModel`);
- ``delay``: the env receives the action of ``k`` steps before
  (:class:`~pgscope.envs.perturbations.ActionDelay`);
- ``action-noise``: Gaussian noise on the policy's action, before the clipping
  (:class:`~pgscope.envs.perturbations.ActionNoise`);
- ``obs-noise``: Gaussian noise on the observation the policy receives
  (:class:`~pgscope.envs.perturbations.ObservationNoise`).

This module imports neither NumPy nor gymnasium (the command line reads :data:`KINDS`
while building its parser); the wrappers load when a kind is applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pgscope.errors import PgscopeError
from pgscope.registry import Registry, UnknownNameError


class PerturbationError(PgscopeError):
    """A malformed perturbation, or one that does not apply to the env."""


@dataclass(frozen=True)
class PerturbContext:
    """What the kinds need to know beyond their level: the evaluation's ``seed`` (the noise
    generators derive from it), whether the run clips its actions (``action_clip``), and
    the observation-noise unit: one std per observation coordinate (``obs_std``, a NumPy
    array) and where it comes from (``obs_std_source``)."""

    seed: int = 0
    action_clip: bool = True
    obs_std: Any = None
    obs_std_source: str = ""


#: ``check(env, context)``: why the kind cannot apply to ``env`` (a made, unwrapped-by-us
#: env of the run's id), or None.
Check = Callable[[Any, PerturbContext], str | None]
#: ``wrap(env, level, context)``: the env under the kind at ``level``.
Wrap = Callable[[Any, float, PerturbContext], Any]
#: ``make_kwargs(level, max_episode_steps)``: keyword arguments to ``gymnasium.make``.
MakeKwargs = Callable[[float, int | None], dict[str, Any]]


@dataclass(frozen=True)
class PerturbationKind:
    """One kind of perturbation. ``level`` means ``unit``; ``nominal`` is the level that
    is no perturbation; a level must be at least ``minimum`` (above it when not
    ``minimum_allowed``) and whole when ``integer``. A kind applies through ``wrap`` (a
    gymnasium wrapper) and/or ``make_kwargs`` (arguments to ``gymnasium.make``); ``check``
    refuses envs it cannot apply to; ``undone`` says how the change is undone."""

    name: str
    unit: str
    definition: str
    undone: str
    nominal: float
    minimum: float
    minimum_allowed: bool
    check: Check
    wrap: Wrap | None = None
    make_kwargs: MakeKwargs | None = None
    integer: bool = False

    def level_error(self, level: float) -> str | None:
        """Why ``level`` is not a level of this kind, or None."""
        if not math.isfinite(level):
            return f"{self.name} levels must be finite numbers, got {level}"
        if level < self.minimum or (level == self.minimum and not self.minimum_allowed):
            bound = f">= {self.minimum:g}" if self.minimum_allowed else f"> {self.minimum:g}"
            return f"{self.name} levels must be {bound} ({self.unit}), got {level:g}"
        if self.integer and not float(level).is_integer():
            return f"{self.name} levels must be whole numbers ({self.unit}), got {level:g}"
        return None


KINDS: Registry[PerturbationKind] = Registry("perturbation kind")


def register_kind(kind: PerturbationKind) -> PerturbationKind:
    """Add a kind to :data:`KINDS` (last: it is applied outside the kinds before it)."""
    return KINDS.register(kind.name, kind)


def kind(name: str) -> PerturbationKind:
    """The kind named ``name``; a :class:`PerturbationError` names the known ones."""
    try:
        return KINDS.get(name)
    except UnknownNameError as exc:
        raise PerturbationError(str(exc)) from None


@dataclass(frozen=True)
class Perturbation:
    """A kind and the levels its robustness curve visits (sorted, without duplicates;
    :attr:`curve_levels` adds the nominal level, which every curve is normalized by)."""

    kind: str
    levels: tuple[float, ...]

    @property
    def curve_levels(self) -> tuple[float, ...]:
        return tuple(sorted({*self.levels, KINDS.get(self.kind).nominal}))

    def __str__(self) -> str:
        return f"{self.kind}={','.join(f'{x:g}' for x in self.levels)}"


SYNTAX = "KIND=LEVEL[,LEVEL...]"


def _syntax_hint() -> str:
    return f"write {SYNTAX}, e.g. obs-noise=0.1,0.2,0.5; kinds: {', '.join(KINDS.names())}"


def parse_perturbation(text: str) -> Perturbation:
    """``KIND=LEVEL[,LEVEL...]`` as a :class:`Perturbation` (levels sorted, duplicates
    dropped); one :class:`PerturbationError` for any mistake: an unknown kind, a level
    that is not a number or not allowed for the kind, or no level other than the nominal
    one (a curve needs a perturbed point)."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise PerturbationError(f"--perturb '{text}': {_syntax_hint()}.")
    try:
        k = KINDS.get(name)
    except UnknownNameError as exc:
        raise PerturbationError(f"--perturb '{text}': {exc}") from None
    levels = []
    for part in rest.split(","):
        try:
            levels.append(float(part.strip().replace("_", "")))
        except ValueError:
            raise PerturbationError(f"--perturb '{text}': '{part.strip()}' is not a number; "
                                    f"{_syntax_hint()}.") from None
    for level in levels:
        why = k.level_error(level)
        if why:
            raise PerturbationError(f"--perturb '{text}': {why}.")
    if all(level == k.nominal for level in levels):
        raise PerturbationError(
            f"--perturb '{text}': give at least one level other than the nominal "
            f"{k.nominal:g} (no perturbation; every curve includes it).")
    return Perturbation(k.name, tuple(sorted(set(levels))))


def parse_perturbations(items: Iterable[str | Perturbation]) -> list[Perturbation]:
    """Strings (:func:`parse_perturbation`) or :class:`Perturbation` objects, checked: at
    least one, each kind at most once, every level allowed."""
    out: list[Perturbation] = []
    for item in items:
        p = parse_perturbation(item) if isinstance(item, str) else item
        k = kind(p.kind)
        for level in p.levels:
            why = k.level_error(level)
            if why:
                raise PerturbationError(f"--perturb '{p}': {why}.")
        if any(q.kind == p.kind for q in out):
            raise PerturbationError(f"--perturb: kind '{p.kind}' is given twice; give all "
                                    f"its levels in one {SYNTAX}.")
        out.append(p)
    if not out:
        raise PerturbationError(f"no perturbation given: {_syntax_hint()}.")
    return out


def check_applicable(env: Any, perturbations: Sequence[Perturbation],
                     context: PerturbContext, env_id: str) -> None:
    """One :class:`PerturbationError` naming every kind that cannot apply to ``env``."""
    problems = []
    for p in perturbations:
        why = KINDS.get(p.kind).check(env, context)
        if why:
            problems.append(f"{p.kind}: {why}")
    if problems:
        raise PerturbationError(f"cannot perturb env '{env_id}': {'; '.join(problems)}.")


def make_kwargs(settings: Sequence[tuple[str, float]], max_episode_steps: int | None
                ) -> dict[str, Any]:
    """The keyword arguments to ``gymnasium.make`` that the ``(kind, level)`` settings
    ask for (nominal levels ask for nothing)."""
    out: dict[str, Any] = {}
    for name, level in settings:
        k = KINDS.get(name)
        if k.make_kwargs is not None and level != k.nominal:
            out.update(k.make_kwargs(level, max_episode_steps))
    return out


def apply_perturbations(env: Any, settings: Sequence[tuple[str, float]],
                        context: PerturbContext) -> Any:
    """``env`` wrapped by every ``(kind, level)`` of ``settings`` whose level is not
    nominal, from the inside out in registry order. Closing the result undoes what the
    kinds changed in the env itself (the MuJoCo model)."""
    by_name = dict(settings)
    for k in KINDS.values():
        if k.name in by_name and k.wrap is not None and by_name[k.name] != k.nominal:
            env = k.wrap(env, by_name[k.name], context)
    return env


# --- the built-in kinds -------------------------------------------------------------------
def _box_actions(env: Any, context: PerturbContext) -> str | None:
    import numpy as np
    from gymnasium.spaces import Box

    space = env.action_space
    if not isinstance(space, Box):
        return f"needs continuous (Box) actions, the env has {space}"
    if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        return "needs finite action bounds (the unit is half the action range)"
    return None


def _mujoco(env: Any, context: PerturbContext) -> str | None:
    from pgscope.envs.perturbations import mujoco_model

    return None if mujoco_model(env) is not None else (
        "needs a MuJoCo env (env.unwrapped.model with body_mass and geom_friction)")


def _time_limited(env: Any, context: PerturbContext) -> str | None:
    steps = getattr(getattr(env, "spec", None), "max_episode_steps", None)
    return None if steps else "the env sets no time limit (max_episode_steps)"


def _always(env: Any, context: PerturbContext) -> str | None:
    return None


def _wrap_obs_noise(env: Any, level: float, context: PerturbContext) -> Any:
    from pgscope.envs.perturbations import ObservationNoise

    if context.obs_std is None:
        raise PerturbationError("obs-noise needs the observation std (PerturbContext.obs_std).")
    return ObservationNoise(env, level * context.obs_std, seed=context.seed)


def _wrap_action_noise(env: Any, level: float, context: PerturbContext) -> Any:
    from pgscope.envs.perturbations import ActionNoise

    space = env.action_space
    return ActionNoise(env, level * (space.high.astype(float) - space.low) / 2,
                       clip=context.action_clip, seed=context.seed)


def _wrap_scaled(fields: tuple[str, ...]) -> Wrap:
    def wrap(env: Any, level: float, context: PerturbContext) -> Any:
        from pgscope.envs.perturbations import ScaledModel

        return ScaledModel(env, fields, level)
    return wrap


def _wrap_delay(env: Any, level: float, context: PerturbContext) -> Any:
    from pgscope.envs.perturbations import ActionDelay

    return ActionDelay(env, int(level))


def scaled_time_limit(factor: float, max_episode_steps: int) -> int:
    """The time limit of the ``time-limit`` kind: ``factor * max_episode_steps`` rounded
    to the nearest step (halves up), at least 1."""
    return max(1, math.floor(factor * max_episode_steps + 0.5))


def _time_limit_kwargs(level: float, max_episode_steps: int | None) -> dict[str, Any]:
    if not max_episode_steps:
        raise PerturbationError("time-limit: the env sets no time limit (max_episode_steps).")
    return {"max_episode_steps": scaled_time_limit(level, max_episode_steps)}


register_kind(PerturbationKind(
    name="time-limit", unit="factor on the env's max_episode_steps",
    definition="episodes are truncated at round(level x max_episode_steps) steps (at "
               "least 1) instead of max_episode_steps",
    undone="nothing to undo: the evaluation makes its own env with that limit",
    nominal=1.0, minimum=0.0, minimum_allowed=False, check=_time_limited,
    make_kwargs=_time_limit_kwargs))
register_kind(PerturbationKind(
    name="mass", unit="factor on every body's mass and inertia (MuJoCo)",
    definition="model.body_mass and model.body_inertia are multiplied by the level from "
               "each reset to the end of that episode (same shapes, density x level)",
    undone="the original arrays are written back exactly at each episode's end and when "
           "the env is closed",
    nominal=1.0, minimum=0.0, minimum_allowed=False, check=_mujoco,
    wrap=_wrap_scaled(("body_mass", "body_inertia"))))
register_kind(PerturbationKind(
    name="friction", unit="factor on every geom's friction coefficients (MuJoCo)",
    definition="model.geom_friction (sliding, torsional and rolling coefficients of every "
               "geom) is multiplied by the level from each reset to the end of that episode",
    undone="the original array is written back exactly at each episode's end and when "
           "the env is closed",
    nominal=1.0, minimum=0.0, minimum_allowed=True, check=_mujoco,
    wrap=_wrap_scaled(("geom_friction",))))
register_kind(PerturbationKind(
    name="delay", unit="env steps",
    definition="the env receives at step t the action the policy chose at step t - level; "
               "during an episode's first level steps it receives the null action (zeros "
               "for Box actions, clipped into the bounds; the first action, start, of a "
               "Discrete space)",
    undone="reset empties the queue of pending actions",
    nominal=0.0, minimum=0.0, minimum_allowed=True, integer=True, check=_always,
    wrap=_wrap_delay))
register_kind(PerturbationKind(
    name="action-noise", unit="half the action range, (high - low) / 2, per coordinate",
    definition="level x (high - low) / 2 x N(0, 1) is added to each coordinate of the "
               "policy's action at every step, before the clipping to the bounds (which "
               "happens when the run clips actions, action_clip)",
    undone="nothing to undo: the noise is drawn from the wrapper's own generator",
    nominal=0.0, minimum=0.0, minimum_allowed=True, check=_box_actions,
    wrap=_wrap_action_noise))
register_kind(PerturbationKind(
    name="obs-noise", unit="std of each observation coordinate (the run's frozen "
                           "normalization statistics; without obs_norm, the std over the "
                           "evaluation's unperturbed episodes)",
    definition="level x std x N(0, 1) is added to each coordinate of every observation the "
               "policy receives (the reset's included), std being sqrt(var + 1e-8) of the "
               "run's frozen observation normalizer, so that the normalized observation "
               "moves by level x N(0, 1) before obs clipping",
    undone="nothing to undo: the env's own observations and state are not changed",
    nominal=0.0, minimum=0.0, minimum_allowed=True, check=_always, wrap=_wrap_obs_noise))
