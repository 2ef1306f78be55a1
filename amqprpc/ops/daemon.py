"""Running a worker in the foreground as a supervised daemon: signals, exit codes,
pidfile, systemd notifications, process title, metrics endpoint.

The worker never forks or detaches: Supervisor and systemd want the process they
started, and ``exec amqprpc worker ...`` in a wrapper script keeps the pid.

Signals:

- first SIGTERM/SIGINT: warm stop (see :meth:`Worker.shutdown`), exit 0 when every
  running handler finished within the shutdown timeout, 1 when the timeout cut them off;
- a second SIGTERM/SIGINT, or SIGQUIT: cold stop, at once: close the connection so the
  broker requeues whatever is unacked (running handlers included), exit 1 (EXIT_COLD_STOP);
- SIGHUP: ignored (logged). A graceful restart is the supervisor's job (SIGTERM, then it
  starts a new process); treating HUP as "stop" would leave a ``Restart=on-failure`` unit
  down after an exit 0, and a terminal hang-up must not kill a worker either.

A broker that is not up yet when the daemon starts is waited for (``broker_wait``
seconds, for ever by default, as Celery retries on startup): workers may boot before
their broker. Every attempt is logged (``broker connect failed`` with ``attempt`` and
``retry_in``) and shown to systemd (``STATUS=``, with ``EXTEND_TIMEOUT_USEC=`` so that
``TimeoutStartSec`` measures a start that makes no progress, not a broker that is late);
``READY=1`` is sent once it consumes. A stop signal while waiting exits 0.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from types import FrameType
from typing import Callable, Protocol

from amqprpc import logs
from amqprpc.ops import sdnotify
from amqprpc.config import redact
from amqprpc.errors import PidFileError
from amqprpc.errors import StartupError as StartupError  # re-exported: its home was here
from amqprpc.transport.ioloop import CONNECT_TIMEOUT, StartCancelled
from amqprpc.ops.pidfile import PidFile

log = logs.get_logger("amqprpc.daemon")

EXIT_OK = 0
EXIT_COLD_STOP = 1

# The least exit code this process ends with, raised by request_exit (a worker that had to
# write off too many stuck handler threads exits 1 however cleanly it then stops).
_exit_floor = EXIT_OK


def request_exit(code: int, reason: str) -> None:
    """Stop this daemon warmly (as SIGTERM does) and exit with at least ``code``: what a
    worker that can no longer serve well asks for, for its supervisor to restart it."""
    global _exit_floor
    _exit_floor = max(_exit_floor, code)
    log.error("exiting for a restart by the supervisor", exit_code=code, reason=reason)
    os.kill(os.getpid(), signal.SIGTERM)


class Daemon(Protocol):
    """What :func:`run_worker` runs: a :class:`~amqprpc.server.worker.Worker` or a
    :class:`~amqprpc.ops.collector.Collector`."""

    url: str

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> dict[str, int]: ...

    @property
    def alive(self) -> bool: ...

    def start(self, *, broker_wait: float = 0.0,
              on_connect_retry: Callable[[int, float, BaseException], None] | None = None) -> None: ...

    def cancel_start(self) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> bool: ...

    def stop(self, timeout: float | None = 10.0) -> None: ...


def run_worker(worker: Daemon, shutdown_timeout: float = 30.0, *, pidfile: str | None = None,
               metrics_port: int | None = None, title: str | None = None, broker_wait: float = math.inf,
               kind: str = "worker") -> int:
    """Serve until a signal; return the process exit code.

    ``worker`` is a :class:`~amqprpc.server.worker.Worker` or anything with its lifecycle
    (:class:`Daemon`), such as the collector.

    Parameters: ``shutdown_timeout`` seconds running handlers get on a warm stop;
    ``pidfile`` path to write this pid to (refused while another live process holds it:
    :class:`StartupError`, as for a metrics port already taken); ``metrics_port`` TCP port for Prometheus'
    ``/metrics`` (None: no endpoint; a Worker only); ``title`` the process title
    (default ``amqprpc worker <service>``); ``broker_wait`` seconds an unreachable broker
    is retried at start before its error is raised (0: at once); ``kind`` what the log
    lines call the process (``worker``, ``collector``).
    """
    stop_requested = threading.Event()
    cold = threading.Event()
    title = title or f"amqprpc {kind} {worker.name}"

    def on_stop_signal(signum: int, _frame: FrameType | None) -> None:
        if stop_requested.is_set() or signum == signal.SIGQUIT:
            cold.set()
            log.warning("cold stop requested", signal=signal.Signals(signum).name)
            _cold_stop(worker, lock, kind)
        log.info("warm stop requested", signal=signal.Signals(signum).name, shutdown_timeout=shutdown_timeout)
        stop_requested.set()
        worker.cancel_start()  # still waiting for the broker: give up waiting (no effect once serving)

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP ignored: stop with SIGTERM and let the supervisor start a new worker")

    lock = PidFile(pidfile) if pidfile else None
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        # One ignored when it started stays ignored (nohup; a --processes child ignores
        # SIGINT: its parent passes a terminal's Ctrl-C on).
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, on_stop_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    _set_process_title(title)
    acquire(lock)
    try:
        if metrics_port is not None:
            try:
                from amqprpc.middleware import metrics  # prometheus_client only when asked for
            except ImportError as exc:
                raise StartupError(f"--metrics-port needs prometheus_client ({exc}): "
                                   f"pip install 'amqprpc[metrics]'") from None

            metrics.instrument(worker)
            if kind == "worker":  # and what its handlers' clients see of the services they call
                from amqprpc.middleware import clientmetrics
                from amqprpc.middleware import add_default
                add_default(clientmetrics.default())
            try:
                metrics.serve(metrics_port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on port {metrics_port}: {exc}") from None
        sizes = {key: getattr(worker, key) for key in ("concurrency", "prefetch") if hasattr(worker, key)}
        log.info(f"{kind} starting", title=title, pid=os.getpid(), broker=redact(worker.url), **sizes,
                 metrics_port=metrics_port, broker_wait="forever" if math.isinf(broker_wait) else broker_wait)
        watchdog = sdnotify.watchdog_interval()
        sdnotify.notify(f"STATUS={title}: connecting to {redact(worker.url)}")
        try:
            worker.start(broker_wait=broker_wait, on_connect_retry=_tell_systemd_we_wait(title, worker, watchdog))
        except StartCancelled:
            log.info(f"{kind} exiting", exit_code=EXIT_OK, reason="stopped while waiting for the broker")
            return EXIT_OK
        sdnotify.notify("READY=1", f"STATUS={title}: serving", f"MAINPID={os.getpid()}")
        tick = min(1.0, watchdog) if watchdog else 1.0
        next_ping = time.monotonic()
        while not stop_requested.wait(tick):
            if not worker.alive:
                log.error(f"{kind} loop died")
                return EXIT_COLD_STOP
            if watchdog and time.monotonic() >= next_ping:
                # Only while the I/O thread lives: a dead loop gets the unit restarted.
                sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
        sdnotify.notify("STOPPING=1", f"STATUS={title}: stopping")
        clean = worker.shutdown(shutdown_timeout)
        code = max(EXIT_OK if clean and not cold.is_set() else EXIT_COLD_STOP, _exit_floor)
        (log.info if code == EXIT_OK else log.warning)(f"{kind} exiting", exit_code=code)
        return code
    finally:
        if lock is not None:
            lock.release()


def acquire(lock: PidFile | None) -> None:
    """Take the pidfile (if any); another live process holding it is a StartupError."""
    if lock is None:
        return
    try:
        lock.acquire()
    except PidFileError as exc:
        raise StartupError(str(exc)) from None


def _tell_systemd_we_wait(title: str, worker: Daemon, watchdog: float | None
                          ) -> Callable[[int, float, BaseException], None]:
    """``on_connect_retry`` for a daemon's start: systemd's status line says it waits for
    the broker, and its start timeout is extended past the next attempt (the process is
    making progress; a start that hangs still times out)."""

    def waiting(attempt: int, retry_in: float, exc: BaseException) -> None:
        budget = retry_in + 2 * CONNECT_TIMEOUT + 30.0
        states = [f"STATUS={title}: waiting for the broker {redact(worker.url)} (attempt {attempt}, "
                  f"next in {retry_in:.1f} s): {redact(str(exc))}", f"EXTEND_TIMEOUT_USEC={int(budget * 1e6)}"]
        if watchdog:
            states.append("WATCHDOG=1")
        sdnotify.notify(*states)

    return waiting


def _cold_stop(worker: Daemon, lock: PidFile | None, kind: str) -> None:
    # Closing the socket makes the broker requeue every unacked message at once; the
    # handler threads are daemons and die with the process.
    sdnotify.notify("STOPPING=1")
    worker.stop(timeout=2.0)
    log.warning(f"{kind} stopped (cold)", **worker.stats)
    if lock is not None:
        lock.release()
    os._exit(EXIT_COLD_STOP)


def _set_process_title(title: str) -> None:
    # What ps/top/htop show instead of "python3 -m amqprpc ...": an operator finds the
    # worker of one service at a glance.
    try:
        import setproctitle
    except ImportError:  # the [daemon] extra is not installed: the title is a nicety, go on without it
        log.info("process title not set: setproctitle is not installed (pip install 'amqprpc[daemon]')")
        return
    setproctitle.setproctitle(title)
