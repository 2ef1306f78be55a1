"""Rate limits for a whole service: ``@service.handler("send_email", rate_limit="20/s")``.

Celery's rate limits are per worker: ten workers run ten times the limit. Here every worker of
the service shares one limit through Redis: a GCRA (generic cell rate algorithm) in one Lua
script that *reserves* the next free slot for each message -- its "theoretical arrival time"
moves on by one interval per message, whoever runs it. A message whose slot is now runs; one
whose slot is later waits for it in the broker (a countdown queue of the request queue, with the
reservation in ``x-rate-slot``), is acked here at once, and runs when it comes back, without
asking Redis again. So nothing over the limit is held unacked or blocks a handler thread (other
actions of the worker go on), and nothing bounces: each message waits once -- unless it comes
back more than ``LATE_AT_MOST`` after its slot (a stalled broker or worker), when it takes a new
slot rather than run in a bunch with others that came late.

Redis down: each worker keeps the limit alone with the same algorithm in process (N workers,
up to N times the rate), with one warning; Redis back, the shared limit resumes (one info line).
A retried message (its ``x-attempts`` moved on) asks for a new slot.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping

from amqprpc import logs
from amqprpc.config import redact, redis_client
from amqprpc.config import redis_url as default_redis_url
from amqprpc.middleware import Delivery, Middleware
from amqprpc.middleware.eta import TOLERANCE_S, wait_in_broker
from amqprpc.outcome import OutcomeKind
from amqprpc.rate import Rate
from amqprpc.retry import attempts_made

log = logs.get_logger("amqprpc.ratelimit")

# The reservation a delayed message carries: "{attempts}:{slot epoch s}" (attempts made when
# its slot was taken: a retry asks for a new one).
SLOT_HEADER = "x-rate-slot"

# Waits up to this long are slept in the handler thread rather than sent through the broker.
SLEEP_AT_MOST = 0.01

# While Redis is down it is asked again this often (a Redis that does not answer costs a timeout).
REDIS_RETRY_S = 2.0

# A message back from waiting runs in its slot if it is at most this late; later (the broker or
# this worker stalled, and others came back late with it), it takes a new slot: late ones never
# run together, so any second holds at most rate x (1 s + this) runs.
LATE_AT_MOST = 0.1

# KEYS[1]: the limit's key. ARGV: interval ms, burst tolerance ms. Redis' own clock, so that
# workers whose clocks differ share one timeline. Returns the ms to wait for the reserved slot.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return tostring(wait)
"""


class LocalGcra:
    """The same reservation in process (one worker alone: Redis down, or tests)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, key: str, rate: Rate, burst: int = 1) -> float:
        """Seconds until the slot reserved for one more run of ``key`` at ``rate`` (0: now)."""
        interval = rate.interval
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat.get(key, now), now)
            self._tat[key] = tat + interval
            return max(0.0, tat - (burst - 1) * interval - now)


class RateLimiter:
    """Reserves slots under the limits of one service, in Redis, else in process.

    ``redis_url`` (default ``AMQPRPC_REDIS_URL``); ``prefix`` of the keys
    (``{prefix}:{service}:{action}``); ``burst`` runs that may go at once after a quiet time
    (1: evenly spaced); ``redis`` a client to use instead (tests)."""

    def __init__(self, service: str, *, redis_url: str | None = None, prefix: str = "amqprpc:ratelimit",
                 burst: int = 1, redis: Any = None, timeout: float = 0.5) -> None:
        self.service = service
        self.prefix = prefix
        self.burst = burst
        self._url = default_redis_url(redis_url)
        self._redis = redis
        self._timeout = timeout
        self._script: Any = None
        self.local = LocalGcra()
        self.redis_down = False
        self._retry_at = 0.0  # while Redis is down: when to ask it again (not at every message)
        self._lock = threading.Lock()

    def _reserve_script(self) -> Any:
        if self._script is None:
            if self._redis is None:
                self._redis = redis_client(self._url, self._timeout)
            self._script = self._redis.register_script(_RESERVE)
        return self._script

    def reserve(self, action: str, rate: Rate) -> float:
        """Seconds the next run of ``action`` must wait for its slot (0: run now)."""
        key = f"{self.prefix}:{self.service}:{action}"
        interval_ms = rate.interval * 1000.0
        if self.redis_down and time.monotonic() < self._retry_at:
            return self.local.reserve(key, rate, self.burst)
        try:
            wait_ms = float(self._reserve_script()(keys=[key], args=[interval_ms, (self.burst - 1) * interval_ms]))
        except Exception as exc:  # noqa: BLE001 - Redis down: this worker keeps the limit alone
            with self._lock:
                self._retry_at = time.monotonic() + REDIS_RETRY_S
                if not self.redis_down:
                    self.redis_down = True
                    log.warning("Redis unreachable: rate limits are kept by each worker alone until it is back",
                                service=self.service, error=redact(str(exc))[:300])
            return self.local.reserve(key, rate, self.burst)
        if self.redis_down:
            with self._lock:
                if self.redis_down:
                    self.redis_down = False
                    log.info("Redis reachable again: rate limits are shared again", service=self.service)
        return wait_ms / 1000.0


def held_slot(headers: Mapping[str, Any]) -> float | None:
    """The slot (epoch s) a delivery comes back with, reserved for this very attempt; else None."""
    held = headers.get(SLOT_HEADER)
    if held is None:
        return None
    attempts, _, slot = str(held).partition(":")
    try:
        return float(slot) if int(attempts) == attempts_made(headers) else None
    except ValueError:
        return None


class RateLimit(Middleware):
    """Keeps the handlers of ``service`` that have a ``rate_limit`` under it (the worker adds it
    only when one has); ``limiter`` shares the limit (a :class:`RateLimiter` by default)."""

    def __init__(self, service: Any, limiter: RateLimiter | None = None) -> None:
        self.rates: dict[str, Rate] = dict(service.rate_limits)
        self.limiter = limiter or RateLimiter(service.name)

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        rate = self.rates.get(delivery.handler or "")
        if rate is None:
            return call_next(delivery)
        slot = held_slot(delivery.headers)
        if slot is not None:  # back from waiting for its slot: no second reservation if on time
            early = slot - time.time()
            if early > TOLERANCE_S:
                return wait_in_broker(delivery, early, OutcomeKind.RATE_LIMITED)
            if -early <= LATE_AT_MOST:
                return call_next(delivery)
        wait = self.limiter.reserve(delivery.handler or "", rate)
        if wait <= SLEEP_AT_MOST:
            if wait > 0:
                time.sleep(wait)
            return call_next(delivery)
        if delivery.deadline is not None and time.time() + wait >= delivery.deadline:
            return delivery.decide.error_reply(
                delivery, f"rate limit {rate.text} of {delivery.handler}: its next free slot is after the "
                          "call's deadline", "RateLimited", OutcomeKind.RATE_LIMITED)
        log.debug("over the rate limit; waits for its slot", action=delivery.handler, wait=round(wait, 3))
        return wait_in_broker(delivery, wait, OutcomeKind.RATE_LIMITED,
                              {SLOT_HEADER: f"{attempts_made(delivery.headers)}:{time.time() + wait:.3f}"})
