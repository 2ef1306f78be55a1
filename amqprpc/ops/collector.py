"""The response collector: moves replies of submitted requests from their queue into Redis.

``client.submit`` names the shared durable collector queue (``topology.collector_queue``)
as ``reply_to``; workers reply there as to any caller. The collector consumes that queue
and stores each reply under ``response:{correlation_id}`` with a TTL, where a web tier
polls for it, and announces it on the pub/sub channel of that name, where a web tier waits
for it (both in one round trip: :meth:`~amqprpc.client.responses.ResponseStore.put_many`).

Threads, and why (the same split as the worker's):
- the loop thread (:class:`~amqprpc.transport.ioloop.AmqpLoop`) owns the connection: it receives
  deliveries and acks, and keeps heartbeats going while Redis is slow or down;
- one store thread takes every delivery that is waiting, writes them to Redis in one
  pipeline, and only then hands their acks back to the loop. If Redis fails it retries
  with jittered backoff and acks nothing meanwhile: the prefetch bounds what it holds,
  the rest stays in the queue, and nothing is lost.

It has the worker's lifecycle (``start``, ``shutdown``, ``stop``, ``alive``, ``stats``), so
:func:`amqprpc.ops.daemon.run_worker` runs it with the same signals and exit codes.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import replace
from typing import Any, Callable

import amqp

from amqprpc.wire import envelope
from amqprpc import logs
from amqprpc.transport.backoff import full_jitter
from amqprpc.config import broker_url as default_broker_url
from amqprpc.config import redact
from amqprpc.transport.consumer import STOP, Consumer
from amqprpc.transport.framehandler import UndecodableMessage
from amqprpc.wire.ids import new_instance_id
from amqprpc.transport.redelivery import Forward, Redelivery
from amqprpc.client.responses import DEFAULT_TTL, ResponseStore
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

log = logs.get_logger("amqprpc.collector")



class Collector:
    """Store every reply arriving on ``topology.collector_queue`` in ``store``.

    Parameters: ``ttl`` seconds a stored reply lives; ``prefetch`` unacked replies held at
    most (also the largest Redis batch); ``heartbeat`` and ``reconnect_cap`` (the longest
    wait between reconnect attempts) seconds; ``retry_base`` and ``retry_cap`` bound the
    backoff between Redis attempts, in seconds.

    The worker's lifecycle: :meth:`start`, :meth:`shutdown` (warm) or :meth:`stop` (cold).
    """

    def __init__(self, store: ResponseStore, *, broker_url: str | None = None, ttl: float = DEFAULT_TTL,
                 topology: Topology = DEFAULT_TOPOLOGY, prefetch: int = 200, heartbeat: float = 30.0,
                 retry_base: float = 0.1, retry_cap: float = 5.0, reconnect_cap: float = 10.0):
        self.name = "collector"
        self.store = store
        self.ttl = ttl
        self.topology = topology
        self.queue_name = topology.collector_queue
        self.prefetch = prefetch
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.consumer_tag = f"amqprpc.collector.{new_instance_id()}"
        self._storer: threading.Thread | None = None
        self._abandon = threading.Event()
        # What cannot be stored (no correlation id, properties that do not decode) goes to
        # ``{collector_queue}.dead`` (``amqprpc.responses.dead``), as a worker's to ``service.X.dead``.
        self.redelivery = Redelivery(self.queue_name, replace(topology, dead_queue_format="{service}.dead"))
        self._consumer = Consumer(default_broker_url(broker_url), name="amqprpc-io-collector", prefetch=prefetch,
                                  redelivery=self.redelivery, declare=self._declare, heartbeat=heartbeat,
                                  reconnect_cap=reconnect_cap)
        self._loop = self._consumer.loop
        self.url = self._loop.url
        self._inbox = self._consumer.inbox
        self._counts = {"stored": 0, "dropped": 0, "store_errors": 0}  # written by the store thread alone

    # --- lifecycle (any thread) --------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._loop.alive

    @property
    def stats(self) -> dict[str, int]:
        return {"received": self._consumer.received, **self._counts}

    def start(self, *, broker_wait: float = 0.0,
              on_connect_retry: Callable[[int, float, BaseException], None] | None = None) -> None:
        """Connect, start consuming and start the store thread (``broker_wait`` and
        ``on_connect_retry`` as for :meth:`Worker.start <amqprpc.server.worker.Worker.start>`).
        When it raises, no thread of this collector is left running."""
        self._storer = threading.Thread(target=self._store_loop, name="amqprpc-collector-store", daemon=True)
        self._storer.start()
        try:
            self._consumer.start(broker_wait, on_connect_retry)
        except BaseException:
            self._inbox.put(STOP)
            self._storer.join(5.0)
            raise
        log.info("collector ready", queue=self.queue_name, ttl=self.ttl, prefix=self.store.prefix,
                 prefetch=self.prefetch)

    def cancel_start(self) -> None:
        self._loop.cancel_start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cold stop: close the connection now; what is unacked goes back to the queue."""
        self._loop.stop(timeout)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Warm stop: stop consuming, store and ack what was already received, then close.

        Storing is quick, so what was prefetched is stored rather than requeued. Returns
        False when Redis did not take it within ``timeout`` seconds: those replies stay
        unacked and go back to the queue when the connection closes."""
        cancelled = threading.Event()
        self._loop.call_soon(self._consumer.stop_consuming, cancelled, False)
        cancelled.wait(5.0)
        self._inbox.put(STOP)
        if self._storer is not None:
            self._storer.join(timeout)
        clean = self._storer is None or not self._storer.is_alive()
        if not clean:
            self._abandon.set()
        self._loop.stop()
        (log.info if clean else log.warning)("collector stopped", clean=clean, **self.stats)
        return clean

    # --- loop thread -------------------------------------------------------------------
    def _declare(self, connection: Any, channel: amqp.Channel) -> tuple[amqp.Channel, dict[str, Any]]:
        return channel, {self.consumer_tag: self.topology.responses_queue()}

    def _settle(self, settled: list[tuple[int, amqp.Message, Forward | None]]) -> None:
        """Ack what the store thread stored; dead-letter what it could not store. Tags of
        an earlier connection are dropped: the broker already requeued those."""
        channel = self._consumer.channel
        if channel is None:
            return
        for generation, message, forward in settled:
            self._consumer.settle(channel, generation, message, forward)

    # --- store thread ------------------------------------------------------------------
    def _store_loop(self) -> None:
        get = self._inbox.get
        while True:
            batch: list[tuple[int, amqp.Message]] = []
            item = get()
            while item is not STOP:
                batch.append(item)
                if len(batch) >= self.prefetch:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if batch and not self._store(batch):
                return
            if item is STOP:
                return

    def _store(self, batch: list[tuple[int, amqp.Message]]) -> bool:
        """Write one batch to Redis, retrying until it succeeds; then hand back the acks.
        Returns False when abandoned at shutdown (nothing acked: the broker requeues)."""
        replies: list[tuple[str, bytes]] = []
        settled: list[tuple[int, amqp.Message, Forward | None]] = []
        for generation, message in batch:
            if isinstance(message, UndecodableMessage):
                self._counts["dropped"] += 1
                log.warning("undecodable reply dead-lettered", problem=message.problem)
                settled.append((generation, message, self.redelivery.undecodable(message, self.queue_name)))
                continue
            entry = _reply_entry(message)
            if entry is None:
                self._counts["dropped"] += 1
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
                self._counts["store_errors"] += 1
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
        self._counts["stored"] += len(replies)
        self._loop.call_soon(self._settle, settled)
        return True


def _reply_entry(message: amqp.Message) -> tuple[str, bytes] | None:
    """(correlation id, body to store) of one reply, or None when it names no call
    (none, or one longer than any call's).

    A body that is not a JSON object is stored as a ``BadReply`` error envelope, so that
    the poller gets an answer it can read rather than waiting until it gives up."""
    body = message.body
    doc = envelope.decode_reply(body)
    ids = envelope.reply_ids(message.properties, doc)
    if not ids:
        return None
    correlation_id = ids[0]
    if len(correlation_id) > envelope.SHORTSTR_MAX:  # no call of ours has such an id; nor should a Redis key
        return None
    if not isinstance(doc, dict):
        return correlation_id, envelope.error_reply("reply is not a JSON object", "BadReply", correlation_id)
    return correlation_id, body if isinstance(body, bytes) else body.encode()
