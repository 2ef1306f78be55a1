"""Every exchange, queue and binding amqprpc uses, declared as kombu entities in one place.

The defaults are the wire protocol of DESIGN.md, shared with peers written in other
languages (php-amqplib services name the same exchange, queues and routing keys).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from kombu import Exchange, Queue

from .config import DEFAULT_COLLECTOR_QUEUE


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
    collector_queue: str = DEFAULT_COLLECTOR_QUEUE

    def request_exchange(self) -> Exchange:
        return Exchange(self.service_exchange, type="direct", durable=True)

    def events_exchange(self) -> Exchange:
        return Exchange(self.event_exchange, type="topic", durable=True)

    def request_key(self, service: str) -> str:
        return self.request_key_format.format(service=service)

    def request_queue(self, service: str) -> Queue:
        """The durable queue a service's workers compete on."""
        return Queue(
            self.request_queue_format.format(service=service),
            exchange=self.request_exchange(),
            routing_key=self.request_key(service),
            durable=True,
        )

    def reply_queue(self, source: str) -> Queue:
        """A caller's own reply queue: exclusive, so it dies with the connection.

        The name is ours (not server-named) so that after a reconnect the client
        declares the very queue its in-flight requests named in ``reply_to``.
        """
        name = self.reply_queue_format.format(source=source, uid=os.urandom(6).hex())
        return Queue(name, exclusive=True, auto_delete=True, durable=False, no_ack=True)

    def event_queue(self, service: str, handler: str, pattern: str) -> Queue:
        """A (service, handler)'s durable queue on the event exchange, bound by ``pattern``:
        every subscribing service gets its own copy of an event, the service's instances
        compete for it, and events published while the service is down wait for it."""
        return Queue(
            self.event_queue_format.format(service=service, handler=handler),
            exchange=self.events_exchange(),
            routing_key=pattern,
            durable=True,
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
        return replace(
            self,
            **{field: f"{namespace}.{getattr(self, field)}" for field in (
                "service_exchange", "event_exchange", "request_queue_format", "reply_queue_format",
                "event_queue_format", "broadcast_queue_format", "collector_queue")},
        )

    def responses_queue(self) -> Queue:
        """The shared durable queue ``submit`` names as ``reply_to``; ``amqprpc collector``
        consumes it. Durable so replies wait there while no collector runs."""
        return Queue(self.collector_queue, durable=True)


DEFAULT_TOPOLOGY = Topology()
