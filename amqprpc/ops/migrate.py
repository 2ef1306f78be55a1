"""``amqprpc migrate-queue SERVICE``: give an existing request queue new arguments (priorities).

RabbitMQ cannot change a queue's arguments in place (a redeclare with other ones is
PRECONDITION_FAILED), and turning ``max_priority`` on for a service whose
``service.X.request`` already exists needs exactly that. With the service's workers stopped:

1. a holding queue ``{queue}.migrating`` is declared *with the new arguments* and bound to the
   service's routing key, and the old queue unbound: from now on new requests wait there
   (never both: a message routed to two queues would run twice);
2. the old queue's messages are moved into it (each one published, confirmed, then acked:
   a crash in between duplicates a message, never loses one); the old queue is deleted;
3. the queue is declared again under its own name with the new arguments and bound, the holding
   queue unbound, and its messages moved into it; the holding queue is deleted.

Messages that retry or countdown queues dead-letter by *queue name* in the instant between
deleting the old queue and declaring the new one are dropped by the broker: run it with the
workers stopped and no retries due (``amqprpc dlq`` shows none pending), or accept that.
Run again after an interruption: it picks up where it stopped (a holding queue left over is
drained into the new queue).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import amqp
from kombu import Connection, Queue

from amqprpc import logs
from amqprpc.config import ssl_options
from amqprpc.wire.topology import Topology

log = logs.get_logger("amqprpc.migrate")


class MigrationRefused(RuntimeError):
    """The queue cannot be migrated now (consumers still attached)."""


@dataclass
class Migrated:
    queue: str
    moved: int  # messages now in the new queue that waited in the old (or a left-over holding) one
    arguments: dict[str, Any] | None


def migrate_request_queue(broker_url: str, service: str, topology: Topology, *, queue_type: str = "classic",
                          delivery_limit: int = 7, max_priority: int | None = None) -> Migrated:
    """Re-create ``service``'s request queue with the arguments the service declares now."""
    target = topology.request_queue(service, queue_type, delivery_limit, max_priority)
    holding = Queue(f"{target.name}.migrating", exchange=target.exchange, routing_key=target.routing_key,
                    durable=True, queue_arguments=target.queue_arguments)  # type: ignore[attr-defined]
    moved = 0
    with Connection(broker_url, ssl=ssl_options(broker_url)) as conn:
        channel = conn.channel()
        channel.confirm_select()
        target.exchange(channel).declare()
        old = _consumers(conn, target.name)
        if old is not None:
            if old:
                raise MigrationRefused(f"{target.name} has {old} consumer(s): stop {service}'s workers first")
            holding(channel).declare()
            channel.queue_unbind(target.name, target.exchange.name, target.routing_key)
            _move(channel, target.name, holding.name)
            channel.queue_delete(target.name)
        target(channel).declare()
        if _consumers(conn, holding.name) is not None:
            channel.queue_unbind(holding.name, target.exchange.name, target.routing_key)
            moved += _move(channel, holding.name, target.name)
            channel.queue_delete(holding.name, if_empty=True)
        with contextlib.suppress(Exception):
            channel.close()
    log.info("request queue migrated", queue=target.name, moved=moved, arguments=target.queue_arguments)  # type: ignore[attr-defined]
    return Migrated(target.name, moved, target.queue_arguments)  # type: ignore[attr-defined]


def _consumers(conn: Any, name: str) -> int | None:
    """Consumers of queue ``name``, None when it does not exist (on a channel of its own:
    a passive declare of a missing queue closes its channel)."""
    channel = conn.channel()
    try:
        return int(channel.queue_declare(name, passive=True).consumer_count)
    except amqp.exceptions.NotFound:
        return None
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def _move(channel: amqp.Channel, source: str, destination: str) -> int:
    """Every message of ``source`` into ``destination``, in order: published confirmed, then acked."""
    moved = 0
    while True:
        message = channel.basic_get(source, no_ack=False)
        if message is None:
            return moved
        properties = dict(message.properties)
        channel.basic_publish(amqp.Message(message.body, **properties), "", destination, mandatory=True)
        channel.basic_ack(message.delivery_tag)
        moved += 1
