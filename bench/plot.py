"""The benchmark's figures as charts: SVG files drawn from a run's JSON (``python -m bench.report
--plot RESULT.json``), for the documentation's benchmark page.

Written by hand rather than with a plotting library: the charts are grouped bars, the docs build
then needs nothing more, and the same JSON always gives the same bytes (no timestamps or random
ids in the output), so a committed chart is checked against its JSON by a test and changes only
when the figures do.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

OURS, RAW = "#e8590c", "#868e96"  # amqprpc in the site's colour, raw py-amqp in grey
WIDTH, LABEL_WIDTH, VALUE_WIDTH = 760, 250, 70
BAR, GAP, TOP = 13, 12, 64


@dataclass(frozen=True)
class Chart:
    """One chart: rows of (label, scenario, key) drawn as amqprpc and raw bars side by side."""

    filename: str
    title: str
    unit: str
    rows: Tuple[Tuple[str, str, str], ...]
    note: str = ""


CHARTS = (
    Chart("calls-per-second.svg", "Throughput: calls (or casts) per second, higher is better", "per second",
          (("one call at a time", "sequential", "per_s"),
           ("32 in flight, one client", "pipelined_32", "per_s"),
           ("8 threads, one client", "threads_8", "per_s"),
           ("AsyncRpcClient, 32 in flight", "aio_32", "per_s"),
           ("confirmed casts, end to end", "casts", "per_s"),
           ("1 KB payloads, 8 in flight", "payload_1k", "per_s"),
           ("64 KB payloads, 8 in flight", "payload_64k", "per_s"),
           ("1 MB payloads, 8 in flight", "payload_1m", "per_s")),
          "raw: 8 threads is one thread keeping 8 calls in flight (py-amqp cannot share a connection)"),
    Chart("latency.svg", "Latency: milliseconds, lower is better", "ms",
          (("one at a time, p50", "sequential", "p50_ms"),
           ("one at a time, p99", "sequential", "p99_ms"),
           ("cast confirmed, p50", "casts", "p50_ms"),
           ("8 threads, p50", "threads_8", "p50_ms"),
           ("32 in flight, p50", "pipelined_32", "p50_ms"),
           ("AsyncRpcClient 32 in flight, p50", "aio_32", "p50_ms"))),
    Chart("cpu-per-call.svg", "CPU time per call: microseconds, lower is better", "µs",
          (("one at a time, client", "sequential", "client_cpu_us"),
           ("one at a time, server", "sequential", "server_cpu_us"),
           ("32 in flight, client", "pipelined_32", "client_cpu_us"),
           ("32 in flight, server", "pipelined_32", "server_cpu_us")),
          "CPU per call swings far less than calls/s with the neighbours' load"),
    Chart("processes.svg", "Server processes on one queue, 32 calls in flight: calls per second", "per second",
          (("1 process", "workers_1", "per_s"),
           ("2 processes", "workers_2", "per_s"),
           ("3 processes", "workers_3", "per_s"),
           ("4 processes", "workers_4", "per_s")),
          "2 cores: the client and the broker share them with the servers"),
)


def figures(doc: Dict[str, Any], chart: Chart) -> List[Tuple[str, Optional[float], Optional[float]]]:
    """The chart's rows that the run measured: (label, amqprpc, raw)."""
    rows = []
    for label, scenario, key in chart.rows:
        result = doc["results"].get(scenario)
        if result is not None and result["amqprpc"].get(key) is not None:
            rows.append((label, result["amqprpc"][key], result["raw"].get(key)))
    return rows


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def svg(chart: Chart, rows: Sequence[Tuple[str, Optional[float], Optional[float]]], caption: str) -> str:
    """The chart as a standalone SVG document."""
    scale_max = max(value for _, *values in rows for value in values if value is not None) or 1.0
    plot_width = WIDTH - LABEL_WIDTH - VALUE_WIDTH - 20
    height = TOP + len(rows) * (2 * BAR + GAP) + 46
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="13">',
           f"<title>{escape(chart.title)}</title>",
           f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
           f'<text x="10" y="22" font-size="15" font-weight="bold" fill="#212529">{escape(chart.title)}</text>',
           f'<rect x="10" y="36" width="12" height="12" fill="{OURS}"/>',
           '<text x="28" y="46" fill="#212529">amqprpc</text>',
           f'<rect x="100" y="36" width="12" height="12" fill="{RAW}"/>',
           '<text x="118" y="46" fill="#212529">raw py-amqp</text>']
    y = TOP
    for label, ours, raw in rows:
        out.append(f'<text x="{LABEL_WIDTH - 8}" y="{y + BAR + 4}" text-anchor="end" fill="#212529">'
                   f"{escape(label)}</text>")
        for offset, value, colour in ((0, ours, OURS), (BAR, raw, RAW)):
            if value is None:
                continue
            length = max(1.0, plot_width * value / scale_max)
            out.append(f'<rect x="{LABEL_WIDTH}" y="{y + offset}" width="{length:.1f}" height="{BAR - 1}" '
                       f'fill="{colour}"/>')
            out.append(f'<text x="{LABEL_WIDTH + length + 5:.1f}" y="{y + offset + BAR - 2}" font-size="11" '
                       f'fill="#495057">{number(value)}</text>')
        if ours is not None and raw:
            out.append(f'<text x="{WIDTH - 10}" y="{y + BAR + 4}" text-anchor="end" font-size="11" '
                       f'fill="#495057">{ours / raw:.2f}x</text>')
        y += 2 * BAR + GAP
    out.append(f'<line x1="{LABEL_WIDTH}" y1="{TOP - 4}" x2="{LABEL_WIDTH}" y2="{y - GAP + 4}" stroke="#adb5bd"/>')
    out.append(f'<text x="{WIDTH - 10}" y="{TOP - 8}" text-anchor="end" font-size="11" fill="#495057">'
               f"amqprpc / raw</text>")
    for line, text in enumerate(filter(None, (chart.note, caption))):
        out.append(f'<text x="10" y="{y + 12 + 16 * line}" font-size="11" fill="#495057">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def caption(doc: Dict[str, Any]) -> str:
    machine = doc["machine"]
    return (f"{doc['started_utc'][:16].replace('T', ' ')} UTC: {machine['nproc']} x {machine['cpu']}, "
            f"Python {machine['python']}, py-amqp {machine['py_amqp']}, kombu {machine['kombu']}, "
            f"{machine.get('json', 'json (stdlib)')}, load {machine['loadavg_at_start'][0]:.2f} at start")


def charts(doc: Dict[str, Any]) -> Dict[str, str]:
    """Every chart the run has figures for: file name -> SVG text."""
    drawn = {}
    for chart in CHARTS:
        rows = figures(doc, chart)
        if rows:
            drawn[chart.filename] = svg(chart, rows, caption(doc))
    return drawn


def write(doc: Dict[str, Any], folder: Path) -> List[Path]:
    """Write the charts of ``doc`` into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in charts(doc).items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written
