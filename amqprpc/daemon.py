"""Running a worker in the foreground as a daemon: signals, exit codes.

First SIGTERM/SIGINT: warm stop (see :meth:`Worker.shutdown`), exit 0 when every running
handler finished in time. A second SIGTERM/SIGINT, or SIGQUIT: cold stop, at once: close
the connection so the broker requeues whatever is unacked, exit 1 (EXIT_COLD_STOP).
"""
from __future__ import annotations

import os
import signal
import threading

from . import logs
from .worker import Worker

log = logs.get_logger("amqprpc.daemon")

EXIT_OK = 0
EXIT_COLD_STOP = 1


def run_worker(worker: Worker, shutdown_timeout: float = 30.0) -> int:
    """Serve until a signal; return the process exit code."""
    stop_requested = threading.Event()
    cold = threading.Event()

    def on_stop_signal(signum, _frame):
        if stop_requested.is_set() or signum == signal.SIGQUIT:
            cold.set()
            log.warning("cold stop requested", signal=signal.Signals(signum).name)
            _cold_stop(worker)
        log.info("warm stop requested", signal=signal.Signals(signum).name, shutdown_timeout=shutdown_timeout)
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, on_stop_signal)
    worker.start()
    while not stop_requested.wait(1.0):
        if not worker.alive:
            log.error("worker loop died")
            return EXIT_COLD_STOP
    clean = worker.shutdown(shutdown_timeout)
    return EXIT_OK if clean and not cold.is_set() else EXIT_COLD_STOP


def _cold_stop(worker: Worker) -> None:
    # Closing the socket makes the broker requeue every unacked message at once; the
    # handler threads are daemons and die with the process.
    worker.stop(timeout=2.0)
    log.info("worker stopped (cold)", **worker.stats)
    os._exit(EXIT_COLD_STOP)
