"""``python -m bench [--quick] [--only SCENARIOS] [--out PATH]``: amqprpc vs raw py-amqp, side by side.

Starts an amqprpc worker and a raw py-amqp echo server as subprocesses (each on its own
unique queues), then runs every scenario in alternating rounds against both, prints a
table of figures and amqprpc/raw ratios, and writes them as JSON.

Scenarios: calls one at a time; 32 in flight from one RpcClient; 8 threads sharing one;
32 in flight from one AsyncRpcClient; confirmed casts; 8 calls in flight of 1 KB, 64 KB
and 1 MB payloads (calls/s and MB/s); 1 to 4 server processes of each side on its one
queue, 32 in flight (how calls/s scales on this machine); RSS over many calls.

``--dispatch-cost PATH`` and ``--prefork PATH`` attach the JSON that ``python -m bench.dispatch_cost
--features --out PATH`` and ``python -m bench.prefork --out PATH`` wrote (run apart: the one counts
instructions under valgrind, the other needs free cores); the table prints them after the
scenarios, each with its own date and load (bench/report.py).
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

from amqprpc.wire import envelope
from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name

from .measure import cpu_of, interleaved, rss_mb
from .raw_client import RawClient
from .report import attach, table
from .rpc_side import RpcSide

# Operations per side for a full run; --quick takes a tenth, --scale any fraction.
# "workers" is per process count (1 to MAX_PROCESSES), "payload_*" per payload size.
FULL = {"sequential": 20_000, "pipelined": 100_000, "threads": 40_000, "aio": 50_000, "casts": 10_000,
        "payload_1k": 20_000, "payload_64k": 4_000, "payload_1m": 400, "workers": 20_000, "rss": 100_000}
IN_FLIGHT = 32
THREADS = 8
PAYLOAD_IN_FLIGHT = 8
MAX_PROCESSES = 4
PAYLOAD = {"user_id": "u-123", "fields": ["name", "email"], "n": 42}
# Bytes of JSON string data per payload scenario: the request body is this plus the
# envelope (~300 bytes); 1 MB stays under the worker's default max_message_bytes (1 MiB).
PAYLOAD_SIZES = {"payload_1k": 1_000, "payload_64k": 64_000, "payload_1m": 1_000_000}
# Scenarios in the order they run (casts before workers: extra worker processes would
# consume casts the first one counts; rss last, after every one-off allocation).
SCENARIOS = ("sequential", "pipelined_32", "threads_8", "aio_32", "casts", *PAYLOAD_SIZES,
             *(f"workers_{n}" for n in range(1, MAX_PROCESSES + 1)), "rss")
GROUPS = {"payloads": tuple(PAYLOAD_SIZES), "workers": tuple(s for s in SCENARIOS if s.startswith("workers_"))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the counts, 4 rounds (about a minute)")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the full counts (overrides --quick)")
    parser.add_argument("--rss-calls", type=int, default=None, help="calls for the RSS scenario (0 skips it)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per scenario")
    parser.add_argument("--broker-url", default=None, help="default: AMQPRPC_BROKER_URL or local guest")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<UTC timestamp>.json)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated scenarios or groups to run: {','.join(SCENARIOS)}; "
                             f"groups: {','.join(GROUPS)} (default: all)")
    parser.add_argument("--skip", default=None, help="comma-separated scenarios or groups not to run")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--dispatch-cost", default=None,
                        help="attach this JSON of python -m bench.dispatch_cost --out (features unused: worker CPU)")
    parser.add_argument("--prefork", default=None,
                        help="attach this JSON of python -m bench.prefork --out (--processes scaling)")
    args = parser.parse_args(argv)
    try:
        wanted = _select(args.only, args.skip)
        attached = attach({}, args.dispatch_cost, args.prefork)  # read now: a bad path fails before the run
    except ValueError as exc:
        parser.error(str(exc))
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    rounds = args.rounds or (4 if args.quick or scale < 1 else 10)
    counts = {name: max(rounds * 2, int(n * scale)) for name, n in FULL.items()}
    if args.rss_calls is not None:
        counts["rss"] = args.rss_calls
    if not counts["rss"] and "rss" in wanted:
        wanted.remove("rss")
    url = default_broker_url(args.broker_url)

    service = unique_name("bench-svc")
    rpc_queue, cast_queue = unique_name("bench-raw-rpc"), unique_name("bench-raw-cast")
    servers = {"amqprpc": [_spawn("amqprpc", url, service)], "raw": [_spawn("raw", url, rpc_queue, cast_queue)]}
    ours_server, raw_server = servers["amqprpc"][0], servers["raw"][0]
    # The raw side sends the very bytes amqprpc would send, so both move the same sizes.
    body = _request_body(service, PAYLOAD)
    ours = raw = None
    try:
        ours = RpcSide(url, service, PAYLOAD)
        raw = RawClient(url, rpc_queue, cast_queue, body)
        warm = max(20, counts["sequential"] // 10)
        ours.calls(warm)
        raw.pipelined(warm, IN_FLIGHT)
        started, load_at_start = time.time(), os.getloadavg()

        def compare(count: int, ours_run, raw_run) -> dict:
            return interleaved(rounds, count, cpu_of(ours_run, lambda: [proc.pid for proc in servers["amqprpc"]]),
                               cpu_of(raw_run, lambda: [proc.pid for proc in servers["raw"]]))

        def pipelined(n_in_flight: int, count: int) -> dict:
            return compare(count, lambda n: ours.pipelined(n, n_in_flight),
                               lambda n: raw.pipelined(n, n_in_flight))

        def payload(name: str) -> dict:
            # Printable ASCII that JSON copies as is: the cost measured is moving the bytes.
            data = ("0123456789abcdefghijklmnopqrstuvwxyz" * (PAYLOAD_SIZES[name] // 36 + 1))[:PAYLOAD_SIZES[name]]
            big = {"data": data}
            big_body = _request_body(service, big)
            result = compare(counts[name], lambda n: ours.pipelined(n, PAYLOAD_IN_FLIGHT, payload=big),
                                 lambda n: raw.pipelined(n, PAYLOAD_IN_FLIGHT, body=big_body))
            # Megabytes of request body per second (the reply carries as much back).
            for side in ("amqprpc", "raw"):
                result[side]["mb_per_s"] = round(result[side]["per_s"] * len(big_body) / 1e6, 2)
            result["ratio"]["mb_per_s"] = result["ratio"].get("per_s")
            result["body_bytes"] = len(big_body)
            result["in_flight"] = PAYLOAD_IN_FLIGHT
            return result

        def processes(n: int) -> dict:
            # Grow both sides to n server processes on their one queue, all started at once.
            more = {kind: [_start(kind, url, *names) for _ in range(n - len(servers[kind]))]
                    for kind, names in (("amqprpc", (service,)), ("raw", (rpc_queue, cast_queue)))}
            for kind, procs in more.items():
                for proc in procs:
                    _ready(kind, proc)
                    servers[kind].append(proc)
            result = pipelined(IN_FLIGHT, counts["workers"])
            result["processes"] = n
            return result

        scenarios = {
            "sequential": lambda: compare(counts["sequential"], ours.sequential, raw.sequential),
            "pipelined_32": lambda: pipelined(IN_FLIGHT, counts["pipelined"]),
            # Raw py-amqp cannot share a connection between threads: its figure is one
            # thread keeping 8 calls in flight, the best 8 concurrent callers could get.
            "threads_8": lambda: compare(counts["threads"], lambda n: ours.threads(n, THREADS),
                                             lambda n: raw.pipelined(n, THREADS)),
            "aio_32": lambda: compare(counts["aio"], lambda n: ours.aio(n, IN_FLIGHT),
                                          lambda n: raw.pipelined(n, IN_FLIGHT)),
            "casts": lambda: compare(counts["casts"], ours.casts, raw.casts),
            **{name: (lambda name=name: payload(name)) for name in PAYLOAD_SIZES},
            **{f"workers_{n}": (lambda n=n: processes(n)) for n in range(1, MAX_PROCESSES + 1)},
            "rss": lambda: _rss(ours, ours_server.pid, raw_server.pid, counts["rss"]),
        }
        results = {}
        for name in SCENARIOS:
            if name not in wanted:
                continue
            if name == "rss":
                _stop(servers["amqprpc"][1:] + servers["raw"][1:])  # RSS is one worker's
            results[name] = scenarios[name]()
        doc = {
            "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
            "seconds": round(time.time() - started, 1),
            # machine() runs now, at the end: the load at start was taken before the first scenario.
            "machine": {**machine(), "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
            "settings": {"counts_per_side": counts, "rounds": rounds, "in_flight": IN_FLIGHT, "threads": THREADS,
                         "payload_in_flight": PAYLOAD_IN_FLIGHT, "worker_concurrency": 8, "prefetch": 64,
                         "body_bytes": len(body)},
            "note": args.note,
            "results": results,
            **attached,
        }
    finally:
        for side in (ours, raw):
            if side is not None:
                side.close()
        _stop(servers["amqprpc"] + servers["raw"])
        delete_queues(rpc_queue, cast_queue, f"service.{service}.request", broker_url=url)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nwritten: {out}")
    return doc


def _select(only: str | None, skip: str | None) -> list[str]:
    """The scenarios ``--only`` and ``--skip`` leave, in running order; groups expanded."""
    def expand(text: str) -> set[str]:
        names = set()
        for name in filter(None, (part.strip() for part in text.split(","))):
            if name in GROUPS:
                names.update(GROUPS[name])
            elif name in SCENARIOS:
                names.add(name)
            else:
                raise ValueError(f"unknown scenario {name!r} (scenarios: {', '.join(SCENARIOS)}; "
                                 f"groups: {', '.join(GROUPS)})")
        return names

    chosen = expand(only) if only else set(SCENARIOS)
    chosen -= expand(skip) if skip else set()
    return [name for name in SCENARIOS if name in chosen]


def _request_body(service: str, payload: dict) -> bytes:
    return envelope.request_body(message_id=envelope.new_id(), source="bench", target=service, action="echo",
                                 payload=payload, reply_to="amq.gen-0123456789abcdefghijkl", headers={})


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
    return _ready(kind, _start(kind, url, *names))


def _start(kind: str, url: str, *names: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.servers", kind, url, *names], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, text=True)


def _ready(kind: str, proc: subprocess.Popen) -> subprocess.Popen:
    """Wait until a started server says it consumes."""
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{kind} server did not start (said {line!r})")
    return proc


def _stop(procs: list) -> None:
    """Close the servers' stdin (their signal to stop) and wait for them, all at once."""
    for proc in procs:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    import amqp
    import kombu
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "py_amqp": amqp.__version__, "kombu": kombu.__version__,
            "json": getattr(envelope, "JSON_LIBRARY", "json (stdlib)"), "loadavg_at_start": os.getloadavg(),
            "kernel": platform.release()}


if __name__ == "__main__":
    main()
