"""What ``pgscope presets`` prints: the presets, one of them resolved for an env with every
key, or two side by side with the keys where they differ marked.

A value is printed as ``--set`` accepts it (``true``, ``64,64``, ``0.0003``), so any line
can be pasted back as an override.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pgscope.config import ENV_DEFAULTS, PRESETS, ByEnv, Config, env_family, make_config
from pgscope.errors import ConfigError

#: Keys shown in the header rather than as rows (they name the preset and the env).
HEADER_KEYS = ("preset", "env_id")


def format_value(value: Any) -> str:
    """``value`` as ``--set`` would take it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, ByEnv):
        return "{" + ", ".join(f"{env}: {format_value(v)}" for env, v in value.items()) + "}"
    return str(value)


def value_sources(name: str, env_id: str) -> dict[str, str]:
    """Where each key of preset ``name`` resolved for ``env_id`` comes from: ``default``
    (the dataclass), ``preset``, ``env`` (:data:`pgscope.config.ENV_DEFAULTS`) or
    ``preset, per env`` (a :class:`pgscope.config.ByEnv` value of the preset)."""
    values = PRESETS[name]
    family = env_family(env_id)
    env_keys = ENV_DEFAULTS[family] if family else {}
    out = {}
    for f in dataclasses.fields(Config):
        v = values.get(f.name)
        out[f.name] = ("preset, per env" if isinstance(v, ByEnv) else
                       "env" if f.name in env_keys else
                       "preset" if f.name in values else "default")
    return out


def preset_rows(names: Sequence[str], env_id: str) -> list[tuple[str, list[str], bool]]:
    """One row per config key (those of :data:`HEADER_KEYS` left out): the key, its value
    in each preset resolved for ``env_id``, and whether the values differ."""
    configs = [make_config(name, env_id).to_dict() for name in names]
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in HEADER_KEYS:
            continue
        values = [format_value(c[f.name]) for c in configs]
        rows.append((f.name, values, len(set(values)) > 1))
    return rows


def format_presets(names: Sequence[str], env_id: str, diff_only: bool = False) -> str:
    """Preset ``names[0]`` with every key resolved for ``env_id`` and where each value
    comes from; or two presets side by side, the differing keys marked ``*`` (with
    ``diff_only``, only those)."""
    if not 1 <= len(names) <= 2:
        raise ConfigError(f"give one preset, or two to compare; got {len(names)}.")
    rows = preset_rows(names, env_id)
    n_keys, n_diff = len(rows), sum(differ for _, _, differ in rows)
    if diff_only:
        if len(names) == 1:
            raise ConfigError("--diff compares two presets: give a second one.")
        rows = [r for r in rows if r[2]]
    if len(names) == 1:
        sources = value_sources(names[0], env_id)
        header = ["key", names[0], "from"]
        table = [[key, values[0], sources[key]] for key, values, _ in rows]
        title = f"preset {names[0]} on {env_id}: all {len(rows)} keys"
    else:
        header = ["", "key", *names]
        table = [["*" if differ else "", key, *values] for key, values, differ in rows]
        title = (f"presets {names[0]} and {names[1]} on {env_id}: {n_diff} of {n_keys} "
                 "keys differ (*)")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([title, "", line.format(*header).rstrip(),
                      *(line.format(*r).rstrip() for r in table)])


def format_preset_list() -> str:
    """Every preset, its algorithm and the values it sets that differ from the defaults
    (per-env values as ``{Hopper: ..., Walker2d: ..., Humanoid: ...}``)."""
    base = Config()
    lines = []
    for name, values in PRESETS.items():
        changed = {k: v for k, v in values.items()
                   if k != "algo" and (isinstance(v, ByEnv) or getattr(base, k) != v)}
        text = ", ".join(f"{k}={format_value(v)}" for k, v in changed.items()) or \
            "(the defaults)"
        lines.append(f"{name:12s} {values['algo']:5s} {text}")
    lines += ["", "pgscope presets NAME [--env ENV]: every key of a preset resolved for an env; "
              "pgscope presets A B [--diff]: two side by side"]
    return "\n".join(lines)


__all__ = ["format_preset_list", "format_presets", "format_value", "preset_rows",
           "value_sources"]
