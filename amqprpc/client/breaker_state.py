"""Where a :class:`~amqprpc.client.breaker.CircuitBreaker`'s state lives: in this process
(:class:`LocalStore`), or in one Redis hash per breaker whose every transition is one Lua
script (:class:`RedisStore`, falling back to the local store while Redis is down); and the
failure-rate window (:class:`RateWindow`)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Protocol

from amqprpc import logs
from amqprpc.config import redact, redis_client
from amqprpc.wire.ids import text

log = logs.get_logger("amqprpc.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Settings(Protocol):
    """What the stores read of their breaker."""

    reset_timeout: float
    failure_threshold: int
    half_open_max_calls: int

    @property
    def _local(self) -> "LocalStore": ...


class RateWindow:
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


class LocalStore:
    """Process-local state with the same transitions as the Lua scripts of RedisStore."""

    def __init__(self, breaker: Settings):
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


class RedisStore:
    """Breaker state in Redis, falling back to the process-local store while Redis is down."""

    def __init__(self, breaker: Settings, url: str, prefix: str, timeout: float, retry_interval: float):
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
