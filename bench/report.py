"""The printed table: one row per figure, amqprpc beside raw, and their ratio.

``python -m bench.report --markdown RESULT.json`` prints the benchmark page's table from a run;
``python -m bench.report --plot RESULT.json`` draws its figures as SVG charts into docs/benchmark/
(``--out-dir`` elsewhere; see bench/plot.py). The docs chart the reference run,
bench/reference/20261207T1314Z.json, so building them never runs a benchmark.

Two figures come from tools of their own, run apart from the bench's load and attached to a
run's JSON as they are (``python -m bench --dispatch-cost PATH --prefork PATH``, or here with
the same options): what the features a service does not use cost the worker per message
(``python -m bench.dispatch_cost --features --out PATH``: callgrind instructions, which the
load does not move) and how a CPU-bound handler scales with ``--processes``
(``python -m bench.prefork --processes 1,2 --out PATH``: calls/s, which only free cores make
meaningful). Each is printed after the table with its own date and load.
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
    lines += attached(doc, markdown=False)
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
    return "\n".join(lines + attached(doc, markdown=True))


def attached(doc: dict, markdown: bool) -> list[str]:
    """The sections of the figures attached to a run (module doc): a heading line saying
    where each comes from, then its rows (a markdown table, or aligned columns)."""
    lines: list[str] = []
    extra = doc.get("attached") or {}
    features = (extra.get("dispatch_cost") or {}).get("features")
    if features:
        source = extra["dispatch_cost"]
        measure = ("instructions per message (callgrind)" if features["measure"] == "instructions"
                   else "CPU us per message (no callgrind: moved by the load)")
        head = (f"Worker CPU per message, features unused (Eta, RevokeChecks, Idempotency, Workflows): "
                f"python -m bench.dispatch_cost, {measure}, no broker; {_when(source)}")
        rows = [("kind", "as built", "without the feature scopes", f"ratio (goal <= {features['goal']:.2f})",
                 "old flat layout", "ratio")]
        for kind, figures in features["kinds"].items():
            rows.append((kind, f"{figures['as_built']:,.0f}", f"{figures['without_features']:,.0f}",
                         f"{figures['vs_without']:.3f}", f"{figures['old']:,.0f}", f"{figures['vs_old']:.3f}"))
        lines += _section(head, rows, markdown)
    prefork = extra.get("prefork")
    if prefork:
        settings = prefork["settings"]
        head = (f"--processes N, a CPU-bound handler ({settings['ms']:g} ms of pure Python a call, "
                f"{settings['in_flight']} in flight; goal >= 0.8*N on N free cores): python -m bench.prefork, "
                f"best of {settings['rounds']} rounds; {_when(prefork)}")
        rows = [("processes", "calls/s", "median", "scaling", "goal")]
        for count, figures in sorted(prefork["results"].items(), key=lambda item: int(item[0])):
            rows.append((count, f"{figures['best_per_s']:.1f}", f"{figures['median_per_s']:.1f}",
                         f"{figures['scaling']:.2f}x", f"{0.8 * int(count):.1f}x" if int(count) > 1 else "-"))
        lines += _section(head, rows, markdown)
    return lines


def _when(source: dict) -> str:
    return (f"{source['started_utc'][:16].replace('T', ' ')} UTC, {source['nproc']} cores, load average "
            f"{source['loadavg_before'][0]:.2f} before, {source['loadavg_after'][0]:.2f} after")


def _section(head: str, rows: list[tuple[str, ...]], markdown: bool) -> list[str]:
    if markdown:
        return ["", head + ":", "", "| " + " | ".join(rows[0]) + " |",
                "|---|" + "---:|" * (len(rows[0]) - 1), *("| " + " | ".join(row) + " |" for row in rows[1:])]
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    return [head, *("  " + "  ".join(cell.rjust(width) if n else cell.ljust(width)
                                     for n, (cell, width) in enumerate(zip(row, widths))) for row in rows)]


def attach(doc: dict, dispatch_cost: str | None = None, prefork: str | None = None) -> dict:
    """``doc`` with the JSON files of bench.dispatch_cost and bench.prefork attached (module doc)."""
    loaded = {}
    for name, path in (("dispatch_cost", dispatch_cost), ("prefork", prefork)):
        if path:
            with open(path) as source:
                loaded[name] = json.load(source)
            if loaded[name].get("tool") != name:
                raise SystemExit(f"{path} is not the JSON of bench.{name} --out "
                                 f"(its tool: {loaded[name].get('tool')})")
    return attach_figures(doc, loaded.get("dispatch_cost"), loaded.get("prefork"))


def attach_figures(doc: dict, dispatch_cost: dict | None = None, prefork: dict | None = None) -> dict:
    """``doc`` with those tools' figures (as their JSON has them) under ``attached``."""
    for name, figures in (("dispatch_cost", dispatch_cost), ("prefork", prefork)):
        if figures:
            doc.setdefault("attached", {})[name] = figures
    return doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", help="a run's JSON (bench/results/...)")
    parser.add_argument("--markdown", action="store_true", help="the docs' table instead of the console's")
    parser.add_argument("--plot", action="store_true", help="write the figures as SVG charts (see --out-dir)")
    parser.add_argument("--out-dir", default=str(DOCS_CHARTS), help="where --plot writes (default: docs/benchmark)")
    parser.add_argument("--dispatch-cost", help="attach the JSON of python -m bench.dispatch_cost --out")
    parser.add_argument("--prefork", help="attach the JSON of python -m bench.prefork --out")
    args = parser.parse_args()
    with open(args.result) as source:
        doc = attach(json.load(source), args.dispatch_cost, args.prefork)
    if args.plot:
        for path in plot.write(doc, Path(args.out_dir)):
            print(f"written: {path}")
    else:
        print(markdown(doc) if args.markdown else table(doc))
