"""``python -m bench.prefork``: calls/s of a CPU-bound handler with ``--processes 1`` and ``2``.

A handler that runs ``--ms`` milliseconds of pure Python (the GIL held throughout) is served by
``amqprpc worker --processes P --concurrency 2`` for each P of ``--processes``, in alternating
rounds; ``--in-flight`` client threads call it back to back for ``--calls`` calls a round. It
prints calls/s per process count (best round, and the median), the ratio to one process and
the load average before and after: on a machine shared with other work the ratio says little
(issue #23 asks >= 1.6x for two processes on two idle cores; #27 >= 0.8*N for N processes on N
free cores). ``--out PATH`` writes the figures as JSON, which ``python -m bench --prefork PATH`` and
``python -m bench.report --prefork PATH`` print in the bench's table (bench/report.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from amqprpc import RpcClient
from amqprpc.testing import delete_queues, unique_name

ROOT = Path(__file__).resolve().parent.parent


def loops_for(ms: float) -> int:
    """Turns of cpu_app.burn's loop that take ``ms`` milliseconds here (best of 5)."""
    loops, best = 200_000, float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(loops):
            total += i * i % 7
        best = min(best, time.perf_counter() - started)
    return int(loops * ms / 1000 / best)


def serve(name: str, processes: int) -> subprocess.Popen:
    env = {**os.environ, "AMQPRPC_BENCH_SERVICE": name, "AMQPRPC_REGISTRY_INTERVAL": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "amqprpc", "worker", name, "--app", "bench.cpu_app:service",
                             "--processes", str(processes), "--concurrency", "2", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def round_trip(client: RpcClient, name: str, loops: int, calls: int, in_flight: int) -> float:
    """Calls/s of ``calls`` calls made by ``in_flight`` threads back to back."""
    left = [calls]
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            client.call(name, "burn", {"loops": loops}, timeout=60)

    threads = [threading.Thread(target=caller) for _ in range(in_flight)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="process counts to compare (comma separated)")
    parser.add_argument("--ms", type=float, default=20.0, help="milliseconds of CPU per call")
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    counts = [int(each) for each in args.processes.split(",")]
    loops = loops_for(args.ms)
    started, load_before = time.time(), os.getloadavg()
    figures: dict[int, list[float]] = {count: [] for count in counts}
    with RpcClient("bench-prefork", timeout=60) as client:
        for _ in range(args.rounds):
            for count in counts:
                name = unique_name("bench-prefork")
                worker = serve(name, count)
                try:
                    deadline = time.monotonic() + 30
                    while True:  # ready: it answers
                        try:
                            client.call(name, "burn", {"loops": 1}, timeout=2)
                            break
                        except Exception:  # noqa: BLE001 - not up yet
                            if time.monotonic() > deadline:
                                raise
                    figures[count].append(round_trip(client, name, loops, args.calls, args.in_flight))
                finally:
                    worker.send_signal(signal.SIGTERM)
                    worker.wait(60)
                    delete_queues(f"service.{name}.request", f"service.{name}.dead")
    base = max(figures[counts[0]])
    print(f"CPU-bound handler, {args.ms:g} ms of pure Python per call ({loops} loops), {args.in_flight} in flight, "
          f"{args.rounds} rounds of {args.calls} calls, {os.cpu_count()} cores")
    for count in counts:
        best, median = max(figures[count]), statistics.median(figures[count])
        print(f"  --processes {count}: best {best:7.1f} calls/s, median {median:7.1f}  ({best / base:.2f}x)")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.out:
        doc = {"tool": "prefork", "started_utc": datetime.datetime.fromtimestamp(
                   started, datetime.timezone.utc).isoformat(timespec="seconds"),
               "nproc": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
               "settings": {"ms": args.ms, "loops": loops, "calls": args.calls, "rounds": args.rounds,
                            "in_flight": args.in_flight, "concurrency": 2},
               "results": {str(count): {"best_per_s": round(max(figures[count]), 1),
                                        "median_per_s": round(statistics.median(figures[count]), 1),
                                        "rounds_per_s": [round(each, 1) for each in figures[count]],
                                        "scaling": round(max(figures[count]) / base, 3)} for count in counts}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
