"""Retry policies: how often, how long apart, and for which errors.

Modelled on Dramatiq's ``middleware/retries.py``: the attempt count travels *with the
message* (here in AMQP headers), so a retry survives a worker restart and any worker
instance may run the next attempt. The waiting happens in the broker (see
:mod:`amqprpc.transport.redelivery`): no handler thread sleeps and no message is held unacked
during a backoff.

The same :class:`Retry` object serves the client: ``client.call(..., retry=Retry(...))``
re-sends a call that timed out or found nobody, inside one overall deadline. Pass it only
for idempotent actions: a call that timed out may have run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Tuple, Type

from amqprpc.transport.backoff import full_jitter
from amqprpc.errors import CallTimeout, CircuitOpen, ServiceUnavailable

# AMQP header names carried by a message that failed at least once (and by its dead
# letter). Prefixed like RabbitMQ's own ``x-death`` so they cannot collide with a peer's
# application headers.
ATTEMPTS = "x-attempts"                # attempts made so far (int)
FIRST_FAILURE = "x-first-failure"      # epoch seconds (float) of the first failure
LAST_FAILURE = "x-last-failure"        # epoch seconds (float) of the latest failure
ERROR = "x-error"                      # text of the latest error
ERROR_TYPE = "x-error-type"            # class name of the latest error ("ConnectionError", "BadMessage")
DELIVERIES = "x-deliveries"            # redeliveries counted on classic queues (see redelivery.py)
ORIGINAL_EXCHANGE = "x-original-exchange"
ORIGINAL_ROUTING_KEY = "x-original-routing-key"
ORIGINAL_QUEUE = "x-original-queue"    # where --replay sends it back
RAW_PROPERTIES = "x-raw-properties"    # an undecodable message's property bytes, as received
BOOKKEEPING = (ATTEMPTS, FIRST_FAILURE, LAST_FAILURE, ERROR, ERROR_TYPE, DELIVERIES,
               ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY, ORIGINAL_QUEUE, RAW_PROPERTIES, "x-death",
               "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason", "x-delivery-count")


@dataclass(frozen=True)
class Retry:
    """A retry policy.

    Parameters: ``max_attempts`` runs in total, the first one included (so 3 = two
    retries); ``base_delay`` and ``max_delay`` in seconds: the wait before retry ``n``
    (1-based) is drawn uniformly from ``[0, min(max_delay, base_delay * 2**(n-1))]``
    ("full jitter", which spreads a thundering herd of failures), or is exactly that
    bound with ``jitter=False``; ``on`` the exception classes worth retrying (others fail
    at once: a ``KeyError`` will not go away by waiting). An exception whose class says
    ``retryable = False`` (:class:`~amqprpc.errors.ValidationError`: the same payload fails
    the same way every time) is never retried, whatever ``on`` says.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 60.0
    on: Tuple[Type[BaseException], ...] = (Exception,)
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")
        if isinstance(self.on, type):  # Retry(on=ConnectionError) reads naturally: accept it
            object.__setattr__(self, "on", (self.on,))

    def retries(self, exc: BaseException, attempt: int) -> bool:
        """Whether failing attempt ``attempt`` (1-based) with ``exc`` earns another one."""
        return attempt < self.max_attempts and isinstance(exc, self.on) and getattr(exc, "retryable", True) is not False

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        if self.jitter:
            return full_jitter(attempt - 1, self.base_delay, self.max_delay)
        return float(min(self.max_delay, self.base_delay * (2 ** min(attempt - 1, 32))))


def headers_of(message: Any) -> dict[str, Any]:
    """A py-amqp message's AMQP headers (py-amqp calls them ``application_headers``)."""
    return message.properties.get("application_headers") or {}


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Attempts recorded in a message's AMQP headers (0 for a fresh message). Headers
    come from the wire, so anything that is not a sane integer counts as 0."""
    return int_header(headers, ATTEMPTS)


def int_header(headers: Mapping[str, Any] | None, name: str) -> int:
    value = (headers or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if isinstance(value, float) and not math.isfinite(value):  # a double header can be inf or nan
        return 0
    return max(0, int(value))


# Client side -------------------------------------------------------------------------
_MIN_ATTEMPT_S = 0.05


def call_with_retry(send: Callable[[float], Any], retry: Retry, timeout: float,
                    retryable: Tuple[Type[BaseException], ...] = (CallTimeout, ServiceUnavailable),
                    share: bool = True) -> Any:
    """Run ``send(attempt_timeout)`` until it succeeds, within ``timeout`` seconds in all.

    Only ``retryable`` errors (never :class:`CircuitOpen`: the breaker already decided)
    that also match ``retry.on`` are retried. With ``share`` each attempt gets an equal
    share of the time that is left (a third at most), so a timed-out attempt still leaves
    room for the next; else each gets all of it. Backoff sleeps happen in the caller's own thread.
    """
    deadline = time.monotonic() + timeout
    attempt = 0
    last: BaseException | None = None
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        if last is not None and left <= 0:
            raise last
        try:
            return send(left / min(retry.max_attempts - attempt + 1, 3) if share else left)
        except retryable as exc:
            if isinstance(exc, CircuitOpen) or not retry.retries(exc, attempt):
                raise
            last = exc
            pause = retry.delay(attempt)
            # Leave the next attempt a fair chance (a tenth of what is left, 50 ms at least),
            # else report this failure: a timeout of a hopeless sliver of an attempt would
            # hide what actually went wrong.
            left = deadline - time.monotonic()
            if left - pause < max(0.1 * left, _MIN_ATTEMPT_S):
                raise
            time.sleep(pause)


# Bounded policy for the client's confirmed publishes (casts, events) that meet a
# connection loss: kombu's own default (``max_retries=None``) would retry forever, and a
# caller that was promised a timeout would hang with it.
PUBLISH_RETRY = Retry(max_attempts=5, base_delay=0.2, max_delay=2.0)
