"""Helpers for testing services (shipped, like ``nameko.testing``).

Without a broker: :func:`worker_factory` runs one service's handlers with a
:class:`FakeClient` as ``service.client`` (:mod:`amqprpc.testing.fake`);
:class:`InMemoryClient` routes calls, casts and events to handlers in this process
(:mod:`amqprpc.testing.inmemory`). Against a real broker:
:func:`running_worker`, :func:`delete_queues`, :func:`unique_name`, :func:`wait_for`, and
:func:`capture_logs` for both.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from amqprpc import logs
from amqprpc.wire import topology
from amqprpc.config import broker_url as default_broker_url
from amqprpc.server.events import service_queue_names
from amqprpc.service import Service
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology
from amqprpc.server.worker import Worker
from amqprpc.testing.fake import FakeClient, Harness, Sent, worker_factory
from amqprpc.testing.inmemory import DeadLetter, InMemoryClient

if TYPE_CHECKING:  # mypy proves that every client a handler may be given offers what service.client promises
    from amqprpc.caller import AsyncCaller, Caller
    from amqprpc.client.aio import AsyncRpcClient
    from amqprpc.client.rpc import RpcClient

    _CALLERS: tuple[type[Caller], ...] = (RpcClient, FakeClient, InMemoryClient)
    _ASYNC_CALLERS: tuple[type[AsyncCaller], ...] = (AsyncRpcClient,)
    from amqprpc.middleware.view import WorkerView

    _WORKER: type[WorkerView] = Worker  # what lifecycle hooks are handed

__all__ = [
    "worker_factory", "FakeClient", "InMemoryClient", "Harness", "Sent", "DeadLetter",
    "running_worker", "unique_name", "delete_queues", "delete_exchanges", "wait_for", "capture_logs",
]


def unique_name(prefix: str = "test") -> str:
    """A name no other test (or developer) uses: queues and services cannot collide."""
    return f"{prefix}-{os.getpid()}-{os.urandom(4).hex()}"


def delete_queues(*names: str, broker_url: str | None = None) -> None:
    """Delete queues a test declared (missing ones are fine)."""
    topology.delete(default_broker_url(broker_url), queues=names)


def delete_exchanges(*names: str, broker_url: str | None = None) -> None:
    """Delete exchanges a test declared, e.g. those of a ``Topology.namespaced`` one."""
    topology.delete(default_broker_url(broker_url), exchanges=names)


@contextlib.contextmanager
def running_worker(service: Service, *, broker_url: str | None = None, topology: Topology = DEFAULT_TOPOLOGY,
                   delete: bool = True, shutdown_timeout: float = 10.0, **options: Any) -> Iterator[Worker]:
    """Run ``service`` in a worker inside this process; stop it and delete its queues after
    (its request queue and its service-pool event queues, with their dead-letter and delay
    queues; pass ``delete=False`` when other workers of the same service outlive this one)."""
    worker = Worker(service, broker_url=broker_url, topology=topology, **options)
    worker.start()
    try:
        yield worker
    finally:
        worker.shutdown(shutdown_timeout)
        if delete:
            names = service_queue_names(service, topology)
            delete_queues(*names, *topology.retry_queue_names(service.name, names), broker_url=broker_url)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it is truthy; raise AssertionError after ``timeout`` seconds.
    (For tests only: production paths never poll.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@contextlib.contextmanager
def capture_logs(logger: str = "amqprpc", level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Collect what ``logger`` (and the loggers below it) logs at ``level`` or above while
    inside, as dicts of ``event``, ``log_level`` and the line's fields (the shape of
    ``structlog.testing.capture_logs``), whatever the process's logging configuration."""
    captured: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append({**logs.record_fields(record), "log_level": record.levelname.lower()})

    target = logging.getLogger(logger)
    handler, saved_level = Collect(level), target.level
    target.addHandler(handler)
    target.setLevel(level)
    try:
        yield captured
    finally:
        target.removeHandler(handler)
        target.setLevel(saved_level)
