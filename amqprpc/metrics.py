"""Prometheus metrics of a worker (``amqprpc worker --metrics-port``).

The metrics are module-level collectors in prometheus_client's default registry, so a
service's own metrics appear on the same endpoint. :func:`instrument` wraps a worker's
request handling from the outside: the worker itself knows nothing about Prometheus, and
a worker without ``--metrics-port`` pays nothing. Other parts of amqprpc that dead-letter
a message call :func:`dead_letter`.

Label cardinality is bounded: ``action`` is one of the service's own handlers or
``<unknown>``, never a string taken from the wire.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from . import envelope
from .service import snake_case

UNKNOWN_ACTION = "<unknown>"

REQUESTS = Counter("amqprpc_requests", "Requests and events handled, by action (for an event: its handler's "
                   "name) and outcome (success, error, retried, dead_lettered, recounted, rejected, expired).",
                   ["service", "action", "outcome"])
DURATION = Histogram("amqprpc_handler_duration_seconds", "Time from taking a request to its reply, in seconds.",
                     ["service", "action"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("amqprpc_requests_in_flight", "Requests being handled right now.", ["service"])
REDELIVERIES = Counter("amqprpc_redeliveries", "Requests the broker delivered again (redelivered flag set).",
                       ["service"])
DEAD_LETTERS = Counter("amqprpc_dead_letters", "Messages given up on and dead-lettered, by reason (the error "
                       "type: an exception class name, BadMessage, ...).", ["service", "reason"])


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
BREAKER_STATE = Gauge("amqprpc_breaker_state", "Circuit breaker state per target: 0 closed, 1 half-open, 2 open.",
                      ["breaker"])
BREAKER_TRANSITIONS = Counter("amqprpc_breaker_transitions", "Circuit breaker state changes made or seen here.",
                              ["breaker", "old", "new", "origin"])
BREAKER_REJECTIONS = Counter("amqprpc_breaker_rejections", "Calls refused with CircuitOpen (nothing published).",
                             ["breaker"])


def breaker_changed(change: Any) -> None:
    """A CircuitBreaker listener (every breaker registers it): count the transition and
    publish the new state. ``change.name`` is a target service (or service.action) the
    caller chose, so cardinality is that of the caller's own targets."""
    BREAKER_TRANSITIONS.labels(change.name, change.old, change.new, change.origin).inc()
    BREAKER_STATE.labels(change.name).set(BREAKER_STATES.get(change.new, -1))


def breaker_rejected(name: str) -> None:
    BREAKER_REJECTIONS.labels(name).inc()


def dead_letter(service: str, reason: str, count: int = 1) -> None:
    """Count ``count`` messages of ``service`` dead-lettered for ``reason`` (a short
    bounded word such as an exception class name or ``BadMessage``, never free text).
    A worker with metrics counts its own through :func:`instrument`; other code that
    dead-letters (tools, custom consumers) calls this."""
    DEAD_LETTERS.labels(service, reason).inc(count)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread."""
    start_http_server(port, addr)


def instrument(worker: Any) -> None:
    """Count every request and event ``worker`` (an :class:`amqprpc.worker.Worker`)
    handles, and every message it dead-letters."""
    service = worker.service
    name = service.name
    handle = worker._handle
    in_flight = IN_FLIGHT.labels(name)
    redeliveries = REDELIVERIES.labels(name)
    # Pre-create the series of every known action so dashboards see zeros, not gaps.
    for action in [*service.handlers, *service.events]:
        for outcome in ("success", "error"):
            REQUESTS.labels(name, action, outcome)
    redeliveries.inc(0)

    def handle_and_count(message):
        started = time.perf_counter()
        if message.delivery_info.get("redelivered"):
            redeliveries.inc()
        in_flight.inc()
        try:
            result = handle(message)
        finally:
            in_flight.dec()
        _, _, body, disposition = result
        event_consumer = worker.event_consumers.get(message.delivery_info.get("consumer_tag"))
        if event_consumer is not None:
            action = event_consumer.subscription.name
            outcome = "success" if disposition is None else _forwarded(disposition) or "error"
        else:
            action, outcome = _request_outcome(worker, message.body, body, disposition)
        REQUESTS.labels(name, action, outcome).inc()
        DURATION.labels(name, action).observe(time.perf_counter() - started)
        return result

    worker._handle = handle_and_count

    # Dead letters are counted where they are published (the worker's Forwarder), whatever
    # path decided them: a final failure, a bad message, a poison message, a worker error.
    forwarder = worker.forwarder
    send = forwarder.send

    def send_and_count(channel, delivery_tag, forward):
        if forward.what == "dead_letter":
            headers = forward.message.properties.get("application_headers") or {}
            dead_letter(name, str(headers.get("x-error-type") or "unknown"))
        return send(channel, delivery_tag, forward)

    forwarder.send = send_and_count


def _forwarded(disposition: Any) -> str | None:
    """The outcome of a message forwarded instead of acked: ``retried`` (to a delay
    queue), ``dead_lettered``, ``recounted`` (a redelivery put back with its count)."""
    what = getattr(disposition, "what", None)
    return {"retry": "retried", "dead_letter": "dead_lettered", "recount": "recounted"}.get(what)


def _request_outcome(worker: Any, request: bytes, reply: bytes | None, disposition: Any) -> tuple[str, str]:
    """(action label, outcome) of a request from what the worker made of it:
    ``(reply_to, correlation_id, reply body, disposition)``."""
    action = _action_of(worker, request)
    forwarded = _forwarded(disposition)
    if forwarded:
        return action, forwarded
    if disposition is False:
        return action, "rejected"
    if reply is None:
        return action, "expired"
    return action, "success" if reply.startswith(b'{"success":true') else "error"


def _action_of(worker: Any, body: bytes) -> str:
    try:
        action = envelope.loads(body).get("action")
    except Exception:  # noqa: BLE001 - a bad message has no action
        return UNKNOWN_ACTION
    if not isinstance(action, str):
        return UNKNOWN_ACTION
    service = worker.service
    if service.find(action) is not None:
        return action if action in service.handlers else snake_case(action)  # getUser counts as get_user
    return action if action in getattr(worker, "_builtins", {}) else UNKNOWN_ACTION  # e.g. ping
