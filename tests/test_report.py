"""pgscope report in a real browser: headless Chromium (Debian's ``chromium`` package) driven
by playwright. Each report (a run, a probe output folder, a study) must load with no
console error and no request leaving the file (every request is intercepted; only the file
itself and data: URLs are allowed), show its sections, plots and numbers, and escape every
user-provided string (a run directory, study name and description carrying HTML/script
must not execute: no dialog opens and the text shows literally).

Chromium is a system package: ``make sysdeps`` (run by ``make test``) installs it. Without
it these tests fail with that instruction; they never pass silently.

Set PGSCOPE_REPORT_SCREENSHOTS=DIR to keep the screenshots (full pages) in DIR.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pgscope import make_config, train
from pgscope.cli import main
from pgscope.report import write_report

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "docs" / "probes" / "hopper-ppo-iter150"
EVIL = "<script>alert(1)</script>"
EVIL_DIR = "<img src=x onerror=alert(2)>"  # a directory name cannot hold '/'
TINY = dict(steps_per_iter=256, minibatches=4, epochs=2, hidden=(16,))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run 'make sysdeps' (Debian package 'chromium'); "
                    "the browser tests do not pass without a browser.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Visit:
    """A report opened in a fresh page, with everything the page did recorded."""

    def __init__(self, browser, html: Path, shot: Path) -> None:
        self.errors: list[str] = []
        self.blocked: list[str] = []
        self.dialogs: list[str] = []
        url = html.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

        def route(r):
            if r.request.url == url or r.request.url.startswith("data:"):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()
        self.page.route("**/*", route)
        self.page.goto(url)
        self.page.wait_for_function(
            "document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 || "
            "document.querySelectorAll('.js-plotly-plot').length === 0", timeout=30_000)
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(shot), full_page=True)
        keep = os.environ.get("PGSCOPE_REPORT_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / shot.name)
        self.text = self.page.inner_text("body")

    def ids(self) -> set[str]:
        return set(self.page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))

    def plots(self) -> int:
        return self.page.eval_on_selector_all(".js-plotly-plot .main-svg", "e => e.length")

    def check_clean(self) -> None:
        assert not self.errors, self.errors
        assert not self.blocked, f"requests left the file: {self.blocked}"
        assert not self.dialogs, f"a script from the data ran: {self.dialogs}"


@pytest.fixture(scope="module")
def sick_run(tmp_path_factory):
    """A tiny Pendulum run whose huge initial std saturates the actions (a doctor finding),
    in a directory whose name is HTML, with the docs' probe results and a short clip."""
    root = tmp_path_factory.mktemp("report")
    run = root / EVIL_DIR
    cfg = make_config("ppo", "Pendulum-v1", {**TINY, "total_steps": 8 * 256, "seed": 0,
                                             "init_log_std": 3.0})
    train(cfg, run, progress=False)
    shutil.copytree(PROBES, run / "probes" / "iter_000004")
    import imageio.v2 as imageio

    frames = [np.full((64, 96, 3), 40 * i, dtype=np.uint8) for i in range(6)]
    (run / "videos").mkdir()
    imageio.mimwrite(run / "videos" / "final.mp4", frames, fps=5, macro_block_size=16)
    return run


def test_run_report_in_the_browser(browser, sick_run, tmp_path):
    html = write_report(sick_run, tmp_path / "run.html")
    v = Visit(browser, html, tmp_path / "report-run.png")
    v.check_clean()
    assert {"summary", "doctor", "learning", "diagnostics", "probes", "video", "config",
            "finding-1", "panel-kl", "panel-saturation", "panel-ev"} <= v.ids()
    assert v.plots() >= 10  # learning curve + diagnostics panels, all drawn by plotly
    # the directory name shows as text, never as an element
    assert EVIL_DIR in v.text
    assert v.page.eval_on_selector_all("main img[src='x'], header img", "e => e.length") == 0
    # the doctor finding, linked to its shaded panel, with its numbers
    assert "actions-saturated" in v.text
    records = [json.loads(x) for x in (sick_run / "metrics.jsonl").read_text().splitlines()]
    worst = max(r["action_saturation"] for r in records)
    assert f"{worst:.3g}" in v.text
    link = v.page.get_attribute("#finding-1 a", "href")
    assert link.startswith("#panel-") or link == "#learning"
    # the saturation panel shades the finding's iterations (a plotly shape)
    shapes = v.page.evaluate("document.getElementById('fig-saturation').layout.shapes.length")
    assert shapes >= 1
    # registry names and units label the panels
    assert "action_saturation" in v.text and "nats" in v.page.content()
    # probes: reading, numbers and the plot (as a data: URL)
    values = json.loads((PROBES / "values.json").read_text())
    rel = values["vs_gae_targets"]["relative_error"]["mean"]
    assert f"{100 * rel:.1f}%" in v.text
    assert v.page.eval_on_selector_all("#probes img", "e => e.length") >= 4
    assert all(src.startswith("data:image/png;base64,") for src in v.page.eval_on_selector_all(
        "#probes img", "e => e.map(i => i.getAttribute('src'))"))
    # the clip plays from a data: URL
    assert v.page.get_attribute("#video video", "src").startswith("data:video/mp4;base64,")


def test_probe_report_in_the_browser(browser, tmp_path):
    html = write_report(PROBES, tmp_path / "probe.html")
    v = Visit(browser, html, tmp_path / "report-probe.png")
    v.check_clean()
    for kind in ("gradients", "values", "baselines", "landscape", "trust-region"):
        assert f"probe-{kind}" in v.ids()
    grads = json.loads((PROBES / "gradients.json").read_text())
    row = grads["policy"][-1]
    assert f"{row['pairwise_cosine']['mean']:.3g}" in v.text  # the numbers table
    assert "pairwise cosine" in v.text and "'true' gradient" in v.text  # the readings


def test_study_report_in_the_browser(browser, tmp_path):
    from pgscope.study import load_spec, run_study

    spec_file = tmp_path / "s.toml"
    spec_file.write_text(
        f'name = "{EVIL}"\ndescription = "notes {EVIL} & more"\nenvs = ["Pendulum-v1"]\n'
        "seeds = [0, 1]\ntotal_steps = 512\n"
        "set = { steps_per_iter = 256, minibatches = 4, epochs = 2, hidden = [16] }\n"
        '[[configs]]\nlabel = "base"\npreset = "ppo"\n'
        '[[configs]]\nlabel = "wide-std"\npreset = "ppo"\ninit_log_std = 1.0\n'
        "[score]\nlast_iterations = 2\n")
    study = tmp_path / "study"
    run_study(load_spec(spec_file), study, workers=1, progress=False)
    html = write_report(study, tmp_path / "study.html")
    assert EVIL not in html.read_text()  # escaped everywhere, in the tables and the plots
    v = Visit(browser, html, tmp_path / "report-study.png")
    v.check_clean()
    assert {"summary", "runs", "curves", "scores", "comparisons", "power", "profiles",
            "reliability", "configs"} <= v.ids()
    assert EVIL in v.text  # shown literally
    assert v.plots() >= 4  # curves, intervals, P(a > b), profiles
    from pgscope.study.analysis import summarize

    agg = summarize(study)["tables"]["aggregates"]
    iqm = agg[agg["label"] == "base"]["iqm"].iloc[0]
    assert f"{iqm:.4g}" in v.text
    assert "2/0/0/0 of 2" in v.text  # the run counts


def test_report_cli_and_errors(sick_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(sick_run), "--out", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    text = out.read_text()
    assert "<script src" not in text and "http://" not in text.split("<script>")[0]
    assert EVIL_DIR not in text  # the raw name never reaches the HTML
    assert main(["report", str(tmp_path)]) == 2  # neither run, study nor probes
    assert "neither a run directory" in capsys.readouterr().err


def test_probe_folder_shows_every_registered_probe_kind(tmp_path):
    """A features.json (probe 7) gets its reading and table, like the five Closer-Look ones;
    the paper's definitions appear beside pgscope's."""
    from pgscope.report.probes import probe_folder_html

    ci = dict(mean=12.5, ci_low=11.0, ci_high=14.0)
    (tmp_path / "features.json").write_text(json.dumps(dict(
        feature_dot=ci, feature_cosine=dict(mean=0.9, ci_low=0.8, ci_high=0.95),
        feature_norm=ci, srank=dict(mean=30, ci_low=29, ci_high=31),
        settings=dict(feature_dim=64))))
    values = json.loads((PROBES / "values.json").read_text())
    values["vs_cut_returns"] = values["vs_true_returns"]
    (tmp_path / "values.json").write_text(json.dumps(values))
    html = probe_folder_html(tmp_path, "probes", "p")
    assert html.index("p-values") < html.index("p-features")  # registry order
    assert "effective rank" in html and "12.5 [11, 14]" in html and "of 64" in html
    assert "cut returns (the paper&#x27;s)" in html or "cut returns (the paper's)" in html


def test_the_final_return_names_the_window_it_averages(tmp_path):
    """An 8-iteration run's page said 'final return (last 10 iterations)'."""
    from pgscope.config import make_config
    from pgscope.report.run_page import run_page
    from pgscope.run import RunDir

    def summary_of(returns: list[float]) -> str:
        path = tmp_path / f"run{len(returns)}"
        run, lock = RunDir.create(path, make_config("ppo", "Pendulum-v1"))
        for i, ret in enumerate(returns):
            run.append_metrics(dict(iteration=i + 1, env_steps=64 * (i + 1), return_mean=ret))
        run.write_status("complete")
        lock.release()
        return run_page(path).render()

    assert "final return (last 8 iterations with episodes, 95% t-CI)" in summary_of(
        [float(i) for i in range(8)])
    assert "final return (last 10 iterations with episodes" in summary_of(
        [float(i) for i in range(12)])
    assert "final return (last 1 iteration with episodes)" in summary_of([5.0])


def test_diagnostic_panels_axes_read_as_a_person_expects():
    """The explained-variance axis was titled '1', the critic-features panel put the dot
    product (~8) and the cosine (<= 1) on one linear axis, and log axes labelled their
    minor ticks ('5, 2, 0.01, 5, 2')."""
    import json
    import re

    from pgscope.report.run_page import PANELS, diagnostics

    records = [dict(iteration=i + 1, env_steps=64 * (i + 1), explained_variance=0.1 * i,
                    kl_mean=10.0 ** -(1 + i % 3), feature_dot=8.0 + i, feature_norm=3.0,
                    feature_cosine=0.5) for i in range(10)]
    html = diagnostics(records, [], {"algo": "ppo", "ppo_loss": "clip"})
    figures = {m.group(1): json.loads(m.group(2)) for m in re.finditer(
        r'Plotly\.newPlot\(\s*"fig-([a-z-]+)",\s*\[.*?\],\s*(\{.*?\}),\s*\{"displaylogo"',
        html, flags=re.S)}  # each figure's layout
    assert {"ev", "kl", "features", "feature-cosine"} <= set(figures), set(figures)
    assert figures["ev"]["yaxis"]["title"]["text"] == "dimensionless"
    assert figures["kl"]["yaxis"]["type"] == "log" and figures["kl"]["yaxis"]["dtick"] == 1
    keys = {anchor: keys for anchor, _, keys, _, _ in PANELS}
    assert "feature_cosine" not in keys["features"] and "feature_dot" in keys["features"]


def test_every_panel_draws_the_levels_its_doctor_checks_watch():
    """Only the KL panel showed a threshold; each fixed level an alarm compares a plotted
    metric with (Alarm.lines) is now drawn on the panel that shows the metric."""
    from pgscope.doctor import ALARMS
    from pgscope.report.run_page import PANELS, alarm_lines

    plotted = {k for _, _, keys, _, _ in PANELS for k in keys}
    watched = {key for a in ALARMS for key, _ in a.lines}
    assert watched and watched <= plotted
    assert alarm_lines(["action_saturation"]) == {0.8: ["actions-saturated"]}
    assert alarm_lines(["entropy_frac", "policy_std"]) == {0.1: ["entropy-collapse"],
                                                          0.99: ["entropy-at-max"]}
    assert alarm_lines(["value_target_absmax", "advantage_absmax"]) == {
        100.0: ["values-out-of-scale"]}


def test_the_config_section_lists_the_changed_keys_first():
    import json

    from pgscope.config import make_config
    from pgscope.report.run_page import config_html

    def as_saved(cfg):  # as config.json holds it
        return json.loads(json.dumps(cfg.to_dict()))

    html = config_html(as_saved(make_config("ppo", "Pendulum-v1", {"clip_eps": 0.1,
                                                                   "seed": 3})), {})
    head = html.split("<h3>Every key</h3>")[0]
    assert "Changed from the preset ppo (1 key)" in head and "clip_eps" in head
    assert "policy_lr" not in head and "seed" not in head.split("(1 key)")[1]
    same = config_html(as_saved(make_config("ppo", "Pendulum-v1")), {})
    assert "(0 keys)" in same and "none: the preset as it is" in same
