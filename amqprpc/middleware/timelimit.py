"""Time limits: a handler that runs too long is stopped, and one that cannot be stopped is
written off -- never a silent hang.

``@service.handler("x", time_limit=SECONDS)`` (or ``amqprpc worker --time-limit``, the default
for every handler) bounds one run of a handler. At the limit, :class:`TimeLimit` raises
:class:`~amqprpc.errors.TimeLimitExceeded` inside the handler's thread, as dramatiq's TimeLimit
middleware does (``PyThreadState_SetAsyncExc``): pure-Python code stops at its next bytecode,
and the exception then follows the handler's retry policy (it runs as a ``handle_scope``,
inside the retries) like any error the handler raised.

An asynchronous exception only lands when the thread runs Python code: a handler stuck in C
code, in a blocking call (``time.sleep``, a socket read without timeout) or that swallows the
exception is still running after ``hard_grace`` more seconds. It is then *abandoned*:
``on_abandon`` is told (the worker writes the thread off: its message is dead-lettered with
the reason, a new handler thread takes its place, and after ``max_abandoned`` such threads
the process exits 1 for its supervisor to restart it; a child of ``--processes`` is replaced
by its parent at the first one).

One watchdog thread per worker keeps every deadline (never one timer per call): it sleeps
until the earliest one, and a call that starts adds its deadline without waking it unless
it is the new earliest (sequential calls under a constant limit wake it once per limit).
"""
from __future__ import annotations

import ctypes
import math
import threading
import time
from typing import Any, Callable

from amqprpc import logs
from amqprpc.errors import TimeLimitExceeded
from amqprpc.middleware import Delivery, Middleware

log = logs.get_logger("amqprpc.timelimit")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int


def raise_in_thread(ident: int, exc_type: type[BaseException] = TimeLimitExceeded) -> bool:
    """Make thread ``ident`` raise ``exc_type`` at its next bytecode; False if no such thread."""
    modified: int = _set_async_exc(ident, exc_type)
    return modified == 1


def cancel_raise(ident: int) -> None:
    """Take back an exception :func:`raise_in_thread` left pending on thread ``ident``
    (harmless when there is none)."""
    _set_async_exc(ident, ctypes.py_object())  # NULL: clears the pending exception


class Watch:
    """One running handler under a time limit: its thread, limit and deadlines (monotonic),
    whether the exception was raised (``fired``), and whether it ended (``done``)."""

    __slots__ = ("ident", "thread_name", "limit", "soft_at", "hard_at", "fired", "done", "delivery")

    def __init__(self, ident: int, thread_name: str, limit: float, delivery: Delivery | None) -> None:
        self.ident = ident
        self.thread_name = thread_name
        self.limit = limit
        self.soft_at = time.monotonic() + limit
        self.hard_at = math.inf
        self.fired = False
        self.done = False
        self.delivery = delivery

    def __repr__(self) -> str:
        return f"<Watch {self.thread_name} limit={self.limit} fired={self.fired} done={self.done}>"


class Watchdog:
    """The one thread that keeps the deadlines of a worker's running handlers.

    At a watch's ``soft_at`` it raises :class:`TimeLimitExceeded` in the watched thread
    (``on_fire(watch)`` is told); if the watch is still not ended ``hard_grace`` seconds later
    (None: never), it drops it and calls ``on_abandon(watch)``. Both callbacks run on the
    watchdog thread, outside its lock; what they raise is logged and contained."""

    def __init__(self, hard_grace: float | None, on_fire: Callable[[Watch], None],
                 on_abandon: Callable[[Watch], None], name: str = "amqprpc-timelimit") -> None:
        self.hard_grace = hard_grace
        self.on_fire = on_fire
        self.on_abandon = on_abandon
        self.name = name
        self._watches: set[Watch] = set()
        self._changed = threading.Condition(threading.Lock())
        self._next_wake = math.inf
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._changed:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopped = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def watch(self, limit: float, delivery: Delivery | None = None) -> Watch:
        """Start watching the calling thread for ``limit`` seconds."""
        current = threading.current_thread()
        watch = Watch(current.ident or 0, current.name, limit, delivery)
        with self._changed:
            self._watches.add(watch)
            if watch.soft_at < self._next_wake:  # the new earliest deadline: wake the watchdog to sleep less
                self._next_wake = watch.soft_at
                self._changed.notify()
        if self._thread is None:
            self.start()
        return watch

    def unwatch(self, watch: Watch) -> None:
        """The watched call ended (however): forget it, and take back its exception if it
        was raised but has not landed yet (after this, none will for this watch)."""
        with self._changed:
            watch.done = True
            self._watches.discard(watch)
            if watch.fired:
                cancel_raise(watch.ident)

    @property
    def watching(self) -> int:
        with self._changed:
            return len(self._watches)

    def _run(self) -> None:
        fired: list[Watch] = []
        abandoned: list[Watch] = []
        with self._changed:
            while not self._stopped:
                now = time.monotonic()
                next_wake = math.inf
                for watch in list(self._watches):
                    if not watch.fired:
                        if now < watch.soft_at:
                            next_wake = min(next_wake, watch.soft_at)
                            continue
                        watch.fired = True  # under the lock: unwatch() then knows to take it back
                        raise_in_thread(watch.ident)
                        fired.append(watch)
                        if self.hard_grace is not None:
                            watch.hard_at = now + self.hard_grace
                    if now >= watch.hard_at:
                        self._watches.discard(watch)
                        abandoned.append(watch)
                    else:
                        next_wake = min(next_wake, watch.hard_at)
                self._next_wake = next_wake
                if fired or abandoned:
                    self._changed.release()
                    try:
                        self._tell(fired, abandoned)
                    finally:
                        self._changed.acquire()
                    continue
                self._changed.wait(None if math.isinf(next_wake) else max(0.0, next_wake - now))

    def _tell(self, fired: list[Watch], abandoned: list[Watch]) -> None:
        for callback, watches in ((self.on_fire, fired), (self.on_abandon, abandoned)):
            for watch in watches:
                try:
                    callback(watch)
                except Exception:  # noqa: BLE001 - the watchdog must outlive any callback
                    log.exception("time limit callback failed", callback=getattr(callback, "__name__", "?"))
            watches.clear()


class TimeLimit(Middleware):
    """Bounds each handler run by its time limit (see the module doc).

    ``default`` seconds for handlers without their own ``time_limit`` (None: those run
    unbounded); ``hard_grace`` seconds after the exception before a handler still running is
    abandoned (None: never abandoned, only logged). Abandoning writes the thread off through
    the worker (``Worker.write_off``: its message dead-lettered with the reason, a new
    handler thread in its place) and calls ``on_abandon(watch)``; once more than
    ``max_abandoned`` were, ``on_too_many()`` (``amqprpc worker`` exits 1 then, see
    :mod:`amqprpc.ops.taskcontrol`). ``limit_of(delivery)`` may replace how a delivery's
    limit is found. Counts: ``counts["timed_out"]`` handlers that reached their limit,
    ``counts["abandoned"]`` those written off after the grace (also in ``worker.stats``).
    """

    def __init__(self, default: float | None = None, *, hard_grace: float | None = 10.0,
                 max_abandoned: int = 3, on_too_many: Callable[[], None] | None = None,
                 on_abandon: Callable[[Watch], None] | None = None,
                 limit_of: Callable[[Delivery], float | None] | None = None) -> None:
        if default is not None and default <= 0:
            raise ValueError("a time limit must be positive seconds")
        self.default = default
        self.hard_grace = hard_grace
        self.max_abandoned = max_abandoned
        self.on_too_many = on_too_many
        self.on_abandon = on_abandon
        self._limit_of = limit_of
        self.counts = {"timed_out": 0, "abandoned": 0}
        self._counts_lock = threading.Lock()
        self.watchdog = Watchdog(hard_grace, self._fired, self._abandoned)

    # --- lifecycle -----------------------------------------------------------------------
    def worker_started(self, worker: Any) -> None:
        self.watchdog.start()

    def worker_stopped(self, worker: Any) -> None:
        self.watchdog.stop()

    # --- per delivery ----------------------------------------------------------------------
    def limit_of(self, delivery: Delivery) -> float | None:
        """The time limit of the handler that runs ``delivery``: its own, else the default."""
        if self._limit_of is not None:
            return self._limit_of(delivery)
        own = _own_limit(delivery)
        return own if own is not None else self.default

    def handle_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        limit = self.limit_of(delivery)
        if limit is None:
            return call_next(delivery)
        watch = self.watchdog.watch(limit, delivery)
        try:
            return call_next(delivery)
        except TimeLimitExceeded as exc:
            if not watch.fired:  # the handler's own, not ours
                raise
            raise TimeLimitExceeded(f"{delivery.handler or delivery.action} ran past its time limit of {limit:g} s",
                                    limit) from exc
        finally:
            # Our exception may land on the way out (the handler returned as the limit
            # passed): at most once per watch, so one more try always gets through.
            while True:
                try:
                    self.watchdog.unwatch(watch)
                    break
                except TimeLimitExceeded:
                    continue

    def _fired(self, watch: Watch) -> None:
        self._count("timed_out", watch)
        delivery = watch.delivery
        log.warning("time limit reached, TimeLimitExceeded raised in the handler", limit=watch.limit,
                    thread=watch.thread_name, action=delivery.action if delivery else None,
                    message_id=delivery.message_id if delivery else None, hard_grace=self.hard_grace)

    def _abandoned(self, watch: Watch) -> None:
        abandoned = self._count("abandoned", watch)
        delivery = watch.delivery
        log.error("handler ignored its time limit: abandoned", limit=watch.limit, hard_grace=self.hard_grace,
                  thread=watch.thread_name, action=delivery.action if delivery else None,
                  message_id=delivery.message_id if delivery else None, abandoned=abandoned,
                  max_abandoned=self.max_abandoned)
        write_off = getattr(getattr(delivery, "worker", None), "write_off", None)
        if write_off is not None:
            write_off(watch.ident, f"Handler ignored its time limit of {watch.limit:g} s and was abandoned "
                                   f"{self.hard_grace:g} s later", "TimeLimitExceeded")
        if self.on_abandon is not None:
            self.on_abandon(watch)
        if abandoned > self.max_abandoned and self.on_too_many is not None:
            self.on_too_many()

    def _count(self, name: str, watch: Watch) -> int:
        with self._counts_lock:
            self.counts[name] += 1
            count = self.counts[name]
        worker = getattr(watch.delivery, "worker", None)
        count_in_stats = getattr(worker, "count", None)  # Worker.count (not the in-memory client's owner)
        if count_in_stats is not None:
            count_in_stats(name)
        return count


def _own_limit(delivery: Delivery) -> float | None:
    """The ``time_limit`` the running handler was registered with, if any."""
    service = getattr(getattr(delivery, "decide", None), "service", None)  # the dispatcher's
    if service is None or delivery.handler is None:
        return None
    limit: float | None = service.time_limit(delivery.handler, delivery.kind == "event")
    return limit
