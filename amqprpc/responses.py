"""Where accept-then-poll replies live: Redis keys ``response:{correlation_id}`` with a TTL.

``amqprpc collector`` writes them (:meth:`ResponseStore.put_many`); a web tier reads them
(:meth:`ResponseStore.get`). The value is the reply body exactly as the worker sent it (the
JSON envelope of DESIGN.md), so a poller written in another language reads the same thing.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import redis

from . import envelope
from .config import redis_url as default_redis_url

DEFAULT_PREFIX = "response:"
DEFAULT_TTL = 300.0


def default_prefix(prefix: str | None = None) -> str:
    """The key prefix: the argument, else ``AMQPRPC_RESPONSE_PREFIX``, else ``response:``."""
    return prefix or os.environ.get("AMQPRPC_RESPONSE_PREFIX") or DEFAULT_PREFIX


class ResponseStore:
    """Replies of submitted requests, by correlation id.

    Parameters: ``redis_url`` defaults to ``AMQPRPC_REDIS_URL``; ``prefix`` of the keys
    (default ``response:``, or ``AMQPRPC_RESPONSE_PREFIX``; tests use their own);
    ``client`` an existing ``redis.Redis`` to use instead; ``socket_timeout`` in seconds.
    Thread-safe (redis-py pools its connections).
    """

    def __init__(self, redis_url: str | None = None, *, prefix: str | None = None,
                 client: redis.Redis | None = None, socket_timeout: float = 5.0):
        self.prefix = default_prefix(prefix)
        self.redis = client or redis.Redis.from_url(default_redis_url(redis_url), socket_timeout=socket_timeout,
                                                    socket_connect_timeout=socket_timeout)

    def key(self, correlation_id: str) -> str:
        return f"{self.prefix}{correlation_id}"

    def get(self, correlation_id: str) -> Any:
        """The decoded reply envelope (``{"success": true, "data": ...}`` or
        ``{"success": false, "error": ..., "error_type": ...}``), or None while it is
        pending (or unknown, or expired)."""
        raw = self.redis.get(self.key(correlation_id))
        return None if raw is None else envelope.loads(raw)

    def put_many(self, replies: Iterable[tuple[str, bytes]], ttl: float = DEFAULT_TTL) -> None:
        """Store ``(correlation_id, reply body)`` pairs, each expiring after ``ttl`` seconds,
        in one round trip. Raises ``redis.RedisError`` when Redis did not take them all."""
        pipe = self.redis.pipeline(transaction=False)
        ttl_ms = max(1, int(ttl * 1000))
        for correlation_id, body in replies:
            pipe.set(self.key(correlation_id), body, px=ttl_ms)
        pipe.execute()

    def close(self) -> None:
        self.redis.close()
