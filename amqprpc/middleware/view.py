"""WorkerView: what a middleware's lifecycle hooks (``worker_starting`` ... ``worker_stopped``)
may read of the worker, as a type.

A hook is handed the :class:`~amqprpc.server.worker.Worker` itself, but typing its argument
as the Worker would make the middleware layer import the server above it; this Protocol
names what the built-in middleware (ping, the shared client, registry presence, metrics)
use, and the Worker satisfies it. Everything is read-only but ``builtins`` (where a
middleware registers an action every worker answers, as ping does) and ``hooks``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, MutableMapping, Protocol

from amqprpc.service import Service
from amqprpc.wire.topology import Topology


class WorkerView(Protocol):
    """The worker as its middleware sees it."""

    @property
    def service(self) -> Service:
        """The service it serves."""

    @property
    def name(self) -> str:
        """The service's name."""

    @property
    def topology(self) -> Topology:
        """Its exchanges and queue names."""

    @property
    def queue_name(self) -> str:
        """Its request queue."""

    @property
    def instance_id(self) -> str:
        """This worker's id (host.pid.random), as ping and the registry show it."""

    @property
    def url(self) -> str:
        """The broker URL it connects to (with credentials: redact before showing it)."""

    @property
    def concurrency(self) -> int:
        """Its number of handler threads."""

    @property
    def started_at(self) -> float:
        """When it was created (``time.time()``)."""

    @property
    def stats(self) -> Mapping[str, int]:
        """What it did so far: received, succeeded, failed, refused, expired, retried, ..."""

    @property
    def builtins(self) -> MutableMapping[str, Callable[[dict[str, Any]], Any]]:
        """Actions every worker answers besides its service's own, by name (ping)."""

    @property
    def hooks(self) -> Any:
        """Its :class:`~amqprpc.middleware.Hooks` (typed ``Any`` here: the hooks module
        imports this one)."""
