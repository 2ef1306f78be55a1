"""Handlers tested without a broker: worker_factory's fake service.client, and the in-memory
client that routes calls, casts and events to Service handlers with the wire's semantics."""
from __future__ import annotations

import threading
import time

import pytest

from amqprpc import CallTimeout, RemoteError, Retry, Service, ServiceUnavailable, current_call
from amqprpc.testing import FakeClient, InMemoryClient, worker_factory


def shop_of_two():
    """users answers; orders calls users and publishes order.created; audit and mail listen."""
    users, orders, audit, mail = Service("users"), Service("orders"), Service("audit"), Service("mail")
    seen: list = []

    @users.handler
    def get_user(payload):
        if payload["user_id"] == "nobody":
            raise LookupError(f"no user {payload['user_id']}")
        return {"id": payload["user_id"], "tags": ("a", "b"), "trace_id": current_call().trace_id}

    @orders.handler
    def create_order(payload):
        user = orders.client.call("users", "get_user", {"user_id": payload["user_id"]})
        orders.client.publish_event("order.created", {"order_id": "o1", "user": user["id"]})
        seen.append(("create_order returns", None))
        return {"order_id": "o1", "user": user, "trace_id": current_call().trace_id}

    @audit.event("order.*")
    def on_order(payload):
        seen.append(("audit", current_call().action, payload["order_id"], current_call().trace_id))

    @mail.event("#", name="everything")
    def on_anything(payload):
        seen.append(("mail", current_call().action))

    @mail.event("payment.*")
    def on_payment(payload):
        seen.append(("mail-payment", current_call().action))

    return [users, orders, audit, mail], seen


def test_a_call_answers_with_what_json_carries_and_events_fan_out_to_every_matching_handler():
    services, seen = shop_of_two()
    with InMemoryClient(*services) as client:
        order = client.call("orders", "create_order", {"user_id": "u1"})
    assert order["user"]["tags"] == ["a", "b"]  # a tuple crossed as JSON
    # The nested call carried the trace id; the event handlers ran after create_order returned,
    # under the same trace id, each matching handler once and no other.
    assert order["user"]["trace_id"] == order["trace_id"]
    assert seen == [("create_order returns", None), ("audit", "order.created", "o1", order["trace_id"]),
                    ("mail", "order.created")]
    assert [(sent.kind, sent.service, sent.action) for sent in client.sent] == [
        ("call", "orders", "create_order"), ("call", "users", "get_user"), ("event", None, "order.created")]


def test_errors_reach_the_caller_as_the_real_client_raises_them():
    services, _ = shop_of_two()
    client = InMemoryClient(*services)
    with pytest.raises(RemoteError) as failed:
        client.call("users", "get_user", {"user_id": "nobody"})
    assert (failed.value.error_type, failed.value.message) == ("LookupError", "no user nobody")
    with pytest.raises(RemoteError) as unknown:
        client.call("users", "no_such_action")
    assert (unknown.value.error_type, unknown.value.message) == ("UnknownAction", "Unknown action: no_such_action")
    with pytest.raises(ServiceUnavailable, match="no queue is bound"):
        client.call("nobody-deploys-this", "get_user")
    with pytest.raises(ServiceUnavailable):
        client.cast("nobody-deploys-this", "get_user")
    # a nested call's failure reaches the outer caller as the outer handler let it go
    with pytest.raises(RemoteError) as nested:
        client.call("orders", "create_order", {"user_id": "nobody"})
    assert nested.value.error_type == "RemoteError" and "LookupError: no user nobody" in nested.value.message


def test_results_json_cannot_carry_are_error_replies_and_camel_case_and_proxies_work():
    service = Service("odd")
    service.handler("give_set")(lambda payload: {1, 2})
    service.handler("get_user")(lambda payload: {"id": payload["user_id"]})
    client = InMemoryClient(service)
    with pytest.raises(RemoteError) as failed:
        client.call("odd", "give_set")
    assert failed.value.error_type == "TypeError" and "not JSON serializable" in failed.value.message
    assert client.proxy("odd").getUser(user_id="u2") == {"id": "u2"}
    assert client.call("odd", "ping")["service"] == "odd"


def test_casts_and_events_whose_handler_fails_are_dead_lettered_after_their_retries():
    service = Service("flaky")
    attempts = []

    @service.handler(retry=Retry(max_attempts=3, base_delay=0))
    def charge(payload):
        attempts.append("charge")
        raise ConnectionError("card network down")

    @service.event("order.created", retry=Retry(max_attempts=2, base_delay=0))
    def on_order(payload):
        attempts.append("on_order")
        if len(attempts) < 5:
            raise ConnectionError("still down")

    client = InMemoryClient(service)
    client.cast("flaky", "charge", {"amount": 1})
    client.cast("flaky", "refund", {})
    client.publish_event("order.created", {"order_id": "o1"})
    client.publish_event("nobody.listens", {})
    assert attempts == ["charge"] * 3 + ["on_order"] * 2
    assert [(d.kind, d.action, d.error_type) for d in client.dead_letters] == [
        ("cast", "charge", "ConnectionError"), ("cast", "refund", "UnknownAction")]


def test_a_call_shares_its_deadline_with_the_calls_its_handler_makes_and_times_out_like_one():
    inner, outer = Service("inner"), Service("outer")
    inner.handler("left")(lambda payload: current_call().remaining())
    outer.handler("ask")(lambda payload: outer.client.call("inner", "left", timeout=30))

    @outer.handler
    def slow(payload):
        time.sleep(0.05)
        return "late"

    client = InMemoryClient(inner, outer)
    assert 0 < client.call("outer", "ask", timeout=2) <= 2
    with pytest.raises(CallTimeout):
        client.call("outer", "slow", timeout=0.01)


def test_call_async_and_submit():
    service = Service("echo")
    service.handler("echo")(lambda payload: payload)
    client = InMemoryClient(service)
    done = threading.Event()
    future = client.call_async("echo", "echo", {"x": 1}, callback=lambda f: done.set())
    assert future.result(0) == {"x": 1} and done.is_set()
    correlation_id = client.submit("echo", "echo", {"y": 2})
    assert client.replies[correlation_id]["data"] == {"y": 2}


def test_worker_factory_runs_a_handler_with_a_fake_client_that_records_and_answers():
    services, _ = shop_of_two()
    orders = services[1]
    fake = FakeClient().answer("users", "get_user", lambda payload: {"id": payload["user_id"]})
    worker = worker_factory(orders, client=fake)
    order = worker.create_order(user_id="u7")
    assert order["user"] == {"id": "u7"} and len(order["trace_id"]) == 32
    assert fake.calls == [("call", "users", "get_user", {"user_id": "u7"})]
    assert fake.events == [("event", None, "order.created", {"order_id": "o1", "user": "u7"})]
    fake.answer("users", "get_user", RemoteError("User not found", "UserNotFound"))
    with pytest.raises(RemoteError, match="User not found"):
        worker.call("create_order", {"user_id": "u8"})
    with pytest.raises(LookupError, match="no answer for users.get_user"):
        worker_factory(orders).create_order(user_id="u9")
    # outside the harness, the service's client is the shared one again (nothing was installed for good)
    from amqprpc.service import _installed
    assert _installed.get() is None


def test_worker_factory_builds_a_service_with_the_tests_dependencies_and_runs_its_event_handlers():
    def build(greeting="hello"):
        service = Service("greeter")
        heard = []
        service.handler("greet")(lambda payload: f"{greeting} {payload['name']}")
        service.event("user.*")(lambda payload: heard.append((current_call().action, payload)))
        service.heard = heard
        return service

    worker = worker_factory(build, greeting="hi")
    assert worker.greet(name="Ann") == "hi Ann"
    assert worker.event("user.created", {"id": 1}) == 1 and worker.event("order.created") == 0
    assert worker.service.heard == [("user.created", {"id": 1})]
    with pytest.raises(RemoteError, match="Unknown action"):
        worker.call("nope")
    with pytest.raises(TypeError, match="pass the function that builds it"):
        worker_factory(worker.service, greeting="hi")
