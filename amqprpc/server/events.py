"""A worker's event subscriptions: which queue each event handler consumes, under which tag.

Delivery (README, "Events"), chosen per handler with ``@service.event(pattern, broadcast=...)``:

- service pool (default): one durable queue per (service, handler), bound to the event
  exchange by the handler's topic pattern. Every subscribing service gets its own copy of
  each event; the instances of one service compete for it, so the service handles it once.
- broadcast: each worker instance declares its own exclusive, auto-delete queue, so every
  running instance handles every event (cache invalidation, config reload). Events
  published while an instance is down are not kept for it.

All of them are consumed on the worker's one channel, next to its request queue (declared
and consumed, and consumed again if the broker cancels them, by ``AmqpLoop.consume``); the
worker tells an event from a request by the delivery's consumer tag (see ``Worker._handle``).
"""
from __future__ import annotations

from dataclasses import dataclass

from kombu import Queue

from amqprpc.wire.ids import new_instance_id
from amqprpc.service import EventSubscription, Service
from amqprpc.wire.topology import Topology


@dataclass(frozen=True)
class EventConsumer:
    subscription: EventSubscription
    queue: Queue
    tag: str


def event_consumers(service: Service, topology: Topology, tag_prefix: str, queue_type: str = "classic",
                    delivery_limit: int = 10, instance: str | None = None) -> dict[str, EventConsumer]:
    """The event consumers a worker of ``service`` runs, keyed by consumer tag.

    ``tag_prefix`` is the worker's own (unique) consumer tag; broadcast queues are named
    after ``instance`` (the worker's ``host.pid.random`` id, a new one if not given) so that
    instances never share one.
    Service-pool queues are of ``queue_type`` like the request queue (broadcast ones are
    always exclusive classic queues: they live and die with one connection).
    """
    instance = instance or new_instance_id()
    consumers = {}
    for name, subscription in service.events.items():
        if subscription.broadcast:
            queue = topology.broadcast_queue(service.name, name, subscription.pattern, instance)
        else:
            queue = topology.event_queue(service.name, name, subscription.pattern, queue_type, delivery_limit)
        tag = f"{tag_prefix}.event.{name}"
        consumers[tag] = EventConsumer(subscription, queue, tag)
    return consumers


def service_queue_names(service: Service, topology: Topology) -> list[str]:
    """The durable queues a service's workers declare (its request queue and one queue per
    service-pool event handler), e.g. to delete them when a test or demo is done."""
    names = [topology.request_queue_format.format(service=service.name)]
    names += [topology.event_queue_format.format(service=service.name, handler=name)
              for name, subscription in service.events.items() if not subscription.broadcast]
    return names


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic exchange routes ``routing_key`` to a binding with ``pattern``
    (``*`` one word, ``#`` zero or more words), e.g. to tell which handlers an event reaches."""
    return _topic_match(pattern.split("."), routing_key.split("."))


def _topic_match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_match(rest, words[1:])
