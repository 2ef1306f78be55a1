"""Middleware: hooks around a worker's lifecycle and deliveries and a client's sends, in order,
with one typed outcome per delivery and failures contained."""
from __future__ import annotations

import threading

import pytest

from amqprpc import RemoteError, Retry, RpcClient, ServiceUnavailable, middleware
from amqprpc.middleware import Hooks, Middleware
from amqprpc.outcome import OutcomeKind
from amqprpc.testing import capture_logs, running_worker, wait_for


class Recorder(Middleware):
    def __init__(self, name: str = "rec", journal: list | None = None):
        self.name = name
        self.journal = [] if journal is None else journal
        self.handled: list = []
        self.settled: list = []
        self.lock = threading.Lock()

    def worker_starting(self, worker):
        self.journal.append((self.name, "starting"))

    def worker_started(self, worker):
        self.journal.append((self.name, "started"))

    def worker_stopping(self, worker):
        self.journal.append((self.name, "stopping"))

    def worker_stopped(self, worker):
        self.journal.append((self.name, "stopped"))

    def before_handle(self, delivery):
        delivery.state[self.name] = threading.get_ident()

    def after_handle(self, delivery, outcome):
        assert delivery.state[self.name] == threading.get_ident()  # same handler thread
        with self.lock:
            self.handled.append((delivery, outcome))

    def before_publish(self, message):
        message.headers["x-seen-by"] = self.name

    def after_settle(self, message, outcome):
        with self.lock:
            self.settled.append((message, outcome))


class Broken(Middleware):
    def before_handle(self, delivery):
        raise RuntimeError("broken before_handle")

    def after_handle(self, delivery, outcome):
        raise RuntimeError("broken after_handle")

    def before_publish(self, message):
        raise RuntimeError("broken before_publish")


def test_before_hooks_run_in_order_and_after_hooks_in_reverse_and_only_overrides_are_called():
    journal: list = []
    first, second = Recorder("first", journal), Recorder("second", journal)
    hooks = Hooks([first, second, Middleware()], defaults=False)
    hooks.run(hooks.worker_starting, None)
    hooks.run(hooks.worker_stopped, None)
    assert journal == [("first", "starting"), ("second", "starting"), ("second", "stopped"), ("first", "stopped")]
    assert len(hooks.before_handle) == 2 and not Hooks([Middleware()], defaults=False).after_settle


@pytest.mark.integration
def test_a_default_middleware_joins_every_worker_and_client_created_after(service, broker_url):
    recorder = Recorder()
    middleware.add_default(recorder)
    try:
        service.handler("echo")(lambda payload: payload)
        with running_worker(service) as worker, RpcClient("tests", broker_url=broker_url) as client:
            assert recorder in worker.hooks.middleware and recorder in client.hooks.middleware
            assert client.call(service.name, "echo", {"a": 1}) == {"a": 1}
    finally:
        middleware.remove_default(recorder)
    assert not Hooks().middleware or recorder not in Hooks().middleware


@pytest.mark.integration
def test_every_delivery_gets_one_outcome_and_the_client_sees_each_settle(service, broker_url):
    worker_side, client_side = Recorder(), Recorder()
    service.handler("echo")(lambda payload: payload)
    service.handler("explode")(lambda payload: (_ for _ in ()).throw(KeyError("no")))
    service.handler("flaky", retry=Retry(max_attempts=2, base_delay=0.01, jitter=False))(
        lambda payload: (_ for _ in ()).throw(ConnectionError("not now")))
    seen = threading.Event()
    service.event("mw.thing")(lambda payload: seen.set())
    with running_worker(service, middleware=[worker_side]) as worker, \
            RpcClient("tests", broker_url=broker_url, middleware=[client_side]) as client:
        assert client.call(service.name, "echo", {"a": 1}) == {"a": 1}
        with pytest.raises(RemoteError):
            client.call(service.name, "explode")
        with pytest.raises(RemoteError, match="Unknown action"):
            client.call(service.name, "nope")
        with pytest.raises(RemoteError):
            client.call(service.name, "flaky", timeout=5)
        client.cast(service.name, "echo", {"b": 2})
        client.publish_event("mw.thing", {})
        with pytest.raises(ServiceUnavailable):
            client.cast("no-such-service-anywhere", "x")
        wait_for(seen.is_set)
        wait_for(lambda: len(worker_side.handled) == 7)
        stats = dict(worker.stats)

    outcomes = [(d.kind, d.handler, o.kind, o.error_type) for d, o in worker_side.handled]
    assert sorted(outcomes, key=repr) == sorted([
        ("call", "echo", OutcomeKind.REPLIED, None),
        ("call", "explode", OutcomeKind.FAILED, "KeyError"),
        ("call", None, OutcomeKind.FAILED, "UnknownAction"),
        ("call", "flaky", OutcomeKind.RETRIED, "ConnectionError"),
        ("call", "flaky", OutcomeKind.FAILED, "ConnectionError"),
        ("cast", "echo", OutcomeKind.DONE, None),
        ("event", "<lambda>", OutcomeKind.DONE, None),
    ], key=repr)
    first = worker_side.handled[0][0]
    assert first.headers["x-seen-by"] == "rec"  # the client's before_publish headers travel as AMQP headers
    assert first.action == "echo" and first.payload == {"a": 1} and "trace_id" in first.body_headers
    assert all(o.duration >= 0 for _, o in worker_side.handled)
    assert stats["succeeded"] == 3 and stats["failed"] == 4 and stats["retried"] == 1
    assert [j for _, j in worker_side.journal] == ["starting", "started", "stopping", "stopped"]

    settled = [(m.kind, m.action, o.kind, o.error_type) for m, o in client_side.settled]
    assert settled == [
        ("call", "echo", "ok", None), ("call", "explode", "error", "KeyError"),
        ("call", "nope", "error", "UnknownAction"), ("call", "flaky", "error", "ConnectionError"),
        ("cast", "echo", "ok", None), ("event", "mw.thing", "ok", None),
        ("cast", "x", "unavailable", "ServiceUnavailable"),
    ]


@pytest.mark.integration
def test_a_failing_hook_is_logged_and_never_fails_the_call_or_delivery(service, broker_url):
    service.handler("echo")(lambda payload: payload)
    with capture_logs("amqprpc.middleware") as records, running_worker(service, middleware=[Broken()]), \
            RpcClient("tests", broker_url=broker_url, middleware=[Broken()]) as client:
        assert client.call(service.name, "echo", {"a": 1}) == {"a": 1}
        wait_for(lambda: len(records) >= 3)
    assert {(r["middleware"], r["hook"]) for r in records} == {
        ("Broken", "before_publish"), ("Broken", "before_handle"), ("Broken", "after_handle")}


@pytest.mark.integration
def test_a_bad_message_and_an_expired_request_get_their_outcome(service, broker_url):
    import amqp
    from kombu import Connection

    recorder = Recorder()
    service.handler("echo")(lambda payload: payload)
    with running_worker(service, middleware=[recorder]) as worker:
        with Connection(broker_url) as conn:
            channel = conn.default_channel
            channel.basic_publish(amqp.Message(b"not json"), "", worker.queue_name)
            channel.basic_publish(amqp.Message(b'{"message_id":"m1","action":"echo","payload":{},'
                                               b'"headers":{"deadline":1}}', content_type="application/json"),
                                  "", worker.queue_name)
        wait_for(lambda: len(recorder.handled) == 2)
        stats = dict(worker.stats)
    kinds = sorted((o.kind, o.error_type, o.dead_lettered) for _, o in recorder.handled)
    assert kinds == sorted([(OutcomeKind.REFUSED, "BadMessage", True), (OutcomeKind.EXPIRED, None, False)])
    assert stats["refused"] == 1 and stats["expired"] == 1


def test_metrics_count_what_the_outcome_says_and_nothing_from_the_wire():
    from prometheus_client import REGISTRY

    from amqprpc.middleware.metrics import Metrics
    from amqprpc.middleware import Delivery
    from amqprpc.outcome import Outcome

    name = f"mw-metrics-{threading.get_ident()}"

    def sample(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"service": name, **labels}) or 0.0

    metrics = Metrics()
    for handler, outcome in [("get", Outcome(OutcomeKind.REPLIED, None, 0.01)),
                             ("get", Outcome(OutcomeKind.FAILED, "KeyError", 0.02)),
                             (None, Outcome(OutcomeKind.REFUSED, "BadMessage", 0.0, True))]:
        delivery = Delivery(name, "call", "q", {}, {"redelivered": True}, 10, 0.0)
        delivery.action, delivery.handler = "whatever-the-wire-said", handler
        metrics.before_handle(delivery)
        assert sample("amqprpc_requests_in_flight") == 1
        metrics.after_handle(delivery, outcome)
    assert sample("amqprpc_requests_total", action="get", outcome="replied") == 1
    assert sample("amqprpc_requests_total", action="get", outcome="failed") == 1
    assert sample("amqprpc_requests_total", action="<unknown>", outcome="refused") == 1
    assert sample("amqprpc_dead_letters_total", reason="BadMessage") == 1
    assert sample("amqprpc_redeliveries_total") == 3 and sample("amqprpc_requests_in_flight") == 0


@pytest.mark.integration
def test_a_call_the_open_breaker_refuses_settles_as_circuit_open_for_hooks_and_client_metrics(broker_url):
    from prometheus_client import REGISTRY

    from amqprpc import CircuitBreaker, CircuitOpen
    from amqprpc.middleware.clientmetrics import ClientMetrics
    from amqprpc.testing import unique_name

    target = unique_name("mw-nobody")  # no queue: the first call fails ServiceUnavailable and opens the breaker
    recorder = Recorder()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60, shared=False)

    def refused_calls():
        return REGISTRY.get_sample_value("amqprpc_client_duration_seconds_count", {
            "kind": "call", "service": target, "action": "get", "outcome": "circuit_open"}) or 0.0

    with RpcClient("tests", broker_url=broker_url, breaker=breaker,
                   middleware=[recorder, ClientMetrics()]) as client:
        with pytest.raises(ServiceUnavailable):
            client.call(target, "get", timeout=5)
        with pytest.raises(CircuitOpen):
            client.call(target, "get", timeout=5)
        with pytest.raises(CircuitOpen):
            client.call_async(target, "get", timeout=5).result(5)
    settled = [(m.kind, m.service, m.action, o.kind, o.error_type) for m, o in recorder.settled]
    assert settled == [("call", target, "get", "unavailable", "ServiceUnavailable"),
                       *[("call", target, "get", "circuit_open", "CircuitOpen")] * 2]
    refused = [m for m, _ in recorder.settled[1:]]
    assert all(m.headers == {} and m.message_id == "" for m in refused)  # no before_publish: nothing was built
    assert refused_calls() == 2


@pytest.mark.integration
def test_a_refused_call_the_fallback_answers_still_settles_as_circuit_open(broker_url):
    from amqprpc import CircuitBreaker
    from amqprpc.testing import unique_name

    target = unique_name("mw-nobody")
    recorder = Recorder()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60, shared=False,
                             fallback=lambda service, action, payload, exc: {"degraded": True})
    with RpcClient("tests", broker_url=broker_url, breaker=breaker, middleware=[recorder]) as client:
        assert client.call(target, "get", timeout=5) == {"degraded": True}  # ServiceUnavailable: opens it
        assert client.call(target, "get", timeout=5) == {"degraded": True}  # refused
    assert [o.kind for _, o in recorder.settled] == ["unavailable", "circuit_open"]


class Scoped(Recorder):
    """A publish_scope that journals every command and answers ``cached`` calls itself."""

    def __init__(self) -> None:
        super().__init__("scoped")
        self.commands: list = []

    def publish_scope(self, call_next, command):
        self.commands.append((command.kind, command.action, command.blocking))
        if command.action == "cached":
            return {"from": "cache"}  # nothing is built or sent
        return call_next(command)


@pytest.mark.integration
def test_a_publish_scope_runs_around_every_send_and_may_answer_without_sending(service, broker_url):
    scoped = Scoped()
    service.handler("echo")(lambda payload: payload)
    seen = threading.Event()
    service.event("mw.scoped")(lambda payload: seen.set())
    with running_worker(service) as worker, \
            RpcClient("tests", broker_url=broker_url, middleware=[scoped]) as client:
        assert client.call(service.name, "echo", {"a": 1}) == {"a": 1}
        future = client.call_async(service.name, "echo", {"b": 2})
        assert future.result(5) == {"b": 2} and future.message_id
        assert client.call(service.name, "cached") == {"from": "cache"}
        assert client.cast(service.name, "echo", {"c": 3})  # its message id
        client.publish_event("mw.scoped", {})
        assert client.submit(service.name, "echo", {"d": 4})
        wait_for(seen.is_set)
        wait_for(lambda: worker.stats["succeeded"] >= 4)
    assert scoped.commands == [("call", "echo", True), ("call", "echo", False), ("call", "cached", True),
                               ("cast", "echo", True), ("event", "mw.scoped", True), ("submit", "echo", True)]
    # before_publish and after_settle ran inside, for each message actually written: not the cached one
    assert [m.kind for m, _ in scoped.settled if m.kind == "call"] == ["call", "call"]
    assert "cached" not in {m.action for m, _ in scoped.settled}


@pytest.mark.integration
def test_the_client_retry_and_the_breaker_sit_in_the_publish_chain_outside_the_scopes(broker_url):
    from amqprpc import CircuitBreaker, CircuitOpen
    from amqprpc.testing import unique_name

    target = unique_name("mw-nobody")  # no queue: every attempt is ServiceUnavailable
    scoped = Scoped()
    retry = Retry(max_attempts=3, base_delay=0.01, jitter=False)
    with RpcClient("tests", broker_url=broker_url, middleware=[scoped]) as client:
        with pytest.raises(ServiceUnavailable):
            client.call(target, "get", timeout=5, retry=retry)
        assert len(scoped.commands) == 3  # one scope per attempt, each a message of its own
        assert [o.kind for _, o in scoped.settled] == ["unavailable"] * 3
        client.breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60, shared=False)  # re-composed
        scoped.commands.clear()
        with pytest.raises(CircuitOpen):  # attempt 1 opens it; attempt 2 is refused, and not retried
            client.call(target, "get", timeout=5, retry=retry)
        assert len(scoped.commands) == 1  # the refused attempt never reached the scope
        assert [o.kind for _, o in scoped.settled][-2:] == ["unavailable", "circuit_open"]
