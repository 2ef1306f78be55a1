"""Idempotency keys against the real broker and Redis: one key sent 5 times runs once and all
5 calls get the same result; repeated casts are acked unrun and counted; a failing first
attempt's retry (same message id, same key) is not taken for a duplicate of itself."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from amqprpc import Retry, RpcClient, current_call
from amqprpc.middleware.idempotency import IdempotencyStore
from amqprpc.testing import running_worker, unique_name, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def idempotency_keys(redis_available, service_name) -> Any:
    store = IdempotencyStore()
    yield store
    for key in store.redis.scan_iter(match=store.key(service_name, "*")):
        store.redis.delete(key)


def test_one_key_sent_5_times_runs_once_and_all_5_calls_get_the_same_result(service, broker_url,
                                                                           idempotency_keys):
    runs: list[str | None] = []
    lock = threading.Lock()

    @service.handler("charge")
    def charge(payload: dict) -> dict:
        with lock:
            runs.append(current_call().idempotency_key)  # type: ignore[union-attr]
        time.sleep(0.3)  # the repeats arrive while the first still runs: they wait for it
        return {"charge_id": unique_name("ch"), "amount": payload["amount"]}

    key = unique_name("order")
    with running_worker(service, broker_url=broker_url, concurrency=4) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        futures = [client.call_async(service.name, "charge", {"amount": 10}, timeout=10, idempotency_key=key)
                   for _ in range(4)]
        results = [future.result(10) for future in futures]
        results.append(client.call(service.name, "charge", {"amount": 10}, timeout=10, idempotency_key=key))
        assert runs == [key]
        assert all(result == results[0] for result in results) and len(results) == 5
        wait_for(lambda: worker.stats["deduplicated"] == 4)
        assert worker.stats["succeeded"] == 1


def test_repeated_casts_are_acked_unrun_and_counted(service, broker_url, idempotency_keys):
    runs: list[int] = []
    service.handler("touch")(lambda payload: runs.append(1))
    with running_worker(service, broker_url=broker_url) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        ids = [client.cast(service.name, "touch", {}, idempotency_key="same") for _ in range(3)]
        assert len(set(ids)) == 3
        wait_for(lambda: worker.stats["deduplicated"] == 2 and len(runs) == 1)
        client.cast(service.name, "touch", {}, idempotency_key="other")
        wait_for(lambda: len(runs) == 2)


def test_a_failing_first_attempt_is_retried_and_repeats_then_get_its_result(service, broker_url,
                                                                            idempotency_keys):
    attempts: list[int] = []

    @service.handler("flaky", retry=Retry(max_attempts=3, base_delay=0.05, jitter=False))
    def flaky(payload: dict) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("downstream hiccup")
        return f"done after {len(attempts)}"

    with running_worker(service, broker_url=broker_url) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        assert client.call(service.name, "flaky", {}, timeout=10, idempotency_key="k") == "done after 2"
        assert client.call(service.name, "flaky", {}, timeout=10, idempotency_key="k") == "done after 2"
        assert len(attempts) == 2
        wait_for(lambda: worker.stats["deduplicated"] == 1 and worker.stats["retried"] == 1)


def test_cast_and_call_async_make_known_the_message_ids_workers_see(service, broker_url, idempotency_keys):
    seen: list[str] = []
    service.handler("note")(lambda payload: seen.append(current_call().correlation_id))  # type: ignore[union-attr]
    with running_worker(service, broker_url=broker_url), RpcClient("tests", broker_url=broker_url) as client:
        future = client.call_async(service.name, "note", {}, timeout=10)
        future.result(10)
        cast_id = client.cast(service.name, "note", {})
        wait_for(lambda: len(seen) == 2)
        assert seen == [future.message_id, cast_id]  # the envelope's correlation id is its message id
        parsed = client.call_async(service.name, "note", {}, timeout=10, returns=type(None))
        parsed.result(10)
        assert isinstance(parsed.message_id, str) and parsed.message_id == seen[-1]
