"""The raw py-amqp side: what the same calls cost with nothing but py-amqp.

One thread, one connection, blocking ``drain_events()`` with no timeout (no per-frame
``settimeout``), a fresh ``amqp.Message`` per call (a real client must set the
correlation id), an exclusive server-named reply queue consumed with no_ack.
"""
from __future__ import annotations

import time

import amqp

from .measure import Sample
from .servers import COUNT_QUERY, raw_connection

perf = time.perf_counter


class RawClient:
    def __init__(self, url: str, rpc_queue: str, cast_queue: str, body: bytes):
        self.conn = raw_connection(url)
        self.channel = self.conn.channel()
        self.reply_to = self.channel.queue_declare("", exclusive=True, auto_delete=True).queue
        self.channel.basic_consume(self.reply_to, no_ack=True, callback=self._on_reply)
        self.confirm = self.conn.channel()
        self.confirm.confirm_select()
        self.rpc_queue, self.cast_queue, self.body = rpc_queue, cast_queue, body
        self._on = None  # what the running scenario does with a reply
        self._seq = 0
        self.casts_sent = 0

    def close(self) -> None:
        self.conn.close()

    def _on_reply(self, message: amqp.Message) -> None:
        self._on(message)

    def _send(self, correlation_id: str, body: bytes | None = None) -> None:
        self.channel.basic_publish(
            amqp.Message(body or self.body, content_type="application/json", correlation_id=correlation_id,
                         message_id=correlation_id, reply_to=self.reply_to, delivery_mode=2, expiration="30000"),
            "", self.rpc_queue)

    def _next_id(self) -> str:
        self._seq += 1
        return str(self._seq)

    def sequential(self, count: int) -> Sample:
        got = []
        self._on = lambda message: got.append(message.properties["correlation_id"])
        latencies = []
        drain = self.conn.drain_events
        started = perf()
        for _ in range(count):
            cid = self._next_id()
            t0 = perf()
            self._send(cid)
            while not got:
                drain()
            if got.pop() != cid:
                raise AssertionError("raw reply out of order")
            latencies.append(perf() - t0)
        return Sample(count, perf() - started, latencies)

    def pipelined(self, count: int, in_flight: int, body: bytes | None = None) -> Sample:
        """``count`` calls, ``in_flight`` at a time (of ``body``, default the bench's request)."""
        sent_at: dict[str, float] = {}
        latencies = []
        state = {"sent": 0}

        def send_one() -> None:
            cid = self._next_id()
            sent_at[cid] = perf()
            state["sent"] += 1
            self._send(cid, body)

        def on_reply(message: amqp.Message) -> None:
            latencies.append(perf() - sent_at.pop(message.properties["correlation_id"]))
            if state["sent"] < count:
                send_one()

        self._on = on_reply
        drain = self.conn.drain_events
        started = perf()
        for _ in range(min(in_flight, count)):
            send_one()
        while len(latencies) < count:
            drain()
        return Sample(count, perf() - started, latencies)

    def casts(self, count: int) -> Sample:
        """Persistent, mandatory, confirmed publishes (one confirm round trip each, as
        ``basic_publish_confirm`` does), timed until the server consumed and acked them."""
        latencies = []
        publish = self.confirm.basic_publish_confirm
        started = perf()
        for _ in range(count):
            t0 = perf()
            publish(amqp.Message(self.body, content_type="application/json", delivery_mode=2), "",
                    self.cast_queue, mandatory=True)
            latencies.append(perf() - t0)
        self.casts_sent += count
        got = []
        self._on = lambda message: got.append(message)
        self._send(self._next_id(), COUNT_QUERY + str(self.casts_sent).encode())
        while not got:
            self.conn.drain_events()
        return Sample(count, perf() - started, latencies)
