"""A timer on a thread of its own, for deadlines that must hold whatever the I/O loop does.

A call's deadline used to be a timer of the client's loop thread. But that thread also
connects (a TCP and AMQP handshake, bounded by ``connect_timeout`` per step) and waits
for the broker's answers to channel methods (bounded by the link's silence limit, up to
two heartbeat intervals): meanwhile no deadline fired, and calls outlived their timeouts
by seconds. :class:`Timer` runs ``fire(now)`` on its own thread instead, whatever the
loop thread is blocked in.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from amqprpc import logs

log = logs.get_logger("amqprpc.deadlines")


class Timer:
    """Runs ``fire(now)`` no earlier than the earliest time :meth:`arm` asked for;
    ``fire`` returns when it wants to run next (monotonic seconds), or None.

    The thread starts on the first :meth:`arm` and ends with :meth:`close`. ``fire``
    runs without the timer's lock held: it may take its own locks, and call :meth:`arm`.
    """

    def __init__(self, fire: Callable[[float], "float | None"], name: str):
        self._fire = fire
        self._name = name
        self._changed = threading.Condition(threading.Lock())
        self._due: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, due: float) -> None:
        """Fire at ``due`` (monotonic seconds) unless already armed earlier. Any thread."""
        with self._changed:
            if self._due is not None and self._due <= due:
                return
            self._due = due
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if self._due is not None and self._due <= now:
                        self._due = None
                        break
                    self._changed.wait(None if self._due is None else self._due - now)
            try:
                due = self._fire(now)
            except Exception:  # noqa: BLE001 - a timer that died would never fire again
                log.exception("timer failed", timer=self._name)
                due = time.monotonic() + 0.1
            if due is not None:
                self.arm(due)
