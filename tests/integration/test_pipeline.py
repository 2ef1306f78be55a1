"""One pipeline for every message (#21): the dispatcher decides without a connection, the
around-middleware (consume_scope, handle_scope) plugs into it, and the in-memory client runs
the very same pipeline as a real worker -- the same hooks in the same order for the same
requests."""
from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from amqprpc import RemoteError, Retry, RpcClient, Service, current_call
from amqprpc.middleware import Delivery, Middleware
from amqprpc.outcome import OutcomeKind
from amqprpc.retry import ORIGINAL_QUEUE
from amqprpc.testing import InMemoryClient, running_worker, wait_for


class Recording(Middleware):
    """Writes down every per-delivery hook and scope it sees, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []
        self.lock = threading.Lock()

    def _note(self, *entry: str) -> None:
        with self.lock:
            self.seen.append(entry)

    def before_handle(self, delivery: Delivery) -> None:
        self._note("before_handle", delivery.kind, str(delivery.action))

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        self._note("consume_scope", delivery.kind, str(delivery.action), str(delivery.handler))
        decision = call_next(delivery)
        self._note("consume_scope done", decision.outcome.kind.value)
        return decision

    def handle_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        self._note("handle_scope", str(delivery.action), str(delivery.payload))
        try:
            result = call_next(delivery)
        except Exception as exc:
            self._note("handle_scope raised", type(exc).__name__)
            raise
        self._note("handle_scope returned", repr(result))
        return result

    def after_handle(self, delivery: Delivery, outcome: Any) -> None:
        self._note("after_handle", outcome.kind.value, str(outcome.error_type))


def _shop(name: str) -> Service:
    service = Service(name)
    attempts: dict[str, int] = {}

    @service.handler
    def add(payload: dict) -> int:
        return payload["a"] + payload["b"]

    @service.handler
    def broken(payload: dict) -> None:
        raise ValueError("always")

    @service.handler(retry=Retry(max_attempts=2, base_delay=0.0, max_delay=0.0, on=(KeyError,)))
    def flaky(payload: dict) -> str:
        attempts[payload["key"]] = attempts.get(payload["key"], 0) + 1
        if attempts[payload["key"]] == 1:
            raise KeyError("first time")
        return "second time lucky"

    return service


def _scenario(client: Any, name: str) -> list[Any]:
    """The same requests, whichever client serves them; what each answered."""
    answers: list[Any] = [client.call(name, "add", {"a": 1, "b": 2})]
    for action in ("broken", "nope"):
        try:
            client.call(name, action, {})
        except RemoteError as exc:
            answers.append(exc.error_type)
    answers.append(client.call(name, "flaky", {"key": "k"}))
    return answers


@pytest.mark.integration
def test_in_memory_and_a_real_worker_run_the_same_hooks_in_the_same_order(broker_url, service_name):
    in_memory, real = Recording(), Recording()
    assert _scenario(InMemoryClient(_shop(service_name), middleware=[in_memory]), service_name) == [
        3, "ValueError", "UnknownAction", "second time lucky"]
    with running_worker(_shop(service_name), broker_url=broker_url, middleware=[real]) as worker:
        with RpcClient(broker_url=broker_url, source="pipeline-test") as client:
            assert _scenario(client, service_name) == [3, "ValueError", "UnknownAction", "second time lucky"]
        wait_for(lambda: worker.stats["received"] == 5)
    assert real.seen == in_memory.seen
    # And the sequence is the documented one: scopes inside the simple hooks, the handle
    # scope inside the consume scope, an unknown action never reaching the scopes.
    assert in_memory.seen[:6] == [
        ("before_handle", "call", "add"), ("consume_scope", "call", "add", "add"), ("handle_scope", "add", "{'a': 1, 'b': 2}"),
        ("handle_scope returned", "3"), ("consume_scope done", "replied"), ("after_handle", "replied", "None")]
    assert ("before_handle", "call", "nope") in in_memory.seen
    assert not any(entry[0].startswith("consume_scope") and "nope" in entry for entry in in_memory.seen)
    assert ("consume_scope done", "retried") in in_memory.seen


class Gate(Middleware):
    """A consume scope that decides instead of calling on, for actions it is told."""

    def __init__(self, refuse: str, later: str) -> None:
        self.refuse, self.later = refuse, later
        self.put_off = 0

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        if delivery.action == self.refuse:
            return delivery.decide.ack(delivery, OutcomeKind.DONE, "Refused")
        if delivery.action == self.later and not delivery.headers.get(ORIGINAL_QUEUE):
            self.put_off += 1
            return delivery.decide.later(delivery, 0.05, OutcomeKind.RETRIED)
        return call_next(delivery)


def test_a_consume_scope_decides_without_running_the_handler_or_puts_the_message_off():
    ran: list[str] = []
    service = Service("gated")

    @service.handler
    def skipped(payload: dict) -> None:
        ran.append("skipped")

    @service.handler
    def delayed(payload: dict) -> None:
        ran.append("delayed")

    gate = Gate(refuse="skipped", later="delayed")
    client = InMemoryClient(service, middleware=[gate])
    client.cast("gated", "skipped", {})
    client.cast("gated", "delayed", {})
    assert ran == ["delayed"] and gate.put_off == 1 and client.dead_letters == []


class Exploding(Middleware):
    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        raise RuntimeError("a bug in a middleware")


def test_a_failing_scope_dead_letters_the_message_and_the_next_one_is_still_served():
    service = Service("exploding")
    service.handler("work")(lambda payload: "done")
    client = InMemoryClient(service, middleware=[Exploding()])
    client.cast("exploding", "work", {})
    client.cast("exploding", "work", {})
    assert [letter.error_type for letter in client.dead_letters] == ["WorkerError", "WorkerError"]


class Stopwatch(Middleware):
    """A handle scope that raises into the retry policy, as a time limit does."""

    def handle_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        if delivery.payload.get("too_slow"):
            raise TimeoutError("over the limit")
        return call_next(delivery)


def test_what_a_handle_scope_raises_follows_the_handlers_retry_policy():
    service = Service("timed")
    service.handler("job", retry=Retry(max_attempts=3, base_delay=0.0, max_delay=0.0))(lambda payload: "ok")
    client = InMemoryClient(service, middleware=[Stopwatch()])
    assert client.call("timed", "job", {}) == "ok"
    with pytest.raises(RemoteError) as raised:
        client.call("timed", "job", {"too_slow": True})
    assert raised.value.error_type == "TimeoutError"
    client.cast("timed", "job", {"too_slow": True})
    assert [(letter.error_type, letter.error) for letter in client.dead_letters] == [("TimeoutError", "over the limit")]


class PassThrough(Middleware):
    def handle_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        return call_next(delivery)


@pytest.mark.parametrize("middleware", [[], [PassThrough()]], ids=["handler called directly", "through a handle_scope"])
def test_a_camel_case_call_follows_the_retry_policy_of_its_snake_case_handler(middleware):
    # The dispatcher looks the policy up by the registered name it routed to (not by
    # Service.retry_policy's snake_case on every delivery), and calls the handler itself
    # when no handle_scope wraps it: the call context is bound either way.
    service = Service("camel")
    seen: list[Any] = []

    @service.handler(retry=Retry(max_attempts=2, base_delay=0.0, max_delay=0.0, on=(KeyError,)))
    def flaky_job(payload: dict) -> str:
        call = current_call()
        seen.append((call.action, call.service) if call else None)
        if len(seen) == 1:
            raise KeyError("first time")
        return "second time lucky"

    client = InMemoryClient(service, middleware=middleware)
    assert client.call("camel", "flakyJob", {}) == "second time lucky"
    assert seen == [("flakyJob", "camel")] * 2
