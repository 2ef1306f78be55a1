"""The hand-off of deliveries from the loop thread to a pool of threads, waking only one.

``queue.SimpleQueue`` wakes two threads per item when several wait on it: its getter
releases the queue's lock after taking the item, and that release wakes the next
waiting getter, which finds nothing, takes the GIL from the thread doing the work and
goes back to sleep. With a worker's 8 idle handler threads that was 3.3 context switches
and GIL hand-overs per call for one call's work (measured with strace and
/proc/<pid>/task/*/status, one call at a time).

:class:`Inbox` wakes one thread only when there is work for it: each sleeping thread
waits on a lock of its own, and the one released is the one that went idle last (LIFO:
its stack and caches are still warm, and a quiet service runs on one thread). Under load,
threads that finish take the next item without sleeping, as they did before.

A worker's quiet handler thread may read the socket itself (:mod:`~amqprpc.transport.readtoken`,
:meth:`~amqprpc.transport.consumer.Consumer.next_delivery`): while it leads, what it puts in the
inbox (the consumer callback runs in its reads) wakes nobody -- it takes the first item itself
when it stops leading (:meth:`Inbox.end_lead`), and wakes one other thread only when more wait.
:meth:`Inbox.nudge` wakes an idle thread with no item (``get`` returns :data:`LEAD`) to lead.
"""
from __future__ import annotations

import collections
import queue
import threading
from typing import Any


LEAD = object()  # what get() returns to a thread nudged to lead (no item for it)


class _Waiter:
    __slots__ = ("wake", "lead")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # held until the thread is woken (released once per wake-up)
        self.lead = False  # woken by nudge(), not for an item


class Inbox:
    """``put``, ``get`` and ``get_nowait`` as a ``queue.SimpleQueue`` has them (unbounded,
    FIFO; ``get_nowait`` raises ``queue.Empty``), waking at most one sleeping thread at a time.

    A put wakes the thread that went idle last, unless one woken earlier has not run yet;
    a thread that takes an item and leaves more behind wakes the next one (the baton).
    So one call at a time wakes one thread per call, and a burst wakes threads one after
    another while threads that finish their work take what waits without sleeping.
    Invariant (under the lock): items waiting and threads sleeping means one is waking.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[Any] = collections.deque()
        self._idle: list[_Waiter] = []
        self._waking = False
        self._local = threading.local()
        self._leader: int | None = None  # the thread that reads the socket and takes what it puts

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._idle and not self._waking and (self._leader is None or self._leader != threading.get_ident()):
                self._wake_one()

    def get(self) -> Any:
        lock, items = self._lock, self._items
        waiter = None
        while True:
            with lock:
                if waiter is not None:
                    self._waking = False  # the one woken is running: a put may wake another
                    if waiter.lead:
                        waiter.lead = False
                        if not items:
                            return LEAD
                if items:
                    item = items.popleft()
                    if items and self._idle and not self._waking:
                        self._wake_one()
                    return item
                if waiter is None:
                    waiter = getattr(self._local, "waiter", None)
                    if waiter is None:
                        waiter = self._local.waiter = _Waiter()
                self._idle.append(waiter)
            waiter.wake.acquire()  # released by _wake_one

    def take(self) -> Any:
        """An item, or None at once when there is none (waking the next thread when more wait)."""
        with self._lock:
            items = self._items
            if not items:
                return None
            item = items.popleft()
            if items and self._idle and not self._waking:
                self._wake_one()
            return item

    def begin_lead(self) -> None:
        """This thread reads the socket now: what it puts wakes nobody until :meth:`end_lead`."""
        self._leader = threading.get_ident()

    def end_lead(self) -> Any:
        """This thread stopped reading: the first item for it (None when there is none), the
        next waiting thread woken when more wait."""
        with self._lock:
            if self._leader == threading.get_ident():
                self._leader = None
        return self.take()

    def nudge(self) -> None:
        """Wake the thread that went idle last to lead (its ``get`` returns :data:`LEAD`), unless
        one is waking already or none sleeps."""
        with self._lock:
            if self._idle and not self._waking:
                self._waking = True
                waiter = self._idle.pop()
                waiter.lead = True
                waiter.wake.release()

    def get_nowait(self) -> Any:
        with self._lock:
            if self._items:
                return self._items.popleft()
        raise queue.Empty

    def qsize(self) -> int:
        return len(self._items)

    def _wake_one(self) -> None:
        self._waking = True
        self._idle.pop().wake.release()
