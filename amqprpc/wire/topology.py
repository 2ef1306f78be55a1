"""Every exchange, queue and binding amqprpc uses, declared as kombu entities in one place.

The defaults are the wire protocol (README, "Wire protocol in short"), shared with peers written in other
languages (php-amqplib services name the same exchange, queues and routing keys).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Iterable

import amqp
from kombu import Connection, Exchange, Queue

from amqprpc import logs
from amqprpc.config import DEFAULT_COLLECTOR_QUEUE, ssl_options
from amqprpc.errors import TopologyMismatch as TopologyMismatch  # re-exported: its home was here

log = logs.get_logger("amqprpc.topology")

# Quorum queues dead-letter at least once (RabbitMQ >= 3.10): a message expiring from a delay
# queue, or over the delivery limit, is kept until its dead-letter target confirmed it (and
# not dropped while, say, that queue's leader is being elected). The strategy needs
# reject-publish overflow; with no length limit set, that never rejects anything.
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True)
class Topology:
    """Names of the shared entities. Change them only together with every peer."""

    service_exchange: str = "service.exchange"
    event_exchange: str = "event.exchange"
    request_queue_format: str = "service.{service}.request"
    request_key_format: str = "request.{service}"
    reply_queue_format: str = "amqprpc.reply.{source}.{uid}"
    event_queue_format: str = "service.{service}.event.{handler}"
    broadcast_queue_format: str = "service.{service}.event.{handler}.{instance}"
    dead_queue_format: str = "service.{service}.dead"
    delay_queue_format: str = "{queue}.delay.{ms}"
    # Where a countdown/ETA cast waits (:meth:`countdown_queue`): one queue per delay amount,
    # apart from the retry buckets (those may be quorum queues; these are always classic).
    countdown_queue_format: str = "{queue}.countdown.{ms}"
    # Backoff delays are rounded *up* into these buckets (ms): a queue's per-message TTL
    # only expires at its head (RabbitMQ checks only the oldest message: a 100 ms message
    # behind a 60 s one waits 60 s), so each bucket holds one TTL and
    # its messages leave in arrival order; a short delay never waits behind a long one.
    delay_buckets_ms: tuple[int, ...] = (100, 250, 500, 1000, 2000, 5000, 10000, 30000, 60000, 120000, 300000,
                               600000, 1800000, 3600000)
    # An idle delay queue vanishes this long after its last declare (publishers re-declare
    # at least every DELAY_REDECLARE_S, so a queue never expires with a message inside).
    delay_queue_idle_ms: int = 600000
    collector_queue: str = DEFAULT_COLLECTOR_QUEUE

    def request_exchange(self) -> Exchange:
        return Exchange(self.service_exchange, type="direct", durable=True)

    def events_exchange(self) -> Exchange:
        return Exchange(self.event_exchange, type="topic", durable=True)

    def request_key(self, service: str) -> str:
        return self.request_key_format.format(service=service)

    def request_queue(self, service: str, queue_type: str = "classic", delivery_limit: int = 10,
                      max_priority: int | None = None) -> Queue:
        """The durable queue a service's workers compete on.

        Classic queues get no arguments at all, so the queues users already declared
        (``service.X.request`` without arguments) keep working: retries and dead letters
        are published by the worker, not by a broker-side DLX on this queue. Quorum
        queues (``queue_type="quorum"``, for clusters) get a ``x-delivery-limit`` and a
        dead-letter route to the service's dead queue as a backstop under the worker's
        own redelivery count. ``max_priority`` (1-10) makes a classic queue a priority queue
        (``x-max-priority``); quorum queues take no argument for it (RabbitMQ 4 always gives
        them two levels: priority 0-4 and 5 and above).
        """
        arguments = self.queue_arguments(service, queue_type, delivery_limit)
        if max_priority is not None and queue_type == "classic":
            arguments = {"x-max-priority": max_priority}
        return Queue(
            self.request_queue_format.format(service=service),
            exchange=self.request_exchange(),
            routing_key=self.request_key(service),
            durable=True,
            queue_arguments=arguments,
        )

    def queue_arguments(self, service: str, queue_type: str = "classic",
                        delivery_limit: int = 10) -> dict[str, Any] | None:
        """x-arguments of a durable queue consumed by ``service``'s workers."""
        if queue_type == "classic":
            return None
        if queue_type != "quorum":
            raise ValueError(f"queue type must be classic or quorum, not {queue_type!r}")
        return {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.dead_queue_name(service),
                **AT_LEAST_ONCE}

    def dead_queue_name(self, service: str) -> str:
        return self.dead_queue_format.format(service=service)

    def dead_queue(self, service: str, queue_type: str = "classic") -> Queue:
        """``service.{svc}.dead``: what failed for good, with the reason in its headers.
        Bound to nothing: the worker publishes to it through the default exchange."""
        arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
        return Queue(self.dead_queue_name(service), durable=True, queue_arguments=arguments)

    def delay_bucket_ms(self, seconds: float) -> int:
        """The smallest bucket not shorter than ``seconds`` (the largest one at most)."""
        wanted = seconds * 1000.0
        for bucket in self.delay_buckets_ms:
            if bucket >= wanted:
                return bucket
        return self.delay_buckets_ms[-1]

    def delay_queue(self, queue: str, ms: int, queue_type: str = "classic") -> Queue:
        """A queue holding messages for ``ms`` milliseconds, then dead-lettering them
        through the default exchange straight back into ``queue``. Going back to the
        consumed queue itself (not to an exchange) makes it work for request queues and
        event queues alike, and an event retry reaches only the subscriber that failed."""
        arguments = {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue,
                     "x-expires": ms + self.delay_queue_idle_ms}
        if queue_type == "quorum":
            arguments.update({"x-queue-type": "quorum", **AT_LEAST_ONCE})
        return Queue(self.delay_queue_format.format(queue=queue, ms=ms), durable=True, queue_arguments=arguments)

    def countdown_ms(self, seconds: float) -> int:
        """The delay a countdown of ``seconds`` waits, in ms: never shorter than asked, rounded
        *up* so that few queues serve every delay -- to 50 ms under 10 s (a rate limit's slots are
        that close), to 1 s under 1 h
        (so at most 1 s late), beyond that to a step of ~0.5% (at most 0.5% late)."""
        ms = math.ceil(seconds * 1000.0)
        if ms <= 10_000:
            return max(50, -(-ms // 50) * 50)
        if ms <= 3_600_000:
            return -(-ms // 1000) * 1000
        steps = math.ceil(math.log(ms / 3_600_000) / math.log(COUNTDOWN_STEP) - 1e-9)
        return -(-math.ceil(3_600_000 * COUNTDOWN_STEP ** steps) // 1000) * 1000

    def countdown_queue(self, queue: str, ms: int) -> Queue:
        """Where a cast waits ``ms`` before it reaches ``queue`` (a request queue): a durable
        classic queue nobody consumes, whose one TTL (per queue: every message in it waits
        the same, so none waits behind a longer one) dead-letters it through the default
        exchange into ``queue``. It vanishes when unused for ``ms`` plus the idle time
        (publishers re-declare it while they use it, so never with a message inside)."""
        arguments = {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue,
                     "x-expires": ms + self.delay_queue_idle_ms}
        return Queue(self.countdown_queue_format.format(queue=queue, ms=ms), durable=True,
                     queue_arguments=arguments)

    def retry_queue_names(self, service: str, queues: list[str]) -> list[str]:
        """The dead-letter queue of ``service`` and every delay queue its workers may
        declare for the consumed ``queues`` (for cleaning up after tests)."""
        return [self.dead_queue_name(service)] + [
            self.delay_queue_format.format(queue=queue, ms=ms) for queue in queues for ms in self.delay_buckets_ms]

    def reply_queue(self, source: str) -> Queue:
        """A caller's own reply queue: exclusive, so it dies with the connection.

        The name is ours (not server-named) so that after a reconnect the client
        declares the very queue its in-flight requests named in ``reply_to``.
        """
        name = self.reply_queue_format.format(source=source, uid=os.urandom(6).hex())
        return Queue(name, exclusive=True, auto_delete=True, durable=False, no_ack=True)

    def event_queue(self, service: str, handler: str, pattern: str, queue_type: str = "classic",
                    delivery_limit: int = 10) -> Queue:
        """A (service, handler)'s durable queue on the event exchange, bound by ``pattern``:
        every subscribing service gets its own copy of an event, the service's instances
        compete for it, and events published while the service is down wait for it.
        Quorum ones (clusters) get the request queue's delivery limit and dead-letter route."""
        return Queue(
            self.event_queue_format.format(service=service, handler=handler),
            exchange=self.events_exchange(),
            routing_key=pattern,
            durable=True,
            queue_arguments=self.queue_arguments(service, queue_type, delivery_limit),
        )

    def broadcast_queue(self, service: str, handler: str, pattern: str, instance: str) -> Queue:
        """One worker instance's own queue for a broadcast handler: exclusive and
        auto-deleted, so every running instance gets every event, and the queue lives
        exactly as long as the instance's connection (nothing piles up for dead ones)."""
        return Queue(
            self.broadcast_queue_format.format(service=service, handler=handler, instance=instance),
            exchange=self.events_exchange(),
            routing_key=pattern,
            durable=False,
            exclusive=True,
            auto_delete=True,
        )

    def namespaced(self, namespace: str) -> "Topology":
        """The same layout with every exchange and queue name prefixed by ``namespace``:
        a whole shop of its own on a shared broker (the demo, tests), with the usual
        service and event names. Peers speaking the default protocol do not see it."""
        names: dict[str, Any] = {field: f"{namespace}.{getattr(self, field)}" for field in (
                "service_exchange", "event_exchange", "request_queue_format", "reply_queue_format",
                "event_queue_format", "broadcast_queue_format", "collector_queue", "dead_queue_format")}
        return replace(self, **names)

    def responses_queue(self) -> Queue:
        """The shared durable queue ``submit`` names as ``reply_to``; ``amqprpc collector``
        consumes it. Durable so replies wait there while no collector runs."""
        return Queue(self.collector_queue, durable=True)


DEFAULT_TOPOLOGY = Topology()

# Above 1 h, countdown queues are ~0.5% apart (about 1300 of them up to 30 days).
COUNTDOWN_STEP = 1.005
MAX_COUNTDOWN_S = 30 * 86400


def declare_queue(connection: Any, channel: amqp.Channel, queue: Queue) -> tuple[amqp.Channel, Queue]:
    """Declare ``queue``; returns the channel to go on with and the queue as declared.

    A quorum queue declared by an amqprpc from before at-least-once dead-lettering has all
    our arguments but those two, and RabbitMQ refuses to redeclare it with them
    (PRECONDITION_FAILED, which also closes ``channel``): it is then used as it is, on a
    new channel of ``connection``, with a warning. Any other difference is raised.
    """
    try:
        queue(channel).declare()
        return channel, queue
    except amqp.exceptions.PreconditionFailed:
        arguments = queue.queue_arguments or {}  # type: ignore[attr-defined]  # kombu sets it from Queue.attrs
        if "x-dead-letter-strategy" not in arguments:
            raise
        earlier = copy.copy(queue)
        earlier.queue_arguments = {  # type: ignore[attr-defined]
            k: v for k, v in arguments.items() if k not in AT_LEAST_ONCE}
        channel = connection.channel()
        earlier(channel).declare()
        log.warning("queue exists with at-most-once dead-lettering (declared by an earlier amqprpc); used as it is",
                    queue=queue.name)
        return channel, earlier


def priority_mismatch(service: str, max_priority: int | None, reply_text: str) -> str:
    """The one error a worker gives when its request queue exists with other priorities than
    ``Service(max_priority=...)`` asks for: a queue's arguments cannot change in place."""
    wanted = f"max_priority={max_priority}" if max_priority else "no max_priority"
    return (f"{service}'s request queue exists with other priorities than the service declares ({wanted}; "
            f"broker: {reply_text}). A queue's arguments cannot change: run 'amqprpc migrate-queue {service}' "
            "(it moves the waiting messages to a queue declared as the service now says), then start the workers")


def delete(broker_url: str, *, queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
    """Delete these queues and exchanges (missing ones are fine): what a namespaced run (the
    demo, a test) declared. Not for a shared topology: a deleted queue takes its messages."""
    with Connection(broker_url, ssl=ssl_options(broker_url)) as conn:
        for method, names in (("queue_delete", queues), ("exchange_delete", exchanges)):
            for name in names:
                channel = conn.channel()
                try:
                    getattr(channel, method)(name)
                except conn.channel_errors:
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
