"""``pgscope report PATH``: one self-contained HTML file for a run, a probe output folder or
a study.

Everything is inside the file: the CSS, plotly.js (inlined once), every plot's data, the
probes' PNGs and the policy's clip as data: URLs; it makes no network request of any kind.
Plots are interactive (plotly: hover values, zoom, click a legend entry to hide a series).
Every user-provided string (config labels, env ids, study names, notes, paths) is escaped.

    from pgscope.report import write_report
    write_report("runs/hopper-ppo-s0")          # -> runs/hopper-ppo-s0/report.html
"""

from __future__ import annotations

from pathlib import Path

from pgscope.errors import PgscopeError
from pgscope.report.page import Page, esc


def kind_of(path: Path) -> str:
    """'run', 'study' or 'probes' (a folder of probe results)."""
    from pgscope.report.probes import probe_files

    if (path / "config.json").exists():
        return "run"
    from pgscope.study.spec import is_study_dir

    if is_study_dir(path):  # (the seed runs of `train --seeds` too)
        return "study"
    if path.is_dir() and probe_files(path):
        return "probes"
    raise PgscopeError(f"'{path}' is neither a run directory (config.json), a study directory "
                       "(study.json) nor a folder of probe results (<kind>.json).")


def probes_page(path: Path) -> Page:
    from pgscope.report.probes import folder_iteration, probe_files, probe_folder_html

    files = probe_files(path)
    first = files[0][1]
    settings = first.get("settings") or {}
    ck = first.get("checkpoint") or {}
    env = settings.get("env_id") or (first.get("runs") or [{}])[0].get("env_id", "?")
    it = folder_iteration(path)
    page = Page(f"pgscope probes {path.resolve().name}",
                f"{esc(env)}, checkpoint iteration {esc(it)} of {esc(ck.get('run', '?'))}")
    page.add("probes", "Probe results",
             '<p class="note">Each probe: a one-line reading, its plot and its numbers (95% '
             "bootstrap CIs in brackets). Definitions: docs/design.md section 3.</p>"
             + probe_folder_html(path, ", ".join(k for k, _, _ in files), "probe"))
    return page


def write_report(path: str | Path, out: str | Path | None = None,
                 video: str | Path | None = None) -> Path:
    """Write the report of ``path`` (run, study or probe folder) to ``out`` (default
    ``PATH/report.html``) and return the file. ``video``: a clip to embed (runs; default
    the newest mp4/gif in ``RUN/videos/``)."""
    path = Path(path)
    what = kind_of(path)  # of report, not of probe
    if what == "run":
        from pgscope.report.run_page import run_page

        page = run_page(path, Path(video) if video else None)
    elif what == "study":
        from pgscope.report.study_page import study_page

        page = study_page(path)
    else:
        page = probes_page(path)
    out = Path(out) if out is not None else path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page.render(), encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["kind_of", "write_report"]
