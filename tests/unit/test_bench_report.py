"""The benchmark page's charts: ``python -m bench.report --plot`` draws them from a run's JSON, and
the committed ones (docs/benchmark/*.svg) are those of the reference run the docs quote."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from bench import plot

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "bench" / "reference" / "20261122T0938Z.json"
CHARTS = ROOT / "docs" / "benchmark"
SVG = "{http://www.w3.org/2000/svg}"


def test_plot_writes_one_svg_per_chart_from_a_results_file(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "bench.report", "--plot", str(REFERENCE), "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(chart.filename for chart in plot.CHARTS)
    for name in written:
        root = ElementTree.parse(tmp_path / name).getroot()
        assert root.tag == f"{SVG}svg"
        assert len(root.findall(f"{SVG}rect")) > 4, name  # bars, not an empty frame


def test_bars_are_in_proportion_to_the_figures() -> None:
    doc = json.loads(REFERENCE.read_text())
    chart = next(chart for chart in plot.CHARTS if chart.filename == "calls-per-second.svg")
    root = ElementTree.fromstring(plot.charts(doc)[chart.filename])
    widths = [float(rect.get("width", 0)) for rect in root.findall(f"{SVG}rect") if rect.get("x") == str(plot.LABEL_WIDTH)]
    sequential = doc["results"]["sequential"]
    assert abs(widths[0] / widths[1] - sequential["amqprpc"]["per_s"] / sequential["raw"]["per_s"]) < 0.01


def test_a_scenario_the_run_did_not_measure_is_left_out() -> None:
    doc = json.loads(REFERENCE.read_text())
    del doc["results"]["aio_32"]
    drawn = plot.charts(doc)["calls-per-second.svg"]
    assert "AsyncRpcClient" not in drawn and "one call at a time" in drawn


def test_the_committed_charts_are_the_reference_runs() -> None:
    doc = json.loads(REFERENCE.read_text())
    for name, text in plot.charts(doc).items():
        committed = (CHARTS / name).read_text(encoding="utf-8")
        assert committed == text, (f"docs/benchmark/{name} is out of date; redraw with: "
                                   f"python -m bench.report --plot {REFERENCE.relative_to(ROOT)}")
