"""The exceptions a caller can catch. All subclass :class:`RpcError`.

The CLI maps them to exit codes (see ``amqprpc.cli``): ``RemoteError`` -> 1,
``CallTimeout`` -> 3, ``ServiceUnavailable`` and ``CircuitOpen`` -> 4.
"""
from __future__ import annotations


class RpcError(Exception):
    """Base class of every error amqprpc raises to a caller."""


class RemoteError(RpcError):
    """The handler ran and failed, or refused the request.

    ``error_type`` is the remote exception's class name (``"ValueError"``,
    ``"UnknownAction"``, ...), ``message`` its text. No traceback travels.
    """

    def __init__(self, message: str, error_type: str = "RemoteError", message_id: str | None = None):
        super().__init__(f"{error_type}: {message}")
        self.message = message
        self.error_type = error_type
        self.message_id = message_id


class CallTimeout(RpcError):
    """No reply arrived before the call's deadline, or a service down the chain (which
    shares the deadline) answered that its own call ran out of it (error_type CallTimeout)."""


class ServiceUnavailable(RpcError):
    """Nobody can take the request: no queue is bound for the service, or the
    broker cannot be reached, or the connection was lost with the call in flight."""


class ConnectionLost(ServiceUnavailable):
    """Not connected to the broker, or the connection dropped with the request in flight.
    Unlike "no queue is bound", waiting for the reconnect may help: casts and events
    retry it under a bounded policy (``amqprpc.retry.PUBLISH_RETRY``)."""


class PublishRefused(ServiceUnavailable):
    """The broker refused (nacked) the message: it was not stored. A quorum queue without
    a leader, or a channel opened while one was being elected, does that; the channel is
    replaced, and casts and events re-send under the same bounded policy as after a
    connection loss. A call learns it at once rather than at its timeout."""


class CircuitOpen(ServiceUnavailable):
    """The caller's circuit breaker for this service is open; nothing was sent."""


class BadMessage(Exception):
    """A message from the wire that is not a valid envelope. Never raised to callers:
    the worker turns it into an error reply or a dead letter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
