"""The time-limit core without a broker: the watchdog raises TimeLimitExceeded inside a
busy pure-Python thread at its limit, abandons one stuck in a blocking call after the grace,
takes back an exception that has not landed when the call ended in time, and wakes once per
limit, not once per call."""
from __future__ import annotations

import threading
import time

import pytest

from amqprpc import Service, TimeLimitExceeded
from amqprpc.middleware.timelimit import TimeLimit, Watch, Watchdog, raise_in_thread
from amqprpc.testing import wait_for


def spin_forever() -> None:
    while True:
        pass


def run_in_thread(target, *args):
    """Run ``target`` in a thread; returns (thread, box) where box gets 'error' or 'result'."""
    box: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            box["result"] = target(*args)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
        box["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_raise_in_thread_stops_a_busy_loop():
    thread, box = run_in_thread(spin_forever)
    time.sleep(0.05)
    assert raise_in_thread(thread.ident)
    thread.join(2)
    assert not thread.is_alive() and isinstance(box["error"], TimeLimitExceeded)


def test_time_limit_stops_pure_python_at_the_limit_and_nothing_is_abandoned():
    abandoned: list[Watch] = []
    limit = TimeLimit(hard_grace=1.0, on_abandon=abandoned.append, limit_of=lambda delivery: 0.3)

    def scope() -> None:
        limit.handle_scope(lambda delivery: spin_forever(), _delivery())

    thread, box = run_in_thread(scope)
    thread.join(3)
    assert isinstance(box["error"], TimeLimitExceeded) and box["error"].limit == 0.3
    assert "time limit of 0.3 s" in str(box["error"])
    assert 0.25 <= box["elapsed"] <= 0.8
    time.sleep(1.2)  # past the grace: the watch ended, so nothing is abandoned
    assert abandoned == [] and limit.counts == {"timed_out": 1, "abandoned": 0}
    assert limit.watchdog.watching == 0
    limit.watchdog.stop()


def test_a_blocking_call_is_abandoned_after_the_grace():
    abandoned: list[Watch] = []
    release = threading.Event()
    limit = TimeLimit(hard_grace=0.3, on_abandon=abandoned.append, limit_of=lambda delivery: 0.2)
    thread, box = run_in_thread(lambda: limit.handle_scope(lambda delivery: release.wait(30), _delivery()))
    wait_for(lambda: abandoned, timeout=3)
    started_waiting = time.monotonic()
    assert abandoned[0].ident == thread.ident and limit.counts == {"timed_out": 1, "abandoned": 1}
    release.set()  # the blocking call returns: the pending exception lands in the thread then
    thread.join(2)
    assert isinstance(box.get("error"), TimeLimitExceeded) and time.monotonic() - started_waiting < 2
    limit.watchdog.stop()


def test_a_call_that_ends_in_time_is_not_interrupted_later():
    limit = TimeLimit(hard_grace=None, limit_of=lambda delivery: 0.2)

    def many() -> int:
        total = 0
        for _ in range(200):
            total += limit.handle_scope(lambda delivery: 1, _delivery())
        time.sleep(0.4)  # past every limit: nothing pending may land here
        return total

    thread, box = run_in_thread(many)
    thread.join(5)
    assert box.get("result") == 200 and limit.counts["timed_out"] == 0
    limit.watchdog.stop()


def test_a_result_returned_as_the_limit_passes_is_never_an_exception_after_the_scope():
    """A handler that ends right at its limit: the exception either ends the scope or is
    taken back; it never lands in the code after it."""
    limit = TimeLimit(hard_grace=None, limit_of=lambda delivery: 0.05)
    outcomes = {"returned": 0, "timed_out": 0}

    def busy_until(deadline: float) -> str:
        while time.monotonic() < deadline:
            pass
        return "done"

    def loop() -> None:
        for _ in range(20):
            try:
                limit.handle_scope(lambda delivery: busy_until(time.monotonic() + 0.05), _delivery())
                outcomes["returned"] += 1
            except TimeLimitExceeded:
                outcomes["timed_out"] += 1
            for _ in range(20000):  # Python code after the scope: a stray exception would land here
                pass

    thread, box = run_in_thread(loop)
    thread.join(10)
    assert "error" not in box, box
    assert outcomes["returned"] + outcomes["timed_out"] == 20
    limit.watchdog.stop()


def test_the_watchdog_wakes_once_per_limit_not_once_per_call():
    wakes = []
    watchdog = Watchdog(None, wakes.append, wakes.append)
    original = watchdog._changed.wait

    def counting_wait(timeout=None):
        wakes.append(timeout)
        return original(timeout)

    watchdog._changed.wait = counting_wait  # type: ignore[method-assign]
    watchdog.start()
    time.sleep(0.05)
    before = len(wakes)
    for _ in range(500):
        watchdog.unwatch(watchdog.watch(5.0))
    time.sleep(0.05)
    assert len(wakes) - before <= 2
    watchdog.stop()


def test_handler_time_limit_option():
    service = Service("tl-options")

    @service.handler(time_limit=2)
    def slow(payload: dict) -> None: ...

    @service.handler
    def quick(payload: dict) -> None: ...

    @service.event("x.happened", time_limit=1.5)
    def happened(payload: dict) -> None: ...

    assert service.time_limit("slow") == 2.0 and service.time_limit("quick") is None
    assert service.time_limit("happened", event=True) == 1.5 and service.uses_time_limits
    with pytest.raises(ValueError):
        service.handler("bad", time_limit=0)


class _Delivery:
    handler = action = "spin"
    message_id = "m-1"
    kind = "call"


def _delivery():  # what handle_scope reads of a delivery when limit_of is given
    return _Delivery()


def test_through_the_dispatcher_a_time_limit_is_the_handlers_error_and_follows_its_retry_policy():
    """The same pipeline a worker runs (InMemoryClient): the time limit raises inside the
    handler, the caller gets TimeLimitExceeded, a retry policy retries it, a cast that keeps
    timing out is dead-lettered."""
    from amqprpc import RemoteError, Retry
    from amqprpc.testing import InMemoryClient

    service = Service("tl-dispatch")
    runs = {"spin": 0, "retried": 0}

    @service.handler(time_limit=0.2)
    def spin(payload: dict) -> None:
        runs["spin"] += 1
        while True:
            pass

    @service.handler(time_limit=0.2, retry=Retry(max_attempts=2, base_delay=0.01, jitter=False))
    def flaky(payload: dict) -> str:
        runs["retried"] += 1
        if runs["retried"] == 1:
            while True:
                pass
        return "second time lucky"

    @service.handler
    def quick(payload: dict) -> str:
        return "ok"

    @service.event("tl.happened", time_limit=0.2)
    def happened(payload: dict) -> None:
        while True:
            pass

    limit = TimeLimit(default=5, hard_grace=None)
    client = InMemoryClient(service, middleware=[limit])
    started = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        client.call("tl-dispatch", "spin", {})
    assert caught.value.error_type == "TimeLimitExceeded" and time.monotonic() - started < 1.5
    assert client.call("tl-dispatch", "flaky", {}) == "second time lucky" and runs["retried"] == 2
    assert client.call("tl-dispatch", "quick", {}) == "ok"
    client.cast("tl-dispatch", "spin", {})
    assert [letter.error_type for letter in client.dead_letters] == ["TimeLimitExceeded"]
    assert limit.counts["timed_out"] == 3

    client.publish_event("tl.happened", {})
    assert [letter.error_type for letter in client.dead_letters] == ["TimeLimitExceeded"] * 2
    assert limit.counts["timed_out"] == 4
    limit.watchdog.stop()


def test_a_handlers_own_time_limit_holds_without_configuring_anything():
    """Worker and InMemoryClient add TimeLimit themselves when a handler has a time_limit."""
    from amqprpc import RemoteError, Worker
    from amqprpc.testing import InMemoryClient

    service = Service("tl-auto")

    @service.handler(time_limit=0.2)
    def spin(payload: dict) -> None:
        while True:
            pass

    assert any(isinstance(each, TimeLimit) for each in Worker(service, broker_url="amqp://127.0.0.1:1//").hooks.middleware)
    assert not any(isinstance(each, TimeLimit) for each in Worker(Service("tl-none"), broker_url="amqp://127.0.0.1:1//").hooks.middleware)
    with pytest.raises(RemoteError) as caught:
        InMemoryClient(service).call("tl-auto", "spin", {})
    assert caught.value.error_type == "TimeLimitExceeded"
