"""The request a handler thread is serving, so nested calls inherit its deadline and trace.

A worker sets it around each handler; ``RpcClient`` reads it when building a request.
contextvars (not thread-locals) so that it also follows asyncio tasks.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class CallContext:
    service: str
    action: str
    correlation_id: str
    trace_id: str
    deadline: float | None  # epoch seconds


current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("amqprpc_call", default=None)
