"""Prometheus metrics of the calling side: what a service's clients see of the services they call.

:class:`ClientMetrics` is a client middleware. ``amqprpc worker --metrics-port`` adds it to
every client of the process (so the nested calls of its handlers are counted beside the
worker's own metrics); an application with its own Prometheus endpoint adds it with
``amqprpc.middleware.add_default(ClientMetrics())`` or per client (``middleware=[...]``).
Imported only then: prometheus_client is the [metrics] extra, never imported by ``import amqprpc``.

The circuit breakers' state and rejections are counted too (``amqprpc_breaker_*`` in
:mod:`amqprpc.middleware.metrics`), from the first ClientMetrics made. Labels are bounded by the caller's own
code (the services, actions and events it names), never by what arrives from the wire.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Gauge, Histogram

from amqprpc.middleware import metrics
from amqprpc.middleware import Middleware

DURATION = Histogram(
    "amqprpc_client_duration_seconds",
    "Calls until answered, failed or timed out, and casts, events, submits until the broker confirmed, in "
    "seconds, by kind (call, cast, event, submit), target service (empty for events), action (or event name) "
    "and outcome (ok, error, timeout, unavailable, refused, circuit_open: a call an open breaker refused, "
    "nothing sent; also in amqprpc_breaker_rejections_total by breaker).",
    ["kind", "service", "action", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("amqprpc_client_calls_in_flight", "Calls sent and waiting for their answer, by target service.",
                  ["service"])


class ClientMetrics(Middleware):
    """Observe every message a client sends (see the module doc). Cheap on the settling
    thread: the labelled children are looked up once per (kind, service, action, outcome)."""

    def __init__(self) -> None:
        self._durations: dict[tuple[str, str, str, str], Any] = {}
        self._in_flight: dict[str, Any] = {}
        metrics.count_breakers()
        metrics.count_channel_closes()

    def _gauge(self, service: str) -> Any:
        gauge = self._in_flight.get(service)
        if gauge is None:
            gauge = self._in_flight[service] = IN_FLIGHT.labels(service)
        return gauge

    def before_publish(self, message: Any) -> None:
        if message.kind == "call":
            self._gauge(message.service or "").inc()
            message.state["prometheus.in_flight"] = True

    def after_settle(self, message: Any, outcome: Any) -> None:
        key = (message.kind, message.service or "", message.action, outcome.kind)
        histogram = self._durations.get(key)
        if histogram is None:
            histogram = self._durations[key] = DURATION.labels(*key)
        histogram.observe(outcome.duration)
        if message.state.pop("prometheus.in_flight", False):
            self._gauge(message.service or "").dec()


_default: ClientMetrics | None = None


def default() -> ClientMetrics:
    """The process's one ClientMetrics (what ``--metrics-port`` adds to every client)."""
    global _default
    if _default is None:
        _default = ClientMetrics()
    return _default
