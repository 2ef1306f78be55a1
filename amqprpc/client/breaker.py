"""A circuit breaker per target service, shared by every client process through Redis.

States (per service, or per ``service.action`` with ``per_action=True``):

- **closed**: calls go out; ``failure_threshold`` consecutive failures (or, optionally, a
  failure rate over a time window) open it.
- **open**: calls fail at once with :class:`~amqprpc.errors.CircuitOpen`, nothing is
  published, until ``reset_timeout`` seconds have passed.
- **half-open**: at most ``half_open_max_calls`` trial calls at a time; a success closes
  the breaker, a failure opens it again for another ``reset_timeout``.

Failures are ``CallTimeout``, ``ServiceUnavailable`` and connection errors. A
``RemoteError`` means the service is alive and answered, so it does not count unless
``count_remote_errors=True`` (or a custom ``is_failure``) says so.

Sharing: with a Redis URL (argument or ``AMQPRPC_REDIS_URL``) the state lives in one Redis
hash per breaker and every transition is one Lua script, so concurrent processes never
lose an update. Redis is kept off the hot path: a process caches what it last saw for
``sync_interval`` seconds, so a successful call on a closed breaker touches Redis at most
once per ``sync_interval`` per service; an open breaker rejects from the cache until its
reset time. Only failures, half-open trials and the first success after failures run a
script. If Redis cannot be reached the breaker logs ONE warning and keeps working on
process-local state (probing Redis again every ``redis_retry_interval`` seconds): a Redis
outage never fails a call.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from amqprpc import logs
from amqprpc.errors import CallTimeout, CircuitOpen, RemoteError, ServiceUnavailable
from amqprpc.client.breaker_state import CLOSED, HALF_OPEN, OPEN, LocalStore, RateWindow, RedisStore

log = logs.get_logger("amqprpc.breaker")

DEFAULT_PREFIX = "amqprpc:breaker"

# What counts as "the service is not there" by default. OSError covers socket and
# connection errors (ConnectionError is one); CircuitOpen is our own refusal, never a failure.
DEFAULT_FAILURES: tuple[type[BaseException], ...] = (CallTimeout, ServiceUnavailable, OSError)


# Told about every breaker of this process: state changes (a StateChange) and rejections (the
# breaker's name). amqprpc.middleware.metrics.count_breakers() adds its counters (--metrics-port
# and ClientMetrics call it: a worker then shows the breakers of its handlers' service.client);
# nothing here imports it, so a process without metrics loads no prometheus_client.
change_listeners: list[Callable[["StateChange"], Any]] = []
rejection_listeners: list[Callable[[str], Any]] = []


@dataclass(frozen=True)
class StateChange:
    """What listeners receive: breaker ``name`` (service or service.action) went from
    ``old`` to ``new``. ``failures`` is the consecutive failure count then; ``origin`` is
    ``"local"`` when this process made the transition, ``"shared"`` when it saw another
    process's transition in Redis."""

    name: str
    old: str
    new: str
    failures: int
    origin: str


@dataclass
class _View:
    """What this process last knew of one breaker (monotonic times)."""

    state: str
    failures: int
    open_until: float
    fetched: float


class Ticket:
    """Permission for one call; hand its outcome back with :meth:`CircuitBreaker.record`."""

    __slots__ = ("name", "trial")

    def __init__(self, name: str, trial: bool):
        self.name = name
        self.trial = trial


class CircuitBreaker:
    """Fail fast on services that are down; see the module docstring for the states.

    Parameters:
    - ``failure_threshold``: consecutive failures that open the breaker.
    - ``reset_timeout``: seconds an open breaker rejects before it lets a trial through.
    - ``half_open_max_calls``: trial calls allowed at a time while half-open.
    - ``failure_rate``/``window``/``min_calls``: also open when, within the last
      ``window`` seconds, at least ``min_calls`` calls were made and at least this fraction
      (0..1) failed. Counted per process (counting every call in Redis would put it on the
      hot path); the trip itself is shared. Off when None.
    - ``per_action``: one breaker per ``service.action`` instead of per service.
    - ``count_remote_errors``: count ``RemoteError`` as a failure too.
    - ``is_failure``: ``exc -> bool``, overrides the default classification.
    - ``fallback``: ``(service, action, payload, exc) -> data``; ``RpcClient.call`` returns
      its result instead of raising when the breaker refuses a call or the call fails.
    - ``redis_url``: share state through Redis; defaults to ``AMQPRPC_REDIS_URL`` when that
      is set, else process-local. ``shared=False`` forces process-local state.
    - ``key_prefix``: Redis keys are ``{key_prefix}:{name}``.
    - ``sync_interval``: seconds a process trusts its cached view of a closed breaker.
    - ``redis_timeout``: socket and connect timeout for Redis, seconds.
    - ``redis_retry_interval``: seconds between attempts to reach Redis again after a failure.
    - ``listeners``: callables receiving :class:`StateChange`; see :meth:`add_listener`.
    """

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 30.0, half_open_max_calls: int = 1, *,
                 failure_rate: float | None = None, window: float = 60.0, min_calls: int = 20,
                 per_action: bool = False, count_remote_errors: bool = False,
                 is_failure: Callable[[BaseException], bool] | None = None,
                 fallback: Callable[[str, str, Any, BaseException], Any] | None = None,
                 redis_url: str | None = None, shared: bool = True, key_prefix: str = DEFAULT_PREFIX,
                 sync_interval: float = 1.0, redis_timeout: float = 0.1, redis_retry_interval: float = 5.0,
                 listeners: Iterable[Callable[[StateChange], Any]] = ()):
        if failure_threshold < 1 or half_open_max_calls < 1:
            raise ValueError("failure_threshold and half_open_max_calls must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self.failure_rate = failure_rate
        self.window = window
        self.min_calls = min_calls
        self.per_action = per_action
        self.count_remote_errors = count_remote_errors
        self._is_failure = is_failure
        self.fallback = fallback
        self.sync_interval = sync_interval
        # Besides these, every breaker tells the process-wide change_listeners (metrics).
        self._listeners = list(listeners)
        self._views: dict[str, _View] = {}
        self._windows: dict[str, RateWindow] = {}
        self._lock = threading.Lock()
        self.stats = {"rejected": 0, "opened": 0, "half_opened": 0, "closed": 0}
        self._local = LocalStore(self)
        url = (redis_url or os.environ.get("AMQPRPC_REDIS_URL")) if shared else None
        self._store: LocalStore | RedisStore = (
            RedisStore(self, url, key_prefix, redis_timeout, redis_retry_interval) if url else self._local)

    # --- public --------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        """True when state is kept in Redis (even if Redis is down right now)."""
        return isinstance(self._store, RedisStore)

    def add_listener(self, listener: Callable[[StateChange], Any]) -> None:
        """Call ``listener(StateChange)`` on every state change this process makes or sees
        (e.g. the metrics module's gauge). Listeners run in the calling thread and must be quick."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[StateChange], Any]) -> None:
        self._listeners.remove(listener)

    def name_for(self, service: str, action: str) -> str:
        return f"{service}.{action}" if self.per_action else service

    def state(self, service: str, action: str = "") -> str:
        """The current state of the breaker for ``service`` (asks the store, not the cache)."""
        name = self.name_for(service, action)
        state, failures, left = self._store.read(name)
        self._update(name, state, failures, left, "shared")
        return state

    def is_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` counts against the service."""
        if self._is_failure is not None:
            return self._is_failure(exc)
        if isinstance(exc, CircuitOpen):
            return False
        if isinstance(exc, RemoteError):
            return self.count_remote_errors
        return isinstance(exc, DEFAULT_FAILURES)

    def before_call(self, service: str, action: str) -> Ticket:
        """Permission for one call, or :class:`CircuitOpen` (nothing must be sent then)."""
        name = self.name_for(service, action)
        view = self._views.get(name)
        now = time.monotonic()
        if view is not None:
            if view.state == CLOSED and now - view.fetched < self.sync_interval:
                return Ticket(name, False)
            if view.state == OPEN and now < view.open_until:
                self._reject(name, view.open_until - now)
        allowed, state, failures, left = self._store.acquire(name)
        self._update(name, state, failures, left, "shared")
        if not allowed:
            self._reject(name, left)
        return Ticket(name, state == HALF_OPEN)

    def record(self, ticket: Ticket, exc: BaseException | None) -> None:
        """The outcome of a call made with ``ticket``: ``exc`` None for success."""
        failed = exc is not None and self.is_failure(exc)
        name = ticket.name
        if self.failure_rate is not None and self._window(name, self.failure_rate).add(failed):
            self._transition(name, "trip")
            return
        if not failed:
            view = self._views.get(name)
            if view is not None and view.state == CLOSED and view.failures == 0 and not ticket.trial:
                return  # the hot path: nothing to tell anyone
            self._transition(name, "ok")
        else:
            self._transition(name, "fail")

    def call(self, service: str, action: str, payload: Any, send: Callable[[], Any], *,
             on_reject: Callable[[str, str, CircuitOpen], Any] | None = None) -> Any:
        """Run ``send()`` (a blocking call) under the breaker; the fallback, if any, answers
        instead of :class:`CircuitOpen` and of failures that count. ``on_reject(service,
        action, exc)`` is told of a refusal first (the client's ``after_settle`` hooks)."""
        try:
            ticket = self.before_call(service, action)
        except CircuitOpen as exc:
            if on_reject is not None:
                on_reject(service, action, exc)
            if self.fallback is None:
                raise
            return self.fallback(service, action, payload, exc)
        try:
            result = send()
        except Exception as exc:
            self.record(ticket, exc)
            if self.fallback is not None and self.is_failure(exc):
                return self.fallback(service, action, payload, exc)
            raise
        self.record(ticket, None)
        return result

    def call_async(self, service: str, action: str, payload: Any, send: Callable[[], Future[Any]],
                   defer: Callable[[Callable[[Future[Any]], Any]], Callable[[Future[Any]], Any]], *,
                   on_reject: Callable[[str, str, CircuitOpen], Any] | None = None) -> Future[Any]:
        """Run ``send()`` (returns a Future) under the breaker. A refusal is a Future failed
        with :class:`CircuitOpen` (or resolved by the fallback), ``on_reject`` told first as
        for :meth:`call`. The outcome is recorded by
        ``defer(fn)``, a done-callback that runs ``fn`` off the thread that resolves the
        Future: that thread is the client's I/O loop, which must never wait on Redis."""
        try:
            ticket = self.before_call(service, action)
        except CircuitOpen as exc:
            if on_reject is not None:
                on_reject(service, action, exc)
            future: Future[Any] = Future()
            try:
                if self.fallback is None:
                    raise
                future.set_result(self.fallback(service, action, payload, exc))
            except Exception as error:  # noqa: BLE001 - the caller gets it from the Future
                future.set_exception(error)
            return future
        future = send()
        future.add_done_callback(defer(lambda done: self.record(
            ticket, CallTimeout("cancelled") if done.cancelled() else done.exception())))
        return future

    # --- internals -----------------------------------------------------------------------
    def _reject(self, name: str, left: float) -> None:
        self.stats["rejected"] += 1
        for listener in rejection_listeners:
            listener(name)
        raise CircuitOpen(f"{name}: circuit open, retry in {max(left, 0.0):.1f}s; nothing was sent")

    def _transition(self, name: str, outcome: str) -> None:
        state, failures, left = self._store.record(name, outcome)
        self._update(name, state, failures, left, "local")

    def _window(self, name: str, rate: float) -> "RateWindow":
        window = self._windows.get(name)
        if window is None:
            window = self._windows.setdefault(name, RateWindow(self.window, rate, self.min_calls))
        return window

    def _update(self, name: str, state: str, failures: int, left: float, origin: str) -> None:
        now = time.monotonic()
        with self._lock:
            old = self._views.get(name)
            self._views[name] = _View(state, failures, now + left if state == OPEN else 0.0, now)
        old_state = old.state if old is not None else CLOSED
        if old_state == state:
            return
        if state == OPEN:
            self.stats["opened"] += 1
            window = self._windows.get(name)
            if window is not None:
                window.clear()
            log.warning("circuit opened", breaker=name, failures=failures, retry_in=round(left, 3), origin=origin)
        elif state == HALF_OPEN:
            self.stats["half_opened"] += 1
            log.info("circuit half-open", breaker=name, origin=origin)
        else:
            self.stats["closed"] += 1
            log.info("circuit closed", breaker=name, origin=origin)
        change = StateChange(name, old_state, state, failures, origin)
        for listener in [*change_listeners, *self._listeners]:
            try:
                listener(change)
            except Exception:  # noqa: BLE001 - a broken listener must not break calls
                log.exception("circuit breaker listener failed", breaker=name)
