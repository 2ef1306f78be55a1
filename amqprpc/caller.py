"""What a caller offers, as types: the methods a handler may use on ``service.client``.

:class:`~amqprpc.client.RpcClient` (a real connection), :class:`~amqprpc.testing.FakeClient`
(records and answers) and :class:`~amqprpc.testing.InMemoryClient` (runs the handlers in this
process) all satisfy :class:`Caller`, so a handler, or a function that takes "some client",
is written once against this Protocol and type-checks against each of them;
:class:`~amqprpc.client.AsyncRpcClient` satisfies :class:`AsyncCaller`, its awaitable twin.
It lives at the bottom of the package (it imports no client) so that
:mod:`amqprpc.service` can name it without importing upward.
"""
from __future__ import annotations

from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from amqprpc.retry import Retry


class Proxy(Protocol):
    """``client.proxy("user-service")``: its attributes are the service's actions."""

    def __getattr__(self, name: str) -> Callable[..., Any]: ...


class Caller(Protocol):
    """Calls, casts, events and submits, blocking until the broker (or the reply) answered.

    ``payload`` is a dict, a pydantic model or a dataclass; ``returns`` a type to parse a
    call's data into. See :class:`~amqprpc.client.RpcClient` for what each raises."""

    def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             retry: Retry | None = None, returns: Any = None, idempotency_key: str | None = None) -> Any: ...

    def call_async(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   callback: Callable[[Future[Any]], Any] | None = None, returns: Any = None,
                   idempotency_key: str | None = None) -> Future[Any]: ...

    def cast(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
             priority: int | None = None, message_id: str | None = None,
             headers: Mapping[str, Any] | None = None) -> str: ...

    def publish_event(self, name: str, payload: Any = None, *, timeout: float | None = None) -> None: ...

    def submit(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
               idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
               priority: int | None = None) -> str: ...

    def proxy(self, service: str, *, timeout: float | None = None) -> Proxy: ...

    def close(self) -> None: ...


class AsyncCaller(Protocol):
    """:class:`Caller` for asyncio code: the same methods, awaited."""

    async def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   returns: Any = None, idempotency_key: str | None = None) -> Any: ...

    async def cast(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
                   priority: int | None = None) -> str: ...

    async def publish_event(self, name: str, payload: Any = None, *, timeout: float | None = None) -> None: ...

    async def submit(self, service: str, action: str, payload: Any = None, *,
                     timeout: float | None = None, idempotency_key: str | None = None, countdown: float | None = None,
                     eta: datetime | None = None, priority: int | None = None) -> str: ...

    async def close(self) -> None: ...
