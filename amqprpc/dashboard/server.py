"""``amqprpc dashboard`` as a daemon: the same life as a worker's (signals, pidfile, systemd
notifications, broker wait, logging) through :func:`amqprpc.ops.daemon.run_worker`, with
uvicorn serving the application in a thread of its own.

Start: the broker is waited for (``broker_wait``, backoff up to ``reconnect_cap``, each
attempt logged and shown to systemd), then the port is bound (taken: exit 2), the collector
takes its first snapshot and uvicorn serves; ``READY=1`` follows. SIGTERM/SIGINT stop it:
the event streams end, uvicorn closes its connections, exit 0. While serving, a broker or
Redis outage only empties that part of the page (with the reason) until it is back.
"""
from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import Any, Callable

from amqprpc import logs
from amqprpc.config import redact, ssl_options
from amqprpc.dashboard.collect import Collector
from amqprpc.errors import StartCancelled, StartupError
from amqprpc.transport.backoff import full_jitter

log = logs.get_logger("amqprpc.dashboard")


def wait_for_broker(url: str, broker_wait: float, cap: float, cancelled: threading.Event,
                    on_connect_retry: Callable[[int, float, BaseException], None] | None = None) -> None:
    """Return once the broker accepts a connection; raise its error after ``broker_wait``
    seconds, :class:`StartCancelled` when ``cancelled`` is set meanwhile."""
    from kombu import Connection

    give_up_at = time.monotonic() + broker_wait
    attempt = 0
    while True:
        try:
            with Connection(url, connect_timeout=3, ssl=ssl_options(url)) as connection:
                connection.connect()
            return
        except Exception as exc:  # noqa: BLE001 - retried until broker_wait, then raised
            delay = full_jitter(attempt, 0.5, cap)
            if cancelled.is_set():
                raise StartCancelled() from None
            if time.monotonic() + delay > give_up_at:
                raise
            attempt += 1
            log.warning("broker connect failed", url=redact(url), error=redact(str(exc)),
                        error_type=type(exc).__name__, attempt=attempt, retry_in=round(delay, 3))
            if on_connect_retry is not None:
                on_connect_retry(attempt, delay, exc)
            if cancelled.wait(delay):
                raise StartCancelled() from None


class DashboardDaemon:
    """What :func:`~amqprpc.ops.daemon.run_worker` runs (its ``Daemon`` protocol)."""

    def __init__(self, app: Any, collector: Collector, *, host: str, port: int, broker_url: str,
                 reconnect_cap: float = 10.0):
        self.app = app
        self.collector = collector
        self.host, self.port = host, port
        self.url = broker_url
        self.reconnect_cap = reconnect_cap
        self._cancelled = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stats(self) -> dict[str, int]:
        return {"snapshots": int(self.collector.snapshot()["version"])}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.collector.alive

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host.strip("[]"), self.port))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror or exc}") \
                from None
        sock.listen(128)
        self.port = sock.getsockname()[1]
        return sock

    def start(self, *, broker_wait: float = 0.0,
              on_connect_retry: Callable[[int, float, BaseException], None] | None = None) -> None:
        import uvicorn

        # uvicorn's own start/stop lines say what "dashboard ready" says, with %-style
        # arguments the structured log would print raw: only its warnings and errors.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        sock = self.bind()  # a port that is taken fails at once, not after the broker wait
        try:
            wait_for_broker(self.url, broker_wait, self.reconnect_cap, self._cancelled, on_connect_retry)
        except BaseException:
            sock.close()
            raise
        self.collector.start()
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3, ws="none")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="amqprpc-dashboard-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise StartupError("the dashboard's HTTP server did not start")
        log.info("dashboard ready", url=f"http://{self.host}:{self.port}/", broker=redact(self.url),
                 queues=self.collector.queues.source)

    def cancel_start(self) -> None:
        self._cancelled.set()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop serving: event streams end, then uvicorn closes its connections."""
        self.collector.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        return not (self._thread is not None and self._thread.is_alive())

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._server is not None:
            self._server.force_exit = True
        self.shutdown(timeout if timeout is not None else 10.0)


def serve(daemon: DashboardDaemon, *, pidfile: str | None = None, broker_wait: float = math.inf,
          shutdown_timeout: float = 10.0) -> int:
    """Run until a stop signal; the exit code."""
    from amqprpc.ops.daemon import run_worker

    return run_worker(daemon, shutdown_timeout, pidfile=pidfile, title=f"amqprpc dashboard {daemon.name}",
                      broker_wait=broker_wait, kind="dashboard")
