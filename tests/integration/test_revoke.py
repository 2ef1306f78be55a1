"""Revoke against the real broker and Redis: queued messages revoked never run and are
counted (stats, Prometheus); a revoked call is answered Revoked; a running handler polling
``current_call().cancelled`` stops within a second; the message ids the client makes known
are the ones workers see."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from amqprpc import Retry, Revoked, RpcClient, current_call
from amqprpc.middleware import Middleware
from amqprpc.middleware.revoke import RevocationStore, RevokeChecks
from amqprpc.ops.registry import describe_worker
from amqprpc.testing import running_worker, wait_for
from amqprpc.outcome import OutcomeKind

pytestmark = pytest.mark.integration


@pytest.fixture
def revocations(redis_available, service_name) -> Any:
    store = RevocationStore()
    yield store
    store.forget(service_name)


def checks_of(worker: Any) -> RevokeChecks:
    return next(each for each in worker.hooks.middleware if isinstance(each, RevokeChecks))


def test_50_casts_revoked_while_queued_never_run_and_are_counted(service, broker_url, revocations):
    ran: list[Any] = []
    service.handler("work")(lambda payload: ran.append(payload["n"]))
    with RpcClient("tests", broker_url=broker_url) as client:
        with running_worker(service, broker_url=broker_url, delete=False):
            pass  # declares the queue; nothing consumes it now
        ids = [client.cast(service.name, "work", {"n": n}) for n in range(50)]
        assert len(set(ids)) == 50 and all(isinstance(each, str) and each for each in ids)
        client.revoke(service.name, *ids)
        client.cast(service.name, "work", {"n": "kept"})
        with running_worker(service, broker_url=broker_url, concurrency=4) as worker:
            wait_for(lambda: worker.stats["revoked"] == 50 and ran == ["kept"], timeout=20)
            assert worker.stats["succeeded"] == 1
            assert describe_worker(worker)["stats"]["revoked"] == 50  # what the registry announces
    assert ran == ["kept"]


def test_revoked_deliveries_are_counted_in_prometheus(service, broker_url, revocations):
    from prometheus_client import REGISTRY

    from amqprpc.middleware.metrics import Metrics

    service.handler("work")(lambda payload: None)
    with RpcClient("tests", broker_url=broker_url) as client:
        with running_worker(service, broker_url=broker_url, delete=False):
            pass
        ids = [client.cast(service.name, "work", {}) for _ in range(3)]
        client.revoke(service.name, *ids)
        with running_worker(service, broker_url=broker_url, middleware=[Metrics()]) as worker:
            wait_for(lambda: worker.stats["revoked"] == 3)
    labels = {"service": service.name, "action": "work", "outcome": OutcomeKind.REVOKED.value}
    assert REGISTRY.get_sample_value("amqprpc_requests_total", labels) == 3


def test_a_revoked_call_waiting_its_turn_is_answered_revoked(service, broker_url, revocations):
    release, ran = threading.Event(), []
    service.handler("block")(lambda payload: release.wait(10))
    service.handler("work")(lambda payload: ran.append(1) or "done")
    with running_worker(service, broker_url=broker_url, concurrency=1) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        client.cast(service.name, "block", {})
        wait_for(lambda: worker.stats["received"] >= 1)
        future = client.call_async(service.name, "work", {}, timeout=10)
        assert isinstance(future.message_id, str)
        client.revoke(service.name, future.message_id)
        checks = checks_of(worker)
        wait_for(lambda: checks._flags.get(service.name, (False, 0.0))[0])  # the poller saw revocations exist
        release.set()
        with pytest.raises(Revoked):
            future.result(10)
        assert ran == [] and worker.stats["revoked"] == 1


def test_a_running_handler_polling_cancelled_stops_within_a_second(service, broker_url, revocations):
    started, stopped = threading.Event(), {}

    @service.handler("crunch")
    def crunch(payload: dict) -> Any:
        started.set()
        while not current_call().cancelled:  # type: ignore[union-attr]
            time.sleep(0.01)
            if time.monotonic() - stopped.setdefault("began", time.monotonic()) > 10:
                return "never cancelled"
        stopped["at"] = time.monotonic()
        raise Revoked("stopped between steps")

    with running_worker(service, broker_url=broker_url) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        future = client.call_async(service.name, "crunch", {}, timeout=15)
        assert started.wait(10)
        time.sleep(0.6)  # running well past the first poll
        revoked_at = time.monotonic()
        client.revoke(service.name, future.message_id)
        with pytest.raises(Revoked):
            future.result(10)
        assert stopped["at"] - revoked_at < 1.0
        wait_for(lambda: worker.stats["revoked"] == 1)
        assert worker.stats["failed"] == 0


def test_a_cast_that_stops_when_cancelled_is_acked_not_dead_lettered(service, broker_url, revocations):
    started, done = threading.Event(), threading.Event()

    @service.handler("crunch")
    def crunch(payload: dict) -> None:
        started.set()
        while not current_call().cancelled:  # type: ignore[union-attr]
            time.sleep(0.01)
        done.set()
        raise Revoked()

    with running_worker(service, broker_url=broker_url) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        message_id = client.cast(service.name, "crunch", {})
        assert started.wait(10)
        client.revoke(service.name, message_id)
        assert done.wait(5)
        wait_for(lambda: worker.stats["revoked"] == 1)
        assert worker.stats["dead_lettered"] == 0


def test_with_redis_down_a_worker_runs_everything_and_warns_once(service, broker_url):
    from amqprpc.testing import capture_logs

    ran: list[int] = []
    service.handler("work")(lambda payload: ran.append(1))
    with capture_logs("amqprpc") as logs, \
            running_worker(service, broker_url=broker_url, redis_url="redis://127.0.0.1:1/0") as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        for _ in range(5):
            client.cast(service.name, "work", {})
        wait_for(lambda: len(ran) == 5)
        assert worker.stats["revoked"] == 0
    unreachable = [line for line in logs if "Redis unreachable" in str(line.get("event"))]
    assert len(unreachable) == 1


class PutOffOnce(Middleware):
    """Stands in for a countdown/ETA middleware: the first time a message passes, it goes
    back through a delay bucket (decide.later) instead of running."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: set[str] = set()
        self.put_off = threading.Event()

    def consume_scope(self, call_next: Any, delivery: Any) -> Any:
        if delivery.message_id not in self.seen:
            self.seen.add(delivery.message_id)
            self.put_off.set()
            return delivery.decide.later(delivery, self.delay, OutcomeKind.RETRIED)
        return call_next(delivery)


def test_a_message_revoked_while_it_waits_on_a_countdown_never_runs(service, broker_url, revocations):
    ran: list[int] = []
    service.handler("work")(lambda payload: ran.append(1))
    countdown = PutOffOnce(1.0)
    with running_worker(service, broker_url=broker_url, middleware=[countdown]) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        message_id = client.cast(service.name, "work", {})
        assert countdown.put_off.wait(10)
        client.revoke(service.name, message_id)
        wait_for(lambda: worker.stats["revoked"] == 1, timeout=15)
        assert ran == []


def test_a_cast_revoked_while_its_retry_waits_is_not_retried(service, broker_url, revocations):
    attempts: list[int] = []

    @service.handler("flaky", retry=Retry(max_attempts=3, base_delay=1.0, jitter=False))
    def flaky(payload: dict) -> None:
        attempts.append(1)
        raise ConnectionError("downstream hiccup")

    with running_worker(service, broker_url=broker_url) as worker, \
            RpcClient("tests", broker_url=broker_url) as client:
        message_id = client.cast(service.name, "flaky", {})
        wait_for(lambda: worker.stats["retried"] == 1)
        client.revoke(service.name, message_id)
        wait_for(lambda: worker.stats["revoked"] == 1, timeout=15)
        assert attempts == [1] and worker.stats["dead_lettered"] == 0


def test_the_async_client_makes_ids_known_and_revokes(service, broker_url, revocations):
    import asyncio

    from amqprpc import AsyncRpcClient

    started = threading.Event()
    ran: list[int] = []

    @service.handler("crunch")
    def crunch(payload: dict) -> None:
        started.set()
        while not current_call().cancelled:  # type: ignore[union-attr]
            time.sleep(0.01)
        raise Revoked("stopped")

    service.handler("note")(lambda payload: ran.append(1))

    async def scenario() -> None:
        async with AsyncRpcClient("tests", broker_url=broker_url) as client:
            answer = client.call_async(service.name, "crunch", {}, timeout=15)
            assert isinstance(answer.message_id, str)  # type: ignore[attr-defined]
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            await client.revoke(service.name, answer.message_id)  # type: ignore[attr-defined]
            with pytest.raises(Revoked):
                await answer
            assert isinstance(await client.cast(service.name, "note", {}), str)

    with running_worker(service, broker_url=broker_url) as worker:
        asyncio.run(scenario())
        wait_for(lambda: worker.stats["revoked"] == 1 and ran == [1])
