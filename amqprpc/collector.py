"""The response collector: moves replies of submitted requests from their queue into Redis.

``client.submit`` names the shared durable collector queue (``topology.collector_queue``)
as ``reply_to``; workers reply there as to any caller. The collector consumes that queue
and stores each reply under ``response:{correlation_id}`` with a TTL, where a web tier
polls for it, and announces it on the pub/sub channel of that name, where a web tier waits
for it (both in one round trip: :meth:`~amqprpc.responses.ResponseStore.put_many`).

Threads, and why (the same split as the worker's):
- the loop thread (:class:`~amqprpc.ioloop.AmqpLoop`) owns the connection: it receives
  deliveries and acks, and keeps heartbeats going while Redis is slow or down;
- one store thread takes every delivery that is waiting, writes them to Redis in one
  pipeline, and only then hands their acks back to the loop. If Redis fails it retries
  with jittered backoff and acks nothing meanwhile: the prefetch bounds what it holds,
  the rest stays in the queue, and nothing is lost.

It has the worker's lifecycle (``start``, ``shutdown``, ``stop``, ``alive``, ``stats``), so
:func:`amqprpc.daemon.run_worker` runs it with the same signals and exit codes.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
from dataclasses import replace
from typing import Any

import amqp

from . import envelope, logs
from .backoff import full_jitter
from .config import broker_url as default_broker_url
from .config import redact
from .framehandler import UndecodableMessage
from .ioloop import AmqpLoop
from .redelivery import Forward, Forwarder, Redelivery
from .responses import DEFAULT_TTL, ResponseStore
from .topology import DEFAULT_TOPOLOGY, Topology

log = logs.get_logger("amqprpc.collector")

_STOP = object()


class Collector(AmqpLoop):
    """Store every reply arriving on ``topology.collector_queue`` in ``store``.

    Parameters: ``ttl`` seconds a stored reply lives; ``prefetch`` unacked replies held at
    most (also the largest Redis batch); ``heartbeat`` seconds; ``retry_base`` and
    ``retry_cap`` bound the backoff between Redis attempts, in seconds.
    """

    def __init__(self, store: ResponseStore, *, broker_url: str | None = None, ttl: float = DEFAULT_TTL,
                 topology: Topology = DEFAULT_TOPOLOGY, prefetch: int = 200, heartbeat: float = 30.0,
                 retry_base: float = 0.1, retry_cap: float = 5.0):
        super().__init__(default_broker_url(broker_url), name="amqprpc-io-collector", heartbeat=heartbeat)
        self.store = store
        self.ttl = ttl
        self.topology = topology
        self.queue_name = topology.collector_queue
        self.prefetch = prefetch
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.channel: amqp.Channel | None = None
        self.consumer_tag = f"amqprpc.collector.{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._storer: threading.Thread | None = None
        self._abandon = threading.Event()
        # What cannot be stored (no correlation id, properties that do not decode) goes to
        # ``{collector_queue}.dead`` (``amqprpc.responses.dead``), as a worker's to ``service.X.dead``.
        self.redelivery = Redelivery(self.queue_name, replace(topology, dead_queue_format="{service}.dead"))
        self.forwarder = Forwarder()
        self._consuming = True  # until a warm stop cancels the consumer
        self.stats = {"received": 0, "stored": 0, "dropped": 0, "store_errors": 0}

    # --- lifecycle (any thread) --------------------------------------------------------
    def start(self) -> None:
        """Connect, start consuming and start the store thread."""
        self._storer = threading.Thread(target=self._store_loop, name="amqprpc-collector-store", daemon=True)
        self._storer.start()
        super().start()
        log.info("collector ready", queue=self.queue_name, ttl=self.ttl, prefix=self.store.prefix,
                 prefetch=self.prefetch)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Warm stop: stop consuming, store and ack what was already received, then close.

        Storing is quick, so what was prefetched is stored rather than requeued. Returns
        False when Redis did not take it within ``timeout`` seconds: those replies stay
        unacked and go back to the queue when the connection closes."""
        cancelled = threading.Event()
        self.call_soon(self._stop_consuming, cancelled)
        cancelled.wait(5.0)
        self._inbox.put(_STOP)
        if self._storer is not None:
            self._storer.join(timeout)
        clean = self._storer is None or not self._storer.is_alive()
        if not clean:
            self._abandon.set()
        self.stop()
        (log.info if clean else log.warning)("collector stopped", clean=clean, **self.stats)
        return clean

    # --- loop thread -------------------------------------------------------------------
    def on_connected(self, connection) -> None:
        channel = connection.channel()
        channel.basic_qos(0, self.prefetch, False)
        self.forwarder.connect(connection)
        self.consume(channel, self.topology.responses_queue(), self._on_message, consumer_tag=self.consumer_tag)
        self.channel = channel

    def keep_consuming(self, consumer_tag: str) -> bool:
        return self._consuming

    def on_disconnected(self, exc) -> None:
        # The broker redelivers what the dead channel held; storing twice is harmless (SET).
        self.channel = None
        self.forwarder.disconnected()

    def _on_message(self, message: amqp.Message) -> None:
        self.stats["received"] += 1
        self._inbox.put((self.generation, message))

    def _stop_consuming(self, done: threading.Event) -> None:
        self._consuming = False
        try:
            if self.channel is not None:
                self.channel.basic_cancel(self.consumer_tag)
        finally:
            done.set()

    def _settle(self, settled: list[tuple[int, amqp.Message, Forward | None]]) -> None:
        """Ack what the store thread stored; dead-letter what it could not store. Tags of
        an earlier connection are dropped: the broker already requeued those."""
        channel = self.channel
        if channel is None:
            return
        for generation, message, forward in settled:
            if generation != self.generation:
                continue
            if forward is None:
                channel.basic_ack(message.delivery_tag)
            else:
                self.forwarder.forward(channel, message.delivery_tag, forward, lambda reason: self.redelivery.dead_letter(
                    message, self.queue_name, reason, "UnencodableCopy", keep_headers=False))

    # --- store thread ------------------------------------------------------------------
    def _store_loop(self) -> None:
        get = self._inbox.get
        while True:
            batch: list[tuple[int, amqp.Message]] = []
            item = get()
            while item is not _STOP:
                batch.append(item)
                if len(batch) >= self.prefetch:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if batch and not self._store(batch):
                return
            if item is _STOP:
                return

    def _store(self, batch: list[tuple[int, amqp.Message]]) -> bool:
        """Write one batch to Redis, retrying until it succeeds; then hand back the acks.
        Returns False when abandoned at shutdown (nothing acked: the broker requeues)."""
        replies: list[tuple[str, bytes]] = []
        settled: list[tuple[int, amqp.Message, Forward | None]] = []
        for generation, message in batch:
            if isinstance(message, UndecodableMessage):
                self.stats["dropped"] += 1
                log.warning("undecodable reply dead-lettered", problem=message.problem)
                settled.append((generation, message, self.redelivery.undecodable(message, self.queue_name)))
                continue
            entry = _reply_entry(message)
            if entry is None:
                self.stats["dropped"] += 1
                log.warning("reply without a correlation id, dead-lettered",
                            message_id=message.properties.get("message_id"))
                settled.append((generation, message, self.redelivery.dead_letter(
                    message, self.queue_name, "Reply names no call (no correlation_id or message_id)", "BadReply")))
                continue
            replies.append(entry)
            settled.append((generation, message, None))
        attempt = 0
        while replies:
            try:
                self.store.put_many(replies, self.ttl)
                break
            except Exception as exc:  # noqa: BLE001 - Redis down, or anything else: keep unacked, retry
                self.stats["store_errors"] += 1
                delay = full_jitter(attempt, self.retry_base, self.retry_cap)
                attempt += 1
                log.warning("storing replies in Redis failed; they stay unacked", error=redact(str(exc)),
                            replies=len(replies), attempt=attempt, retry_in=round(delay, 3))
                if self._abandon.wait(delay):
                    return False
        if attempt:
            log.info("Redis took the replies again", replies=len(replies), attempts=attempt + 1)
        for correlation_id, _ in replies:
            log.debug("reply stored", correlation_id=correlation_id)
        self.stats["stored"] += len(replies)
        self.call_soon(self._settle, settled)
        return True


def _reply_entry(message: amqp.Message) -> tuple[str, bytes] | None:
    """(correlation id, body to store) of one reply, or None when it names no call
    (none, or one longer than any call's).

    A body that is not a JSON object is stored as a ``BadReply`` error envelope, so that
    the poller gets an answer it can read rather than waiting until it gives up."""
    body = message.body
    correlation_id = message.properties.get("correlation_id")
    try:
        doc: Any = envelope.loads(body)
    except (ValueError, TypeError, RecursionError):
        doc = None
    if not correlation_id and isinstance(doc, dict):
        # A foreign server may answer with the request's message_id only.
        correlation_id = doc.get("message_id")
    if not correlation_id:
        return None
    correlation_id = str(correlation_id)
    if len(correlation_id) > envelope.SHORTSTR_MAX:  # no call of ours has such an id; nor should a Redis key
        return None
    if not isinstance(doc, dict):
        return correlation_id, envelope.error_reply("reply is not a JSON object", "BadReply", correlation_id)
    return correlation_id, body if isinstance(body, bytes) else body.encode()
