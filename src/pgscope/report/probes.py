"""Probe results in a report: for each ``<kind>.json`` its plot (the probe's own PNG), its
numbers and a one-line reading of what they mean. The reading and the table are the
probe's own (``reading`` and ``table`` of its :class:`pgscope.probes.Probe`): this module
knows no probe by name; a probe without them gets a generic sentence and table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pgscope.probes import probe_names, probes
from pgscope.report.page import esc, fmt, image, interval_text, table


def probe_files(folder: Path) -> list[tuple[str, dict[str, Any], Path | None]]:
    """(kind, result, png or None) of every probe result in ``folder``, in the probe
    registry's order (:func:`pgscope.probes.probe_names`)."""
    out = []
    for kind in probe_names():
        f = folder / f"{kind}.json"
        if f.exists():
            try:
                result = json.loads(f.read_text())
            except ValueError:
                continue
            png = folder / f"{kind}.png"
            out.append((kind, result, png if png.exists() else None))
    return out


def probe_folders(run: Path) -> list[Path]:
    """A run's probe output folders (``probes/iter_*``, finished ones only), by iteration."""
    root = run / "probes"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and probe_files(p))


#: What a result holds besides the probe's own numbers (written by ``run_probes``).
BOOKKEEPING = ("checkpoint", "pgscope_version", "probe_settings", "settings")
#: The table of a result that its probe's ``table`` cannot read.
NO_TABLE = '<p class="note">(no table for this result)</p>'
#: What a probe's ``reading`` or ``table`` raises on a result it cannot read.
UNREADABLE = (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError)


def generic_reading(kind: str) -> str:
    """The sentence of a probe without a reading of its own (or of a result it cannot
    read)."""
    return f"{kind}: see the numbers below."


def generic_table(r: dict[str, Any]) -> str:
    """The table of a probe without one of its own: every top-level number and bootstrap
    summary (``mean``, ``ci_low``, ``ci_high``) of the result, by key."""
    rows = []
    for key, value in r.items():
        if key in BOOKKEEPING:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append([key, fmt(value)])
        elif isinstance(value, dict) and "mean" in value:
            rows.append([key, interval_text(value)])
    return table(["key", "value"], rows) if rows else NO_TABLE


def reading(kind: str, r: dict[str, Any]) -> str:
    """One sentence: what the probe's numbers say (the probe's own ``reading``)."""
    own = probes().get(kind).reading
    if own is not None:
        try:
            return own(r)
        except UNREADABLE:
            pass
    return generic_reading(kind)


def numbers(kind: str, r: dict[str, Any]) -> str:
    """The probe's main numbers as a table (95% CIs in brackets; the probe's own
    ``table``)."""
    own = probes().get(kind).table
    if own is None:
        return generic_table(r)
    try:
        return own(r)
    except UNREADABLE:
        return NO_TABLE


def probe_folder_html(folder: Path, heading: str, anchor: str) -> str:
    """Every probe result of one output folder: reading, plot, numbers."""
    parts = [f'<h3 id="{esc(anchor)}">{esc(heading)}</h3>']
    for kind, result, png in probe_files(folder):
        parts.append(f'<h4 id="{esc(anchor)}-{esc(kind)}">{esc(kind)}</h4>')
        parts.append(f'<p class="reading">{esc(reading(kind, result))}</p>')
        if png is not None:
            parts.append(image(png, f"{kind} probe plot"))
        parts.append(numbers(kind, result))
        ck = result.get("checkpoint") or {}
        if ck:
            bits = [f"iteration {fmt(ck.get('iteration'))}"]
            if ck.get("env_steps") is not None:
                bits.append(f"{fmt(ck['env_steps'])} env steps")
            if result.get("pgscope_version"):
                bits.append(f"pgscope {result['pgscope_version']}")
            parts.append(f'<p class="note">checkpoint: {esc(", ".join(bits))}</p>')
    return "".join(parts)


def folder_iteration(folder: Path) -> int | None:
    for _, result, _ in probe_files(folder):
        it = (result.get("checkpoint") or {}).get("iteration")
        if isinstance(it, int):
            return it
    digits = "".join(c for c in folder.name if c.isdigit())
    return int(digits) if digits else None
