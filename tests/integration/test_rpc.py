"""Calls, casts and their failures, against the real broker."""
import threading
import time

import pytest

from amqprpc import CallTimeout, RemoteError, RpcClient, ServiceUnavailable
from amqprpc.testing import running_worker, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def client(broker_url):
    with RpcClient("tests", broker_url=broker_url) as client:
        yield client


def test_call_returns_the_handlers_data(service, client):
    service.handler("echo")(lambda payload: {"got": payload})
    with running_worker(service):
        assert client.call(service.name, "echo", {"a": 1}) == {"got": {"a": 1}}


def test_handler_exception_becomes_remote_error_with_type_and_message(service, client):
    @service.handler
    def explode(payload):
        raise KeyError("no such thing")

    with running_worker(service):
        with pytest.raises(RemoteError) as info:
            client.call(service.name, "explode", {})
    assert info.value.error_type == "KeyError"
    assert "no such thing" in info.value.message
    assert "Traceback" not in info.value.message


def test_unknown_action_is_named_in_the_error(service, client):
    with running_worker(service):
        with pytest.raises(RemoteError, match="Unknown action: missing_action"):
            client.call(service.name, "missing_action", {})


def test_unserializable_result_is_an_error_reply_and_the_worker_lives_on(service, client):
    service.handler("bad")(lambda payload: object())
    service.handler("good")(lambda payload: "fine")
    with running_worker(service):
        with pytest.raises(RemoteError, match="not JSON serializable"):
            client.call(service.name, "bad", {})
        assert client.call(service.name, "good", {}) == "fine"


def test_unknown_service_fails_fast_with_service_unavailable(client):
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="no queue is bound"):
        client.call("no-such-service-anywhere", "x", {}, timeout=10)
    assert time.monotonic() - started < 1.0


def test_slow_handler_times_out_within_the_timeout(service, client):
    service.handler("slow")(lambda payload: time.sleep(1.0))
    with running_worker(service):
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            client.call(service.name, "slow", {}, timeout=0.3)
        assert time.monotonic() - started < 0.6


def test_request_whose_deadline_passed_is_dropped_unrun(service, client):
    ran = []
    service.handler("block")(lambda payload: time.sleep(0.6))
    service.handler("record")(lambda payload: ran.append(payload["n"]))
    with running_worker(service, concurrency=1, prefetch=10) as worker:
        client.call_async(service.name, "block", {}, timeout=5)
        time.sleep(0.05)
        with pytest.raises(CallTimeout):  # waits behind "block" and expires
            client.call(service.name, "record", {"n": 1}, timeout=0.2)
        wait_for(lambda: worker.stats["expired"] == 1, timeout=3)
    assert ran == []


def test_call_async_resolves_and_runs_the_callback(service, client):
    service.handler("double")(lambda payload: payload["n"] * 2)
    seen, done = [], threading.Event()
    with running_worker(service):
        future = client.call_async(service.name, "double", {"n": 21},
                                   callback=lambda f: (seen.append(f.result()), done.set()))
        assert future.result(5) == 42
        assert done.wait(5)
    assert seen == [42]


def test_callback_may_itself_call_without_deadlock(service, client):
    service.handler("double")(lambda payload: payload["n"] * 2)
    results = []
    done = threading.Event()

    def chained(future):
        results.append(client.call(service.name, "double", {"n": future.result()}))
        done.set()

    with running_worker(service):
        client.call_async(service.name, "double", {"n": 1}, callback=chained)
        assert done.wait(5)
    assert results == [4]


def test_proxy_maps_camel_case_attributes_to_actions(service, client):
    @service.handler
    def get_user(payload):
        return payload["user_id"]

    with running_worker(service):
        proxy = client.proxy(service.name)
        assert proxy.get_user(user_id="u1") == "u1"
        assert proxy.getUser(user_id="u2") == "u2"


def test_cast_is_confirmed_and_handled(service, client):
    seen = []
    service.handler("touch")(lambda payload: seen.append(payload["n"]))
    with running_worker(service):
        for n in range(20):
            client.cast(service.name, "touch", {"n": n})
        wait_for(lambda: len(seen) == 20)
    assert sorted(seen) == list(range(20))


def test_cast_to_a_service_with_no_queue_raises(client):
    with pytest.raises(ServiceUnavailable):
        client.cast("no-such-service-anywhere", "touch", {})


def test_nested_call_inherits_deadline_and_trace(broker_url, client):
    from amqprpc import Service
    from amqprpc.context import current
    from amqprpc.testing import unique_name

    outer, inner = Service(unique_name("outer")), Service(unique_name("inner"))
    seen = {}

    @inner.handler
    def where(payload):
        seen["inner"] = current.get()
        return "ok"

    @outer.handler
    def relay(payload):
        seen["outer"] = current.get()
        with RpcClient("outer", broker_url=broker_url) as nested:
            return nested.call(inner.name, "where", {}, timeout=30)

    with running_worker(inner), running_worker(outer):
        assert client.call(outer.name, "relay", {}, timeout=2) == "ok"
    assert seen["inner"].trace_id == seen["outer"].trace_id
    # The inner worker counts what was left (timeout_ms) from the request's arrival: its
    # deadline is the outer one plus the hop's transit (docs/guides/deadlines.md).
    assert -0.002 <= seen["inner"].deadline - seen["outer"].deadline < 0.5
    assert seen["outer"].deadline - time.time() < 2


def test_client_that_cannot_reach_the_broker_says_so_without_the_password():
    with pytest.raises(ServiceUnavailable) as info:
        RpcClient("t", broker_url="amqp://bob:topsecret@127.0.0.1:1//", connect_timeout=1)
    assert "topsecret" not in str(info.value) and "bob:***@" in str(info.value)
