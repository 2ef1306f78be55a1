"""Prometheus metrics of a worker (``amqprpc worker --metrics-port``).

The metrics are module-level collectors in prometheus_client's default registry, so a
service's own metrics appear on the same endpoint. :func:`instrument` wraps a worker's
deliveries through a :class:`Metrics` middleware, fed by the outcome the worker decided for
each one: the worker itself knows nothing about Prometheus, and a worker without
``--metrics-port`` pays nothing. Other code that dead-letters a message calls :func:`dead_letter`.

Label cardinality is bounded: ``action`` is one of the service's own handlers or
``<unknown>``, never a string taken from the wire.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric

from amqprpc.client import breaker
from amqprpc.transport import channels
from amqprpc.middleware import Delivery, Middleware
from amqprpc.middleware.eta import TIMING
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.middleware.view import WorkerView

UNKNOWN_ACTION = "<unknown>"

REQUESTS = Counter("amqprpc_requests", "Requests and events handled, by action (for an event: its handler's "
                   "name) and outcome (replied, failed, retried, dead_lettered, refused, expired, recounted, done, "
                   "revoked, deduplicated, skipped; tasks in time: delayed, rate_limited).",
                   ["service", "action", "outcome"])
DURATION = Histogram("amqprpc_handler_duration_seconds", "Time from taking a request to its reply, in seconds.",
                     ["service", "action"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("amqprpc_requests_in_flight", "Requests being handled right now.", ["service"])
REDELIVERIES = Counter("amqprpc_redeliveries", "Requests the broker delivered again (redelivered flag set).",
                       ["service"])
TIMED_RUNS = Counter("amqprpc_timed_runs", "Deliveries of tasks in time that came due and went on to run: kind "
                     "countdown (a cast sent with countdown/eta) or periodic (a beat's tick).",
                     ["service", "action", "kind"])
DEAD_LETTERS = Counter("amqprpc_dead_letters", "Messages given up on and dead-lettered, by reason (the error "
                       "type: an exception class name, BadMessage, ...).", ["service", "reason"])

WORKFLOWS = Counter("amqprpc_workflows", "Workflows started by the clients of this process (started), and ended by "
                    "its workers (succeeded, failed).", ["outcome"])


def workflow(outcome: str) -> None:
    """Count a workflow started here, or ended by a step that ran here."""
    WORKFLOWS.labels(outcome).inc()


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
BREAKER_STATE = Gauge("amqprpc_breaker_state", "Circuit breaker state per target: 0 closed, 1 half-open, 2 open.",
                      ["breaker"])
BREAKER_TRANSITIONS = Counter("amqprpc_breaker_transitions", "Circuit breaker state changes made or seen here.",
                              ["breaker", "old", "new", "origin"])
BREAKER_REJECTIONS = Counter("amqprpc_breaker_rejections", "Calls refused with CircuitOpen (nothing published).",
                             ["breaker"])
CHANNELS_CLOSED = Counter("amqprpc_broker_channel_closes", "Channels the broker closed (406: a delivery held past "
                          "consumer_timeout; 403: a permission missing), by reply code.", ["reply_code"])


# Counts a worker keeps in its stats (features count there: Worker.count), exported as
# they are at each scrape: stats key -> (metric name, help).
STATS_COUNTERS = {
    "timed_out": ("amqprpc_timed_out", "Handler runs stopped at their time limit (TimeLimitExceeded raised in them)."),
    "abandoned": ("amqprpc_abandoned", "Handler runs that ignored their time limit past the hard limit: their "
                                       "message dead-lettered, their thread (or child process) replaced."),
}
# A --processes child's parent's counts (amqprpc.ops.prefork), the same in every child.
PARENT_COUNTERS = {
    "child_restarts": ("amqprpc_child_restarts", "Child worker processes that died and were started again."),
    "recycled": ("amqprpc_children_recycled", "Child worker processes replaced warmly (max tasks, max memory, "
                                              "an abandoned handler)."),
    "killed": ("amqprpc_children_killed", "Child worker processes the parent had to SIGKILL."),
}


class _StatsCollector:
    """Reads the counters of STATS_COUNTERS from every instrumented worker's stats, and its
    parent's counts in a --processes child, when Prometheus scrapes (nothing on the hot path)."""

    def __init__(self) -> None:
        self.workers: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.parent: Callable[[], dict[str, int]] | None = None
        self.registered = False

    def collect(self) -> Iterator[Metric]:
        families = {key: CounterMetricFamily(name, text, labels=["service"])
                    for key, (name, text) in STATS_COUNTERS.items()}
        services = []
        for worker in list(self.workers):
            stats = worker.stats
            services.append(worker.service.name)
            for key, family in families.items():
                family.add_metric([worker.service.name], stats.get(key, 0))
        yield from families.values()
        if self.parent is None:
            return
        counts = self.parent()
        for key, (name, text) in PARENT_COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=["service"])
            for service in services:
                family.add_metric([service], counts[key])
            yield family


_STATS = _StatsCollector()  # registered by the first instrument() (not on import)


def count_parent(read: Callable[[], dict[str, int]]) -> None:
    """Export the counts ``read()`` returns (child_restarts, recycled, killed) as this
    process's parent's: a ``--processes`` child (:mod:`amqprpc.ops.prefork`) calls it."""
    _STATS.parent = read


def breaker_changed(change: Any) -> None:
    """A CircuitBreaker listener (every breaker registers it): count the transition and
    publish the new state. ``change.name`` is a target service (or service.action) the
    caller chose, so cardinality is that of the caller's own targets."""
    BREAKER_TRANSITIONS.labels(change.name, change.old, change.new, change.origin).inc()
    BREAKER_STATE.labels(change.name).set(BREAKER_STATES.get(change.new, -1))


def breaker_rejected(name: str) -> None:
    BREAKER_REJECTIONS.labels(name).inc()


def count_breakers() -> None:
    """Every circuit breaker of this process counts in ``amqprpc_breaker_*`` from now on
    (once, however often it is called). Explicit, not an import side effect:
    :func:`instrument` and the client metrics call it."""
    if breaker_changed not in breaker.change_listeners:
        breaker.change_listeners.append(breaker_changed)
    if breaker_rejected not in breaker.rejection_listeners:
        breaker.rejection_listeners.append(breaker_rejected)


def channel_closed(reply_code: int) -> None:
    """A channel the broker closed (:mod:`amqprpc.transport.channels`), by reply code:
    406 for a handler past consumer_timeout, 403 for a missing permission."""
    CHANNELS_CLOSED.labels(str(reply_code)).inc()


def count_channel_closes() -> None:
    """Every channel the broker closes in this process counts in
    ``amqprpc_broker_channel_closes_total`` from now on (once, however often it is called;
    :func:`instrument` and the client metrics call it)."""
    if channel_closed not in channels.close_listeners:
        channels.close_listeners.append(channel_closed)


def dead_letter(service: str, reason: str, count: int = 1) -> None:
    """Count ``count`` messages of ``service`` dead-lettered for ``reason`` (a short
    bounded word such as an exception class name or ``BadMessage``, never free text).
    A worker with metrics counts its own through :func:`instrument`; other code that
    dead-letters (tools, custom consumers) calls this."""
    DEAD_LETTERS.labels(service, reason).inc(count)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread."""
    start_http_server(port, addr)


class Metrics(Middleware):
    """Counts what a worker does with each delivery, from its :class:`~amqprpc.outcome.Outcome`:
    requests and events by handler and outcome, their durations, those in flight, the
    redeliveries and the dead letters (by reason)."""

    def worker_starting(self, worker: WorkerView) -> None:
        # Pre-create the series of every known action so dashboards see zeros, not gaps.
        service = worker.service
        for action in service.handlers:
            for kind in (OutcomeKind.REPLIED, OutcomeKind.FAILED):
                REQUESTS.labels(service.name, action, kind.value)
        for action in service.events:
            for kind in (OutcomeKind.DONE, OutcomeKind.DEAD_LETTERED):
                REQUESTS.labels(service.name, action, kind.value)
        REDELIVERIES.labels(service.name).inc(0)

    def before_handle(self, delivery: Delivery) -> None:
        IN_FLIGHT.labels(delivery.service).inc()
        if delivery.redelivered:
            REDELIVERIES.labels(delivery.service).inc()

    def after_handle(self, delivery: Delivery, outcome: Outcome) -> None:
        service = delivery.service
        IN_FLIGHT.labels(service).dec()
        # delivery.handler is a registered handler's name (or ping), never a string from the wire.
        action = delivery.handler or UNKNOWN_ACTION
        REQUESTS.labels(service, action, outcome.kind.value).inc()
        DURATION.labels(service, action).observe(outcome.duration)
        if outcome.dead_lettered:
            dead_letter(service, outcome.error_type or "unknown")
        timing = delivery.state.get(TIMING)
        if timing is not None:
            TIMED_RUNS.labels(service, action, timing).inc()

    def outcome_amended(self, delivery: Delivery, old: Outcome, new: Outcome) -> None:
        # Its reply or copy could not be encoded: dead-lettered after all. amqprpc_requests
        # keeps the outcome first decided (a counter does not go back); the dead letter counts.
        if new.dead_lettered and not old.dead_lettered:
            dead_letter(delivery.service, new.error_type or "unknown")


def instrument(worker: Any) -> Metrics:
    """Count every request and event ``worker`` (a :class:`amqprpc.server.worker.Worker`) handles
    and every message it dead-letters: adds a :class:`Metrics` middleware (before it starts),
    and counts the process's circuit breakers and the channels the broker closes."""
    count_breakers()
    count_channel_closes()
    metrics = Metrics()
    worker.hooks.add(metrics)
    if not _STATS.registered:
        REGISTRY.register(_STATS)
        _STATS.registered = True
    _STATS.workers.add(worker)
    return metrics
