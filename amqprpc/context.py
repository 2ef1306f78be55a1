"""The request a handler thread is serving, so nested calls inherit its deadline and trace.

A worker sets it around each handler; ``RpcClient`` reads it when building a request.
contextvars (not thread-locals) so that it also follows asyncio tasks.

Handlers read it with :func:`current_call` (exported as ``amqprpc.current_call``);
``current`` is the ContextVar itself, for the worker and the client.
"""
from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional


class Cancellation:
    """A flag raised for one running handler (``cancelled``): a plain attribute, set from
    another thread, read by the handler. Anything with a ``cancelled`` attribute serves as a
    :class:`RunScope`'s ``cancel``: the worker's own is the delivery's (its ``cancelled``, which
    the revoke middleware raises; :class:`HandlerCall`)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class RunScope(NamedTuple):
    """What a worker's middleware knows about the run that is about to start on this thread,
    handed to the :class:`CallContext` built for it (see :data:`scope`): ``cancel`` is set
    when the message is revoked while its handler runs (:mod:`amqprpc.middleware.revoke`);
    ``idempotency_key`` the key the request carries (:mod:`amqprpc.middleware.idempotency`)."""

    cancel: Optional[Any] = None  # a Cancellation, or anything with a `cancelled` attribute
    idempotency_key: Optional[str] = None
    # A NamedTuple, not a frozen dataclass: one is made per delivery, on the hot path.


_NO_SCOPE = RunScope()

#: Set by worker middleware around the handler's run (on the handler thread); read once when
#: the CallContext is built, so the context stays right when a handler passes it to other threads.
scope: contextvars.ContextVar[RunScope] = contextvars.ContextVar("amqprpc_run_scope", default=_NO_SCOPE)


def _scope_now() -> RunScope:
    return scope.get()


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the request or event it runs for."""

    service: str  # the service whose handler runs
    action: str  # the action, or for an event handler the event's name ("order.created")
    correlation_id: str  # the request's correlation id (an event's message id)
    trace_id: str  # shared by every hop that followed from one original request
    deadline: float | None  # epoch seconds after which nobody waits for the answer; None for events
    run: RunScope = field(default_factory=_scope_now, repr=False, compare=False)

    def remaining(self) -> float | None:
        """Seconds left until the deadline (negative once it passed), or None without one."""
        return None if self.deadline is None else self.deadline - time.time()

    @property
    def cancelled(self) -> bool:
        """True once the message was revoked (``client.revoke`` / ``amqprpc revoke``) while
        this handler runs: the worker notices within about a second. A long handler checks it
        between steps and stops (returning early, or raising :class:`amqprpc.Revoked` so a
        caller gets that error). Always False where revocation is not checked (no Redis)."""
        cancel = self.run.cancel
        return cancel is not None and cancel.cancelled

    @property
    def idempotency_key(self) -> str | None:
        """The idempotency key the request was sent with (``call(..., idempotency_key=...)``),
        or None."""
        return self.run.idempotency_key


class HandlerCall:
    """What a worker sets in :data:`current` around each handler's run: the fields of a
    :class:`CallContext` in a plain record, made in a fraction of a frozen dataclass's
    time (it is made for every delivery; most handlers never ask for it).
    :func:`current_call` turns it into the CallContext (once: the same object after that).
    ``cancel`` what says the run was called off (the delivery: its ``cancelled``), read
    through the CallContext's ``cancelled``; ``run`` the :data:`scope` when it was made."""

    __slots__ = ("service", "action", "correlation_id", "trace_id", "deadline", "cancel", "run", "_public")

    def __init__(self, service: str, action: str, correlation_id: str, trace_id: str, deadline: float | None,
                 cancel: Any = None) -> None:
        self.service = service
        self.action = action
        self.correlation_id = correlation_id
        self.trace_id = trace_id
        self.deadline = deadline
        self.cancel = cancel
        self.run = scope.get()
        self._public: CallContext | None = None

    def public(self) -> CallContext:
        """The :class:`CallContext` of this run (made on first use)."""
        public = self._public
        if public is None:
            run = self.run
            if self.cancel is not None and run.cancel is None:
                run = RunScope(self.cancel, run.idempotency_key)
            public = self._public = CallContext(self.service, self.action, self.correlation_id, self.trace_id,
                                                self.deadline, run)
        return public

    # What else a CallContext answers, for code that reads `current` itself.
    def remaining(self) -> float | None:
        return self.public().remaining()

    @property
    def cancelled(self) -> bool:
        return self.public().cancelled

    @property
    def idempotency_key(self) -> str | None:
        return self.public().idempotency_key

    def __repr__(self) -> str:
        return f"<HandlerCall {self.service}.{self.action} {self.correlation_id}>"


#: The call being handled: a :class:`CallContext`, or the worker's :class:`HandlerCall`
#: (both have the fields nested calls read: trace_id, correlation_id, deadline).
current: contextvars.ContextVar[CallContext | HandlerCall | None] = contextvars.ContextVar("amqprpc_call",
                                                                                           default=None)

#: Envelope headers every message published in this context carries besides its own (a
#: workflow's steps carry the workflow there); the clients merge them in last.
outgoing_headers: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "amqprpc_outgoing_headers", default=None)


def current_call() -> CallContext | None:
    """The request or event being handled on this thread (or asyncio task), None outside
    a handler::

        @service.event("payment.*")
        def on_payment(payload):
            if current_call().action == "payment.failed": ...
    """
    call = current.get()
    return call.public() if isinstance(call, HandlerCall) else call
