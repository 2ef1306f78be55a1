"""Every exception amqprpc raises to its user, in one module (all exported from ``amqprpc``).

A caller of a service catches :class:`RpcError` and its subclasses. The others are raised
while setting a process up: :class:`ServiceNotFound` (loading a service by name),
:class:`TopologyMismatch` (a queue declared with other arguments), :class:`StartupError`
and :class:`PidFileError` (the daemon), :class:`StartCancelled` (a start stopped while it
waited for the broker). The modules that raise them re-export them, so
``from amqprpc.loading import ServiceNotFound`` keeps working.

The CLI maps them to exit codes (see ``amqprpc.cli``): ``RemoteError`` -> 1,
``ServiceNotFound`` and ``StartupError`` -> 2, ``CallTimeout`` -> 3, ``ServiceUnavailable``
and ``CircuitOpen`` -> 4.

Wire level, never raised to a caller: :class:`BadMessage`, and :class:`ReplyTooLarge`,
whose name a caller sees as the ``error_type`` of a :class:`RemoteError`.
"""
from __future__ import annotations

from typing import Any


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


class Revoked(RemoteError):
    """The request was revoked (``client.revoke`` / ``amqprpc revoke``) before it ran, or its
    handler stopped when it saw ``current_call().cancelled`` and raised this. A caller gets
    it as a :class:`RemoteError` whose ``error_type`` is ``"Revoked"``. A handler that raises
    it is never retried (``retryable = False``): the message was called off."""

    retryable = False

    def __init__(self, message: str = "revoked", error_type: str = "Revoked", message_id: str | None = None):
        super().__init__(message, error_type, message_id)


class CallTimeout(RpcError):
    """No reply arrived before the call's deadline, or a service down the chain (which
    shares the deadline) answered that its own call ran out of it (error_type CallTimeout)."""


class WorkflowFailed(RpcError):
    """A workflow ended without its result: a step failed for good (after its retries), or
    the workflow was revoked. ``step`` the failing step's id (``"0.1"``), ``service`` and
    ``action`` it ran, ``error`` and ``error_type`` what it raised (``"Revoked"`` for a revoked
    workflow); ``results`` the results that did arrive, by step id."""

    def __init__(self, workflow: str, step: str, service: str, action: str, error: str, error_type: str,
                 results: dict[str, Any] | None = None) -> None:
        super().__init__(f"workflow {workflow} failed at step {step} ({service}.{action}): {error_type}: {error}")
        self.workflow = workflow
        self.step = step
        self.service = service
        self.action = action
        self.error = error
        self.error_type = error_type
        self.results = results or {}


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


class AccessRefused(ServiceUnavailable):
    """The broker refused this connection's user what the call, cast or event needed (403
    ACCESS_REFUSED: e.g. no write permission on ``service.exchange``); the message names
    the exchange and the user. Raised at once, never retried (the same publish is refused
    until someone grants the permission); the next publish goes on a fresh channel, so it
    works as soon as the permission is granted, without a restart."""


class MessageTooLarge(RpcError, ValueError):
    """A call, cast, event or submit the broker would refuse for its size, refused before
    anything was sent: its AMQP headers (properties) do not fit in one frame of the
    connection's negotiated ``frame_max`` (RabbitMQ would close the whole connection, 501
    FRAME_ERROR, failing every call in flight), or its body is larger than the client's
    ``max_message_size`` (the broker's ``max_message_size``; RabbitMQ would close the
    channel, 406). Only this message fails; it is never re-sent. ``part`` is "headers" or
    "body", ``size`` and ``limit`` are in bytes."""

    def __init__(self, message: str, part: str, size: int, limit: int):
        super().__init__(message)
        self.part, self.size, self.limit = part, size, limit


class CircuitOpen(ServiceUnavailable):
    """The caller's circuit breaker for this service is open; nothing was sent."""


class BadMessage(Exception):
    """A message from the wire that is not a valid envelope. Never raised to callers:
    the worker turns it into an error reply or a dead letter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StartCancelled(Exception):
    """``start()`` (of a Worker, Collector or client's loop) gave up waiting for the broker:
    ``stop`` or ``cancel_start`` was called meanwhile."""

    def __init__(self) -> None:
        super().__init__("stopped while waiting for the broker")


class ReplyTooLarge(Exception):
    """A handler's result too large to send back (``Worker.max_reply_bytes``); the caller
    gets a RemoteError with ``error_type == "ReplyTooLarge"``."""


class TimeLimitExceeded(Exception):
    """Raised inside a running handler when its time limit (``@service.handler(...,
    time_limit=SECONDS)`` or ``amqprpc worker --time-limit``) is reached, by
    :class:`amqprpc.middleware.timelimit.TimeLimit`: pure-Python code stops at its next
    bytecode. An ``Exception`` (as Celery's ``SoftTimeLimitExceeded``), so a handler may catch
    it to clean up; one that swallows it and goes on, or sits in C code or a blocking call, is
    abandoned after the hard time limit's grace. It then follows the handler's retry policy
    like any other error; a caller sees ``error_type == "TimeLimitExceeded"``."""

    def __init__(self, message: str = "time limit exceeded", limit: float | None = None):
        super().__init__(message)
        self.limit = limit


class ServiceNotFound(LookupError):
    """The service or the ``--app`` reference cannot be loaded (a usage error: exit 2)."""


class TopologyMismatch(RuntimeError):
    """A queue exists with other arguments than the ones asked for (PRECONDITION_FAILED)."""


class StartupError(Exception):
    """The process cannot start as configured (pidfile held, metrics port taken): a
    usage error, not a broker problem."""


class PidFileError(Exception):
    """Another live process holds the pidfile."""


class ValidationError(RpcError):
    """A payload (or, with ``returns=``, a reply) that does not fit the type a handler or
    caller declared (:mod:`amqprpc.contracts`). ``errors`` lists each failing field as
    ``{"loc": "items.0.quantity", "msg": "Input should be greater than 0", "type": ...}``;
    the message names them all, one ``path: reason`` each, and carries no traceback.

    Raised in a handler it becomes the caller's error reply (``error_type``
    ``"ValidationError"``), or a dead letter for a cast or an event: it is never retried
    (``retryable = False``), since the same payload would fail the same way every time.
    """

    retryable = False

    def __init__(self, message: str, errors: list[Any] | None = None):
        super().__init__(message)
        self.message = message
        self.errors = errors or []


class RemoteValidationError(RemoteError, ValidationError):
    """The remote handler refused the payload as not fitting its declared type: a
    :class:`RemoteError` (``error_type`` ``"ValidationError"``) and a
    :class:`ValidationError`, whose ``errors`` are the reply's ``errors`` list (each
    ``{"loc", "msg", "type"}``, at most :data:`amqprpc.wire.envelope.MAX_REPLY_ERRORS`; empty
    when the peer sent none)."""

    def __init__(self, message: str, errors: list[Any] | None = None, message_id: str | None = None):
        RemoteError.__init__(self, message, "ValidationError", message_id)
        self.errors = errors or []


class ContractError(TypeError):
    """A handler annotation amqprpc cannot validate with (an unsupported type, a name that
    does not resolve, a type pydantic cannot build a schema for). Found when the worker
    starts (``amqprpc worker`` exits 2 with this one line), not on the first call."""
