"""Each probe's section of the HTML report (its ``reading`` and ``table``) reads the result
that probe really writes: every registered probe is computed on a tiny tabular run, and
every cell of its table must hold a value (no empty cell, no '-' for a missing key, no
'nan'), its reading must be its own sentence (not the report's generic one). The
trust-region table once showed '-' for its per-run ratios because the report read keys the
probe no longer wrote (``ratio_max_median`` for ``ratio_max_after_median``). A probe
without a reading or table (a plug-in's) gets the report's generic ones."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pgscope import make_config, train
from pgscope.cli import main
from pgscope.envs.tabular import ENV_ID
from pgscope.html_format import text_tables
from pgscope.probes import Probe, probe_names, probes, register_probe, run_probes
from pgscope.report.probes import (
    NO_TABLE,
    generic_reading,
    numbers,
    probe_folder_html,
    reading,
)

ROOT = Path(__file__).resolve().parents[1]
#: Results written by an older pgscope (the legacy trust-region key names).
DOCS_PROBES = ROOT / "docs" / "probes" / "hopper-ppo-iter150"
#: A tiny PPO run on the tabular MDP: trains in about 2 s, every probe in about 6 s.
TINY = dict(steps_per_iter=256, num_envs=1, minibatches=4, epochs=2, total_steps=512,
            gamma=0.9, gae_lambda=0.95, checkpoint_every=1)
SETTINGS = dict(sizes=(64, 256), k=3, true_pairs=4096, value_pairs=2048, fit_pairs=4096,
                landscape_counts=(200,), landscape_grid=(0, 1), landscape_directions=2)
#: What a cell (or a part of 'mean [low, high]') must never be.
MISSING = {"", "-", "nan", "none", "null"}


class _Tables(HTMLParser):
    """Every ``<table>`` of a fragment: its header cells and its rows of data cells, as
    the text a reader sees (entities unescaped)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, list]] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
            if tag == "th":
                self.tables[-1]["header"].append(self._row.pop())
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.tables[-1]["rows"].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(fragment: str) -> list[dict[str, list]]:
    parser = _Tables()
    parser.feed(fragment)
    parser.close()
    return parser.tables


def empty_cells(fragment: str) -> list[str]:
    """'table t, row r, column "header": "text"' for every cell with nothing to read: empty,
    '-' (how the report writes None and NaN), 'nan', or an interval with such a part."""
    bad = []
    for t, tab in enumerate(tables(fragment)):
        for r, row in enumerate(tab["rows"]):
            assert len(row) == len(tab["header"]), (tab["header"], row)
            for header, cell in zip(tab["header"], row, strict=True):
                parts = [cell, *re.split(r"[\s\[\],]+", cell.strip(" []"))]
                if any(p.strip().lower() in MISSING for p in parts):
                    bad.append(f'table {t}, row {r}, column "{header}": {cell!r}')
    return bad


def test_the_cell_checker_sees_missing_values():
    html = ("<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody>"
            "<tr><td>1</td><td>0.5 [0.4, 0.6]</td></tr>"
            "<tr><td>-</td><td>0.5 [-, 0.6]</td></tr>"
            "<tr><td></td><td>nan</td></tr></tbody></table>")
    assert len(empty_cells(html)) == 4
    assert empty_cells(html.split("<tr><td>-")[0] + "</tbody></table>") == []
    assert empty_cells('<table><tr><th>x</th></tr><tr><td class="num">-0.25</td></tr></table>'
                       ) == []


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A real result of every registered probe, on a tiny tabular PPO run."""
    run = train(make_config("ppo", ENV_ID, TINY), tmp_path_factory.mktemp("tables") / "run",
                progress=False)
    return run_probes("all", run, None, progress=False, log=lambda line: None, **SETTINGS)


def test_every_registered_probe_was_computed(results):
    assert tuple(results) == probe_names()


@pytest.mark.parametrize("kind", probe_names())
def test_each_probe_reads_and_tabulates_its_own_result(results, kind):
    """No cell of the probe's table is empty, '-' or 'nan', and its reading is its own."""
    result = results[kind]
    probe = probes().get(kind)
    assert probe.reading is not None and probe.table is not None, kind
    sentence = reading(kind, result)
    assert sentence == probe.reading(result)
    assert sentence != generic_reading(kind) and sentence.strip()
    assert "nan" not in sentence.lower().split() and " - " not in sentence, sentence
    html = numbers(kind, result)
    assert html == probe.table(result) and html != NO_TABLE
    found = tables(html)
    assert found and all(t["rows"] for t in found), html
    bad = empty_cells(html)
    assert not bad, f"{kind}: " + "; ".join(bad)


def test_trust_region_tables_every_run_it_compares(results):
    html = numbers("trust-region", results["trust-region"])
    runs = tables(html)[1]
    assert runs["header"][1:3] == ["max ratio (median over iterations)", "max ratio (max)"]
    summary = results["trust-region"]["runs"][0]["summary"]
    assert runs["rows"][0][1] == f"{summary['ratio_max_after_median']:.4g}"
    assert runs["rows"][0][2] == f"{summary['ratio_max_after_max']:.4g}"


def test_results_written_by_an_older_pgscope_still_fill_their_tables():
    """The docs' Hopper results predate the ``*_after`` keys (``ratio_max_median``,
    ``ratio_max`` per epoch): read through their old names."""
    for kind in ("gradients", "values", "baselines", "landscape", "trust-region"):
        result = json.loads((DOCS_PROBES / f"{kind}.json").read_text())
        assert reading(kind, result) != generic_reading(kind), kind
        html = numbers(kind, result)
        assert html != NO_TABLE, kind
        assert not empty_cells(html), (kind, empty_cells(html))


def test_a_result_its_probe_cannot_read_gets_the_generic_reading_and_a_note():
    assert reading("gradients", {}) == generic_reading("gradients")
    assert numbers("trust-region", {"replay": {}}) == NO_TABLE


@pytest.fixture
def plug_in():
    """A probe registered from outside pgscope.probes, with no reading or table."""
    def compute(p):
        return {}

    registered = register_probe(Probe(
        name="plug-in", description="a plug-in's probe", compute=compute,
        plot=lambda result, path: None, headline=lambda result: "plug-in: done",
        schema={"score": "a number"}, order=99))
    yield registered
    probes().unregister("plug-in")


def test_a_plug_in_probe_without_reading_or_table_gets_the_generic_ones(plug_in, tmp_path):
    result = {"score": 0.25, "spread": {"mean": 1.5, "ci_low": 1.0, "ci_high": 2.0},
              "count": 12, "series": [1, 2, 3], "settings": {"env_id": "x"},
              "pgscope_version": "0"}
    assert reading("plug-in", result) == generic_reading("plug-in")
    html = numbers("plug-in", result)
    (tab,) = tables(html)
    assert tab["rows"] == [["score", "0.25"], ["spread", "1.5 [1, 2]"], ["count", "12"]]
    assert numbers("plug-in", {"series": [1]}) == NO_TABLE
    (tmp_path / "plug-in.json").write_text(json.dumps(result))
    page = probe_folder_html(tmp_path, "probes", "p")
    assert 'id="p-plug-in"' in page and generic_reading("plug-in") in page
    assert "1.5 [1, 2]" in page


@pytest.mark.parametrize("kind", probe_names())
def test_the_console_shows_each_probes_own_table_cell_for_cell(results, kind):
    """``pgscope probe`` prints the report's table of each probe as text: every header
    and cell, one line per row (plus a rule under each header)."""
    html = numbers(kind, results[kind])
    text = text_tables(html)
    lines = [line for line in text.splitlines() if line and set(line) - {"-", " "}]
    found = tables(html)
    notes = [" ".join(re.sub("<[^>]+>", "", n).split())
             for n in re.findall(r"<p[^>]*>(.*?)</p>", html, flags=re.S)]
    assert len(lines) == sum(1 + len(t["rows"]) for t in found) + len(notes)
    for tab in found:
        for row in [tab["header"], *tab["rows"]]:
            assert any(all(cell in line for cell in row) for line in lines), row
    for note in notes:
        assert note in lines, note


#: What each probe's table says about the samples behind its numbers.
SAMPLE_COUNTS = {
    "gradients": ("pairs per estimate", "estimates (K)", "(4096 pairs)"),
    "values": ("states",),
    "baselines": ("pairs per estimate", "estimates (K)", "fit to 4096 pairs"),
    "landscape": ("(200 steps)",),
    "trust-region": ("state-action pairs", "one value per iteration"),
    "features": ("states", "within-episode pairs", "rollout segments"),
}


@pytest.mark.parametrize("kind", probe_names())
def test_each_probes_table_states_the_samples_behind_its_numbers(results, kind):
    text = text_tables(numbers(kind, results[kind]))
    for phrase in SAMPLE_COUNTS.get(kind, ()):
        assert phrase in text, (kind, phrase)
    assert kind in SAMPLE_COUNTS, f"say what samples {kind}'s numbers rest on"


def test_probe_gradients_prints_both_networks_every_size_and_flags_few_estimates(
        tmp_path, capsys):
    run = train(make_config("ppo", ENV_ID, TINY), tmp_path / "run", progress=False)
    assert main(["probe", "gradients", str(run), "--out", str(tmp_path / "g"), "--k", "4",
                 "--sizes", "64", "256", "--true-pairs", "4096", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "estimates (K)" in out and "(4096 pairs)" in out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("policy ", "value "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (net, n, "4!") for net in ("policy", "value") for n in ("64", "256")]
    assert "only 4 estimates per size" in out
    saved = json.loads((tmp_path / "g" / "gradients.json").read_text())
    assert "only 4 estimates per size" in saved["settings"]["few_samples_note"]
    assert main(["probe", "gradients", str(run), "--out", str(tmp_path / "g10"), "--k", "10",
                 "--sizes", "64", "--true-pairs", "4096", "--quiet"]) == 0
    assert "!" not in capsys.readouterr().out.split("estimates (K)")[1].split("\n\n")[0]
