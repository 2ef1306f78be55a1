"""The printed table: one row per figure, amqprpc beside raw, and their ratio."""
from __future__ import annotations

ROWS = [
    ("sequential", "per_s", "sequential calls/s"),
    ("sequential", "p50_ms", "sequential p50 ms"),
    ("sequential", "p99_ms", "sequential p99 ms"),
    ("pipelined_32", "per_s", "32 in flight calls/s"),
    ("pipelined_32", "p50_ms", "32 in flight p50 ms"),
    ("threads_8", "per_s", "8 threads calls/s (raw: 8 in flight)"),
    ("threads_8", "p50_ms", "8 threads p50 ms"),
    ("casts", "per_s", "confirmed casts/s, end to end"),
    ("casts", "p50_ms", "cast confirm p50 ms"),
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
    errors = sum(results[s][side]["errors"] for s in ("sequential", "pipelined_32", "threads_8", "casts")
                 if s in results for side in ("amqprpc", "raw"))
    lines.append(f"errors: {errors}")
    rss = results.get("rss")
    if rss:
        lines.append(f"RSS over {rss['calls']} calls: " + ", ".join(
            f"{name} {rss[name]['before_mb']:.1f} -> {rss[name]['after_mb']:.1f} MB ({rss[name]['growth_mb']:+.2f})"
            for name in ("worker", "client", "raw_server")))
    machine = doc["machine"]
    lines.append(f"machine: {machine['nproc']} x {machine['cpu']}, Python {machine['python']}, "
                 f"load at start {machine['loadavg_at_start'][0]:.2f}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.0f}"
