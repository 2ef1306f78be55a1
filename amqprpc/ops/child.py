"""A ``--processes`` child's side (:mod:`amqprpc.ops.prefork` is the parent's): the pipe to its
parent, as the middleware of the child's worker, and the parent's counters it shows.
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import sys
import threading
from typing import Any

from amqprpc import logs
from amqprpc.middleware import Delivery, Middleware

log = logs.get_logger("amqprpc.prefork")

BEAT_INTERVAL = 1.0
_COUNTERS = ("child_restarts", "recycled", "killed")


class SharedCounters:
    """The parent's counters, in memory its children share (they show them in the registry
    and in Prometheus): written by the parent only."""

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, 8 * len(_COUNTERS))

    def add(self, name: str, n: int = 1) -> None:
        offset = 8 * _COUNTERS.index(name)
        struct.pack_into("q", self._memory, offset, struct.unpack_from("q", self._memory, offset)[0] + n)

    def read(self) -> dict[str, int]:
        return {name: struct.unpack_from("q", self._memory, 8 * index)[0] for index, name in enumerate(_COUNTERS)}


class ChildLink(Middleware):
    """A child's side of the pipe to its parent, as the middleware of the child's worker:
    reports ``ready`` once it consumes, heartbeats (with its stats) every second, and after
    ``max_tasks`` deliveries reports ``recycle`` and stops itself warmly (SIGTERM to itself)."""

    def __init__(self, fd: int, slot: int, processes: int, parent_pid: int, counters: SharedCounters,
                 max_tasks: int | None) -> None:
        self.fd = fd
        self.slot = slot
        self.processes = processes
        self.parent_pid = parent_pid
        self.counters = counters
        self.max_tasks = max_tasks
        self.tasks = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._recycling = False
        self._worker: Any = None

    def report(self, kind: str, **fields: Any) -> None:
        """One line to the parent; never raises (a parent gone is noticed by the heartbeat)."""
        line = json.dumps({"kind": kind, **fields}, separators=(",", ":"), default=str).encode() + b"\n"
        with self._lock:
            try:
                os.write(self.fd, line)
            except OSError:
                pass

    def describe(self) -> dict[str, Any]:
        """What the registry shows of this child (``process`` in its entry)."""
        return {"mode": "child", "slot": self.slot, "processes": self.processes, "parent_pid": self.parent_pid,
                **self.counters.read()}

    def worker_starting(self, worker: Any) -> None:
        # With --metrics-port the metrics module is loaded by now: it exports the parent's
        # counts too. (Looked up, not imported: Prometheus stays optional.)
        metrics = sys.modules.get("amqprpc.middleware.metrics")
        if metrics is not None:
            metrics.count_parent(self.counters.read)

    def worker_started(self, worker: Any) -> None:
        self._worker = worker
        self.report("ready")
        threading.Thread(target=self._beat, name="amqprpc-child-beat", daemon=True).start()

    def worker_stopping(self, worker: Any) -> None:
        self._stopped.set()

    def before_handle(self, delivery: Delivery) -> None:
        if self.max_tasks is None:
            return
        with self._lock:
            self.tasks += 1
            due = self.tasks >= self.max_tasks and not self._recycling
            if due:
                self._recycling = True
        if due:
            self.recycle("max-tasks-per-child", tasks=self.tasks)

    def recycle(self, reason: str, **fields: Any) -> None:
        """Tell the parent to start a replacement, then stop this child warmly."""
        self.report("recycle", reason=reason, **fields)
        os.kill(os.getpid(), signal.SIGTERM)

    def _beat(self) -> None:
        while not self._stopped.wait(BEAT_INTERVAL):
            stats = getattr(self._worker, "stats", None)
            self.report("beat", stats=dict(stats) if stats is not None else {})
            if os.getppid() != self.parent_pid:  # the parent is gone (kill -9): do not serve orphaned
                log.error("parent process gone: stopping", parent_pid=self.parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return


_current: ChildLink | None = None


def current_child() -> ChildLink | None:
    """This process's link to its prefork parent, or None when it is no child of one."""
    return _current


def become(link: ChildLink) -> ChildLink:
    """Make this (just forked) process the child ``link`` describes."""
    global _current
    _current = link
    return link
