"""Idempotency keys without a broker: the Idempotency middleware driven directly against the
real Redis (a stand-in delivery and decisions), and with Redis down. The real-broker check
(one key sent 5 times runs once, all 5 calls get the same result) is in test_idempotency.py."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from amqprpc import CallContext, Service
from amqprpc.middleware.idempotency import Idempotency, IdempotencyStore
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.testing import capture_logs, unique_name
from amqprpc.wire import envelope
from test_revoke_store import DEAD_REDIS, Decisions


def delivery(service: str, key: str | None, kind: str = "call", message_id: str | None = None,
             deadline: float | None = None) -> Any:
    headers: dict[str, Any] = {} if key is None else {"idempotency_key": key}
    if deadline is not None:
        headers["deadline"] = deadline
    message_id = message_id or envelope.new_id()
    return SimpleNamespace(service=service, kind=kind, action="work", handler="work", correlation_id=message_id,
                           message_id=message_id, reply_to="amq.reply" if kind == "call" else None,
                           body_headers=headers, decide=Decisions(), started=time.perf_counter(),
                           deadline=headers.get("deadline"))


class Handler:
    """call_next: counts runs, replies with the run number (or fails, or asks for a retry)."""

    def __init__(self, delay: float = 0.0, outcome: OutcomeKind = OutcomeKind.REPLIED) -> None:
        self.runs = 0
        self.delay = delay
        self.outcome = outcome
        self.keys: list[str | None] = []
        self.lock = threading.Lock()

    def __call__(self, delivery: Any) -> Any:
        with self.lock:
            self.runs += 1
            run = self.runs
        # What the worker's CallContext (current_call()) for this run is built with.
        self.keys.append(CallContext("svc", "work", delivery.message_id, "t", None).idempotency_key)
        time.sleep(self.delay)
        if self.outcome is OutcomeKind.REPLIED:
            return SimpleNamespace(body=envelope.ok_reply({"run": run}, delivery.message_id), forward=None,
                                   outcome=Outcome(OutcomeKind.REPLIED))
        if self.outcome is OutcomeKind.FAILED:
            return SimpleNamespace(body=envelope.error_reply("boom", "ValueError", delivery.message_id),
                                   forward=None, outcome=Outcome(OutcomeKind.FAILED, "ValueError"))
        return SimpleNamespace(body=None, forward="retry", outcome=Outcome(self.outcome, "ValueError"))


def data_of(decision: Any) -> Any:
    doc = envelope.decode_reply(decision.body)
    return doc["data"] if doc["success"] else (doc["error_type"], doc["error"])


@pytest.fixture
def middleware(redis_available) -> Any:
    store = IdempotencyStore(prefix=unique_name("amqprpc-test-idem"))
    idempotency = Idempotency(store)
    idempotency.worker_starting(SimpleNamespace(service=Service(unique_name("svc"))))
    yield idempotency
    for key in store.redis.scan_iter(match=f"{store.prefix}:*"):
        store.redis.delete(key)


pytestmark = pytest.mark.integration


def test_a_key_runs_once_and_every_repeat_gets_the_first_reply(middleware):
    handler, service = Handler(), middleware.service.name
    decisions = [middleware.consume_scope(handler, delivery(service, "k-1")) for _ in range(5)]
    assert handler.runs == 1
    assert [data_of(decision) for decision in decisions] == [{"run": 1}] * 5
    assert [decision.outcome.kind for decision in decisions] == [OutcomeKind.REPLIED] + [OutcomeKind.DEDUPLICATED] * 4
    assert handler.keys == ["k-1"]  # current_call().idempotency_key
    middleware.consume_scope(handler, delivery(service, "k-2"))
    middleware.consume_scope(handler, delivery(service, None))
    assert handler.runs == 3


def test_a_repeat_cast_is_acked_unrun(middleware):
    handler, service = Handler(outcome=OutcomeKind.REPLIED), middleware.service.name
    first = middleware.consume_scope(handler, delivery(service, "k-1", "cast"))
    again = middleware.consume_scope(handler, delivery(service, "k-1", "cast"))
    assert handler.runs == 1 and first.outcome.kind is OutcomeKind.REPLIED
    assert again.verdict == "ack" and again.outcome.kind is OutcomeKind.DEDUPLICATED


def test_a_repeat_waits_for_the_first_while_it_runs(middleware):
    handler, service = Handler(delay=0.5), middleware.service.name
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(middleware.consume_scope(
        handler, delivery(service, "k-1", deadline=time.time() + 5))))
    first.start()
    time.sleep(0.1)
    began = time.monotonic()
    repeat = middleware.consume_scope(handler, delivery(service, "k-1", deadline=time.time() + 5))
    first.join(5)
    assert handler.runs == 1
    assert data_of(repeat) == data_of(results[0]) == {"run": 1}
    assert repeat.outcome.kind is OutcomeKind.DEDUPLICATED and time.monotonic() - began < 1.0


def test_a_repeat_gives_up_waiting_at_its_deadline(middleware):
    handler, service = Handler(delay=1.5), middleware.service.name
    first = threading.Thread(target=middleware.consume_scope, args=(handler, delivery(service, "k-1",
                                                                                      deadline=time.time() + 5)))
    first.start()
    time.sleep(0.1)
    began = time.monotonic()
    repeat = middleware.consume_scope(handler, delivery(service, "k-1", deadline=time.time() + 0.4))
    assert time.monotonic() - began < 0.9
    assert data_of(repeat)[0] == "CallTimeout" and repeat.outcome.kind is OutcomeKind.EXPIRED
    first.join(5)
    assert handler.runs == 1


def test_the_first_attempts_retry_is_not_a_duplicate_of_itself(middleware):
    service = middleware.service.name
    failing = Handler(outcome=OutcomeKind.RETRIED)
    retried = middleware.consume_scope(failing, delivery(service, "k-1", message_id="m-1"))
    assert retried.outcome.kind is OutcomeKind.RETRIED
    succeeding = Handler()
    again = middleware.consume_scope(succeeding, delivery(service, "k-1", message_id="m-1"))  # the retry's copy
    assert succeeding.runs == 1 and data_of(again) == {"run": 1}
    late = middleware.consume_scope(succeeding, delivery(service, "k-1", message_id="m-1"))  # redelivered once more
    assert succeeding.runs == 1 and late.outcome.kind is OutcomeKind.DEDUPLICATED


def test_a_final_error_is_what_repeats_get(middleware):
    handler, service = Handler(outcome=OutcomeKind.FAILED), middleware.service.name
    middleware.consume_scope(handler, delivery(service, "k-1"))
    repeat = middleware.consume_scope(handler, delivery(service, "k-1"))
    assert handler.runs == 1 and data_of(repeat) == ("ValueError", "boom")


def test_a_claim_whose_holder_missed_its_deadline_is_taken_over(middleware):
    store, service = middleware.store, middleware.service.name
    store.claim(service, "k-1", {"state": "running", "message_id": "lost", "until": time.time() - 5}, 60)
    handler = Handler()
    taken = middleware.consume_scope(handler, delivery(service, "k-1", deadline=time.time() + 5))
    assert handler.runs == 1 and data_of(taken) == {"run": 1}


def test_the_window_is_the_handlers_then_the_services(middleware):
    service = middleware.service
    service.dedup_window = 120
    service.handler("short", dedup_window=2)(lambda payload: None)
    handler = Handler()
    middleware.consume_scope(handler, delivery(service.name, "k-1"))
    assert 119_000 < middleware.store.redis.pttl(middleware.store.key(service.name, "k-1")) <= 120_000
    short = delivery(service.name, "k-2")
    short.handler = "short"
    middleware.consume_scope(handler, short)
    assert 0 < middleware.store.redis.pttl(middleware.store.key(service.name, "k-2")) <= 2_000


def test_with_redis_down_every_copy_runs_with_one_warning():
    idempotency = Idempotency(IdempotencyStore(DEAD_REDIS, timeout=0.2))
    handler = Handler()
    with capture_logs("amqprpc") as logs:
        for _ in range(3):
            idempotency.consume_scope(handler, delivery("svc", "k-1"))
    assert handler.runs == 3  # at-least-once, as without a key
    assert handler.keys == ["k-1"] * 3
    assert len([line for line in logs if line["log_level"] == "warning"]) == 1


def test_the_in_memory_client_runs_the_same_middleware(middleware):
    from amqprpc.testing import InMemoryClient

    service = middleware.service
    runs: list[int] = []
    service.handler("charge")(lambda payload: runs.append(1) or {"charged": len(runs)})
    client = InMemoryClient(service, middleware=[middleware])
    replies = [client.call(service.name, "charge", {}, idempotency_key="k-1") for _ in range(3)]
    assert replies == [{"charged": 1}] * 3 and runs == [1]
    assert isinstance(client.cast(service.name, "charge", {}, idempotency_key="k-1"), str)
    assert runs == [1]  # the repeated cast was acked unrun


def test_long_keys_that_share_a_beginning_are_different_keys(middleware):
    handler, service = Handler(), middleware.service.name
    first, second = "x" * 300 + "-1", "x" * 300 + "-2"
    middleware.consume_scope(handler, delivery(service, first))
    middleware.consume_scope(handler, delivery(service, second))
    repeat = middleware.consume_scope(handler, delivery(service, second))
    assert handler.runs == 2 and data_of(repeat) == {"run": 2}
    assert handler.keys == [first, second]  # the handler sees the key as sent


def test_a_dead_letter_frees_its_key_so_a_replay_runs(middleware):
    service = middleware.service.name
    dead = Handler(outcome=OutcomeKind.DEAD_LETTERED)
    middleware.consume_scope(dead, delivery(service, "k-1", "cast", message_id="m-1"))
    assert middleware.store.get(service, "k-1") is None
    replayed = Handler()
    middleware.consume_scope(replayed, delivery(service, "k-1", "cast", message_id="m-1"))  # dlq --replay
    assert replayed.runs == 1
    middleware.consume_scope(replayed, delivery(service, "k-1", "cast"))  # and now it is used
    assert replayed.runs == 1
