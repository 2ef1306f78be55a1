"""``python -m bench.decompose``: where the one-at-a-time gap sits, client side or worker side.

Runs calls one at a time, in alternating rounds: raw py-amqp client to the raw echo
server, raw client to an amqprpc Worker (it sends the very request amqprpc sends), and
RpcClient to the Worker; prints each pair's p50 and p99 and their ratio to raw->raw.
raw->worker over raw->raw is what the worker adds; client->worker over raw->worker what
the client adds.
"""
from __future__ import annotations

import argparse
import json

from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

from .__main__ import PAYLOAD, _request_body, _spawn
from .measure import percentile
from .raw_client import RawClient
from .rpc_side import RpcSide


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.decompose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="calls per round and pair")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    url = default_broker_url(None)
    service = unique_name("bench-svc")
    rpc_queue, cast_queue = unique_name("bench-raw-rpc"), unique_name("bench-raw-cast")
    request_queue = DEFAULT_TOPOLOGY.request_queue(service).name
    servers = [_spawn("amqprpc", url, service), _spawn("raw", url, rpc_queue, cast_queue)]
    body = _request_body(service, PAYLOAD)
    ours = RpcSide(url, service, PAYLOAD)
    raw_to_raw = RawClient(url, rpc_queue, cast_queue, body)
    raw_to_worker = RawClient(url, request_queue, cast_queue, body)
    runs = {"raw->raw": raw_to_raw.sequential, "raw->worker": raw_to_worker.sequential,
            "client->worker": ours.sequential}
    latencies: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for run in runs.values():
            run(200)  # warm-up
        for round_ in range(args.rounds):
            for name in (list(runs) if round_ % 2 == 0 else list(reversed(runs))):
                latencies[name].extend(runs[name](args.count).latencies)
    finally:
        for proc in servers:
            proc.stdin.close()
        for client in (ours, raw_to_raw, raw_to_worker):
            client.close()
        delete_queues(rpc_queue, cast_queue, request_queue, broker_url=url)
    out = {}
    for name, values in latencies.items():
        values.sort()
        out[name] = {"p50_ms": round(percentile(values, 50) * 1e3, 3), "p99_ms": round(percentile(values, 99) * 1e3, 3)}
    for figures in out.values():
        figures["p50_ratio"] = round(figures["p50_ms"] / out["raw->raw"]["p50_ms"], 2)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
