"""Numbers and small HTML tables as text: what the HTML report (layer 6) and each probe's
report section (its ``reading`` and ``table``, layer 5) both write with. Imports nothing of
pgscope, so every layer may use it. Every value passes through :func:`esc`
(html.escape) before it reaches a page."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from typing import Any


def esc(value: Any) -> str:
    """html.escape of ``str(value)`` (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt(x: Any, digits: int = 4) -> str:
    """A number for reading: 4 significant digits, '-inf'/'inf', '-' for None/NaN."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(xf):
        return "-"
    if math.isinf(xf):
        return "inf" if xf > 0 else "-inf"
    return f"{xf:.{digits}g}"


def ci_text(mean: Any, low: Any, high: Any, digits: int = 4) -> str:
    """'m [lo, hi]'."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{fmt(mean, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def interval_text(d: Mapping[str, Any] | None, digits: int = 3) -> str:
    """A bootstrap summary (``mean``, ``ci_low``, ``ci_high``) as 'm [lo, hi]' ('-' when
    it is missing)."""
    d = d or {}
    return ci_text(d.get("mean"), d.get("ci_low"), d.get("ci_high"), digits)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          raw: Sequence[int] = (), row_ids: Sequence[str] | None = None) -> str:
    """An HTML table; every cell escaped except the columns in ``raw`` (already HTML)."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        rid = f' id="{esc(row_ids[i])}"' if row_ids else ""
        out.append(f"<tr{rid}>")
        for j, cell in enumerate(row):
            text = cell if j in raw else esc(fmt(cell) if not isinstance(cell, str) else cell)
            cls = ' class="num"' if j in numeric else ""
            out.append(f"<td{cls}>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Tables(HTMLParser):
    """The cells of the ``<table>`` elements :func:`table` writes, as text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.notes: list[str] = []
        self.note: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "p":
            self.note = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self.note is not None:
            self.notes.append(" ".join("".join(self.note).split()))
            self.note = None
        if tag in ("td", "th") and self.cell is not None and self.tables:
            self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
        elif self.note is not None:
            self.note.append(data)


def text_tables(html: str) -> str:
    """The tables of an HTML fragment (as :func:`table` writes them) as aligned plain
    text, one block per table, for a console: the same cells as the report's; then the
    fragment's notes (its ``<p>`` paragraphs, e.g. the sample counts), one per line."""
    parser = _Tables()
    parser.feed(html)
    blocks = []
    for rows in parser.tables:
        if not rows:
            continue
        widths = [max(len(r[j]) for r in rows if j < len(r)) for j in range(max(map(len, rows)))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks + parser.notes)


__all__ = ["ci_text", "esc", "fmt", "interval_text", "table", "text_tables"]
