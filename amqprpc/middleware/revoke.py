"""Revoking messages: ``client.revoke(service, message_id)`` / ``amqprpc revoke`` and the
worker middleware that honours it.

Why Redis and not a broadcast to the workers: a revoke must reach every worker of the
service, also one started later, and also a message that waits in a delay queue (countdown,
retry backoff) and passes the worker only when due. A key per revoked message
(``amqprpc:revoked:{service}:{message_id}``, kept ``ttl`` seconds, one day by default) does
all of that; a worker checks a message against it right before its handler would run.

Cost when nobody revokes: a revoke also bumps the service's "revocations exist" key
(``amqprpc:revoked:{service}``, kept as long as the longest-lived revocation). A worker
reads that key at most every :data:`FLAG_CACHE_S` seconds (from a handler thread, or from
the poller below); only while it exists is a message looked up before it runs (one
``EXISTS``). So a worker of a service nobody ever revoked for costs one ``GET`` per half
second while it is busy, none per message, none at all while idle.

A handler already running: a poller thread per worker (started on first use, asleep while
nothing runs) looks up the message ids of the running handlers every :data:`POLL_INTERVAL_S`
seconds in one round trip (``MGET``); a revoked one's ``current_call().cancelled`` turns
true, so a handler that checks it between steps stops within about a second. A thread is
not interrupted (Python cannot do that safely): a handler that never looks runs to its end.

Redis down: messages run as if nothing was revoked (at-least-once, as without this
feature); one warning per outage, one info line when Redis answers again; the checks back
off meanwhile so no handler waits on a dead Redis per message (:mod:`amqprpc.middleware.redisstate`).
A revoke that cannot be stored raises :class:`~amqprpc.errors.ServiceUnavailable`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Sequence

from amqprpc import logs
from amqprpc.errors import ServiceUnavailable
from amqprpc.middleware import Delivery, Middleware
from amqprpc.middleware.redisstate import REDIS_TIMEOUT_S, RedisHealth, RedisState
from amqprpc.outcome import OutcomeKind
from amqprpc.middleware.view import WorkerView

log = logs.get_logger("amqprpc.revoke")

DEFAULT_REVOKE_TTL = 86400.0  # seconds a revocation is kept (--revoke-ttl)
KEY_PREFIX = "amqprpc:revoked"
FLAG_CACHE_S = 0.5  # how long a worker trusts what it last read of "revocations exist"
POLL_INTERVAL_S = 0.5  # how often running handlers' message ids are looked up

# Bump the service's "revocations exist" key and make it live at least as long as the
# revocation just stored (a later revoke with a shorter ttl never shortens it).
_BUMP = """
local n = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RevocationStore(RedisState):
    """The revocations of every service in one Redis (``url``, default
    ``AMQPRPC_REDIS_URL``); keys under ``prefix``. The Redis client is made on first use,
    so building a store (a client, a worker) touches nothing."""

    def __init__(self, url: str | None = None, *, prefix: str = KEY_PREFIX, timeout: float = REDIS_TIMEOUT_S):
        super().__init__(url, prefix, timeout)

    def key(self, service: str, message_id: str) -> str:
        return f"{self.prefix}:{service}:{message_id}"

    def flag_key(self, service: str) -> str:
        """The service's "revocations exist" key (its value counts the revokes)."""
        return f"{self.prefix}:{service}"

    def revoke(self, service: str, message_ids: Iterable[str], ttl: float = DEFAULT_REVOKE_TTL) -> int:
        """Mark ``message_ids`` of ``service`` revoked for ``ttl`` seconds (one round trip);
        how many. Raises ServiceUnavailable when Redis cannot be reached."""
        ids = [str(message_id) for message_id in message_ids]
        if not ids:
            return 0
        ttl_ms = max(1, int(ttl * 1000))
        try:
            pipe = self.redis.pipeline(transaction=False)
            for message_id in ids:
                pipe.set(self.key(service, message_id), b"1", px=ttl_ms)
            pipe.eval(_BUMP, 1, self.flag_key(service), ttl_ms)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - redis' connection and timeout errors
            raise ServiceUnavailable(f"cannot revoke: Redis at {self.url} did not answer: {exc}") from None
        return len(ids)

    def any_revoked(self, service: str) -> bool:
        """Whether any revocation of ``service`` may still be kept (raises redis errors)."""
        return bool(self.redis.exists(self.flag_key(service)))

    def is_revoked(self, service: str, message_id: str) -> bool:
        return bool(self.redis.exists(self.key(service, message_id)))

    def revoked_of(self, service: str, message_ids: Sequence[str]) -> tuple[bool, list[bool]]:
        """In one round trip: whether revocations exist for ``service``, and which of
        ``message_ids`` are revoked (raises redis errors)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.flag_key(service))
        pipe.mget([self.key(service, message_id) for message_id in message_ids])
        exists, values = pipe.execute()
        return bool(exists), [value is not None for value in values]

    def forget(self, service: str) -> None:
        """Drop every revocation of ``service`` (tests, or an operator undoing a mistake)."""
        keys = list(self.redis.scan_iter(match=f"{self.key(service, '*')}", count=500))
        self.redis.delete(self.flag_key(service), *keys)


_NEVER_READ = (False, -1e9)  # a service's flag before its first read


class RevokeChecks(Middleware):
    """Worker middleware: a revoked message that has not started is acked unrun (a call is
    answered with a :class:`~amqprpc.errors.Revoked` error), counted as ``revoked``; a
    running one's ``current_call().cancelled`` turns true. Added to every worker (see the
    module doc for what it costs and what it does without Redis)."""

    def __init__(self, store: RevocationStore | None = None, *, flag_cache: float = FLAG_CACHE_S,
                 poll_interval: float = POLL_INTERVAL_S) -> None:
        self.store = store or RevocationStore()
        self.flag_cache = flag_cache
        self.poll_interval = poll_interval
        self.health = RedisHealth("revocation checks")
        # Times are time.perf_counter(), the clock of Delivery.started (no clock read per delivery).
        self._flags: dict[str, tuple[bool, float]] = {}  # service -> (revocations exist, read at)
        self._running: dict[int, tuple[Delivery, float]] = {}  # id(delivery) -> (delivery, since)
        self._lock = threading.Condition()
        self._poller: threading.Thread | None = None
        self._stopping = False

    # --- per delivery (handler thread) -------------------------------------------------
    # Decisions are typed Any here: the client imports this module (for RevocationStore), and
    # naming amqprpc.server.dispatcher would make client -> server an import circle.
    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        message_id = delivery.message_id
        if not message_id:
            return call_next(delivery)
        service = delivery.service
        # The common case in one dict read: nothing revoked for the service, known within
        # flag_cache seconds of when the delivery was taken (the poller keeps the flag fresh
        # while handlers run).
        now = delivery.started
        exists, read_at = self._flags.get(service, _NEVER_READ)
        if (exists or now - read_at > self.flag_cache) and self.revoked(service, message_id):
            log.info("revoked message acked unrun", message_id=message_id, action=delivery.action,
                     kind=delivery.kind)
            return revoked_decision(delivery)
        # Running: the poller raises delivery.cancelled, which the handler reads as
        # current_call().cancelled (the dispatcher's HandlerCall reads the delivery's flag).
        running, key = self._running, id(delivery)
        running[key] = (delivery, now)  # one dict store (atomic under the GIL)
        if self._poller is None:
            self._start_poller()
        try:
            decision = call_next(delivery)
        finally:
            running.pop(key, None)
        if delivery.cancelled and decision.outcome.error_type == "Revoked":
            # The handler saw `cancelled` and raised Revoked: counted as revoked, a cast is not dead-lettered.
            return revoked_decision(delivery)
        return decision

    def revoked(self, service: str, message_id: str) -> bool:
        """Whether ``message_id`` of ``service`` is revoked: a Redis lookup only while the
        service has revocations (cached :attr:`flag_cache` seconds); False without Redis."""
        now = time.perf_counter()
        health = self.health
        if not health.usable(now):
            return False
        try:
            exists, read_at = self._flags.get(service, (False, -1e9))
            if now - read_at > self.flag_cache:
                exists = self.store.any_revoked(service)
                self._flags[service] = (exists, now)
            result = exists and self.store.is_revoked(service, message_id)
        except Exception as exc:  # noqa: BLE001 - redis down: run it (at-least-once)
            health.failed(exc, now)
            return False
        health.answered()
        return result

    # --- running handlers and the poller -----------------------------------------------
    def _start_poller(self) -> None:
        # Once, on the first delivery; it ticks on its own, so no delivery wakes it (waking it
        # per delivery cost a context switch each when it slept between one-at-a-time calls).
        with self._lock:
            if self._poller is None and not self._stopping:
                self._poller = threading.Thread(target=self._poll, name="amqprpc-revoke-poller", daemon=True)
                self._poller.start()

    def _poll(self) -> None:
        """Every poll_interval: one round trip per service for the ids of the handlers that
        have run at least that long (shorter ones are never looked up); nothing while none
        has. Ticks on its own, so a delivery never wakes it."""
        while True:
            with self._lock:
                if not self._stopping:
                    self._lock.wait(self.poll_interval)  # only worker_stopped wakes it early
                if self._stopping:
                    return
            started_before = time.perf_counter() - self.poll_interval
            by_service: dict[str, list[str]] = {}
            for delivery, since in self._running.copy().values():  # copy(): atomic, unlike iterating
                if since <= started_before and delivery.message_id:
                    by_service.setdefault(delivery.service, []).append(delivery.message_id)
            if not by_service:
                continue
            by_service = {service: list(dict.fromkeys(ids)) for service, ids in by_service.items()}
            now = time.perf_counter()
            if self.health.usable(now):
                for service, ids in by_service.items():
                    self._check_running(service, ids, now)

    def _check_running(self, service: str, ids: list[str], now: float) -> None:
        try:
            exists, revoked = self.store.revoked_of(service, ids)
        except Exception as exc:  # noqa: BLE001 - redis down: the handlers run on
            self.health.failed(exc, now)
            return
        self.health.answered()
        self._flags[service] = (exists, now)  # fresh for the handler threads too
        hits = {message_id for message_id, hit in zip(ids, revoked) if hit}
        if not hits:
            return
        for delivery, _ in self._running.copy().values():
            if delivery.service == service and delivery.message_id in hits and not delivery.cancelled:
                log.info("running handler's message revoked: current_call().cancelled is now true",
                         message_id=delivery.message_id)
                delivery.cancelled = True

    def worker_stopped(self, worker: WorkerView) -> None:
        with self._lock:
            self._stopping = True
            poller, self._poller = self._poller, None
            self._lock.notify_all()
        if poller is not None:
            poller.join(2.0)


def revoked_decision(delivery: Delivery) -> Any:
    """The Decision for a revoked message: acked unrun, counted as revoked; a call also gets
    a :class:`~amqprpc.errors.Revoked` error reply (never a retry or a dead letter: it was
    called off)."""
    decide = delivery.decide
    if delivery.kind == "call" and delivery.reply_to:
        return decide.error_reply(delivery, f"{delivery.action}: message {delivery.message_id} was revoked",
                                  "Revoked", OutcomeKind.REVOKED)
    return decide.ack(delivery, OutcomeKind.REVOKED, "Revoked")
