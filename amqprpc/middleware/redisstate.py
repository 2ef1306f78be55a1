"""What the Redis-backed worker features (revocations, idempotency keys) share: a Redis
client made on first use, and how an unreachable Redis is reported.

Both features degrade the same way when Redis is down: messages run as they would without
the feature (at-least-once), with one warning per outage and one info line once Redis
answers again; checks pause :data:`DOWN_RETRY_S` seconds after an error, so no handler
thread waits on a dead Redis for every message.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from amqprpc import logs
from amqprpc.config import redis_client, redis_url

if TYPE_CHECKING:
    import redis

log = logs.get_logger("amqprpc.redisstate")

REDIS_TIMEOUT_S = 0.5  # connect and read timeout of these features' Redis calls
DOWN_RETRY_S = 5.0  # after a Redis error, checks pause this long (messages run unchecked)


class RedisState:
    """Base of a feature's store: ``url`` (default ``AMQPRPC_REDIS_URL``), keys under
    ``prefix``; the client is made on first use, so building a store touches nothing."""

    def __init__(self, url: str | None, prefix: str, timeout: float = REDIS_TIMEOUT_S) -> None:
        self.url = redis_url(url)
        self.prefix = prefix
        self.timeout = timeout
        self._redis: redis.Redis | None = None

    @property
    def redis(self) -> "redis.Redis":
        if self._redis is None:
            self._redis = redis_client(self.url, self.timeout)
        return self._redis


class RedisHealth:
    """Whether Redis answered lately, for one feature (``what``, as the log lines name it)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down_until = 0.0
        self.warned = False

    def usable(self, now: float) -> bool:
        """False for DOWN_RETRY_S seconds after a failure (``now``: time.monotonic())."""
        return now >= self.down_until

    def failed(self, exc: BaseException, now: float) -> None:
        self.down_until = now + DOWN_RETRY_S
        if not self.warned:
            self.warned = True
            log.warning(f"Redis unreachable: {self.what} paused, messages run as without them (at-least-once)",
                        error=repr(exc)[:300], retry_in=DOWN_RETRY_S)

    def answered(self) -> None:
        if self.warned:
            self.warned = False
            log.info(f"Redis answers again: {self.what} resumed")
