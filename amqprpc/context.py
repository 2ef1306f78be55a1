"""The request a handler thread is serving, so nested calls inherit its deadline and trace.

A worker sets it around each handler; ``RpcClient`` reads it when building a request.
contextvars (not thread-locals) so that it also follows asyncio tasks.

Handlers read it with :func:`current_call` (exported as ``amqprpc.current_call``);
``current`` is the ContextVar itself, for the worker and the client.
"""
from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the request or event it runs for."""

    service: str  # the service whose handler runs
    action: str  # the action, or for an event handler the event's name ("order.created")
    correlation_id: str  # the request's correlation id (an event's message id)
    trace_id: str  # shared by every hop that followed from one original request
    deadline: float | None  # epoch seconds after which nobody waits for the answer; None for events

    def remaining(self) -> float | None:
        """Seconds left until the deadline (negative once it passed), or None without one."""
        return None if self.deadline is None else self.deadline - time.time()


current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("amqprpc_call", default=None)

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
    return current.get()
