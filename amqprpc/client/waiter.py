"""The Future of a blocking :meth:`RpcClient.call`: one waiter (the calling thread), woken by
one lock release.

A ``concurrent.futures.Future`` builds a Condition (an RLock and a waiter list) per call, and
its ``result()`` allocates a lock per wait and re-takes the Condition twice: about 15 µs of a
call's client CPU. A blocking call's Future is never handed to user code (``call`` returns the
data), so it needs only what the client itself does with it: settle it once from whichever
thread gets there first (reply, deadline, nack, lost connection), wait for it, and run the
middleware's ``after_settle`` callback. ``call_async`` keeps the real Future.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from typing import Any, Callable

_PENDING = object()


class CallWaiter(Future[Any]):
    """The subset of Future that a blocking call uses, without the Condition.

    ``_ready`` is held from creation until the call is settled: ``result(timeout)`` waits by
    acquiring it (and releases it again, so that a second look returns at once)."""

    def __init__(self) -> None:  # no Future.__init__: none of its Condition is used
        self._ready = threading.Lock()
        self._ready.acquire()
        self._settling = threading.Lock()
        self._value: Any = _PENDING
        self._error: BaseException | None = None
        self._done_callbacks: list[Callable[[Future[Any]], Any]] = []

    def done(self) -> bool:
        return self._value is not _PENDING or self._error is not None

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return not self.done()

    def cancel(self) -> bool:
        return False  # a call on the wire is not cancelled; its deadline ends it

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(_PENDING, exception)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with self._settling:
            if self.done():
                raise InvalidStateError(f"{self!r} is already settled")
            self._value, self._error = value, error
            callbacks, self._done_callbacks = self._done_callbacks, []
        self._ready.release()
        for callback in callbacks:
            _run(callback, self)

    def _wait(self, timeout: float | None) -> None:
        if not self._ready.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            raise FutureTimeout()
        self._ready.release()

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._wait(timeout)
        return self._error

    def add_done_callback(self, fn: Callable[[Future[Any]], Any]) -> None:
        with self._settling:
            if not self.done():
                self._done_callbacks.append(fn)
                return
        _run(fn, self)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("error" if self._error is not None else "done")
        return f"<CallWaiter {state}>"


def _run(callback: Callable[[Future[Any]], Any], future: Future[Any]) -> None:
    """As Future does: a failing done-callback is logged, never raised into the settler."""
    try:
        callback(future)
    except Exception:  # noqa: BLE001 - the settler (loop or timer thread) must go on
        from amqprpc import logs

        logs.get_logger("amqprpc.client").exception("exception calling callback for a call")
