"""Casts that run later (``countdown=`` / ``eta=``): they wait in the broker, not in a worker.

Celery holds ETA tasks unacked in a worker, where RabbitMQ's ``consumer_timeout`` (30 min)
kills the channel and the tasks run twice or are lost. Here the client publishes the cast
into a *countdown queue* of the service (:meth:`~amqprpc.wire.topology.Topology.countdown_queue`):
durable, no consumer, one TTL per queue (every message in it waits the same time, so no short
delay waits behind a long one -- a per-message TTL only expires at the queue's head), which
dead-letters it into the request queue when the time is up. Delays are rounded *up*
(:meth:`~amqprpc.wire.topology.Topology.countdown_ms`), so a task never runs early; the
message also carries ``x-eta`` (epoch seconds), and a worker that receives it early all the
same (another machine's clock) sends it back to wait (:mod:`amqprpc.middleware.eta`).
"""
from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

import amqp
from kombu import Queue

from amqprpc.errors import ServiceUnavailable
from amqprpc.transport.ioloop import close_quietly
from amqprpc.wire.topology import MAX_COUNTDOWN_S

# The application header saying when a delayed message is due (epoch seconds, a float).
ETA_HEADER = "x-eta"

# A countdown queue is declared again at least this often while it is used: a declare is what
# counts as use for its x-expires (publishing does not), and the queue expires ``ms`` plus
# ten minutes after that.
REDECLARE_S = 60.0


def delay_of(countdown: float | None, eta: datetime | None, now: float | None = None) -> float | None:
    """Seconds to wait (<= 0: due now), or None when neither is given. ``eta`` must be
    timezone-aware (a naive datetime says nothing about *which* 9 o'clock: ValueError);
    more than 30 days, a negative or a non-finite countdown are ValueErrors too."""
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    if eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"eta must be a datetime, not {type(eta).__name__}")
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise ValueError("eta must be timezone-aware (e.g. datetime.now(timezone.utc) + timedelta(...))")
        wait = eta.timestamp() - (time.time() if now is None else now)
    elif countdown is not None:
        wait = float(countdown)
        if not math.isfinite(wait) or wait < 0:
            raise ValueError(f"countdown must be a number of seconds >= 0, not {countdown!r}")
    else:
        return None
    if wait > MAX_COUNTDOWN_S:
        raise ValueError(f"a delay of {wait:.0f}s is more than 30 days ({MAX_COUNTDOWN_S}s)")
    return wait


def check_priority(priority: int | None) -> None:
    """A message priority is an AMQP octet; a queue honours up to its ``x-max-priority``
    (more counts as the maximum)."""
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not 0 <= priority <= 255):
        raise ValueError(f"priority must be an int from 0 to 255 (queues honour 0..max_priority), not {priority!r}")


class CountdownQueues:
    """Which countdown queues this client declared, and when (loop thread only)."""

    def __init__(self) -> None:
        self._declared: dict[str, tuple[int, float]] = {}

    def due(self, name: str, generation: int) -> bool:
        """Whether ``name`` must be declared before publishing into it."""
        seen = self._declared.get(name)
        return seen is None or seen[0] != generation or time.monotonic() - seen[1] >= REDECLARE_S

    def declare(self, connection: Any, generation: int, queue: Queue, target: str) -> None:
        """Declare ``queue`` once the request queue ``target`` it empties into is known to
        exist (a delayed cast to a service never deployed would be dropped by the broker when
        its time is up: ServiceUnavailable now instead). On a channel of its own: a refused
        declare closes its channel."""
        channel = connection.channel()
        try:
            try:
                channel.queue_declare(target, passive=True)
            except amqp.exceptions.NotFound:
                raise ServiceUnavailable(f"no queue {target!r}: is its service deployed? (nothing was sent)") from None
            queue(channel).declare()
        finally:
            close_quietly(channel)
        self._declared[queue.name] = (generation, time.monotonic())
