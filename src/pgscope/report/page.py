"""The page: one self-contained HTML file (inline CSS, plotly.js inlined once, images and
videos as data: URLs), and the helpers every section uses; the number and table ones
(:func:`esc`, :func:`fmt`, :func:`ci_text`, :func:`table`) live in
:mod:`pgscope.html_format`, where the probes' own report sections find them too. Every
user-provided string passes through :func:`esc` (html.escape) before it reaches the page;
plotly receives escaped text too and JSON-encodes it (``<`` as ``\\u003c``), so no label
can close a script or open a tag."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the number and table helpers, shared with the probes' own report sections
from pgscope.html_format import ci_text as ci_text
from pgscope.html_format import esc as esc
from pgscope.html_format import fmt as fmt
from pgscope.html_format import interval_text as interval_text
from pgscope.html_format import table as table

#: Colours per series / config: Plotly's qualitative palettes (10 distinct, then 24).
PALETTE_10 = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692",
              "#b6e880", "#ff97ff", "#fecb52")
PALETTE_24 = ("#2e91e5", "#e15f99", "#1ca71c", "#fb0d0d", "#da16ff", "#222a2a", "#b68100",
              "#750d86", "#eb663b", "#511cfb", "#00a08b", "#fb00d1", "#fc0080", "#b2828d",
              "#6c7c32", "#778aae", "#862a16", "#a777f1", "#620042", "#1616a7", "#da60ca",
              "#6c4516", "#0d2a63", "#af0038")
SEVERITY_COLOUR = {"bug": "#d62728", "warning": "#ff7f0e"}
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
#: Largest video embedded in a report.
VIDEO_CAP_BYTES = 8 * 1024 * 1024

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #ffffff; --panel: #f6f8fa;
        --accent: #0969da; --bug: #d62728; --warn: #b35900; --ok: #1a7f37; }
* { box-sizing: border-box; }
body { font-family: FONT_FAMILY; color: var(--fg); background: var(--bg); margin: 0;
       line-height: 1.45; font-size: 15px; }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: var(--muted); font-size: 13px; }
nav { position: sticky; top: 0; background: var(--bg); border-bottom: 1px solid var(--line);
      padding: 6px 28px; z-index: 10; font-size: 14px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { margin-top: 26px; }
h2 { font-size: 19px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 16px; margin: 18px 0 6px; }
h4 { font-size: 14px; margin: 14px 0 4px; }
p.note, .caption { color: var(--muted); font-size: 13px; margin: 4px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left;
         vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
        gap: 10px; }
.panel { border: 1px solid var(--line); border-radius: 6px; padding: 4px; }
.panel .caption { padding: 0 6px 4px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
         font-weight: 600; color: #fff; background: var(--muted); }
.badge.complete, .badge.healthy { background: var(--ok); }
.badge.diverged, .badge.failed, .badge.bug { background: var(--bug); }
.badge.running, .badge.interrupted, .badge.warning { background: var(--warn); }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 14px; }
.kv div:nth-child(odd) { color: var(--muted); }
.reading { font-weight: 600; margin: 4px 0 8px; }
img.probe { max-width: 100%; border: 1px solid var(--line); border-radius: 4px; }
video, img.video { max-width: 640px; width: 100%; border: 1px solid var(--line); }
.changed { background: #fff8c5; }
details summary { cursor: pointer; color: var(--accent); }
""".replace("FONT_FAMILY", FONT)


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value block (values escaped)."""
    return '<div class="kv">' + "".join(
        f"<div>{esc(k)}</div><div>{esc(v if isinstance(v, str) else fmt(v))}</div>"
        for k, v in pairs) + "</div>"


def badge(text: str, kind: str | None = None) -> str:
    return f'<span class="badge {esc(kind or text)}">{esc(text)}</span>'


def image_data_url(path: Path) -> str:
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg",
            ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image(path: Path, alt: str, cls: str = "probe") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="{image_data_url(path)}">'


def video(path: Path) -> str:
    """The clip inline (mp4 as <video>, gif as <img>), or a note when it is over the cap."""
    size = path.stat().st_size
    if size > VIDEO_CAP_BYTES:
        return (f'<p class="note">The clip {esc(path.name)} ({size / 2**20:.1f} MiB) is larger '
                f"than the {VIDEO_CAP_BYTES / 2**20:.0f} MiB embedded in a report; open it "
                "from the run directory.</p>")
    if path.suffix.lower() == ".gif":
        return image(path, f"clip {path.name}", cls="video")
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<video controls muted loop playsinline preload="metadata" '
            f'src="data:video/mp4;base64,{data}"></video>')


def figure(fig: Any, div_id: str, height: int | None = None) -> str:
    """A plotly figure as a div and its script (plotly.js itself is inlined once per page).
    Hover values, zoom and toggling series by clicking the legend are plotly's own."""
    fig.update_layout(template="plotly_white", font=dict(family=FONT, size=12),
                      margin=dict(l=60, r=20, t=40, b=50), hoverlabel=dict(namelength=-1))
    if height:
        fig.update_layout(height=height)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config=dict(displaylogo=False, responsive=True))


def rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def palette(n: int) -> tuple[str, ...]:
    return PALETTE_10 if n <= 10 else PALETTE_24


@dataclass
class Page:
    """Sections in order; rendered to one HTML string by :meth:`render`."""

    title: str
    subtitle: str = ""
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, title, html)

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))

    def render(self) -> str:
        import plotly.offline

        from pgscope import __version__

        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in self.sections)
        body = "".join(f'<section id="{esc(a)}"><h2>{esc(t)}</h2>{html_}</section>'
                       for a, t, html_ in self.sections)
        # plotly.js, inline: no request leaves the file (its source is JavaScript, escaped
        # against an early </script> by the library itself)
        plotly_js = plotly.offline.get_plotlyjs()
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(self.title)}</title><style>{CSS}</style>"
            f"<script>{plotly_js}</script></head><body>"
            f"<header><h1>{esc(self.title)}</h1><div class=\"sub\">{self.subtitle}"
            f" &middot; written {esc(stamp)} by pgscope {esc(__version__)}</div></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
