"""Hyperparameter sweeps in a study spec: one config's key (or two, crossed) over a grid.

A sweep turns one config of a spec (its *family*) into one config per grid point, each
labelled ``<family>.<key>=<value>`` (``ppo.policy_lr=0.0003``; two keys:
``ppo.policy_lr=0.0003.epochs=10``), with the swept values as overrides. The grid of a key
is written in one of three ways::

    sweep = { policy_lr = [1e-4, 3e-4, 1e-3] }                    # the values themselves
    sweep = { policy_lr = { log = [1e-4, 1e-2], points = 5 } }    # log-spaced, ends included
    sweep = { clip_eps = { linear = [0.1, 0.3], points = 5 } }    # evenly spaced
    sweep = { policy_lr = { values = [1e-4, 1e-3], scale = "linear" } }  # the scale stated

A table with two keys crosses them (every combination: a 2-D grid). The grid is recorded
as a :class:`SweepSpec` (in ``StudySpec.sweeps`` and ``study.json``), from which
:mod:`pgscope.study.sensitivity` reads the score curves. This module only parses and
expands; :func:`pgscope.study.spec.parse_spec` places sweeps in a spec and resolves every
generated config like any other.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pgscope.config import Config
from pgscope.errors import ConfigError

#: The scales of a swept key: where its points are spaced evenly, and the units of the
#: sensitivity width (``log``: decades, log10 of the ratio; ``linear``: the key's units).
SCALES = ("log", "linear")
#: At most this many keys crossed in one sweep (a curve or a heatmap).
MAX_KEYS = 2
#: Significant digits of range values (so that a label reads back as its exact value).
DIGITS = 6
_STUDY_KEYS = ("seed", "total_steps", "preset", "env_id")
_NUMERIC = {f.name: str(f.type) for f in dataclasses.fields(Config)
            if str(f.type) in ("int", "float")}
_ALL_KEYS = tuple(f.name for f in dataclasses.fields(Config))


@dataclass(frozen=True)
class SweepSpec:
    """One config swept over a grid of one or two keys.

    ``labels`` are the generated configs' labels in grid order (the first key outermost);
    :meth:`points` pairs each with its values.
    """

    family: str  # the label of the config the sweep was declared on
    preset: str
    keys: tuple[str, ...]
    grids: tuple[tuple[float, ...], ...]  # per key, its values in increasing order
    scales: tuple[str, ...]  # per key, "log" or "linear"
    labels: tuple[str, ...]

    def points(self) -> list[tuple[str, tuple[float, ...]]]:
        """``(label, values)`` of every grid point, in grid order."""
        return list(zip(self.labels, itertools.product(*self.grids), strict=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.grids)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        """Rebuild a sweep saved with ``dataclasses.asdict`` (``study.json``)."""
        return cls(family=data["family"], preset=data["preset"], keys=tuple(data["keys"]),
                   grids=tuple(tuple(g) for g in data["grids"]),
                   scales=tuple(data["scales"]), labels=tuple(data["labels"]))


def format_value(value: float) -> str:
    """A grid value as it appears in a label (``0.0003``, ``1e-05``, ``10``)."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fail(key: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: sweep of '{key}': {what}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _round(value: float) -> float:
    return float(f"{value:.{DIGITS}g}")


def _bounds(key: str, where: str, form: str, bounds: Any) -> tuple[float, float]:
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(map(_is_number, bounds))):
        raise _fail(key, where, f"'{form}' needs two numbers [low, high], got {bounds!r}.")
    low, high = float(bounds[0]), float(bounds[1])
    if form == "log" and (low <= 0 or high <= 0):
        raise _fail(key, where, f"a log range needs positive bounds, got [{bounds[0]!r}, "
                                f"{bounds[1]!r}].")
    if not low < high:
        raise _fail(key, where, f"the range's low end must be below its high end, got "
                                f"[{bounds[0]!r}, {bounds[1]!r}].")
    return low, high


def parse_grid(key: str, spec: Any, where: str = "study spec") -> tuple[tuple[float, ...], str]:
    """The sorted values and the scale of one swept key (see the module's docstring);
    raises :class:`ConfigError` naming the key for anything else."""
    if key not in _ALL_KEYS:
        close = difflib.get_close_matches(key, _ALL_KEYS, n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where}: sweep of '{key}': unknown config key.{hint}")
    if key in _STUDY_KEYS:
        raise _fail(key, where, "it is set by the study, not swept (the seeds are "
                                "'seeds', the budget 'total_steps').")
    if key not in _NUMERIC:
        raise _fail(key, where, "only numeric keys (int or float) can be swept; for other "
                                "values write one [[configs]] entry per value.")
    integer = _NUMERIC[key] == "int"
    scale: str | None = None
    if isinstance(spec, dict):
        table = dict(spec)
        allowed = ("log", "linear", "points", "values", "scale")
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise _fail(key, where, f"unknown entry {', '.join(map(repr, unknown))}; a "
                                    "range is {log = [low, high], points = n} or {linear = "
                                    "[low, high], points = n}, a list {values = [...], "
                                    "scale = 'log' or 'linear'}.")
        forms = [k for k in ("log", "linear", "values") if k in table]
        if len(forms) != 1:
            raise _fail(key, where, "give exactly one of 'log', 'linear' or 'values', got "
                                    f"{', '.join(forms) or 'none'}.")
        form = forms[0]  # a range (log, linear) or a list of values
        if form == "values":
            if "points" in table:
                raise _fail(key, where, "'points' belongs to a range, not to 'values'.")
            scale = table.get("scale")
            if scale not in SCALES:
                raise _fail(key, where, f"'scale' must be 'log' or 'linear', got {scale!r}.")
            values = table["values"]
        else:
            if "scale" in table:
                raise _fail(key, where, f"a '{form}' range has its scale; drop 'scale'.")
            points = table.get("points")
            if not (isinstance(points, int) and not isinstance(points, bool) and points >= 2):
                raise _fail(key, where, f"'points' must be a whole number >= 2, got "
                                        f"{points!r}.")
            low, high = _bounds(key, where, form, table[form])
            if form == "log":
                raw = np.logspace(math.log10(low), math.log10(high), points)
            else:
                raw = np.linspace(low, high, points)
            values = [int(round(v)) if integer else _round(float(v)) for v in raw]
            if integer and len(set(values)) < len(values):
                raise _fail(key, where, f"'{key}' takes whole numbers and {points} points "
                                        f"on [{low:g}, {high:g}] round to repeated values "
                                        f"{values}; use fewer points or a list.")
            scale = form
    else:
        values = spec
    if not isinstance(values, list) or not values:
        raise _fail(key, where, f"needs a non-empty list of values or a range table, got "
                                f"{values!r}.")
    for v in values:
        if not _is_number(v) or (integer and not isinstance(v, int)):
            raise _fail(key, where, f"'{key}' takes {'whole numbers' if integer else 'numbers'}"
                                    f", got {v!r}.")
    if len(set(values)) < len(values):
        raise _fail(key, where, f"a value is listed twice in {values}.")
    values = sorted(values)
    if scale is None:  # a plain list: log when it is positive and spans a decade or more
        scale = "log" if values[0] > 0 and values[-1] >= 10 * values[0] else "linear"
    if scale == "log" and values[0] <= 0:
        raise _fail(key, where, f"a log scale needs positive values, got {values}.")
    return tuple(values), scale


def parse_sweep(family: str, preset: str, spec: Any, overrides: dict[str, Any],
                where: str = "study spec") -> tuple[SweepSpec, list[tuple[str, dict[str, Any]]]]:
    """The sweep declared on config ``family`` (``spec``: the TOML table) and its configs
    as ``(label, overrides)``; a swept key may not also be set in ``overrides``."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: 'sweep' of config '{family}' must be a table of one or "
                          f"two keys, e.g. sweep = {{ policy_lr = [1e-4, 3e-4] }}; got "
                          f"{spec!r}.")
    if len(spec) > MAX_KEYS:
        raise ConfigError(f"{where}: 'sweep' of config '{family}' crosses {len(spec)} keys "
                          f"({', '.join(spec)}); at most {MAX_KEYS} (a curve or a heatmap).")
    keys, grids, scales = [], [], []
    for key, grid in spec.items():
        values, scale = parse_grid(key, grid, f"{where} config '{family}'")
        if key in overrides:
            raise _fail(key, f"{where} config '{family}'",
                        f"'{key}' is also set to {overrides[key]!r} (by 'set' or the "
                        "config); a swept key takes only the grid's values.")
        keys.append(key)
        grids.append(values)
        scales.append(scale)
    configs = []
    for combo in itertools.product(*grids):
        label = family + "".join(f".{k}={format_value(v)}"
                                 for k, v in zip(keys, combo, strict=True))
        configs.append((label, {**overrides, **dict(zip(keys, combo, strict=True))}))
    sweep = SweepSpec(family=family, preset=preset, keys=tuple(keys), grids=tuple(grids),
                      scales=tuple(scales), labels=tuple(label for label, _ in configs))
    return sweep, configs
