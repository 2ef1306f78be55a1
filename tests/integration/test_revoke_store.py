"""Revocations without a broker: the Redis store, the ``amqprpc revoke`` command, the
RevokeChecks middleware driven directly (a stand-in delivery and decisions), the Revoked
error on the caller's side, and what happens with Redis down. The real-broker checks (50
queued casts revoked, a running handler stopping within 1 s) are in test_revoke.py."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from amqprpc import Revoked, RemoteError, current_call
from amqprpc.cli import main
from amqprpc.context import CallContext, Cancellation, HandlerCall, RunScope, scope
from amqprpc.middleware.revoke import RevocationStore, RevokeChecks
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.testing import capture_logs, unique_name, wait_for
from amqprpc.wire import envelope

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


class Decisions:
    """Stands in for the dispatcher's decision helpers: records what was decided."""

    def ack(self, delivery: Any, kind: OutcomeKind, error_type: str | None = None) -> Any:
        return SimpleNamespace(verdict="ack", body=None, forward=None, outcome=Outcome(kind, error_type))

    def error(self, delivery: Any, exc: BaseException) -> Any:
        body = envelope.error_reply(str(exc), type(exc).__name__, delivery.message_id)
        return SimpleNamespace(verdict="error", body=body, forward=None, outcome=Outcome(OutcomeKind.FAILED,
                                                                                         type(exc).__name__))

    def error_reply(self, delivery: Any, error: str, error_type: str, kind: OutcomeKind = OutcomeKind.FAILED) -> Any:
        return SimpleNamespace(verdict="error", body=envelope.error_reply(error, error_type, delivery.message_id),
                               forward=None, outcome=Outcome(kind, error_type))

    def reply(self, delivery: Any, result: Any) -> Any:
        return SimpleNamespace(verdict="reply", body=envelope.ok_reply(result, delivery.message_id), forward=None,
                               outcome=Outcome(OutcomeKind.REPLIED))


def delivery(service: str, kind: str = "cast", message_id: str | None = None, **headers: Any) -> Any:
    message_id = message_id or envelope.new_id()
    return SimpleNamespace(service=service, kind=kind, action="work", handler="work", correlation_id=message_id,
                           message_id=message_id, reply_to="amq.reply" if kind == "call" else None,
                           body_headers=headers, decide=Decisions(), started=time.perf_counter(),
                           deadline=headers.get("deadline"), cancelled=False)


def ran(result: Any = "ran") -> Any:
    def call_next(_: Any) -> Any:
        return SimpleNamespace(verdict="ran", body=None, forward=None, outcome=Outcome(OutcomeKind.DONE), result=result)
    return call_next


def counted(store: RevocationStore, *names: str) -> list[tuple[str, tuple[Any, ...]]]:
    """Record every call of the store's methods ``names`` (each a Redis round trip)."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for name in names:
        real = getattr(store, name)
        setattr(store, name, lambda *args, _real=real, _name=name: calls.append((_name, args)) or _real(*args))
    return calls


# --- no Redis needed -------------------------------------------------------------------
def test_a_revoked_error_reply_is_raised_as_revoked_a_remote_error():
    doc = envelope.decode_reply(envelope.error_reply("work: message m-1 was revoked", "Revoked", "m-1"))
    exc = envelope.remote_error(doc)
    assert isinstance(exc, Revoked) and isinstance(exc, RemoteError)
    assert exc.error_type == "Revoked" and exc.message_id == "m-1"
    assert Revoked.retryable is False  # a handler that raises it is never retried


def test_cancelled_and_idempotency_key_come_from_the_run_scope_the_middleware_set():
    cancel = Cancellation()
    token = scope.set(RunScope(cancel=cancel, idempotency_key="k-1"))
    try:
        call = CallContext("svc", "work", "c-1", "t-1", None)
    finally:
        scope.reset(token)
    assert call.cancelled is False and call.idempotency_key == "k-1"
    cancel.cancelled = True
    assert call.cancelled is True  # read through the context it was built with, from any thread
    plain = CallContext("svc", "work", "c-2", "t-2", None)
    assert plain.cancelled is False and plain.idempotency_key is None
    assert current_call() is None


def test_revoke_command_exits_4_when_redis_cannot_be_reached():
    result = CliRunner().invoke(main, ["revoke", "svc", "m-1", "--redis", DEAD_REDIS])
    assert result.exit_code == 4, result.output
    assert "cannot revoke" in result.output


def test_revoke_command_needs_a_message_id():
    assert CliRunner().invoke(main, ["revoke", "svc"]).exit_code == 2


def test_with_redis_down_messages_run_and_one_warning_says_so():
    checks = RevokeChecks(RevocationStore(DEAD_REDIS, timeout=0.2))
    service = unique_name("svc")
    with capture_logs("amqprpc") as logs:
        outcomes = [checks.consume_scope(ran(), delivery(service)).verdict for _ in range(3)]
    checks.worker_stopped(None)
    assert outcomes == ["ran"] * 3
    warnings = [line for line in logs if line["log_level"] == "warning"]
    assert len(warnings) == 1 and "Redis unreachable" in warnings[0]["event"]


# --- against the real Redis -------------------------------------------------------------
pytestmark_redis = pytest.mark.integration


@pytest.fixture
def store(redis_available) -> Any:
    store = RevocationStore(prefix=unique_name("amqprpc-test-revoked"))
    yield store
    for key in store.redis.scan_iter(match=f"{store.prefix}:*"):
        store.redis.delete(key)


@pytestmark_redis
def test_the_store_keeps_a_revocation_for_its_ttl_and_flags_the_service(store):
    service = unique_name("svc")
    assert not store.any_revoked(service)
    assert store.revoke(service, ["m-1", "m-2"], ttl=60) == 2
    assert store.any_revoked(service) and store.is_revoked(service, "m-1") and not store.is_revoked(service, "m-3")
    assert store.revoked_of(service, ["m-2", "m-3"]) == (True, [True, False])
    assert 59_000 < store.redis.pttl(store.key(service, "m-1")) <= 60_000
    store.revoke(service, ["m-4"], ttl=1)  # a shorter ttl later never shortens the flag
    assert store.redis.pttl(store.flag_key(service)) > 50_000


@pytestmark_redis
def test_revoke_command_stores_the_revocation_and_exits_0(redis_available):
    store, service = RevocationStore(), unique_name("svc")  # the command's own (default) keys
    try:
        result = CliRunner().invoke(main, ["revoke", service, "m-1", "m-2", "--revoke-ttl", "30"])
        assert result.exit_code == 0, result.output
        assert "revoked 2 messages" in result.output
        assert store.is_revoked(service, "m-2") and store.any_revoked(service)
        assert 0 < store.redis.pttl(store.key(service, "m-1")) <= 30_000
    finally:
        store.forget(service)


@pytestmark_redis
def test_a_revoked_cast_is_acked_unrun_and_a_revoked_call_answered_revoked(store):
    checks = RevokeChecks(store)
    service = unique_name("svc")
    cast, call, other = delivery(service), delivery(service, "call"), delivery(service)
    store.revoke(service, [cast.message_id, call.message_id], ttl=60)
    revoked_cast = checks.consume_scope(ran(), cast)
    assert revoked_cast.verdict == "ack" and revoked_cast.outcome.kind is OutcomeKind.REVOKED
    revoked_call = checks.consume_scope(ran(), call)
    assert revoked_call.outcome.kind is OutcomeKind.REVOKED and revoked_call.forward is None
    assert isinstance(envelope.remote_error(envelope.decode_reply(revoked_call.body)), Revoked)
    assert checks.consume_scope(ran(), other).verdict == "ran"
    checks.worker_stopped(None)


@pytestmark_redis
def test_no_lookup_per_message_while_the_service_has_no_revocations(store):
    checks, service = RevokeChecks(store), unique_name("svc")
    lookups = counted(store, "is_revoked")
    for _ in range(20):
        checks.consume_scope(ran(), delivery(service))
    assert lookups == []  # the "revocations exist" flag is absent: nothing looked up per message
    store.revoke(service, ["elsewhere"], ttl=60)
    time.sleep(checks.flag_cache + 0.05)
    checks.consume_scope(ran(), delivery(service))
    assert len(lookups) == 1
    checks.worker_stopped(None)


@pytestmark_redis
def test_a_running_handler_sees_cancelled_within_a_second(store):
    checks = RevokeChecks(store)
    service = unique_name("svc")
    running = delivery(service)
    started, seen = threading.Event(), {}

    def handler(_: Any) -> Any:
        started.set()
        begun = time.monotonic()
        while not current_call_cancelled() and time.monotonic() - begun < 5:
            time.sleep(0.01)
        seen["after"] = time.monotonic()
        return SimpleNamespace(verdict="ran", body=None, forward=None, outcome=Outcome(OutcomeKind.DONE))

    def current_call_cancelled() -> bool:  # current_call() in a handler the dispatcher runs for `running`
        return HandlerCall(service, "work", running.message_id, "t", None, running).public().cancelled

    thread = threading.Thread(target=checks.consume_scope, args=(handler, running))
    thread.start()
    assert started.wait(5)
    time.sleep(0.3)
    revoked_at = time.monotonic()
    store.revoke(service, [running.message_id], ttl=60)
    thread.join(5)
    assert seen["after"] - revoked_at < 1.0
    wait_for(lambda: not checks._running)
    checks.worker_stopped(None)


@pytestmark_redis
def test_a_busy_worker_looks_up_twice_a_second_at_most_not_per_message(store):
    checks, service = RevokeChecks(store), unique_name("svc")
    round_trips = counted(store, "any_revoked", "is_revoked", "revoked_of")

    def quick(delivery: Any) -> Any:
        time.sleep(0.01)
        return ran()(delivery)

    began = time.monotonic()
    for _ in range(100):
        checks.consume_scope(quick, delivery(service))
    elapsed = time.monotonic() - began
    checks.worker_stopped(None)
    # The flag read by handler threads (every flag_cache s) and the poller (every poll_interval s
    # while something runs): bounded by time, not by the 100 messages.
    assert len(round_trips) <= 2 * (elapsed / 0.5 + 1), (round_trips, elapsed)
    assert not any(name == "is_revoked" for name, _ in round_trips)


@pytest.mark.integration
def test_the_dashboard_revokes_a_message_for_every_worker_of_its_service():
    from amqprpc.config import redis_url

    from amqprpc.dashboard.deadletters import Operations
    from amqprpc.middleware.revoke import RevocationStore
    from amqprpc.testing import unique_name

    service, message_id = unique_name("dash-revoke"), unique_name("msg")
    operations = Operations("amqp://unused", redis_url=redis_url())
    result = operations.run("revoke", service, unique_name("action").replace(".", "-")[:60], "tester",
                            {"message_id": message_id})
    store = RevocationStore(redis_url())
    try:
        assert result["ok"] and store.is_revoked(service, message_id)
    finally:
        store.forget(service)
