"""CallWaiter, the Future of a blocking call: settled once by whichever thread comes first,
waited on with a bound, its done-callbacks (the middleware's after_settle) run once."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from amqprpc.client.waiter import CallWaiter


def test_a_result_set_from_another_thread_wakes_the_waiter():
    waiter = CallWaiter()
    threading.Timer(0.05, waiter.set_result, ("data",)).start()
    assert waiter.result(5) == "data" and waiter.done() and waiter.result(0) == "data"
    assert waiter.exception() is None


def test_an_exception_is_raised_to_the_waiter_and_the_first_settler_wins():
    waiter = CallWaiter()
    error = ValueError("no")
    waiter.set_exception(error)
    with pytest.raises(InvalidStateError):
        waiter.set_result("late")
    with pytest.raises(ValueError, match="no"):
        waiter.result(1)
    assert waiter.exception(0) is error and not waiter.cancelled() and not waiter.cancel()


def test_the_wait_is_bounded():
    waiter = CallWaiter()
    started = time.monotonic()
    with pytest.raises(FutureTimeout):
        waiter.result(0.05)
    assert 0.04 <= time.monotonic() - started < 1 and not waiter.done() and waiter.running()


def test_done_callbacks_run_once_on_settling_or_at_once_when_settled_and_a_failing_one_is_contained():
    waiter = CallWaiter()
    seen: list[Future] = []
    waiter.add_done_callback(lambda done: 1 / 0)
    waiter.add_done_callback(seen.append)
    waiter.set_result(1)
    waiter.add_done_callback(seen.append)
    assert seen == [waiter, waiter]


def test_racing_settlers_settle_it_once():
    waiter = CallWaiter()
    outcomes: list[str] = []

    def settle(value: str) -> None:
        try:
            waiter.set_result(value)
            outcomes.append(value)
        except InvalidStateError:
            pass

    threads = [threading.Thread(target=settle, args=(str(n),)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 1 and waiter.result(0) == outcomes[0]
