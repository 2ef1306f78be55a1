"""A service: a name and its handlers, registered with decorators (no base class to inherit)."""
from __future__ import annotations

import contextlib
import contextvars
import functools

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

from amqprpc.caller import Caller
from amqprpc.errors import ContractError
from amqprpc.rate import Rate, parse_rate
from amqprpc.schedule import Schedule
from amqprpc.wire.ids import snake_case
from amqprpc.retry import Retry

Handler = Callable[[dict[str, Any]], Any]

#: Seconds an idempotency key is remembered (:mod:`amqprpc.middleware.idempotency`): 24 h.
DEFAULT_DEDUP_WINDOW = 86400.0

# Where ``Service.client`` comes from: amqprpc.shared_client installs its ``client_for`` here
# when it is imported (``import amqprpc`` does), so that this module -- which the client
# imports -- names no client module and the dependencies stay one way.
client_provider: Callable[[str, Any], Caller] | None = None


# Clients installed ahead of the shared one, by service name, for this thread or asyncio
# task only (a ContextVar: a test thread's fake never reaches a real worker's handler
# threads in the same process). How amqprpc.testing runs handlers without a broker.
_installed: contextvars.ContextVar[Optional[Mapping[str, Caller]]] = contextvars.ContextVar(
    "amqprpc_installed_clients", default=None)


@contextlib.contextmanager
def client_installed(names: Iterable[str], client: Caller) -> Iterator[None]:
    """While inside, ``service.client`` of the services called ``names`` is ``client`` (a
    :class:`~amqprpc.caller.Caller`: :class:`amqprpc.testing.FakeClient`,
    :class:`amqprpc.testing.InMemoryClient`) in this thread or task, and in contexts
    copied from it. Nests; the previous clients come back on exit."""
    token = _installed.set({**(_installed.get() or {}), **{name: client for name in names}})
    try:
        yield
    finally:
        _installed.reset(token)


@dataclass
class EventSubscription:
    pattern: str
    function: Callable[[dict[str, Any]], None]
    name: str
    broadcast: bool = False
    retry: Retry | None = None
    time_limit: float | None = None


@dataclass
class PublishedEvent:
    """An event a service says it publishes (:meth:`Service.publishes`): documentation only,
    for ``amqprpc asyncapi``. ``model`` is its payload's type (None: any JSON object)."""

    name: str
    model: Any = None
    description: str = ""


@dataclass
class Service:
    """A named set of handlers.

    >>> service = Service("user-service")
    >>> @service.handler("get_user")
    ... def get_user(payload): return {"id": payload["user_id"]}

    A handler whose payload is annotated with a pydantic model, a dataclass or a TypedDict
    gets it validated and parsed first (see :mod:`amqprpc.contracts`); the decorators return
    the function as written, ``handlers`` / ``events`` hold what the worker runs.
    """

    name: str
    handlers: Dict[str, Handler] = field(default_factory=dict)
    events: Dict[str, EventSubscription] = field(default_factory=dict)
    retries: Dict[str, Retry] = field(default_factory=dict)
    #: Seconds one run of a handler may take, by action (``handler(..., time_limit=)``).
    time_limits: Dict[str, float] = field(default_factory=dict)
    #: The events this service says it publishes (:meth:`publishes`), by name.
    published: Dict[str, PublishedEvent] = field(default_factory=dict)
    #: CircuitBreaker for the calls this service's handlers make through ``service.client``,
    #: so one dead downstream service fails them fast instead of tying up handler threads.
    breaker: Any = None
    #: Seconds a request's idempotency key is remembered (a repeat within it does not run the
    #: handler again); per handler with ``@service.handler(..., dedup_window=...)``.
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    dedup_windows: Dict[str, float] = field(default_factory=dict)
    #: (kind, name) -> function of the handlers whose annotations did not resolve at
    #: registration (a model defined further down the module), or the model of a published
    #: event pydantic could not describe yet: :meth:`check` retries them.
    _unchecked: Dict[Tuple[str, str], Any] = field(default_factory=dict, repr=False)
    #: 1-10: the request queue is a priority queue (``x-max-priority``); messages sent with a
    #: higher ``priority=`` are taken first. None: a plain queue (priorities ignored).
    max_priority: Optional[int] = None
    #: Handlers' rate limits (``rate_limit="20/s"``) by action, for the whole service.
    rate_limits: Dict[str, Rate] = field(default_factory=dict)
    #: Periodic tasks (:meth:`periodic`) by schedule name, run by ``amqprpc beat``.
    schedules: Dict[str, Schedule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_priority is not None and (isinstance(self.max_priority, bool)
                                              or not isinstance(self.max_priority, int)
                                              or not 1 <= self.max_priority <= 10):
            raise ValueError(f"{self.name}: max_priority must be an int from 1 to 10, not {self.max_priority!r}")

    def handler(self, action: str | Callable[..., Any] | None = None, *, retry: Retry | None = None,
                dedup_window: float | None = None, rate_limit: str | None = None,
                time_limit: float | None = None) -> Callable[..., Any]:
        """Register a function as the handler of ``action`` (default: the function's name).

        Usable bare (``@service.handler``) or with a name (``@service.handler("get_user")``).
        ``retry``: failed attempts are retried through the broker with backoff, then
        dead-lettered (see :class:`~amqprpc.retry.Retry`); calls only while their deadline allows.
        ``dedup_window``: seconds a request's idempotency key is remembered for this handler
        (default: the service's ``dedup_window``, 24 h).
        ``rate_limit``: ``"20/s"`` (``/s``, ``/m``, ``/h``) for the service as a whole, across
        all its workers (:mod:`amqprpc.middleware.ratelimit`); what is over waits in the broker.
        ``time_limit``: seconds one run may take; at the limit ``TimeLimitExceeded`` is raised
        inside it (see :mod:`amqprpc.middleware.timelimit`), which then follows ``retry``.
        """
        _check_time_limit(time_limit)
        if callable(action):
            bare: Callable[[Handler], Handler] = self.handler(None, retry=retry, dedup_window=dedup_window,
                                                              rate_limit=rate_limit, time_limit=time_limit)
            return bare(action)
        rate = parse_rate(rate_limit) if rate_limit is not None else None

        def register(function: Handler) -> Handler:
            name = action or function.__name__
            if name in self.handlers:
                raise ValueError(f"{self.name}: action {name!r} is registered twice")
            self.handlers[name] = self._typed("handler", name, function)
            if retry is not None:
                self.retries[name] = retry
            if time_limit is not None:
                self.time_limits[name] = float(time_limit)
            if dedup_window is not None:
                self.dedup_windows[name] = dedup_window
            if rate is not None:
                self.rate_limits[name] = rate
            return function

        return register

    def event(self, pattern: str, *, name: str | None = None, broadcast: bool = False,
              retry: Retry | None = None, time_limit: float | None = None) -> Callable[..., Any]:
        """Register a function for events whose name matches the topic ``pattern``.
        ``retry`` and ``time_limit`` as for :meth:`handler`."""
        _check_time_limit(time_limit)

        def register(function: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
            key = name or function.__name__
            if key in self.events:
                raise ValueError(f"{self.name}: event handler {key!r} is registered twice")
            self.events[key] = EventSubscription(pattern, self._typed("event", key, function), key, broadcast, retry,
                                                 None if time_limit is None else float(time_limit))
            return function

        return register

    def periodic(self, action: str, *, cron: str | None = None, every: float | None = None,
                 payload: dict[str, Any] | None = None, tz: str = "UTC", name: str | None = None,
                 misfire: str = "once") -> Schedule:
        """Run ``action`` periodically, as a cast, by ``cron`` (``"*/5 * * * *"``, in time
        zone ``tz``) or ``every`` seconds; ``amqprpc beat`` publishes the ticks (any number of
        replicas, one tick once). ``name`` (default: the action) names the schedule in tick
        ids and in Redis; ``misfire``: ticks missed while no beat ran fire once or are skipped.

        >>> service = Service("report-service")
        >>> _ = service.periodic("cleanup", every=300)
        """
        schedule = Schedule(name or action, self.name, action, cron, every, dict(payload or {}), tz, misfire)
        if schedule.name in self.schedules:
            raise ValueError(f"{self.name}: schedule {schedule.name!r} is registered twice (give each a name=)")
        self.schedules[schedule.name] = schedule
        return schedule

    def publishes(self, name: str, model: Any = None, *, description: str = "") -> None:
        """Declare that this service publishes event ``name`` (e.g. ``order.created``), its
        payload a ``model`` (a pydantic model, a dataclass or a TypedDict; None or ``dict``:
        any JSON object). Documentation only: ``amqprpc asyncapi`` describes it as a send
        operation on the event exchange; publishing (``service.client.publish_event``) is
        not changed or checked by it. A model pydantic cannot describe is refused by
        :meth:`check`, as a bad handler annotation is.

        >>> service = Service("order-service")
        >>> service.publishes("order.created", description="An order was placed.")
        """
        if not name or "*" in name or "#" in name:
            raise ValueError(f"{self.name}: publishes {name!r}: an event's name is a routing key "
                             "(words separated by dots), not a pattern")
        if name in self.published:
            raise ValueError(f"{self.name}: published event {name!r} is declared twice")
        self.published[name] = PublishedEvent(name, model, description)
        if model is None or model is dict:
            return
        from amqprpc import contracts

        try:
            contracts.event_contract(model, self._where("publishes", name))
        except ContractError:
            self._unchecked[("publishes", name)] = model  # check() says why, at the worker's start

    def _typed(self, kind: str, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """What the worker runs for ``function``: itself when it has no annotations (no
        import, no wrapper), else what :func:`amqprpc.contracts.typed` makes of them."""
        target = function
        while isinstance(target, functools.partial):  # service.handler("x")(partial(handle, shop))
            target = target.func
        if not getattr(target, "__annotations__", None):
            return function
        from amqprpc import contracts

        try:
            return contracts.typed(function, self._where(kind, name), f"{self.name}.{name}")
        except ContractError:
            self._unchecked[(kind, name)] = function  # check() says why, at the worker's start
            return function

    def _where(self, kind: str, name: str) -> str:
        what = {"handler": "handler", "event": "event handler", "publishes": "published event"}[kind]
        return f"{self.name}: {what} {name!r}"

    def check(self) -> None:
        """Resolve the annotations registration could not; raise ContractError naming every
        handler whose annotations cannot be validated with, and every published event whose
        model cannot be described (one line). The worker calls it before connecting, so a bad
        annotation stops it at start, not on the first call."""
        if not self._unchecked:
            return
        from amqprpc import contracts

        problems = []
        for (kind, name), function in list(self._unchecked.items()):
            if kind == "publishes":
                try:
                    contracts.event_contract(function, self._where(kind, name))
                except ContractError as exc:
                    problems.append(str(exc))
                else:
                    del self._unchecked[(kind, name)]
                continue
            try:
                handler = contracts.typed(function, self._where(kind, name), f"{self.name}.{name}")
            except ContractError as exc:
                problems.append(str(exc))
                continue
            del self._unchecked[(kind, name)]
            if kind == "handler":
                self.handlers[name] = handler
            else:
                self.events[name].function = handler
        if problems:
            raise ContractError("; ".join(problems))

    def find(self, action: str) -> Handler | None:
        """The handler for ``action``, accepting camelCase spellings of snake_case names."""
        if self._unchecked:
            self.check()
        found = self.handlers.get(action)
        if found is None and action != (snake := snake_case(action)):
            found = self.handlers.get(snake)
        return found

    def retry_policy(self, action: str) -> Retry | None:
        """The retry policy of ``action``'s handler (camelCase accepted, as in :meth:`find`)."""
        return self.retries.get(action) or self.retries.get(snake_case(action))

    def time_limit(self, name: str, event: bool = False) -> float | None:
        """The ``time_limit`` handler ``name`` (an event handler's name when ``event``;
        camelCase accepted for actions) was registered with, or None."""
        if event:
            subscription = self.events.get(name)
            return None if subscription is None else subscription.time_limit
        found = self.time_limits.get(name)
        return found if found is not None else self.time_limits.get(snake_case(name))

    @property
    def uses_time_limits(self) -> bool:
        """Whether any handler of this service has a ``time_limit``."""
        return bool(self.time_limits) or any(each.time_limit is not None for each in self.events.values())

    def dedup_window_of(self, action: str) -> float:
        """Seconds ``action``'s idempotency keys are remembered (camelCase accepted)."""
        windows = self.dedup_windows
        if not windows:
            return self.dedup_window
        return windows.get(action) or windows.get(snake_case(action)) or self.dedup_window

    @property
    def client(self) -> Caller:
        """The RpcClient (typed as the :class:`~amqprpc.caller.Caller` it offers) this service's
        handlers use for nested calls and events: one per process, created on first use,
        closed when the last worker of the service here stops (see
        :mod:`amqprpc.middleware.shared_client`). Calls and events made with it inside a
        handler carry the handler's trace id and what is left of its deadline. A client
        installed with :func:`client_installed` (as :mod:`amqprpc.testing` does) comes first."""
        installed = _installed.get()
        if installed is not None and self.name in installed:
            return installed[self.name]
        if client_provider is None:  # pragma: no cover - amqprpc/__init__ imports shared_client
            raise RuntimeError("no client provider: import amqprpc.shared_client")
        return client_provider(self.name, self.breaker)


def _check_time_limit(time_limit: float | None) -> None:
    if time_limit is not None and (isinstance(time_limit, bool) or not time_limit > 0):
        raise ValueError(f"time_limit must be positive seconds, not {time_limit!r}")
