"""OpenTelemetry: one trace across services (and across languages through W3C headers in the
AMQP message), events linked to their publisher, client metrics, and nothing at all without it.

In process the middleware gets a TracerProvider of the test's own (the global one can be set
once per process, and other tests must not trace): it is added as a process-wide default, so
that the nested calls of handlers (``service.client``) carry the trace, as they do under
``opentelemetry-instrument``, which the subprocess tests run.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import amqp
import pytest
from kombu import Connection
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from amqprpc import CircuitBreaker, CircuitOpen, RemoteError, RpcClient, Service, logs, middleware
from amqprpc.wire import envelope
from amqprpc.middleware import observability, shared_client
from amqprpc.context import current
from amqprpc.middleware.otel import OpenTelemetryMiddleware, destination
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

def raw_connection(broker_url: str) -> amqp.Connection:
    """A plain py-amqp connection to the suite's broker, as another language's service opens one."""
    info = Connection(broker_url).info()  # kombu only parses the URL here
    connection = amqp.Connection(f"{info['hostname']}:{info['port']}", userid=info["userid"],
                                 password=info["password"], virtual_host=info["virtual_host"])
    connection.connect()
    return connection


TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")  # flags: sampled, random (level 2)


@pytest.fixture
def spans():
    """Every span the middleware ends while the test runs (it is a default for clients and
    workers made inside the test)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OpenTelemetryMiddleware(tracer_provider=provider)
    middleware.add_default(tracing)
    exporter.tracer = provider.get_tracer("tests")
    try:
        yield exporter
    finally:
        middleware.remove_default(tracing)
        shared_client.close_all()


def finished(exporter, count: int):
    return wait_for(lambda: len(exporter.get_finished_spans()) >= count and exporter.get_finished_spans(), timeout=10)


def named(all_spans, kind: SpanKind, name: str):
    (span,) = [span for span in all_spans if span.kind is kind and span.name == name]
    return span


def hex_trace(span) -> str:
    return format(span.context.trace_id, "032x")


@pytest.mark.integration
def test_a_call_through_two_services_is_one_trace_with_parent_links(spans, broker_url):
    a, b = Service(unique_name("otel-a")), Service(unique_name("otel-b"))
    seen = {}

    @a.handler
    def relay(payload):
        return a.client.call(b.name, "work", payload, timeout=10)

    @b.handler
    def work(payload):
        seen["context"] = current.get().trace_id
        seen["log"] = logs._request.get()["trace_id"]
        if payload.get("fail"):
            raise ValueError("no")
        return "done"

    with running_worker(a, broker_url=broker_url), running_worker(b, broker_url=broker_url), \
            RpcClient("tests", broker_url=broker_url) as client:
        assert client.call(a.name, "relay", {}, timeout=10) == "done"
        all_spans = finished(spans, 6)

        call_a = named(all_spans, SpanKind.CLIENT, f"{a.name}/relay")
        publish_a = named(all_spans, SpanKind.PRODUCER, f"publish service.exchange:request.{a.name}")
        process_a = named(all_spans, SpanKind.CONSUMER,
                          f"process service.exchange:request.{a.name}:service.{a.name}.request")
        call_b = named(all_spans, SpanKind.CLIENT, f"{b.name}/work")
        publish_b = named(all_spans, SpanKind.PRODUCER, f"publish service.exchange:request.{b.name}")
        process_b = named(all_spans, SpanKind.CONSUMER,
                          f"process service.exchange:request.{b.name}:service.{b.name}.request")
        assert call_a.parent is None
        chain = [call_a, publish_a, process_a, call_b, publish_b, process_b]
        for parent, child in zip(chain, chain[1:]):
            assert child.parent.span_id == parent.context.span_id, (parent.name, child.name)
        assert {span.context.trace_id for span in chain} == {call_a.context.trace_id}
        # The process spans also link to the message's creation context (the conventions' default).
        assert [link.context.span_id for link in process_b.links] == [publish_b.context.span_id]
        # One id in the logs and in the envelope that peers without OpenTelemetry pass on.
        assert seen == {"context": hex_trace(call_a), "log": hex_trace(call_a)}

        attributes = publish_b.attributes
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.operation.type"] == "send"
        assert attributes["messaging.operation.name"] == "publish"
        assert attributes["messaging.destination.name"] == f"service.exchange:request.{b.name}"
        assert attributes["messaging.rabbitmq.destination.routing_key"] == f"request.{b.name}"
        assert attributes["messaging.message.conversation_id"] == attributes["messaging.message.id"]
        attributes = process_b.attributes
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == (
            f"service.exchange:request.{b.name}:service.{b.name}.request")
        assert attributes["messaging.message.id"] == publish_b.attributes["messaging.message.id"]
        assert attributes["amqprpc.outcome"] == "replied"
        assert "error.type" not in attributes and process_b.status.status_code is StatusCode.UNSET

        # A failing handler: error.type on its process span and its caller's span; A's handler
        # let the RemoteError through, so A and its caller see that.
        spans.clear()
        with pytest.raises(RemoteError):
            client.call(a.name, "relay", {"fail": True}, timeout=10)
        all_spans = finished(spans, 6)
        for kind, name, error_type in (
                (SpanKind.CONSUMER, f"process service.exchange:request.{b.name}:service.{b.name}.request",
                 "ValueError"),
                (SpanKind.CLIENT, f"{b.name}/work", "ValueError"),
                (SpanKind.CONSUMER, f"process service.exchange:request.{a.name}:service.{a.name}.request",
                 "RemoteError"),
                (SpanKind.CLIENT, f"{a.name}/relay", "RemoteError")):
            span = named(all_spans, kind, name)
            assert span.attributes["error.type"] == error_type, name
            assert span.status.status_code is StatusCode.ERROR
            assert span.attributes.get("amqprpc.outcome", "failed") == "failed"


@pytest.mark.integration
def test_an_events_process_span_starts_its_own_trace_linked_to_the_publisher(spans, broker_url):
    subscriber = Service(unique_name("otel-sub"))
    event = f"{subscriber.name}.happened"
    seen = []

    @subscriber.event(event)
    def on_happened(payload):
        seen.append(current.get().trace_id)

    with running_worker(subscriber, broker_url=broker_url), RpcClient("tests", broker_url=broker_url) as client:
        with spans.tracer.start_as_current_span("request") as outer:
            client.publish_event(event, {"n": 1})
        all_spans = finished(spans, 3)
    publish = named(all_spans, SpanKind.PRODUCER, f"publish event.exchange:{event}")
    process = named(all_spans, SpanKind.CONSUMER,
                    f"process event.exchange:{event}:service.{subscriber.name}.event.on_happened")
    assert publish.parent.span_id == outer.get_span_context().span_id
    assert process.parent is None and process.context.trace_id != publish.context.trace_id
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]
    assert [link.context.trace_id for link in process.links] == [publish.context.trace_id]
    assert process.attributes["amqprpc.handler"] == "on_happened"
    assert seen == [hex_trace(process)]


@pytest.mark.integration
def test_a_raw_amqp_consumer_reads_the_w3c_traceparent_from_the_headers(spans, broker_url):
    event = unique_name("otel-raw")
    queue = unique_name("otel-raw-q")
    connection = raw_connection(broker_url)
    channel = connection.channel()
    try:
        channel.queue_declare(queue, exclusive=True)
        channel.exchange_declare("event.exchange", "topic", durable=True, auto_delete=False)
        channel.queue_bind(queue, "event.exchange", event)
        with RpcClient("tests", broker_url=broker_url) as client:
            client.publish_event(event, {"n": 1})
        message = wait_for(lambda: channel.basic_get(queue, no_ack=True))
    finally:
        connection.close()
    (publish,) = finished(spans, 1)
    headers = message.properties["application_headers"]
    match = TRACEPARENT.match(headers["traceparent"])
    assert match, headers
    assert match.groups() == (hex_trace(publish), format(publish.context.span_id, "016x"))
    assert envelope.loads(message.body)["headers"]["trace_id"] == hex_trace(publish)


def _raw_request(broker_url: str, service: str, headers: dict | None, body_headers: dict) -> dict:
    """Send a request the way a foreign peer does (py-amqp, JSON envelope) and wait for its reply."""
    connection = raw_connection(broker_url)
    channel = connection.channel()
    try:
        reply_queue, _, _ = channel.queue_declare("", exclusive=True)
        message_id = envelope.new_id()
        body = envelope.dumps({"message_id": message_id, "source_service": "php", "target_service": service,
                               "action": "work", "correlation_id": message_id, "reply_to": reply_queue,
                               "headers": body_headers, "payload": {}, "timestamp": int(time.time())})
        properties = {"application_headers": headers} if headers else {}
        channel.basic_publish(amqp.Message(body, content_type="application/json", correlation_id=message_id,
                                           reply_to=reply_queue, **properties),
                              exchange="service.exchange", routing_key=f"request.{service}")
        reply = wait_for(lambda: channel.basic_get(reply_queue, no_ack=True))
        return envelope.loads(reply.body)
    finally:
        connection.close()


@pytest.mark.integration
def test_a_foreign_publishers_traceparent_is_continued_by_the_worker(spans, broker_url):
    service = Service(unique_name("otel-foreign"))
    seen = []

    @service.handler
    def work(payload):
        seen.append(logs._request.get()["trace_id"])
        return "ok"

    trace_id, span_id = envelope.new_id(), envelope.new_id()[:16]
    with running_worker(service, broker_url=broker_url):
        reply = _raw_request(broker_url, service.name, {"traceparent": f"00-{trace_id}-{span_id}-01",
                                                        "tracestate": "vendor=1"}, {})
        assert reply["success"], reply
        (process,) = finished(spans, 1)
        assert hex_trace(process) == trace_id and format(process.parent.span_id, "016x") == span_id
        assert process.parent.is_remote and process.context.trace_state.get("vendor") == "1"
        assert seen == [trace_id]

        # A peer without OpenTelemetry (the PHP services) sends only the envelope's trace_id:
        # the worker's span, its log lines and its nested calls stay in that trace.
        spans.clear()
        php_trace = envelope.new_id()
        assert _raw_request(broker_url, service.name, None, {"trace_id": php_trace})["success"]
        (process,) = finished(spans, 1)
        assert hex_trace(process) == php_trace and seen[-1] == php_trace


@pytest.mark.integration
def test_a_message_that_cannot_be_sent_ends_its_spans_with_the_error(spans, broker_url):
    with RpcClient("tests", broker_url=broker_url) as client:
        with pytest.raises(TypeError):
            client.call(unique_name("otel-none"), "work", {"not json": object()}, timeout=5)
        with pytest.raises(TypeError):
            client.cast(unique_name("otel-none"), "work", {"not json": object()}, timeout=5)
    ended = finished(spans, 3)
    assert sorted((span.kind.name, span.attributes.get("error.type", "")) for span in ended) == [
        ("CLIENT", "TypeError"), ("PRODUCER", ""), ("PRODUCER", "TypeError")]  # a call's PRODUCER ended at once


@pytest.mark.integration
def test_client_metrics_in_opentelemetry_and_prometheus(broker_url):
    from prometheus_client import REGISTRY

    from amqprpc.middleware.clientmetrics import ClientMetrics

    reader = InMemoryMetricReader()
    tracing = OpenTelemetryMiddleware(meter_provider=MeterProvider(metric_readers=[reader]))
    service = Service(unique_name("otel-metrics"))
    service.handler("work")(lambda payload: "ok")
    breaker = CircuitBreaker(failure_threshold=1, shared=False)
    with running_worker(service, broker_url=broker_url), \
            RpcClient("tests", broker_url=broker_url, middleware=[tracing, ClientMetrics()], breaker=breaker) as client:
        assert client.call(service.name, "work", {}, timeout=10) == "ok"
        gone = unique_name("otel-gone")
        with pytest.raises(Exception):
            client.call(gone, "work", {}, timeout=2)  # nobody there: ServiceUnavailable, and the breaker opens
        with pytest.raises(CircuitOpen):
            client.call(gone, "work", {}, timeout=2)

    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    assert sample("amqprpc_client_duration_seconds_count", kind="call", service=service.name, action="work",
                  outcome="ok") == 1
    assert sample("amqprpc_client_duration_seconds_count", kind="call", service=gone, action="work",
                  outcome="unavailable") == 1
    assert sample("amqprpc_client_duration_seconds_count", kind="call", service=gone, action="work",
                  outcome="circuit_open") == 1  # refused by the breaker: settled, nothing sent
    assert sample("amqprpc_client_calls_in_flight", service=service.name) == 0
    assert sample("amqprpc_breaker_state", breaker=gone) == 2
    assert sample("amqprpc_breaker_rejections_total", breaker=gone) == 1

    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points.setdefault(metric.name, []).append(point)
    outcomes = {(point.attributes["amqprpc.service"], point.attributes["amqprpc.outcome"]): point.count
                for point in points["amqprpc.client.duration"]}
    assert outcomes == {(service.name, "ok"): 1, (gone, "unavailable"): 1, (gone, "circuit_open"): 1}
    assert {point.attributes["amqprpc.service"]: point.value for point in points["amqprpc.client.in_flight"]} == {
        service.name: 0, gone: 0}
    assert [(point.attributes["amqprpc.breaker"], point.value) for point in points["amqprpc.breaker.rejections"]] == [
        (gone, 1)]
    states = [(point.attributes["amqprpc.breaker"], point.value) for point in points["amqprpc.breaker.state"]]
    assert (gone, 2) in states


def test_destination_names_follow_the_rabbitmq_conventions():
    assert destination("service.exchange", "request.a") == "service.exchange:request.a"
    assert destination("event.exchange", "x.y", "service.s.event.h") == "event.exchange:x.y:service.s.event.h"
    assert destination("", "service.s.request", "service.s.request") == "service.s.request"  # a retry, via amq.default
    assert destination("", "") == "amq.default"


def test_without_an_sdk_no_middleware_is_added():
    """opentelemetry-api imported (here by these tests; redis 8 imports it too) but no SDK
    provider set: workers and clients get no hook at all, so their messages pay nothing."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert observability.automatic() == []


@pytest.mark.parametrize("disabled, expected", [("", "OpenTelemetryMiddleware"), ("flask,amqprpc", "none")])
def test_an_sdk_set_by_the_application_switches_it_on_unless_disabled(disabled, expected):
    result = _python("""
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.trace import TracerProvider
        from amqprpc.middleware import observability
        assert observability.automatic() == []
        trace.set_tracer_provider(TracerProvider())
        print(' '.join(type(each).__name__ for each in observability.automatic()) or 'none')
    """, env={"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": disabled})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_the_instrumentor_adds_the_middleware_to_the_defaults_and_takes_it_back():
    from amqprpc.middleware.otel import AmqprpcInstrumentor

    provider = TracerProvider()
    AmqprpcInstrumentor().instrument(tracer_provider=provider)
    try:
        (added,) = [each for each in middleware.default if isinstance(each, OpenTelemetryMiddleware)]
        assert added.tracer() is not None
    finally:
        AmqprpcInstrumentor().uninstrument()
    assert not [each for each in middleware.default if isinstance(each, OpenTelemetryMiddleware)]


def _python(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_import_amqprpc_imports_no_opentelemetry_nor_prometheus():
    result = _python("""
        import sys
        import amqprpc
        from amqprpc import RpcClient, Worker, CircuitBreaker
        CircuitBreaker(shared=False)
        loaded = sorted({name.split('.')[0] for name in sys.modules} & {'opentelemetry', 'redis', 'amqprpc.middleware.otel'})
        print(loaded, 'amqprpc.middleware.otel' in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "False"]


@pytest.mark.integration
def test_without_opentelemetry_the_package_imports_and_calls_work(broker_url):
    result = _python(f"""
        import sys
        sys.modules['opentelemetry'] = None  # as if not installed: any import of it fails
        from amqprpc import RpcClient, Service, middleware
        from amqprpc.testing import running_worker, unique_name
        try:
            import amqprpc.middleware.otel
        except ImportError:
            pass
        else:
            raise SystemExit('amqprpc.otel imported without opentelemetry')
        service = Service(unique_name('no-otel'))
        service.handler('inc')(lambda payload: payload['n'] + 1)
        with running_worker(service, broker_url={broker_url!r}), RpcClient('t', broker_url={broker_url!r}) as client:
            assert client.hooks.middleware == [], client.hooks.middleware
            print(client.call(service.name, 'inc', {{'n': 41}}, timeout=10))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"


def _spans_in(text: str) -> list[dict]:
    """The spans the console exporter printed (JSON objects, one after another)."""
    decoder, found, index = json.JSONDecoder(), [], text.find("{")
    while index != -1:
        try:
            obj, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(obj, dict) and "context" in obj and "kind" in obj:
            found.append(obj)
        index = text.find("{", end)
    return found


DROP_IN = pathlib.Path(__file__).resolve().parents[2] / "systemd" / "amqprpc-worker@.service.d"
DROP_IN /= "opentelemetry.conf"


def drop_in_command(service: str) -> tuple[list[str], dict[str, str]]:
    """The shipped systemd drop-in's ExecStart and Environment=, for ``service`` (``%i``) and
    this venv (for /opt/amqprpc/venv)."""
    venv_bin = os.path.dirname(sys.executable) + "/"
    environment, command = {}, None
    for line in DROP_IN.read_text().replace("%i", service).splitlines():
        if line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            environment[key] = value
        elif line.startswith("ExecStart=") and line != "ExecStart=":
            command = line[len("ExecStart="):].replace("/opt/amqprpc/venv/bin/", venv_bin).split()
    assert command is not None
    return command, environment


@pytest.mark.integration
def test_a_worker_under_opentelemetry_instrument_exports_its_spans(tmp_path, broker_url):
    """The daemon path: ``opentelemetry-instrument amqprpc worker ...`` and OTEL_* variables,
    no code change, as the shipped systemd drop-in runs it (the console exporter in place of
    OTLP: spans on the worker's stdout, only because it is asked to)."""
    name = unique_name("otel-daemon")
    (tmp_path / "otel_daemon_app.py").write_text(textwrap.dedent(f"""
        from amqprpc import Service
        service = Service({name!r})

        @service.handler
        def work(payload):
            return 'done'
    """))
    command, otel = drop_in_command(name)
    assert command[0].endswith("/opentelemetry-instrument") and command[1:] == [
        os.path.dirname(sys.executable) + "/amqprpc", "worker", name]
    assert otel["OTEL_SERVICE_NAME"] == name and otel["OTEL_TRACES_EXPORTER"] == "otlp"
    env = {**os.environ, **otel, "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "PYTHONPATH": str(tmp_path), "AMQPRPC_BROKER_URL": broker_url,
           "AMQPRPC_APP": "otel_daemon_app:service", "AMQPRPC_LOG_FORMAT": "json", "AMQPRPC_LOG_LEVEL": "debug",
           "AMQPRPC_REGISTRY_INTERVAL": "0"}
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    try:
        wait_for(lambda: process.poll() is not None or '"worker ready"' in stderr.read_text(), timeout=30)
        assert process.poll() is None, stderr.read_text()
        with RpcClient("tests", broker_url=broker_url) as client:
            assert client.call(name, "work", {}, timeout=10) == "done"
        found = wait_for(lambda: _spans_in(stdout.read_text()), timeout=15)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        delete_queues(f"service.{name}.request")
    (span,) = found
    assert span["kind"] == "SpanKind.CONSUMER"
    assert span["name"] == f"process service.exchange:request.{name}:service.{name}.request"
    assert span["attributes"]["messaging.system"] == "rabbitmq"
    assert span["resource"]["attributes"]["service.name"] == name
    assert process.returncode == 0, stderr.read_text()
    # The worker's log lines name the same trace.
    trace_ids = {json.loads(line).get("trace_id") for line in stderr.read_text().splitlines()
                 if line.startswith("{") and '"trace_id"' in line}
    assert trace_ids == {span["context"]["trace_id"][2:]}
