"""``amqprpc worker SERVICE --processes N``: N child worker processes under one parent.

Threads share one GIL: a CPU-bound handler runs on one core however large ``--concurrency``
is. With ``--processes N`` the parent forks N children, each a whole worker (its own
connection, ``--concurrency`` handler threads) competing for the one request queue, and
looks after them:

- a child that dies (crash, ``kill -9``, OOM killer) is started again at once, then with
  doubling backoff (up to 30 s) while children keep dying young. Nothing it had acked is lost:
  what it held unacked goes back to the queue when its connection closes, and the others
  (or its replacement) run it;
- it is *recycled* warmly after ``--max-tasks-per-child`` deliveries (it says so itself) or
  when its resident memory passes ``--max-memory-per-child`` MB (the parent reads it): a
  replacement starts first, then the old child gets SIGTERM, stops consuming (its prefetched
  messages go back to the queue) and finishes what it runs. The remedy for handlers that leak;
- a child whose handler ignored its time limit past ``--hard-time-limit`` writes the thread
  off (its message dead-lettered with the reason) and says so; it is recycled the same way. A
  child that stops heartbeating altogether (C code holding the GIL) for ``stall_timeout``
  seconds is killed (SIGKILL) and replaced;
- SIGTERM/SIGINT: warm stop of every child (each gets SIGTERM), exit 0 when all stopped
  cleanly, else 1; a second signal or SIGQUIT: cold stop (SIGQUIT to each), exit 1. A child
  ignores SIGINT (a terminal's Ctrl-C reaches the whole process group: the parent passes it on
  once). A child that cannot start for good (exit 2: a usage error such as a metrics port
  taken; exit 4: the broker stayed unreachable for ``--broker-wait``) before any child served
  stops them all with that exit code: restarting would only repeat it;
- ``READY=1`` goes to systemd once every child serves (each reports readiness over a pipe),
  ``WATCHDOG=1`` while the parent's loop runs, ``STOPPING=1`` when it stops; children talk to
  the parent, never to systemd. The pidfile is the parent's.

Process titles: ``amqprpc worker SERVICE parent (N processes)`` and ``amqprpc worker
SERVICE child K/N``. With ``--metrics-port P`` child K serves ``/metrics`` on port ``P+K``.
Children are forked after the service was loaded and checked (before any thread or
connection exists in the parent: the parent stays single-threaded). A child's side of the
pipe (readiness, heartbeats, recycling itself) is :mod:`amqprpc.ops.child`.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable

from amqprpc import logs
from amqprpc.ops import child as child_side, sdnotify
from amqprpc.ops.child import ChildLink, SharedCounters
from amqprpc.ops.daemon import EXIT_COLD_STOP, EXIT_OK, _set_process_title, acquire
from amqprpc.ops.pidfile import PidFile

log = logs.get_logger("amqprpc.prefork")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 4
_FOR_GOOD = (EXIT_USAGE, EXIT_UNAVAILABLE)  # a child exiting so before any served: the parent gives up
BACKOFF_CAP = 30.0
#: A child that lived this long before dying is restarted at once (its death ends a streak).
HEALTHY_AFTER = 30.0
_FORK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP}


class _Child:
    """The parent's record of one child process."""

    __slots__ = ("slot", "pid", "fd", "started", "ready", "retiring", "kill_at", "last_beat", "buffer", "stats")

    def __init__(self, slot: int, pid: int, fd: int) -> None:
        self.slot = slot
        self.pid = pid
        self.fd = fd
        self.started = self.last_beat = time.monotonic()
        self.ready = False
        self.retiring = False  # recycled: a replacement took its slot; its exit is expected
        self.kill_at = float("inf")
        self.buffer = b""
        self.stats: dict[str, Any] = {}


ServeChild = Callable[[ChildLink], int]


class Prefork:
    """The parent of ``processes`` children, each running ``serve(link)`` (which builds a
    worker with ``link`` among its middleware, runs it to its exit code and returns it).

    ``max_tasks_per_child`` deliveries and ``max_memory_mb`` resident MB after which a child is
    recycled (None: never); ``shutdown_timeout`` what each child's warm stop gets (a child
    still there 10 s later is killed); ``stall_timeout`` seconds of heartbeat silence after
    which a child is killed and replaced."""

    def __init__(self, serve: ServeChild, processes: int, *, name: str, max_tasks_per_child: int | None = None,
                 max_memory_mb: float | None = None, shutdown_timeout: float = 30.0,
                 stall_timeout: float = 60.0) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.serve = serve
        self.processes = processes
        self.name = name
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_mb = max_memory_mb
        self.shutdown_timeout = shutdown_timeout
        self.stall_timeout = stall_timeout
        self.counters = SharedCounters()
        self.title = f"amqprpc worker {name} parent ({processes} processes)"
        self._children: dict[int, _Child] = {}  # pid -> child
        self._restart_at: dict[int, float] = {}  # slot -> when to start it again
        self._streak: dict[int, int] = {}  # slot -> consecutive early deaths
        self._stopping = False
        self._cold = False
        self._clean = True
        self._give_up: int | None = None
        self._wakeup_r, self._wakeup_w = -1, -1
        self._pid = os.getpid()

    @property
    def stats(self) -> dict[str, int]:
        """children alive, and the counters: child_restarts (deaths restarted), recycled, killed."""
        return {"children": len(self._children), **self.counters.read()}

    # --- the parent's loop ---------------------------------------------------------------
    def run(self, pidfile: str | None = None) -> int:
        """Fork the children and look after them until a stop signal; the exit code.
        ``pidfile``: the parent's (refused while another live process holds it: StartupError)."""
        lock = PidFile(pidfile) if pidfile else None
        acquire(lock)
        try:
            return self._run()
        finally:
            if lock is not None and os.getpid() == self._pid:
                lock.release()

    def _run(self) -> int:
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)
        signal.set_wakeup_fd(self._wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # (ignored at start: stays so, as for one worker)
                signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select through the wakeup fd
        signal.signal(signal.SIGHUP, lambda signum, frame: log.info("SIGHUP ignored"))
        _set_process_title(self.title)
        log.info("prefork starting", title=self.title, pid=os.getpid(), processes=self.processes,
                 max_tasks_per_child=self.max_tasks_per_child, max_memory_per_child=self.max_memory_mb)
        sdnotify.notify(f"STATUS={self.title}: starting {self.processes} children")
        watchdog = sdnotify.watchdog_interval()
        next_ping = time.monotonic()
        for slot in range(self.processes):
            self._spawn(slot)
        try:
            while self._children or not self._stopping:
                self._wait_and_read(0.5)
                self._reap()
                now = time.monotonic()
                if self._give_up is not None and not self._stopping:
                    self._stop(cold=False)
                if not self._stopping:
                    self._look_after(now)
                else:
                    self._kill_overdue(now)
                if watchdog and now >= next_ping and not self._stopping:
                    sdnotify.notify("WATCHDOG=1")
                    next_ping = now + watchdog
        finally:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
        code = self._give_up if self._give_up is not None else (
            EXIT_OK if self._clean and not self._cold else EXIT_COLD_STOP)
        (log.info if code == EXIT_OK else log.warning)("prefork exiting", exit_code=code, **self.stats)
        return code

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        cold = self._stopping or signum == signal.SIGQUIT
        log.info("cold stop requested" if cold else "warm stop requested", signal=signal.Signals(signum).name,
                 children=sorted(self._children))
        self._stop(cold)

    def _stop(self, cold: bool) -> None:
        if cold:
            self._cold = True
        first = not self._stopping
        self._stopping = True
        if first:
            sdnotify.notify("STOPPING=1", f"STATUS={self.title}: stopping")
        for child in list(self._children.values()):
            if child.retiring and not cold:
                continue  # already stopping warmly: a second SIGTERM would make it a cold stop
            self._signal(child, signal.SIGQUIT if cold else signal.SIGTERM)
            child.kill_at = min(child.kill_at, time.monotonic() + (2.0 if cold else self.shutdown_timeout + 10.0))

    def _look_after(self, now: float) -> None:
        for slot, due in list(self._restart_at.items()):
            if now >= due:
                del self._restart_at[slot]
                self._spawn(slot)
        for child in list(self._children.values()):
            if child.retiring:
                if now >= child.kill_at:
                    self._kill(child, "did not stop after being recycled")
                continue
            if child.ready and now - child.last_beat > self.stall_timeout:  # (not ready: it may wait for the broker)
                self._kill(child, "stalled: no heartbeat", silent_for=round(now - child.last_beat, 1))
            elif self.max_memory_mb is not None and child.ready:
                rss = _rss_mb(child.pid)
                if rss is not None and rss > self.max_memory_mb:
                    self._recycle(child, "max-memory-per-child", rss_mb=round(rss, 1))

    def _kill_overdue(self, now: float) -> None:
        for child in list(self._children.values()):
            if now >= child.kill_at:
                self._clean = False
                self._kill(child, "did not stop in time")
                child.kill_at = float("inf")

    # --- children ------------------------------------------------------------------------
    def _spawn(self, slot: int) -> None:
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals wait across the fork: the parent's handlers never run in the child (which
        # would signal its siblings), and a stop never misses a child not yet in the table.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:  # the child
                os.close(read_fd)
                self._become_child(slot, write_fd)  # never returns
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            self._children[pid] = _Child(slot, pid, read_fd)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_SIGNALS)
        log.info("child started", slot=slot, child_pid=pid)

    def _become_child(self, slot: int, fd: int) -> None:
        code = EXIT_COLD_STOP
        try:
            signal.set_wakeup_fd(-1)
            for each in self._children.values():
                os.close(each.fd)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._children = {}
            for signum in (signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(signum, signal.SIG_DFL)
            # Until its worker takes over the signals: a warm stop of a child not serving yet is clean.
            signal.signal(signal.SIGTERM, _stopped_before_serving)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent too, which passes it on
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_SIGNALS)
            for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(variable, None)  # the parent speaks to systemd, not its children
            logs.bind_process(process=f"child {slot + 1}/{self.processes}")
            link = child_side.become(ChildLink(fd, slot, self.processes, os.getppid(), self.counters,
                                               self.max_tasks_per_child))
            code = self.serve(link)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_COLD_STOP)
        except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the parent's code
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _wait_and_read(self, timeout: float) -> None:
        fds = [self._wakeup_r, *(child.fd for child in self._children.values())]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wakeup_r in readable:
            try:
                while os.read(self._wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass
        for child in list(self._children.values()):
            if child.fd in readable:
                self._read(child)

    def _read(self, child: _Child) -> None:
        try:
            data = os.read(child.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return  # EOF: the child is gone; _reap hears it
        child.last_beat = time.monotonic()
        child.buffer += data
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            self._on_report(child, report)

    def _on_report(self, child: _Child, report: dict[str, Any]) -> None:
        kind = report.get("kind")
        if kind == "beat":
            child.stats = report.get("stats") or {}
        elif kind == "ready":
            child.ready = True
            log.info("child ready", slot=child.slot, child_pid=child.pid)
            current = [each for each in self._children.values() if not each.retiring]
            if not self._stopping and len(current) == self.processes and all(each.ready for each in current):
                log.info("all children ready", processes=self.processes, children=sorted(each.pid for each in current))
                sdnotify.notify("READY=1", f"STATUS={self.title}: serving", f"MAINPID={os.getpid()}")
        elif kind in ("recycle", "abandoned"):
            fields = {key: value for key, value in report.items() if key != "kind"}
            self._recycle(child, str(fields.pop("reason", kind)), signal_it=False, **fields)

    def _recycle(self, child: _Child, reason: str, signal_it: bool = True, **fields: Any) -> None:
        """Replace ``child`` warmly: a new child takes its slot now, the old one stops (it stops
        itself when it asked; else SIGTERM) and is killed if still there after its shutdown timeout."""
        if child.retiring or self._stopping:
            return
        child.retiring = True
        child.kill_at = time.monotonic() + self.shutdown_timeout + 10.0
        self.counters.add("recycled")
        log.info("child recycled", slot=child.slot, child_pid=child.pid, reason=reason, **fields)
        self._spawn(child.slot)
        if signal_it:
            self._signal(child, signal.SIGTERM)

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                continue
            self._read(child)
            os.close(child.fd)
            self._exited(child, status)

    def _exited(self, child: _Child, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)  # negative: killed by that signal
        fields = {"slot": child.slot, "child_pid": child.pid, "exit_code": code,
                  "lived": round(time.monotonic() - child.started, 1)}
        if self._stopping:
            if code != EXIT_OK:
                self._clean = False
            (log.info if code == EXIT_OK else log.warning)("child stopped", **fields)
            return
        if child.retiring:
            log.info("recycled child exited", **fields)
            return
        # This child never served and says it never will (usage, a port taken, a queue of other
        # arguments): restarting it would loop, also when its siblings serve (each child has a
        # metrics port of its own, so one may fail where the others start).
        if code in _FOR_GOOD and not child.ready:
            log.error("child cannot start; giving up", **fields)
            self._give_up = code
            return
        lived = time.monotonic() - child.started
        streak = 0 if lived >= HEALTHY_AFTER else self._streak.get(child.slot, 0) + 1
        self._streak[child.slot] = streak
        delay = 0.0 if streak <= 1 else min(BACKOFF_CAP, 2.0 ** (streak - 2))
        self.counters.add("child_restarts")
        log.warning("child died; restarting", restart_in=delay, **fields)
        self._restart_at[child.slot] = time.monotonic() + delay

    def _signal(self, child: _Child, signum: int) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    def _kill(self, child: _Child, reason: str, **fields: Any) -> None:
        self.counters.add("killed")
        log.error("child killed", slot=child.slot, child_pid=child.pid, reason=reason, **fields)
        self._signal(child, signal.SIGKILL)


def _stopped_before_serving(signum: int, frame: Any) -> None:
    raise SystemExit(EXIT_OK)


def _rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (Linux /proc), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
