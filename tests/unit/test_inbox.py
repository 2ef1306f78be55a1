"""The loop thread's hand-off to handler threads wakes one thread per delivery, never two."""
from __future__ import annotations

import pathlib
import queue
import threading

import pytest

from amqprpc.transport.inbox import Inbox
from amqprpc.testing import wait_for


def _waiting(inbox: Inbox, count: int) -> None:
    wait_for(lambda: len(inbox._idle) == count, timeout=5)  # noqa: SLF001 - all asleep in get()


def _switches(native_id: int) -> int:
    """How often the thread went to sleep (Linux: voluntary context switches)."""
    status = pathlib.Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="counts context switches in /proc")
def test_each_item_wakes_one_thread_and_the_other_waiting_threads_sleep_on(inbox_type=Inbox):
    inbox, handled, ids = inbox_type(), queue.SimpleQueue(), {}

    def take() -> None:
        ids[threading.current_thread().name] = threading.get_native_id()
        while (item := inbox.get()) is not None:
            handled.put((threading.current_thread().name, item))

    threads = [threading.Thread(target=take, name=f"handler-{i}") for i in range(8)]
    for thread in threads:
        thread.start()
    _waiting(inbox, 8)
    before = {name: _switches(native) for name, native in ids.items()}
    handlers = set()
    for n in range(50):  # one at a time, as calls made one after another arrive
        inbox.put(n)
        name, item = handled.get(timeout=5)
        assert item == n
        handlers.add(name)
        _waiting(inbox, 8)
    woken = {name: _switches(native) - before[name] for name, native in ids.items() if name not in handlers}
    for _ in threads:
        inbox.put(None)
    for thread in threads:
        thread.join(5)
    # queue.SimpleQueue wakes a second waiting thread per item (its getter's lock release):
    # here that was ~50 wake-ups spread over the idle threads.
    assert len(handlers) == 1 and sum(woken.values()) == 0, (handlers, woken)


def test_the_last_thread_to_go_idle_is_the_one_woken():
    inbox, took = Inbox(), queue.SimpleQueue()

    def take(name: str) -> None:
        took.put((name, inbox.get()))

    first = threading.Thread(target=take, args=("first",))
    first.start()
    _waiting(inbox, 1)
    second = threading.Thread(target=take, args=("second",))
    second.start()
    _waiting(inbox, 2)
    inbox.put("a")
    assert took.get(timeout=5) == ("second", "a")
    inbox.put("b")
    assert took.get(timeout=5) == ("first", "b")


def test_items_with_no_idle_thread_wait_in_order_and_can_be_taken_back():
    inbox = Inbox()
    for item in range(3):
        inbox.put(item)
    assert inbox.qsize() == 3
    assert inbox.get() == 0
    assert inbox.get_nowait() == 1 and inbox.get_nowait() == 2
    with pytest.raises(queue.Empty):
        inbox.get_nowait()


def test_a_leaders_puts_wake_nobody_and_it_takes_the_first_itself_waking_one_when_more_wait():
    inbox, took = Inbox(), queue.SimpleQueue()

    def take(name: str) -> None:
        took.put((name, inbox.get()))

    sleepers = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(2)]
    for thread in sleepers:
        thread.start()
    _waiting(inbox, 2)
    inbox.begin_lead()  # this thread reads the socket: what it puts is its own to take
    inbox.put("first")
    assert len(inbox._idle) == 2 and not inbox._waking  # noqa: SLF001 - nobody woken
    assert inbox.end_lead() == "first" and took.empty()
    inbox.begin_lead()
    inbox.put("second")
    inbox.put("third")
    assert inbox.end_lead() == "second"
    assert took.get(timeout=5)[1] == "third"  # more waited: one sleeper woken for it
    inbox.put("from another thread")  # not the leader's: wakes the other sleeper as before
    assert took.get(timeout=5)[1] == "from another thread"
    for thread in sleepers:
        thread.join(5)
    assert inbox.take() is None


def test_a_put_by_another_thread_while_one_leads_wakes_a_sleeper():
    inbox, took = Inbox(), queue.SimpleQueue()
    leading, put_done = threading.Event(), threading.Event()

    def lead() -> None:
        inbox.begin_lead()
        leading.set()
        put_done.wait(5)
        took.put(("leader", inbox.end_lead()))

    sleeper = threading.Thread(target=lambda: took.put(("sleeper", inbox.get())))
    sleeper.start()
    _waiting(inbox, 1)
    leader = threading.Thread(target=lead)
    leader.start()
    leading.wait(5)
    inbox.put("x")  # this thread is not the leader
    assert took.get(timeout=5) == ("sleeper", "x")
    put_done.set()
    leader.join(5)
    assert took.get(timeout=5) == ("leader", None)


def test_nudge_wakes_the_last_idle_thread_to_lead():
    from amqprpc.transport.inbox import LEAD

    inbox, took = Inbox(), queue.SimpleQueue()

    def take(name: str) -> None:
        took.put((name, inbox.get()))

    first = threading.Thread(target=take, args=("first",))
    first.start()
    _waiting(inbox, 1)
    second = threading.Thread(target=take, args=("second",))
    second.start()
    _waiting(inbox, 2)
    inbox.nudge()
    assert took.get(timeout=5) == ("second", LEAD)  # the one that went idle last
    inbox.put("item")  # an item wakes the other as before
    assert took.get(timeout=5) == ("first", "item")
    inbox.nudge()  # nobody sleeps: nothing happens
    assert inbox.take() is None
