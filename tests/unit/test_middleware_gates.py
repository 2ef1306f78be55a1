"""consume_gate: a middleware whose consume_scope only has work for messages with a header
is skipped for the others, by the chain the worker composes once (#27: unused features cost
nothing); the call context a handler reads is the same as before (current_call())."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest

from amqprpc import CallContext, Service, context, current_call
from amqprpc.middleware import Delivery, Hooks, Middleware
from amqprpc.middleware.eta import Eta
from amqprpc.middleware.idempotency import Idempotency
from amqprpc.middleware.workflow import Workflows
from amqprpc.testing import InMemoryClient


class Noting(Middleware):
    """A scope that notes each delivery it sees under its own name."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        self.seen.append(self.name)
        return call_next(delivery)


class Gated(Noting):
    consume_gate = (("body_headers", "idempotency_key"),)


class OverridesWithoutItsOwnGate(Gated):
    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        self.seen.append(self.name + " (overridden)")
        return call_next(delivery)


def echo_client(*middleware: Middleware) -> InMemoryClient:
    service = Service("gates")
    service.handler("echo")(lambda payload: payload)
    return InMemoryClient(service, middleware=middleware)


def test_a_gated_scope_runs_only_for_a_message_with_its_key_and_then_in_its_place():
    seen: list[str] = []
    client = echo_client(Noting("first", seen), Gated("gated", seen), Noting("last", seen))
    assert client.call("gates", "echo", {"n": 1}) == {"n": 1}
    assert seen == ["first", "last"]  # no idempotency_key: skipped
    seen.clear()
    assert client.call("gates", "echo", {"n": 2}, idempotency_key="k-1") == {"n": 2}
    assert seen == ["first", "gated", "last"]  # list order kept


def test_a_subclass_that_overrides_the_scope_is_not_gated_by_its_parents_gate():
    seen: list[str] = []
    client = echo_client(OverridesWithoutItsOwnGate("child", seen))
    client.call("gates", "echo", {})
    assert seen == ["child (overridden)"]


def test_the_features_declare_their_gates_and_hooks_resolve_them_once():
    hooks = Hooks([Noting("plain", []), Eta(), Idempotency(), Workflows()], defaults=False)
    assert hooks.consume_gates == ((), (("headers", "x-eta"),), (("body_headers", "idempotency_key"),),
                                   (("body_headers", "workflow"),))
    assert len(hooks.consume_gates) == len(hooks.consume_scope)


def test_a_gate_on_an_unknown_field_is_refused_when_the_hooks_are_resolved():
    class Wrong(Noting):
        consume_gate = (("payload", "tenant"),)

    with pytest.raises(ValueError, match="consume_gate"):
        Hooks([Wrong("wrong", [])], defaults=False)


def test_current_call_is_one_frozen_call_context_per_run_whose_cancelled_is_the_deliverys():
    service = Service("ctx")
    seen: dict[str, Any] = {}

    @service.handler
    def look(payload: Any) -> str:
        call = current_call()
        assert call is current_call() and isinstance(call, CallContext)
        with pytest.raises(dataclasses.FrozenInstanceError):
            call.action = "other"  # type: ignore[misc]
        seen["call"] = call
        raw = context.current.get()  # what the worker sets: the same answers as the CallContext
        assert isinstance(raw, context.HandlerCall) and raw.public() is call
        assert (raw.cancelled, raw.idempotency_key, raw.trace_id) == (call.cancelled, None, call.trace_id)
        return call.trace_id

    client = InMemoryClient(service)
    trace_id = client.call("ctx", "look", {})
    call = seen["call"]
    assert (call.service, call.action, call.trace_id, call.cancelled, call.idempotency_key) == (
        "ctx", "look", trace_id, False, None)
    assert call.deadline is not None and current_call() is None
