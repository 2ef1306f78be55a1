"""``python -m bench.queue_ceiling``: how many messages per second ONE queue carries here.

Raw py-amqp processes (no amqprpc): ``--publishers`` processes publish persistent, confirmed
messages of ``--size`` bytes (a request envelope's size) with up to ``--window`` unconfirmed
each, and ``--consumers`` processes consume them with manual acks (prefetch ``--prefetch``),
all on one durable queue of each ``--types`` (classic, quorum). After a warm-up, it counts
what was consumed (acked) during ``--seconds``: that is the queue's throughput with this
many clients on this machine, the figure the "Running at scale" guide divides by.

The clients are Python: with few cores they, not the queue, may be the limit; raise the
process counts until the figure stops growing (and say how loaded the machine was). With
``--broker-pid`` (the node's beam.smp) it also reports the broker's CPU time per message, a
figure that carries over to other machines better than a rate measured on shared cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import amqp

from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name

from .servers import raw_connection


def _declare(url: str, queue: str, queue_type: str) -> None:
    conn = raw_connection(url)
    try:
        conn.channel().queue_declare(queue, durable=True, auto_delete=False,
                                     arguments={"x-queue-type": queue_type})
    finally:
        conn.close()


def _publish(url: str, queue: str, size: int, window: int, stop, published) -> None:
    conn = raw_connection(url)
    channel = conn.channel()
    channel.confirm_select()
    outstanding = [0]

    def on_ack(delivery_tag: int, multiple: bool) -> None:
        nonlocal last_tag
        done = delivery_tag - last_tag if multiple else 1
        last_tag = max(last_tag, delivery_tag)
        outstanding[0] -= done
        with published.get_lock():
            published.value += done

    last_tag = 0
    channel.events["basic_ack"].add(on_ack)
    body = b"x" * size
    while not stop.is_set():
        while outstanding[0] < window:
            channel.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/json"), "", queue)
            outstanding[0] += 1
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    conn.close()


def _consume(url: str, queue: str, prefetch: int, stop, consumed) -> None:
    conn = raw_connection(url)
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    count = [0]

    def on_message(message: amqp.Message) -> None:
        channel.basic_ack(message.delivery_tag)
        count[0] += 1
        if count[0] >= 100:
            with consumed.get_lock():
                consumed.value += count[0]
            count[0] = 0

    channel.basic_consume(queue, callback=on_message)
    while not stop.is_set():
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    conn.close()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds the process ``pid`` used so far (0 without a pid)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, queue_type: str, publishers: int, consumers: int, seconds: float, size: int,
            window: int, prefetch: int, warmup: float = 2.0, broker_pid: int | None = None) -> dict:
    queue = unique_name(f"bench.ceiling.{queue_type}")
    _declare(url, queue, queue_type)
    stop = multiprocessing.Event()
    published, consumed = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
    processes = [multiprocessing.Process(target=_consume, args=(url, queue, prefetch, stop, consumed))
                 for _ in range(consumers)]
    processes += [multiprocessing.Process(target=_publish, args=(url, queue, size, window, stop, published))
                  for _ in range(publishers)]
    try:
        for process in processes:
            process.start()
        time.sleep(warmup)
        p0, c0, t0, cpu0 = published.value, consumed.value, time.monotonic(), _cpu_seconds(broker_pid)
        time.sleep(seconds)
        p1, c1, t1, cpu1 = published.value, consumed.value, time.monotonic(), _cpu_seconds(broker_pid)
    finally:
        stop.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        delete_queues(queue, broker_url=url)
    result = {"queue_type": queue_type, "publishers": publishers, "consumers": consumers, "size": size,
              "confirmed_per_s": round((p1 - p0) / (t1 - t0)), "consumed_per_s": round((c1 - c0) / (t1 - t0)),
              "load_before": os.getloadavg()[0]}
    if broker_pid and c1 > c0:
        # The broker's work per message: published and confirmed, delivered and acked (counted
        # as half a message each, since publishes may run ahead of consumers).
        messages = ((p1 - p0) + (c1 - c0)) / 2
        result["broker_cpu_us_per_message"] = round((cpu1 - cpu0) / messages * 1e6, 1)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=None, help="broker URL (default: AMQPRPC_BROKER_URL)")
    parser.add_argument("--types", default="classic,quorum")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=300, help="message bytes (a request envelope is ~300)")
    parser.add_argument("--window", type=int, default=256, help="unconfirmed publishes per publisher")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--broker-pid", type=int, default=None, help="the node's beam.smp, to measure its CPU time")
    args = parser.parse_args(argv)
    url = default_broker_url(args.broker)
    results = []
    for queue_type in args.types.split(","):
        result = measure(url, queue_type, args.publishers, args.consumers, args.seconds, args.size, args.window,
                         args.prefetch, broker_pid=args.broker_pid)
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
