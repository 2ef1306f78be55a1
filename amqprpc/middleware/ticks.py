"""Each periodic tick runs once: the worker drops a tick id it already ran.

``amqprpc beat`` publishes each tick with message id ``{schedule}@{scheduled time}`` and an
``x-tick`` header (:mod:`amqprpc.ops.beat`). A leader that published a tick and died before
recording it leaves its successor to publish the same tick again: the first worker to take
one claims its id in Redis (``SET NX`` with a TTL, ``ttl`` seconds: a day by default) and runs
it; a second copy finds the claim and is acked unrun (outcome ``deduplicated``).

A tick coming back after a failed attempt (retry), a crash (redelivered) or a wait (rate
limit) is the same copy, not a duplicate: only a first delivery claims. Redis down: the tick
runs (at-least-once), with one warning. Messages without ``x-tick`` skip this scope (``consume_gate``);
the worker adds this middleware only for a service that has schedules.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from amqprpc import logs
from amqprpc.config import redact, redis_client
from amqprpc.config import redis_url as default_redis_url
from amqprpc.middleware import Delivery, Middleware
from amqprpc.middleware.eta import TIMING, count
from amqprpc.outcome import OutcomeKind
from amqprpc.retry import DELIVERIES, attempts_made
from amqprpc.schedule import TICK_HEADER

log = logs.get_logger("amqprpc.ticks")


class TickOnce(Middleware):
    """Claims each tick id of ``service`` in Redis before it runs; drops one already claimed."""

    consume_gate = (("headers", TICK_HEADER),)  # the chain skips this scope for a message without one

    def __init__(self, service: str, *, redis_url: str | None = None, prefix: str = "amqprpc:tick",
                 ttl: int = 86400, redis: Any = None) -> None:
        self.service = service
        self.prefix = prefix
        self.ttl = ttl
        self._url = default_redis_url(redis_url)
        self._redis = redis
        self._redis_down = False
        self._lock = threading.Lock()

    def claim(self, tick_id: str) -> bool:
        """Whether this worker is the first to run ``tick_id`` (True too when Redis is down)."""
        try:
            if self._redis is None:
                self._redis = redis_client(self._url, 0.5)
            first = bool(self._redis.set(f"{self.prefix}:{self.service}:{tick_id}", "1", nx=True, ex=self.ttl))
        except Exception as exc:  # noqa: BLE001 - Redis down: run it (at-least-once)
            with self._lock:
                if not self._redis_down:
                    self._redis_down = True
                    log.warning("Redis unreachable: periodic ticks run without the duplicate check until it is back",
                                error=redact(str(exc))[:300])
            return True
        if self._redis_down:
            self._redis_down = False
            log.info("Redis reachable again: duplicate ticks are dropped again")
        return first

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        headers = delivery.headers
        if TICK_HEADER not in headers:
            return call_next(delivery)
        first = not delivery.redelivered and not attempts_made(headers) and not headers.get(DELIVERIES)
        if first and delivery.message_id and not self.claim(delivery.message_id):
            log.info("duplicate tick dropped", tick=delivery.message_id)
            count(delivery, "duplicate_ticks")
            return delivery.decide.ack(delivery, OutcomeKind.DEDUPLICATED)
        delivery.state[TIMING] = "periodic"
        count(delivery, "periodic_runs")
        return call_next(delivery)
