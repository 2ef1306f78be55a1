"""OpenTelemetry: spans for calls, casts, events and submits, W3C context in the AMQP headers,
and client metrics, through ``opentelemetry-api`` only (the ``amqprpc[otel]`` extra).

How it is switched on: :func:`amqprpc.middleware.observability.automatic` gives every worker and
client made while an SDK tracer (or meter) provider is the global one the process's
:class:`OpenTelemetryMiddleware` -- so ``opentelemetry-instrument amqprpc worker ...``, which
configures the SDK from ``OTEL_*`` variables before the program runs, exports the worker's
spans with no code change, as does an application that configures the SDK at start-up.
Without an SDK this module is not even imported and no hook runs.
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=amqprpc`` turns it off. There is deliberately no
``opentelemetry_instrumentor`` entry point: it would import amqprpc into every program that
``opentelemetry-instrument`` runs in the environment; :class:`AmqprpcInstrumentor` is there
for code that instruments libraries one by one.

Spans (messaging semantic conventions, RabbitMQ; ``messaging.system=rabbitmq``):

- ``publish {exchange}:{routing key}`` (PRODUCER, operation type ``send``): every message a
  client sends; its context is the creation context injected as ``traceparent``/``tracestate``/
  ``baggage`` into the message's application_headers by the global propagator. For a cast,
  an event or a submit it lasts until the broker confirmed the message; for a call it marks
  the publish and ends at once (the call's own span covers the wait).
- ``{service}/{action}`` (CLIENT, ``rpc.system.name=amqprpc``): a call, until its answer,
  error or timeout; the PRODUCER span is its child.
- ``process {exchange}:{routing key}:{queue}`` (CONSUMER, operation type ``process``): a
  worker handling a delivery. It links to the message's creation context; for requests
  (calls, casts, submits: one consumer each) that context is also its parent, so a call
  through two services is one trace. An event may reach many subscribers: its process span
  starts a trace of its own and only links to the publisher (the conventions' default).
  The span is current while the handler runs: calls and events made by the handler continue
  the trace. ``error.type`` is the outcome's error type (an exception class name,
  ``BadMessage``, ``UnknownAction``, ``CallTimeout``...).

One trace id for logs and traces: while a span is active, the envelope's ``trace_id``
(which peers without OpenTelemetry, such as the PHP services, pass on) and the worker's
log lines carry the OpenTelemetry trace id. A request that comes with a 32-hex
``trace_id`` in its envelope but no ``traceparent`` (a peer without OpenTelemetry) is
processed in that trace, under a remote parent made from the envelope (sampled): the PHP
service's lines, ours and the spans share the id.

Metrics (when an SDK meter provider is set): ``amqprpc.client.duration`` (histogram, s: by
kind, service, action and outcome), ``amqprpc.client.in_flight`` (calls waiting),
``amqprpc.breaker.rejections`` and ``amqprpc.breaker.state``; the Prometheus twins are in
:mod:`amqprpc.middleware.clientmetrics`.
"""
from __future__ import annotations

import os
import random
import threading
from typing import Any, Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, StatusCode

from amqprpc.client import breaker as breaker_module
from amqprpc.middleware import Middleware, add_default, remove_default
from amqprpc.outcome import CallOutcome, Outcome, OutcomeKind
from amqprpc.version import __version__
from amqprpc.middleware.view import WorkerView

SYSTEM = "rabbitmq"
_KEY = "otel"  # our entry in Delivery.state / Outgoing.state
_NOT_ERRORS = frozenset({OutcomeKind.REPLIED, OutcomeKind.DONE, OutcomeKind.RECOUNTED})
DISABLE_VARIABLE = "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"


def _configured(provider: Any, api_module: str) -> bool:
    """Whether ``provider`` is an SDK's, not the API's proxy or no-op (which live in the
    API's own modules, whatever their private names in this version)."""
    return not type(provider).__module__.startswith(api_module)


class _HeadersGetter(Getter[Any]):
    """Reads W3C fields from an AMQP headers table: values may arrive as bytes (a peer's
    longstr that is not UTF-8, or py-amqp's 'x' byte arrays) or not be strings at all."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, (bytes, bytearray)):
            return [bytes(value).decode("utf-8", "replace")]
        return None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


_GETTER = _HeadersGetter()


def destination(exchange: str, routing_key: str, queue: str | None = None) -> str:
    """``messaging.destination.name`` of RabbitMQ: ``{exchange}:{routing key}[:{queue}]``,
    empty parts left out, the queue only when it differs from the routing key; the default
    exchange with nothing else is ``amq.default``."""
    parts = [part for part in (exchange, routing_key) if part]
    if queue and queue != routing_key:
        parts.append(queue)
    return ":".join(parts) or "amq.default"


def _hex_id(value: Any, digits: int) -> int:
    """The first ``digits`` hex digits of ``value`` (an amqprpc id, or a UUID: dashes are
    dropped) as an OpenTelemetry id, or 0 when it has not that many."""
    if not isinstance(value, str):
        return 0
    value = value.replace("-", "")
    if len(value) < digits:
        return 0
    try:
        return int(value[:digits], 16)
    except ValueError:
        return 0


def _envelope_parent(delivery: Any) -> trace.SpanContext | None:
    """The remote parent of a request from a peer without OpenTelemetry that carries an
    amqprpc ``trace_id`` (32 hex digits, or a UUID): its trace continues under the id the
    peer logs. The parent span id comes from the envelope's ``parent_id`` (the caller's
    correlation id) when it has one; that span is not in any backend, the trace is."""
    headers = delivery.body_headers
    raw = headers.get("trace_id")
    if not isinstance(raw, str) or len(raw.replace("-", "")) != 32:
        return None
    trace_id = _hex_id(raw, 32)
    if not trace_id:
        return None
    span_id = _hex_id(headers.get("parent_id"), 16) or _hex_id(delivery.correlation_id, 16) or _random_span_id()
    return trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))


def _random_span_id() -> int:
    return random.getrandbits(64) or 1


class OpenTelemetryMiddleware(Middleware):
    """Traces and client metrics through OpenTelemetry (see the module doc).

    ``tracer_provider`` / ``meter_provider``: the providers to use (tests, or an application
    that keeps its own); by default the global ones, once the application set SDK providers.
    """

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer: Any = None
        self._instruments: _Instruments | None = None
        self._temporary: set[str] = set()  # queues that live with one worker (broadcast events)
        self._lock = threading.Lock()

    # --- providers (cheap until configured: one call per message) -----------------------
    def tracer(self) -> Any:
        tracer = self._tracer
        if tracer is None:
            provider = self._tracer_provider or trace.get_tracer_provider()
            if not _configured(provider, "opentelemetry.trace"):
                return None
            tracer = self._tracer = provider.get_tracer("amqprpc", __version__)
        return tracer

    def instruments(self) -> _Instruments | None:
        instruments = self._instruments
        if instruments is None:
            provider = self._meter_provider or otel_metrics.get_meter_provider()
            if not _configured(provider, "opentelemetry.metrics"):
                return None
            with self._lock:
                if self._instruments is None:
                    self._instruments = _Instruments(provider.get_meter("amqprpc", __version__))
            instruments = self._instruments
        return instruments

    # --- worker ------------------------------------------------------------------------
    def worker_starting(self, worker: WorkerView) -> None:
        for consumer in getattr(worker, "event_consumers", {}).values():
            if consumer.subscription.broadcast:
                self._temporary.add(consumer.queue.name)

    def before_handle(self, delivery: Any) -> None:
        tracer = self.tracer()
        if tracer is None:
            return
        carrier = delivery.headers
        extracted = propagate.extract(carrier, getter=_GETTER) if carrier else otel_context.get_current()
        creation = trace.get_current_span(extracted).get_span_context()
        links = None
        if creation.is_valid:
            links = [Link(creation)]
            # Requests have one consumer: the creation context is the parent too. An event's
            # subscribers start traces of their own, linked to the publisher.
            parent = extracted if delivery.kind != "event" else trace.set_span_in_context(trace.INVALID_SPAN, extracted)
        else:
            remote = _envelope_parent(delivery)
            parent = extracted if remote is None else trace.set_span_in_context(trace.NonRecordingSpan(remote),
                                                                                 extracted)
        queue = delivery.queue
        temporary = queue in self._temporary
        name = destination(delivery.exchange, delivery.routing_key, None if temporary else queue)
        attributes = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": destination(delivery.exchange, delivery.routing_key, queue),
            "amqprpc.service": delivery.service,
            "amqprpc.kind": delivery.kind,
        }
        if temporary:
            attributes["messaging.destination.temporary"] = True
        if delivery.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = delivery.routing_key
        if delivery.message_id:
            attributes["messaging.message.id"] = str(delivery.message_id)
        if delivery.correlation_id:
            attributes["messaging.message.conversation_id"] = str(delivery.correlation_id)
        if delivery.action:
            attributes["amqprpc.action"] = delivery.action
        if delivery.redelivered:
            attributes["amqprpc.redelivered"] = True
        span = tracer.start_span(f"process {name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes,
                                 links=links)
        # Current while the handler runs (same thread): nested calls and events continue it.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        delivery.state[_KEY] = (span, token)
        trace_id = format(span.get_span_context().trace_id, "032x")
        if delivery.trace_id and delivery.trace_id != trace_id and span.is_recording():
            # Another id than the one a peer without OpenTelemetry logged (an event's new
            # trace, an id that is no trace id): keep it findable.
            span.set_attribute("amqprpc.envelope.trace_id", str(delivery.trace_id)[:64])
        delivery.trace_id = trace_id

    def after_handle(self, delivery: Any, outcome: Outcome) -> None:
        entry = delivery.state.pop(_KEY, None)
        if entry is None:
            return
        span, token = entry
        try:
            if span.is_recording():
                span.set_attribute("amqprpc.outcome", outcome.kind.value)
                if delivery.handler:
                    span.set_attribute("amqprpc.handler", delivery.handler)
                if outcome.kind not in _NOT_ERRORS:
                    span.set_attribute("error.type", outcome.error_type or outcome.kind.value)
                    span.set_status(StatusCode.ERROR, outcome.error_type or outcome.kind.value)
            span.end()
        finally:
            otel_context.detach(token)

    # --- client ------------------------------------------------------------------------
    def before_publish(self, message: Any) -> None:
        instruments = self.instruments()
        if instruments is not None and message.kind == "call":
            instruments.in_flight.add(1, {"amqprpc.service": message.service or ""})
            message.state["otel.in_flight"] = True
        tracer = self.tracer()
        if tracer is None:
            return
        parent = otel_context.get_current()
        spans = []
        # Each attribute costs the SDK a validation (most of a span's price): the call's
        # CLIENT span names the service and action, its PRODUCER child the message.
        if message.kind == "call":
            method = f"{message.service}/{message.action}"
            client = tracer.start_span(method, context=parent, kind=SpanKind.CLIENT,
                                       attributes={"rpc.system.name": "amqprpc", "rpc.method": method})
            parent = trace.set_span_in_context(client, parent)
            spans.append(client)
            common = {"messaging.system": SYSTEM, "amqprpc.kind": "call"}
        else:
            common = {"messaging.system": SYSTEM, "amqprpc.kind": message.kind, "amqprpc.action": message.action}
            if message.service:
                common["amqprpc.service"] = message.service
        if message.correlation_id:
            common["messaging.message.conversation_id"] = message.correlation_id
        name = destination(message.exchange, message.routing_key)
        attributes = {**common, "messaging.operation.name": "publish", "messaging.operation.type": "send",
                      "messaging.destination.name": name, "messaging.message.id": message.message_id}
        if message.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = message.routing_key
        producer = tracer.start_span(f"publish {name}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes)
        propagate.inject(message.headers, context=trace.set_span_in_context(producer, parent))
        trace_id = producer.get_span_context().trace_id
        if trace_id and isinstance(message.body_headers, dict) and "trace_id" in message.body_headers:
            # One id for the logs of every hop, OpenTelemetry or not (see the module doc).
            message.body_headers["trace_id"] = format(trace_id, "032x")
        if message.kind == "call":
            producer.end()  # the request is written right after this hook; the CLIENT span waits
        else:
            spans.append(producer)  # until the broker's confirm
        message.state[_KEY] = spans

    def after_settle(self, message: Any, outcome: CallOutcome) -> None:
        failed = outcome.kind != "ok"
        spans = message.state.pop(_KEY, None)
        if spans:
            error_type = (outcome.error_type or outcome.kind) if failed else None
            for span in spans:
                if failed and span.is_recording():
                    span.set_attribute("error.type", error_type)
                    span.set_status(StatusCode.ERROR, error_type)
                span.end()
        instruments = self._instruments
        if instruments is not None:
            labels = {"amqprpc.kind": message.kind, "amqprpc.service": message.service or "",
                      "amqprpc.action": message.action, "amqprpc.outcome": outcome.kind}
            instruments.duration.record(outcome.duration, labels)
            if message.state.pop("otel.in_flight", False):
                instruments.in_flight.add(-1, {"amqprpc.service": message.service or ""})


class _Instruments:
    """The client's OpenTelemetry instruments (one set per meter provider)."""

    def __init__(self, meter: Any) -> None:
        self.duration = meter.create_histogram(
            "amqprpc.client.duration", unit="s",
            description="Calls (until answered, failed or timed out) and casts, events, submits (until confirmed)")
        self.in_flight = meter.create_up_down_counter("amqprpc.client.in_flight", unit="{call}",
                                                      description="Calls waiting for their answer")
        self.rejections = meter.create_counter("amqprpc.breaker.rejections", unit="{call}",
                                               description="Calls refused by an open circuit breaker")
        meter.create_observable_gauge("amqprpc.breaker.state", callbacks=[_breaker_states],
                                      description="Circuit breaker state: 0 closed, 1 half-open, 2 open")
        _rejection_counters.append(self.rejections)


# --- breakers (they refuse before anything reaches the middleware: they report here) -----
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
_breakers: dict[str, int] = {}
_rejection_counters: list[Any] = []


def _breaker_changed(change: Any) -> None:
    _breakers[change.name] = _BREAKER_STATES.get(change.new, -1)


def _breaker_rejected(name: str) -> None:
    for counter in _rejection_counters:
        counter.add(1, {"amqprpc.breaker": name})


def _breaker_states(options: Any) -> Iterable[Any]:
    return [otel_metrics.Observation(state, {"amqprpc.breaker": name}) for name, state in list(_breakers.items())]


breaker_module.change_listeners.append(_breaker_changed)
breaker_module.rejection_listeners.append(_breaker_rejected)


# --- switching it on ----------------------------------------------------------------------
_default: OpenTelemetryMiddleware | None = None


def default_middleware() -> OpenTelemetryMiddleware:
    """The process's one automatic middleware (global providers)."""
    global _default
    if _default is None:
        _default = OpenTelemetryMiddleware()
    return _default


def disabled() -> bool:
    """``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names ``amqprpc`` (or is ``*``)."""
    names = {name.strip() for name in os.environ.get(DISABLE_VARIABLE, "").split(",")}
    return "amqprpc" in names or "*" in names


class AmqprpcInstrumentor:
    """``AmqprpcInstrumentor().instrument(tracer_provider=..., meter_provider=...)``, as
    other libraries' instrumentors: every worker and client made afterwards gets the
    middleware (with these providers, else the global ones), SDK configured or not yet."""

    _middleware: OpenTelemetryMiddleware | None = None

    def instrument(self, **kwargs: Any) -> None:
        provider, meters = kwargs.get("tracer_provider"), kwargs.get("meter_provider")
        middleware = (OpenTelemetryMiddleware(provider, meters) if provider or meters else default_middleware())
        AmqprpcInstrumentor._middleware = middleware
        add_default(middleware)

    def uninstrument(self, **kwargs: Any) -> None:
        if AmqprpcInstrumentor._middleware is not None:
            remove_default(AmqprpcInstrumentor._middleware)
            AmqprpcInstrumentor._middleware = None

    def instrumentation_dependencies(self) -> list[str]:
        return []
