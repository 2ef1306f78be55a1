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
"""
from __future__ import annotations

import collections
import queue
import threading
from typing import Any


class _Waiter:
    __slots__ = ("wake",)

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # held until the thread is woken (released once per wake-up)


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

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._idle and not self._waking:
                self._wake_one()

    def get(self) -> Any:
        lock, items = self._lock, self._items
        waiter = None
        while True:
            with lock:
                if waiter is not None:
                    self._waking = False  # the one woken is running: a put may wake another
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
