"""The RpcClient a service's handlers use for nested calls and events: ``service.client``.

    @service.handler
    def create_order(payload):
        service.client.call("user-service", "validate_token", {"token": payload["token"]})
        service.client.publish_event("order.created", {...})

One client per service per process, created on first use (so a worker that never calls out
opens no second connection), shared by every handler thread (RpcClient is thread-safe), and
closed when the last worker of that service in this process stops. Opening a client per
request, as handlers often do with nameko's ClusterRpcProxy, costs a connection handshake
and a reply queue per request.

A running :class:`~amqprpc.server.worker.Worker` attaches its service here (through the
:class:`SharedClient` middleware every worker runs), so the client talks to the worker's
broker with the worker's topology. Outside any worker (a script, a test) the
client uses ``AMQPRPC_BROKER_URL`` and stays open until :func:`close_all`.
Trace id and deadline need nothing here: the client reads them from the handler's
:mod:`amqprpc.context`.
"""
from __future__ import annotations

import threading

from amqprpc.client.breaker import CircuitBreaker
from amqprpc.client.rpc import RpcClient
from amqprpc import service as _service
from amqprpc.middleware import Middleware
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology
from amqprpc.middleware.view import WorkerView

_lock = threading.Lock()
_attached: dict[str, list[tuple[str | None, Topology]]] = {}  # service -> (broker url, topology) per worker
_clients: dict[str, RpcClient] = {}  # service -> its shared client


def client_for(service: str, breaker: CircuitBreaker | None = None) -> RpcClient:
    """The shared client of ``service``'s handlers; connects on first use, guarded by
    ``breaker`` (the Service's own) when given.

    Raises :class:`~amqprpc.errors.ServiceUnavailable` when the broker cannot be reached
    (the next use tries again).
    """
    client = _clients.get(service)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(service)
        if client is None:
            broker_url, topology = (_attached.get(service) or [(None, DEFAULT_TOPOLOGY)])[0]
            client = _clients[service] = RpcClient(service, broker_url=broker_url, topology=topology, breaker=breaker)
        return client


def attach(service: str, broker_url: str, topology: Topology) -> None:
    """A worker of ``service`` started in this process; its handlers' client uses its broker."""
    with _lock:
        _attached.setdefault(service, []).append((broker_url, topology))


def detach(service: str, broker_url: str, topology: Topology) -> None:
    """That worker stopped (its handlers finished); the last one out closes the client."""
    with _lock:
        workers = _attached.get(service, [])
        if (broker_url, topology) in workers:
            workers.remove((broker_url, topology))
        if workers:
            return
        _attached.pop(service, None)
        client = _clients.pop(service, None)
    if client is not None:
        client.close()


def close_all() -> None:
    """Close every shared client (for scripts and tests that used them outside a worker)."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


class SharedClient(Middleware):
    """Attaches a worker's service while the worker runs: its handlers' ``service.client``
    uses the worker's broker and topology, and is closed after the last worker of the
    service here stopped (its handlers finished)."""

    def worker_starting(self, worker: WorkerView) -> None:
        attach(worker.service.name, worker.url, worker.topology)

    def worker_stopped(self, worker: WorkerView) -> None:
        detach(worker.service.name, worker.url, worker.topology)


_service.client_provider = client_for  # what Service.client returns
