"""The two servers the bench talks to, each run as its own process.

``python -m bench.servers amqprpc SERVICE`` runs an amqprpc :class:`~amqprpc.server.worker.Worker`;
``python -m bench.servers raw RPC_QUEUE CAST_QUEUE`` runs a raw py-amqp echo server. Both
print ``ready`` once consuming and stop when their stdin closes, so a crashed bench never
leaves them behind. Several of either kind may serve the same queues (the bench's
worker-processes scenario); the bench deletes the queues itself.

The raw server is the baseline: the plainest correct py-amqp code, with nothing slowed
down. One thread, prefetch 64, reply then ack from the delivery callback. It turns off the
``connection.blocked`` capability so that ``basic_publish`` does not drain the socket on
every publish (amqprpc bypasses that drain too, see ``amqprpc.transport.ioloop.publish``): without
it a publish made from a delivery callback would run the next delivery's callback inside
it, recursively, and that would hit the baseline.
"""
from __future__ import annotations

import os
import sys
import threading

import amqp
from amqp.connection import NEGOTIATE_CAPABILITIES
from kombu import Connection

PREFETCH = 64
CONCURRENCY = 8
COUNT_QUERY = b"?casts "  # raw RPC body asking "reply once N casts were consumed"


class RawConnection(amqp.Connection):
    """A py-amqp connection whose publishes do not drain the socket first."""

    negotiate_capabilities = {**NEGOTIATE_CAPABILITIES, "connection.blocked": False}


def raw_connection(url: str) -> RawConnection:
    info = Connection(url).info()  # kombu only parses the URL here
    conn = RawConnection(host=f"{info['hostname']}:{info['port']}", userid=info["userid"],
                         password=info["password"], virtual_host=info["virtual_host"], heartbeat=0)
    conn.connect()
    return conn


def serve_raw(url: str, rpc_queue: str, cast_queue: str) -> None:
    conn = raw_connection(url)
    channel = conn.channel()
    for name in (rpc_queue, cast_queue):
        channel.queue_declare(name, durable=True, auto_delete=False)
    channel.basic_qos(0, PREFETCH, False)
    casts = 0
    waiting: list[tuple[int, str, str]] = []  # (count wanted, reply_to, correlation_id)

    def reply(body: bytes, properties: dict) -> None:
        channel.basic_publish(amqp.Message(body, correlation_id=properties.get("correlation_id")),
                              "", properties["reply_to"])

    def on_request(message: amqp.Message) -> None:
        body = message.body
        if body.startswith(COUNT_QUERY):
            wanted = int(body[len(COUNT_QUERY):])
            if casts >= wanted:
                reply(str(casts).encode(), message.properties)
            else:
                waiting.append((wanted, message.properties["reply_to"], message.properties["correlation_id"]))
        else:
            reply(body, message.properties)
        channel.basic_ack(message.delivery_tag)

    def on_cast(message: amqp.Message) -> None:
        nonlocal casts
        casts += 1
        channel.basic_ack(message.delivery_tag)
        for entry in [w for w in waiting if w[0] <= casts]:
            waiting.remove(entry)
            reply(str(casts).encode(), {"reply_to": entry[1], "correlation_id": entry[2]})

    channel.basic_consume(rpc_queue, callback=on_request)
    channel.basic_consume(cast_queue, callback=on_cast)
    # Blocking reads with no timeout: a timeout would cost two settimeout() calls and a
    # poll() per frame. The bench deletes the queues; closing stdin ends this process.
    _exit_when_stdin_closes()
    print("ready", flush=True)
    while True:
        conn.drain_events()


def serve_amqprpc(url: str, service_name: str) -> None:
    from amqprpc import Service, logs
    from amqprpc.server.worker import Worker

    logs.configure("console", "warning")
    service = Service(service_name)
    casts = 0
    consumed = threading.Condition()

    @service.handler
    def echo(payload: dict) -> dict:
        return payload

    @service.handler
    def touch(payload: dict) -> None:
        nonlocal casts
        with consumed:
            casts += 1
            consumed.notify_all()

    @service.handler
    def casts_consumed(payload: dict) -> int:
        """Answers once ``payload["n"]`` casts were handled (or after 60 s)."""
        with consumed:
            consumed.wait_for(lambda: casts >= payload["n"], timeout=60)
            return casts

    worker = Worker(service, broker_url=url, concurrency=CONCURRENCY, prefetch=PREFETCH)
    worker.start()
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    done.wait()
    worker.shutdown(5)
    # Several of these may serve one queue (the bench's worker-processes scenario): the
    # bench deletes it once they are all gone.


def _exit_when_stdin_closes() -> None:
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()


if __name__ == "__main__":
    kind, url, *names = sys.argv[1:]
    if kind == "raw":
        serve_raw(url, *names)
    else:
        serve_amqprpc(url, *names)
