"""``python -m bench.peers [--quick]``: amqprpc beside other RPC frameworks on the same broker.

Peers, each only where importable (``pip install -e '.[bench]'`` or ``make bench-peers``
installs them; the test suite never needs them):

- ``aio_pika``: aio-pika's ``JsonRPC`` (``aio_pika.patterns``), one asyncio client;
- ``celery``: Celery's ``rpc://`` result backend, a threads-pool worker (concurrency 8,
  prefetch 64 like the amqprpc worker), ``AsyncResult.get()`` in the client.

Every side answers the same echo of the bench's payload from a server subprocess (each on
unique queues), one call at a time and 32 in flight, in alternating rounds with raw
py-amqp and amqprpc, so the ratios (amqprpc / peer, peer / raw) come from one run. The
figures go to ``bench/results/peers-<UTC time>.json`` (or ``--out``).

``python -m bench.peers serve KIND URL NAME`` is the peers' server (prints ``ready``, stops
when its stdin closes), as :mod:`bench.servers` is for amqprpc and raw.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .measure import Sample, cpu_of, from_tasks

perf = time.perf_counter
PEERS = ("aio_pika", "celery")
IN_FLIGHT = 32


def available(peer: str) -> bool:
    """Whether ``peer``'s package is importable here (without importing it)."""
    return importlib.util.find_spec(peer) is not None


# --- servers (subprocesses) ---------------------------------------------------------------
def serve_aio_pika(url: str, name: str) -> None:
    import aio_pika
    from aio_pika.patterns import JsonRPC

    async def echo(**payload: Any) -> dict:
        return payload

    async def main() -> None:
        connection = await aio_pika.connect_robust(url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=64)
        rpc = await JsonRPC.create(channel)
        await rpc.register(f"{name}.echo", echo, auto_delete=True)
        print("ready", flush=True)
        await asyncio.Event().wait()  # until stdin closes (os._exit)

    _exit_when_stdin_closes()
    asyncio.run(main())


def celery_app(url: str, name: str) -> Any:
    from celery import Celery

    app = Celery(name, broker=url, backend="rpc://")
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_prefetch_multiplier=8, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, task_default_queue=name)

    @app.task(name=f"{name}.echo")
    def echo(payload: dict) -> dict:
        return payload

    return app


def serve_celery(url: str, name: str) -> None:
    from celery.signals import worker_ready

    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the worker's banner and logs go to stderr; stdout says "ready" only
    app = celery_app(url, name)
    worker_ready.connect(lambda **_: (ready.write("ready\n"), ready.flush()), weak=False)
    _exit_when_stdin_closes()
    app.Worker(pool_cls="threads", concurrency=8, queues=[name], loglevel="WARNING", quiet=True,
               without_heartbeat=True, without_mingle=True, without_gossip=True,
               hostname=f"{name}@bench").start()


def _exit_when_stdin_closes() -> None:
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()


# --- clients --------------------------------------------------------------------------------
class AioPikaSide:
    """aio-pika ``JsonRPC`` from one event loop (run in this thread per scenario round)."""

    def __init__(self, url: str, name: str, payload: dict):
        import aio_pika
        from aio_pika.patterns import JsonRPC

        self.loop = asyncio.new_event_loop()
        self.method, self.payload = f"{name}.echo", payload

        async def connect() -> Any:
            self.connection = await aio_pika.connect_robust(url)
            return await JsonRPC.create(await self.connection.channel())

        self.rpc = self.loop.run_until_complete(connect())

    def close(self) -> None:
        self.loop.run_until_complete(self.connection.close())
        self.loop.close()

    def sequential(self, count: int) -> Sample:
        return self.loop.run_until_complete(self._calls(count, 1))

    def pipelined(self, count: int, in_flight: int) -> Sample:
        return self.loop.run_until_complete(self._calls(count, in_flight))

    async def _calls(self, count: int, in_flight: int) -> Sample:
        call, method, payload = self.rpc.call, self.method, self.payload
        return await from_tasks(count, in_flight, lambda: call(method, kwargs=payload, expiration=30))


class CelerySide:
    """Celery ``send_task`` + ``AsyncResult.get()`` (the ``rpc://`` backend), one thread."""

    def __init__(self, url: str, name: str, payload: dict):
        self.app = celery_app(url, name)
        self.task, self.queue, self.payload = f"{name}.echo", name, payload

    def close(self) -> None:
        self.app.close()

    def sequential(self, count: int) -> Sample:
        return self.pipelined(count, 1)

    def pipelined(self, count: int, in_flight: int) -> Sample:
        """At most ``in_flight`` pending, collected oldest first (``get()`` buffers the rest)."""
        send = self.app.send_task
        window: collections.deque[tuple[float, Any]] = collections.deque()
        latencies: list[float] = []
        errors = 0
        sent = 0
        started = perf()
        while len(latencies) < count:
            while sent < count and len(window) < in_flight:
                window.append((perf(), send(self.task, args=(self.payload,), queue=self.queue)))
                sent += 1
            t0, result = window.popleft()
            try:
                result.get(timeout=30)
            except Exception:  # noqa: BLE001 - counted in the figures
                errors += 1
            latencies.append(perf() - t0)
        return Sample(count, perf() - started, latencies, errors)


SIDES: dict[str, Callable[[str, str, dict], Any]] = {"aio_pika": AioPikaSide, "celery": CelerySide}


# --- the run --------------------------------------------------------------------------------
def interleaved_sides(rounds: int, count: int, runs: dict[str, Callable[[int], Sample]]) -> dict[str, dict]:
    """Like :func:`bench.measure.interleaved`, for any number of sides: each round runs
    every side once, the order rotated each round."""
    per_round = max(1, count // rounds)
    pooled = {side: Sample() for side in runs}
    names = list(runs)
    for index in range(rounds):
        shift = index % len(names)
        for side in names[shift:] + names[:shift]:
            pooled[side].add(runs[side](per_round))
    return {side: sample.figures() for side, sample in pooled.items()}


def compare(figures: dict[str, dict]) -> dict[str, dict]:
    """amqprpc / peer (calls/s: >1 = amqprpc faster) and peer / raw for each peer."""
    out = {}
    ours, raw = figures["amqprpc"], figures["raw"]
    for side, peer in figures.items():
        if side in ("amqprpc", "raw") or not peer.get("per_s"):
            continue
        out[side] = {"amqprpc_over_peer_per_s": round(ours["per_s"] / peer["per_s"], 2),
                     "peer_over_raw_per_s": round(peer["per_s"] / raw["per_s"], 3)}
    return out


def main(argv: list[str] | None = None) -> dict:
    from amqprpc.config import broker_url as default_broker_url
    from amqprpc.testing import delete_queues, unique_name
    from amqprpc.wire.topology import DEFAULT_TOPOLOGY

    from .__main__ import PAYLOAD, _request_body, _spawn, _stop, machine
    from .raw_client import RawClient
    from .rpc_side import RpcSide

    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (2,000 one at a time, 10,000 in flight)")
    parser.add_argument("--count", type=int, default=None, help="calls per side one at a time (default 10,000)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, of: " + ", ".join(PEERS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sequential = args.count or (2_000 if args.quick else 10_000)
    url = default_broker_url(None)
    wanted = [peer for peer in args.peers.split(",") if peer]
    unknown = set(wanted) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    peers = [peer for peer in wanted if available(peer)]
    missing = sorted(set(wanted) - set(peers))

    service = unique_name("bench-svc")
    rpc_queue, cast_queue = unique_name("bench-raw-rpc"), unique_name("bench-raw-cast")
    names = {peer: unique_name(f"bench-{peer.replace('_', '-')}") for peer in peers}
    servers = {"amqprpc": _spawn("amqprpc", url, service), "raw": _spawn("raw", url, rpc_queue, cast_queue)}
    sides: dict[str, Any] = {}
    started, load_at_start = time.time(), os.getloadavg()
    try:
        for peer in peers:
            servers[peer] = _ready(peer, subprocess.Popen(
                [sys.executable, "-m", "bench.peers", "serve", peer, url, names[peer]], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, text=True))
        sides["amqprpc"] = RpcSide(url, service, PAYLOAD)
        sides["raw"] = RawClient(url, rpc_queue, cast_queue, _request_body(service, PAYLOAD))
        for peer in peers:
            sides[peer] = SIDES[peer](url, names[peer], PAYLOAD)
        for side in sides.values():
            side.sequential(50)  # warm-up: connections, reply queues, caches

        def measured(kind: str, run: Callable[[int], Sample]) -> Callable[[int], Sample]:
            return cpu_of(run, lambda: [servers[kind].pid])

        results = {
            "sequential": interleaved_sides(args.rounds, sequential, {
                kind: measured(kind, side.sequential) for kind, side in sides.items()}),
            "pipelined_32": interleaved_sides(args.rounds, sequential * 5, {
                kind: measured(kind, lambda n, side=side: side.pipelined(n, IN_FLIGHT))
                for kind, side in sides.items()}),
        }
        for figures in results.values():
            figures["ratio"] = compare(figures)
    finally:
        for side in sides.values():
            side.close()
        _stop(list(servers.values()))
        delete_queues(rpc_queue, cast_queue, DEFAULT_TOPOLOGY.request_queue(service).name,
                      *(f"{names[peer]}.echo" for peer in peers if peer == "aio_pika"),
                      *(names[peer] for peer in peers if peer == "celery"), broker_url=url)
    doc = {"started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
           "seconds": round(time.time() - started, 1),
           "machine": {**machine(), "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
           "peers": peers, "missing": missing, "versions": {peer: _version(peer) for peer in peers},
           "settings": {"sequential": sequential, "pipelined": sequential * 5, "in_flight": IN_FLIGHT,
                        "rounds": args.rounds},
           "results": results}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "peers-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nwritten: {out}")
    return doc


def table(doc: dict) -> str:
    lines = [f"{'side':10} {'scenario':13} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cli us':>7} {'srv us':>7} "
             f"{'amqprpc/x':>9} {'x/raw':>6}", "-" * 82]
    for scenario, figures in doc["results"].items():
        for side, f in figures.items():
            if side == "ratio":
                continue
            ratio = figures["ratio"].get(side, {})
            lines.append(f"{side:10} {scenario:13} {_fmt(f.get('per_s'))} {_fmt(f.get('p50_ms'), 7)} "
                         f"{_fmt(f.get('p99_ms'), 7)} {_fmt(f.get('client_cpu_us'), 7)} "
                         f"{_fmt(f.get('server_cpu_us'), 7)} {_fmt(ratio.get('amqprpc_over_peer_per_s'), 9)} "
                         f"{_fmt(ratio.get('peer_over_raw_per_s'), 6)}")
    if doc["missing"]:
        lines.append(f"not installed (skipped): {', '.join(doc['missing'])}  (pip install -e '.[bench]')")
    load = doc["machine"]["loadavg_at_start"][0], doc["machine"]["loadavg_at_end"][0]
    lines.append(f"load average {load[0]:.2f} at start, {load[1]:.2f} at end; "
                 + ", ".join(f"{peer} {version}" for peer, version in doc["versions"].items()))
    return "\n".join(lines)


def _fmt(value: Any, width: int = 8) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width}.3f}" if value < 10 else f"{value:>{width}.0f}"


def _version(peer: str) -> str:
    from importlib.metadata import version

    return version(peer.replace("_", "-"))


def _ready(kind: str, proc: subprocess.Popen) -> subprocess.Popen:
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{kind} server did not start (said {line!r})")
    return proc


def serve(kind: str, url: str, name: str) -> None:
    {"aio_pika": serve_aio_pika, "celery": serve_celery}[kind](url, name)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:5])
    else:
        main()
