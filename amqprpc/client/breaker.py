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
from amqprpc.config import redact, redis_client
from amqprpc.errors import CallTimeout, CircuitOpen, RemoteError, ServiceUnavailable
from amqprpc.wire.ids import text

log = logs.get_logger("amqprpc.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
DEFAULT_PREFIX = "amqprpc:breaker"

# What counts as "the service is not there" by default. OSError covers socket and
# connection errors (ConnectionError is one); CircuitOpen is our own refusal, never a failure.
DEFAULT_FAILURES: tuple[type[BaseException], ...] = (CallTimeout, ServiceUnavailable, OSError)


# Told about every breaker of this process: state changes (a StateChange) and rejections (the
# breaker's name). amqprpc.metrics adds its counters when it is imported (a worker's
# --metrics-port then shows the breakers of its handlers' service.client); nothing here
# imports it, so a process without metrics loads no prometheus_client.
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
        self._windows: dict[str, _RateWindow] = {}
        self._lock = threading.Lock()
        self.stats = {"rejected": 0, "opened": 0, "half_opened": 0, "closed": 0}
        self._local = _LocalStore(self)
        url = (redis_url or os.environ.get("AMQPRPC_REDIS_URL")) if shared else None
        self._store: _LocalStore | _RedisStore = (
            _RedisStore(self, url, key_prefix, redis_timeout, redis_retry_interval) if url else self._local)

    # --- public --------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        """True when state is kept in Redis (even if Redis is down right now)."""
        return isinstance(self._store, _RedisStore)

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

    def _window(self, name: str, rate: float) -> "_RateWindow":
        window = self._windows.get(name)
        if window is None:
            window = self._windows.setdefault(name, _RateWindow(self.window, rate, self.min_calls))
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


class _RateWindow:
    """Calls and failures over the last ``window`` seconds in 10 buckets: O(1) per call,
    constant memory whatever the call rate."""

    BUCKETS = 10

    def __init__(self, window: float, rate: float, min_calls: int):
        self.width = window / self.BUCKETS
        self.rate = rate
        self.min_calls = min_calls
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        self.buckets = [[0, 0, 0] for _ in range(self.BUCKETS)]  # [bucket number, calls, failures]

    def add(self, failed: bool) -> bool:
        """Count one call; True when the window now says "open"."""
        number = int(time.monotonic() / self.width)
        with self.lock:
            bucket = self.buckets[number % self.BUCKETS]
            if bucket[0] != number:
                bucket[:] = [number, 0, 0]
            bucket[1] += 1
            bucket[2] += failed
            if not failed:
                return False
            oldest = number - self.BUCKETS + 1
            calls = sum(b[1] for b in self.buckets if b[0] >= oldest)
            failures = sum(b[2] for b in self.buckets if b[0] >= oldest)
        return calls >= self.min_calls and failures >= self.rate * calls


class _LocalStore:
    """Process-local state with the same transitions as the Lua scripts below."""

    def __init__(self, breaker: CircuitBreaker):
        self.b = breaker
        self.lock = threading.Lock()
        self.rows: dict[str, list[Any]] = {}  # name -> [state, failures, opened_at, trials, trial_at]

    def _row(self, name: str) -> list[Any]:
        return self.rows.setdefault(name, [CLOSED, 0, 0.0, 0, 0.0])

    def read(self, name: str) -> tuple[str, int, float]:
        with self.lock:
            row = self._row(name)
            left = row[2] + self.b.reset_timeout - time.monotonic() if row[0] == OPEN else 0.0
            return row[0], row[1], max(left, 0.0)

    def acquire(self, name: str) -> tuple[bool, str, int, float]:
        reset, now = self.b.reset_timeout, time.monotonic()
        with self.lock:
            row = self._row(name)
            state, failures, opened_at, trials, trial_at = row
            if state == CLOSED:
                return True, state, failures, 0.0
            if state == OPEN:
                left = opened_at + reset - now
                if left > 0:
                    return False, state, failures, left
                row[:] = [HALF_OPEN, failures, opened_at, 1, now]
                return True, HALF_OPEN, failures, 0.0
            # half-open: a trial whose caller vanished never reports; its slot lapses after reset_timeout
            if now - trial_at >= reset:
                trials = 0
            if trials < self.b.half_open_max_calls:
                row[3:] = [trials + 1, now]
                return True, state, failures, 0.0
            return False, state, failures, reset - (now - trial_at)

    def record(self, name: str, outcome: str) -> tuple[str, int, float]:
        now = time.monotonic()
        with self.lock:
            row = self._row(name)
            state, failures = row[0], row[1]
            if outcome == "ok":
                if state != OPEN:
                    row[:] = [CLOSED, 0, 0.0, 0, 0.0]
            elif state == HALF_OPEN or outcome == "trip" and state == CLOSED:
                row[:] = [OPEN, failures + 1, now, 0, 0.0]
            else:
                row[1] = failures = failures + 1
                if state == CLOSED and failures >= self.b.failure_threshold:
                    row[:] = [OPEN, failures, now, 0, 0.0]
            left = row[2] + self.b.reset_timeout - now if row[0] == OPEN else 0.0
            return row[0], row[1], max(left, 0.0)


# One hash per breaker: state, failures, opened_at (ms), trials, trial_at (ms). Times come
# from Redis's own clock (TIME), so processes on hosts with skewed clocks still agree.
_LUA_HEAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at', 'trials', 'trial_at')
local state = h[1] or 'closed'
local failures = tonumber(h[2]) or 0
local opened_at = tonumber(h[3]) or 0
local trials = tonumber(h[4]) or 0
local trial_at = tonumber(h[5]) or 0
local reset = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
"""

# ARGV: reset_ms, ttl_ms, max_trials -> {allowed, state, failures, ms until a trial may go}
_LUA_ACQUIRE = _LUA_HEAD + """
if state == 'closed' then return {1, state, failures, 0} end
if state == 'open' then
  local left = opened_at + reset - now
  if left > 0 then return {0, state, failures, left} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'trials', 1, 'trial_at', now)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, 'half_open', failures, 0}
end
if now - trial_at >= reset then trials = 0 end
if trials < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'trials', trials + 1, 'trial_at', now)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, state, failures, 0}
end
return {0, state, failures, reset - (now - trial_at)}
"""

# ARGV: reset_ms, ttl_ms, outcome ('ok' | 'fail' | 'trip' | 'read'), threshold
#   -> {state, failures, ms left open}
_LUA_RECORD = _LUA_HEAD + """
local outcome = ARGV[3]
if outcome == 'ok' then
  if state ~= 'open' and (state ~= 'closed' or failures > 0) then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'trials', 0)
    state, failures = 'closed', 0
  end
elseif outcome ~= 'read' then
  failures = failures + 1
  if state == 'half_open' or (outcome == 'trip' and state == 'closed')
     or (state == 'closed' and failures >= tonumber(ARGV[4])) then
    state, opened_at = 'open', now
    redis.call('HSET', KEYS[1], 'state', 'open', 'failures', failures, 'opened_at', now, 'trials', 0)
  else
    redis.call('HSET', KEYS[1], 'failures', failures)
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local left = 0
if state == 'open' then left = math.max(opened_at + reset - now, 0) end
return {state, failures, left}
"""


class _RedisStore:
    """Breaker state in Redis, falling back to the process-local store while Redis is down."""

    def __init__(self, breaker: CircuitBreaker, url: str, prefix: str, timeout: float, retry_interval: float):
        self.b = breaker
        self.url = url
        self.prefix = prefix
        self.retry_interval = retry_interval
        from redis import RedisError

        self.errors = (RedisError, OSError)
        self.client = redis_client(url, timeout)
        self._acquire = self.client.register_script(_LUA_ACQUIRE)
        self._record = self.client.register_script(_LUA_RECORD)
        self.down_until = 0.0  # monotonic; while in the future, use local state without trying Redis
        self.warned = False
        self.lock = threading.Lock()
        # Keys outlive any plausible outage of a caller but do not pile up forever.
        self.ttl_ms = int(max(breaker.reset_timeout * 10, 3600) * 1000)

    def _args(self) -> list[Any]:
        return [int(self.b.reset_timeout * 1000), self.ttl_ms]

    def _run(self, script: Any, name: str, args: list[Any], local: Callable[[], Any]) -> Any:
        if self.down_until and time.monotonic() < self.down_until:
            return local()
        try:
            result = script(keys=[f"{self.prefix}:{name}"], args=self._args() + args)
        except self.errors as exc:
            self.down_until = time.monotonic() + self.retry_interval
            with self.lock:  # one warning per outage, however many threads noticed it
                first, self.warned = not self.warned, True
            if first:
                log.warning("redis unreachable; circuit breakers use process-local state until it is back",
                            url=redact(self.url), error=redact(str(exc)))
            return local()
        if self.down_until:
            self.down_until = 0.0
            self.warned = False
            log.info("redis reachable again; circuit breakers share state", url=redact(self.url))
        return result

    def read(self, name: str) -> tuple[str, int, float]:
        return self.record(name, "read")

    def acquire(self, name: str) -> tuple[bool, str, int, float]:
        result = self._run(self._acquire, name, [self.b.half_open_max_calls], lambda: self.b._local.acquire(name))
        if isinstance(result, tuple):
            return result
        allowed, state, failures, left = result
        return bool(allowed), text(state), int(failures), int(left) / 1000.0

    def record(self, name: str, outcome: str) -> tuple[str, int, float]:
        local = ((lambda: self.b._local.read(name)) if outcome == "read"
                 else (lambda: self.b._local.record(name, outcome)))
        result = self._run(self._record, name, [outcome, self.b.failure_threshold], local)
        if isinstance(result, tuple):
            return result
        state, failures, left = result
        return text(state), int(failures), int(left) / 1000.0
