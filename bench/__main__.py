"""``python -m bench [--quick] [--out PATH]``: amqprpc vs raw py-amqp, side by side.

Starts an amqprpc worker and a raw py-amqp echo server as subprocesses (each on its own
unique queues), then runs every scenario in alternating rounds against both, prints a
table of figures and amqprpc/raw ratios, and writes them as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from amqprpc import envelope
from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name

from .measure import interleaved, rss_mb
from .raw_client import RawClient
from .report import table
from .rpc_side import RpcSide

# Operations per side for a full run; --quick takes a tenth, --scale any fraction.
FULL = {"sequential": 20_000, "pipelined": 100_000, "threads": 40_000, "casts": 10_000, "rss": 100_000}
IN_FLIGHT = 32
THREADS = 8
PAYLOAD = {"user_id": "u-123", "fields": ["name", "email"], "n": 42}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the counts, 4 rounds (under a minute)")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the full counts (overrides --quick)")
    parser.add_argument("--rss-calls", type=int, default=None, help="calls for the RSS scenario (0 skips it)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per scenario")
    parser.add_argument("--broker-url", default=None, help="default: AMQPRPC_BROKER_URL or local guest")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<UTC timestamp>.json)")
    parser.add_argument("--only", default=None,
                        help="comma-separated scenarios to run (sequential,pipelined_32,threads_8,casts,rss)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    rounds = args.rounds or (4 if args.quick or scale < 1 else 10)
    counts = {name: max(rounds * 2, int(n * scale)) for name, n in FULL.items()}
    if args.rss_calls is not None:
        counts["rss"] = args.rss_calls
    url = default_broker_url(args.broker_url)

    service = unique_name("bench-svc")
    rpc_queue, cast_queue = unique_name("bench-raw-rpc"), unique_name("bench-raw-cast")
    ours_server = _spawn("amqprpc", url, service)
    raw_server = _spawn("raw", url, rpc_queue, cast_queue)
    # The raw side sends the very bytes amqprpc would send, so both move the same sizes.
    body = envelope.request_body(message_id=envelope.new_id(), source="bench", target=service, action="echo",
                                 payload=PAYLOAD, reply_to="amq.gen-0123456789abcdefghijkl", headers={})
    ours = raw = None
    try:
        ours = RpcSide(url, service, PAYLOAD)
        raw = RawClient(url, rpc_queue, cast_queue, body)
        warm = max(20, counts["sequential"] // 10)
        ours.calls(warm)
        raw.pipelined(warm, IN_FLIGHT)
        started = time.time()
        scenarios = {
            "sequential": lambda: interleaved(rounds, counts["sequential"], ours.sequential, raw.sequential),
            "pipelined_32": lambda: interleaved(rounds, counts["pipelined"], lambda n: ours.pipelined(n, IN_FLIGHT),
                                                lambda n: raw.pipelined(n, IN_FLIGHT)),
            # Raw py-amqp cannot share a connection between threads: its figure is one
            # thread keeping 8 calls in flight, the best 8 concurrent callers could get.
            "threads_8": lambda: interleaved(rounds, counts["threads"], lambda n: ours.threads(n, THREADS),
                                             lambda n: raw.pipelined(n, THREADS)),
            "casts": lambda: interleaved(rounds, counts["casts"], ours.casts, raw.casts),
            "rss": lambda: _rss(ours, ours_server.pid, raw_server.pid, counts["rss"]),
        }
        wanted = args.only.split(",") if args.only else [name for name in scenarios if name != "rss" or counts["rss"]]
        results = {name: scenarios[name]() for name in wanted}
        doc = {
            "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
            "seconds": round(time.time() - started, 1),
            "machine": machine(),
            "settings": {"counts_per_side": counts, "rounds": rounds, "in_flight": IN_FLIGHT, "threads": THREADS,
                         "worker_concurrency": 8, "prefetch": 64, "body_bytes": len(body)},
            "note": args.note,
            "results": results,
        }
    finally:
        for side in (ours, raw):
            if side is not None:
                side.close()
        for proc in (ours_server, raw_server):
            proc.stdin.close()
        for proc in (ours_server, raw_server):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_queues(rpc_queue, cast_queue, f"service.{service}.request", broker_url=url)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nwritten: {out}")
    return doc


def _rss(ours: RpcSide, worker_pid: int, raw_pid: int, calls: int) -> dict:
    """RSS of the amqprpc worker and of this (client) process before and after ``calls``
    pipelined calls; the raw server's for reference. Taken after warm-up and every other
    scenario, so that one-off allocations (imports, pools, buffers) are already counted."""
    gc.collect()
    before = {"worker": rss_mb(worker_pid), "client": rss_mb(), "raw_server": rss_mb(raw_pid)}
    ours.calls(calls)
    gc.collect()
    after = {"worker": rss_mb(worker_pid), "client": rss_mb(), "raw_server": rss_mb(raw_pid)}
    return {"calls": calls, **{name: {"before_mb": before[name], "after_mb": after[name],
                                      "growth_mb": round(after[name] - before[name], 2)} for name in before}}


def _spawn(kind: str, url: str, *names: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.servers", kind, url, *names], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{kind} server did not start (said {line!r})")
    return proc


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    import amqp
    import kombu
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "py_amqp": amqp.__version__, "kombu": kombu.__version__, "loadavg_at_start": os.getloadavg(),
            "kernel": platform.release()}


if __name__ == "__main__":
    main()
