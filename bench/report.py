"""The printed table: one row per figure, amqprpc beside raw, and their ratio.

``python -m bench.report --markdown RESULT.json`` prints the benchmark page's table from a run;
``python -m bench.report --plot RESULT.json`` draws its figures as SVG charts into docs/benchmark/
(``--out-dir`` elsewhere; see bench/plot.py). The docs chart the reference run,
bench/reference/20261122T0938Z.json, so building them never runs a benchmark.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import plot

DOCS_CHARTS = Path(__file__).resolve().parent.parent / "docs" / "benchmark"

ROWS = [
    ("sequential", "per_s", "sequential calls/s"),
    ("sequential", "p50_ms", "sequential p50 ms"),
    ("sequential", "p99_ms", "sequential p99 ms"),
    ("sequential", "client_cpu_us", "sequential client CPU us/call"),
    ("sequential", "server_cpu_us", "sequential server CPU us/call"),
    ("sequential", "client_switches", "sequential client switches/call"),
    ("sequential", "server_switches", "sequential server switches/call"),
    ("pipelined_32", "per_s", "32 in flight calls/s"),
    ("pipelined_32", "p50_ms", "32 in flight p50 ms"),
    ("pipelined_32", "client_cpu_us", "32 in flight client CPU us/call"),
    ("pipelined_32", "server_cpu_us", "32 in flight server CPU us/call"),
    ("pipelined_32", "client_switches", "32 in flight client switches/call"),
    ("pipelined_32", "server_switches", "32 in flight server switches/call"),
    ("threads_8", "per_s", "8 threads calls/s (raw: 8 in flight)"),
    ("threads_8", "p50_ms", "8 threads p50 ms"),
    ("aio_32", "per_s", "AsyncRpcClient 32 in flight calls/s"),
    ("aio_32", "p50_ms", "AsyncRpcClient 32 in flight p50 ms"),
    ("casts", "per_s", "confirmed casts/s, end to end"),
    ("casts", "p50_ms", "cast confirm p50 ms"),
    ("payload_1k", "per_s", "1 KB payload calls/s (8 in flight)"),
    ("payload_1k", "mb_per_s", "1 KB payload MB/s"),
    ("payload_64k", "per_s", "64 KB payload calls/s"),
    ("payload_64k", "mb_per_s", "64 KB payload MB/s"),
    ("payload_1m", "per_s", "1 MB payload calls/s"),
    ("payload_1m", "mb_per_s", "1 MB payload MB/s"),
    ("workers_1", "per_s", "1 process calls/s (32 in flight)"),
    ("workers_2", "per_s", "2 processes calls/s"),
    ("workers_3", "per_s", "3 processes calls/s"),
    ("workers_4", "per_s", "4 processes calls/s"),
]


def table(doc: dict) -> str:
    results = doc["results"]
    lines = [f"{'':40} {'amqprpc':>10} {'raw':>10} {'ratio':>7}", "-" * 70]
    for scenario, key, label in ROWS:
        if scenario not in results:
            continue
        figures = results[scenario]
        ratio = figures["ratio"].get(key)
        lines.append(f"{label:40} {_fmt(figures['amqprpc'].get(key)):>10} {_fmt(figures['raw'].get(key)):>10} "
                     f"{_fmt(ratio):>7}")
    errors = sum(figures[side]["errors"] for figures in results.values() if "ratio" in figures
                 for side in ("amqprpc", "raw"))
    lines.append(f"errors: {errors}")
    rss = results.get("rss")
    if rss:
        lines.append(f"RSS over {rss['calls']} calls: " + ", ".join(
            f"{name} {rss[name]['before_mb']:.1f} -> {rss[name]['after_mb']:.1f} MB ({rss[name]['growth_mb']:+.2f})"
            for name in ("worker", "client", "raw_server") if name in rss))
    machine = doc["machine"]
    lines.append(f"machine: {machine['nproc']} x {machine['cpu']}, Python {machine['python']}, "
                 f"{machine.get('json', 'json (stdlib)')}, "
                 f"load at start {machine['loadavg_at_start'][0]:.2f}"
                 + (f", at end {machine['loadavg_at_end'][0]:.2f}" if "loadavg_at_end" in machine else ""))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.0f}"


def markdown(doc: dict) -> str:
    """The README's performance table (figure | amqprpc | raw py-amqp | ratio) and its
    machine line, from one run's JSON."""
    results, machine = doc["results"], doc["machine"]
    lines = ["| figure | amqprpc | raw py-amqp | ratio |", "|---|---:|---:|---:|"]
    for scenario, key, label in ROWS:
        if scenario in results and results[scenario]["amqprpc"].get(key) is not None:
            figures = results[scenario]
            lines.append(f"| {label} | {_fmt(figures['amqprpc'][key])} | {_fmt(figures['raw'].get(key))} | "
                         f"{_fmt(figures['ratio'].get(key))} |")
    rss = results.get("rss")
    if rss:
        for name in ("worker", "client"):
            lines.append(f"| {name} RSS over {rss['calls'] // 1000}k calls | {rss[name]['before_mb']:.1f} -> "
                         f"{rss[name]['after_mb']:.1f} MB ({rss[name]['growth_mb']:+.2f}) | | |")
    load = machine["loadavg_at_start"][0], machine.get("loadavg_at_end", [float("nan")])[0]
    lines.append("")
    lines.append(f"{doc['started_utc'][:16]} UTC, {doc['seconds']:.0f} s: {machine['nproc']} x {machine['cpu']}, "
                 f"Python {machine['python']}, py-amqp {machine['py_amqp']}, kombu {machine['kombu']}, "
                 f"{machine.get('json', 'json (stdlib)')}; load average {load[0]:.2f} at start, {load[1]:.2f} at end.")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", help="a run's JSON (bench/results/...)")
    parser.add_argument("--markdown", action="store_true", help="the docs' table instead of the console's")
    parser.add_argument("--plot", action="store_true", help="write the figures as SVG charts (see --out-dir)")
    parser.add_argument("--out-dir", default=str(DOCS_CHARTS), help="where --plot writes (default: docs/benchmark)")
    args = parser.parse_args()
    with open(args.result) as source:
        doc = json.load(source)
    if args.plot:
        for path in plot.write(doc, Path(args.out_dir)):
            print(f"written: {path}")
    else:
        print(markdown(doc) if args.markdown else table(doc))
