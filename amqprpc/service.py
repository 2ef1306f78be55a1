"""A service: a name and its handlers, registered with decorators (no base class to inherit)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict

if TYPE_CHECKING:
    from .client import RpcClient

from .retry import Retry

Handler = Callable[[dict], Any]

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(name: str) -> str:
    """``getUser`` -> ``get_user``; names already in snake_case are unchanged."""
    return _CAMEL_BOUNDARY.sub("_", name).lower()


@dataclass
class EventSubscription:
    pattern: str
    function: Callable[[dict], None]
    name: str
    broadcast: bool = False
    retry: Retry | None = None


@dataclass
class Service:
    """A named set of handlers.

    >>> service = Service("user-service")
    >>> @service.handler("get_user")
    ... def get_user(payload): return {"id": payload["user_id"]}
    """

    name: str
    handlers: Dict[str, Handler] = field(default_factory=dict)
    events: Dict[str, EventSubscription] = field(default_factory=dict)
    retries: Dict[str, Retry] = field(default_factory=dict)
    #: CircuitBreaker for the calls this service's handlers make through ``service.client``,
    #: so one dead downstream service fails them fast instead of tying up handler threads.
    breaker: Any = None

    def handler(self, action: str | Callable | None = None, *, retry: Retry | None = None) -> Callable:
        """Register a function as the handler of ``action`` (default: the function's name).

        Usable bare (``@service.handler``) or with a name (``@service.handler("get_user")``).
        ``retry``: failed attempts are retried through the broker with backoff, then
        dead-lettered (see :class:`~amqprpc.retry.Retry`); calls only while their deadline allows.
        """
        if callable(action):
            return self.handler(None, retry=retry)(action)

        def register(function: Handler) -> Handler:
            name = action or function.__name__
            if name in self.handlers:
                raise ValueError(f"{self.name}: action {name!r} is registered twice")
            self.handlers[name] = function
            if retry is not None:
                self.retries[name] = retry
            return function

        return register

    def event(self, pattern: str, *, name: str | None = None, broadcast: bool = False,
              retry: Retry | None = None) -> Callable:
        """Register a function for events whose name matches the topic ``pattern``.
        ``retry`` as for :meth:`handler`."""

        def register(function: Callable[[dict], None]) -> Callable[[dict], None]:
            key = name or function.__name__
            if key in self.events:
                raise ValueError(f"{self.name}: event handler {key!r} is registered twice")
            self.events[key] = EventSubscription(pattern, function, key, broadcast, retry)
            return function

        return register

    def find(self, action: str) -> Handler | None:
        """The handler for ``action``, accepting camelCase spellings of snake_case names."""
        found = self.handlers.get(action)
        if found is None and action != (snake := snake_case(action)):
            found = self.handlers.get(snake)
        return found

    def retry_policy(self, action: str) -> Retry | None:
        """The retry policy of ``action``'s handler (camelCase accepted, as in :meth:`find`)."""
        return self.retries.get(action) or self.retries.get(snake_case(action))

    @property
    def client(self) -> "RpcClient":
        """The RpcClient this service's handlers use for nested calls and events: one per
        process, created on first use, closed when the last worker of the service here
        stops (see :mod:`amqprpc.shared_client`). Calls and events made with it inside a
        handler carry the handler's trace id and what is left of its deadline."""
        from .shared_client import client_for  # the client module imports this one

        return client_for(self.name, breaker=self.breaker)
