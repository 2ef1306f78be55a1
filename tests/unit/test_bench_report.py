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
REFERENCE = ROOT / "bench" / "reference" / "20261207T1314Z.json"
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


# --- figures of bench.dispatch_cost and bench.prefork attached to a run (#27) -------------
DISPATCH_COST = {
    "tool": "dispatch_cost", "started_utc": "2026-12-08T10:00:00+00:00", "nproc": 2,
    "loadavg_before": [3.5, 3.0, 2.0], "loadavg_after": [4.25, 3.0, 2.0], "settings": {},
    "results": {}, "features": {"measure": "instructions", "goal": 1.05, "kinds": {
        "call": {"as_built": 145_043, "without_features": 140_171, "old": 144_495, "vs_without": 1.0348,
                 "vs_old": 1.0038},
        "cast": {"as_built": 140_029, "without_features": 135_311, "old": 139_650, "vs_without": 1.0349,
                 "vs_old": 1.0027}}}}
PREFORK = {
    "tool": "prefork", "started_utc": "2026-12-08T11:00:00+00:00", "nproc": 2,
    "loadavg_before": [0.5, 0.4, 0.3], "loadavg_after": [1.75, 0.5, 0.3],
    "settings": {"ms": 20.0, "loops": 1000, "calls": 300, "rounds": 3, "in_flight": 8, "concurrency": 2},
    "results": {"1": {"best_per_s": 48.0, "median_per_s": 47.5, "rounds_per_s": [47.5, 48.0, 47.0], "scaling": 1.0},
                "2": {"best_per_s": 90.0, "median_per_s": 88.0, "rounds_per_s": [88.0, 90.0, 85.0],
                      "scaling": 1.875}}}


def _with_attached() -> dict:
    from bench import report

    doc = json.loads(REFERENCE.read_text())
    return report.attach_figures(doc, DISPATCH_COST, PREFORK)


def test_the_markdown_shows_what_unused_features_cost_and_the_processes_scaling() -> None:
    from bench import report

    text = report.markdown(_with_attached())
    lines = text.splitlines()
    features = lines.index(next(line for line in lines if line.startswith("Worker CPU per message, features unused")))
    assert "instructions per message (callgrind)" in lines[features]
    assert "2026-12-08 10:00 UTC, 2 cores, load average 3.50 before, 4.25 after" in lines[features]
    assert lines[features + 2].startswith("| kind | as built | without the feature scopes | ratio (goal <= 1.05) |")
    assert "| call | 145,043 | 140,171 | 1.035 | 144,495 | 1.004 |" in lines
    assert "| cast | 140,029 | 135,311 | 1.035 | 139,650 | 1.003 |" in lines
    assert any(line.startswith("--processes N, a CPU-bound handler (20 ms") and "load average 0.50 before" in line
               for line in lines)
    assert "| 1 | 48.0 | 47.5 | 1.00x | - |" in lines
    assert "| 2 | 90.0 | 88.0 | 1.88x | 1.6x |" in lines


def test_the_console_table_prints_the_same_sections() -> None:
    from bench import report

    text = report.table(_with_attached())
    assert "features unused" in text and "--processes N" in text
    assert any(line.split() == ["call", "145,043", "140,171", "1.035", "144,495", "1.004"] for line in text.splitlines())
    assert any(line.split() == ["2", "90.0", "88.0", "1.88x", "1.6x"] for line in text.splitlines())


def test_a_run_without_attached_figures_prints_no_such_section() -> None:
    from bench import report

    doc = json.loads(REFERENCE.read_text())
    doc.pop("attached", None)  # (the reference run carries both)
    assert "features unused" not in report.markdown(doc) and "--processes N" not in report.table(doc)


def test_report_attaches_the_tools_json_files_and_refuses_one_of_another_tool(tmp_path: Path) -> None:
    (tmp_path / "dispatch.json").write_text(json.dumps(DISPATCH_COST))
    (tmp_path / "prefork.json").write_text(json.dumps(PREFORK))
    run = subprocess.run([sys.executable, "-m", "bench.report", "--markdown", str(REFERENCE), "--dispatch-cost",
                          str(tmp_path / "dispatch.json"), "--prefork", str(tmp_path / "prefork.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "| call | 145,043 | 140,171 | 1.035 |" in run.stdout and "| 2 | 90.0 | 88.0 | 1.88x |" in run.stdout
    wrong = subprocess.run([sys.executable, "-m", "bench.report", str(REFERENCE), "--prefork",
                            str(tmp_path / "dispatch.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "not the JSON of bench.prefork" in wrong.stderr
