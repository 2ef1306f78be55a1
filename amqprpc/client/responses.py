"""Where accept-then-poll replies live: Redis keys ``response:{correlation_id}`` with a TTL.

``amqprpc collector`` writes them (:meth:`ResponseStore.put_many`); a web tier reads them
(:meth:`ResponseStore.get`) or waits for one (:meth:`ResponseStore.wait`, and
:meth:`AsyncResponseStore.wait` for asyncio). The value is the reply body exactly as the
worker sent it (the reply envelope of the README's "Wire protocol in short"), so a poller written in another language
reads the same thing.

Push. Storing a reply also announces it: the same pipeline that SETs the key PUBLISHes the
body on the Redis pub/sub channel of the same name (channels and keys are separate
namespaces). Pub/sub rather than a stream, because the key already is the durable record
(the collector acks a reply only once it is stored) and the announcement is only a wake-up:
a per-reply channel reaches exactly the one waiter of that reply, and leaves nothing in Redis
to trim. Nothing depends on the announcement arriving: a waiter subscribes, waits for Redis
to confirm the subscription, and only then reads the key, so a reply stored before it
subscribed is found by the read and one stored after reaches it as a message. Each waiter
holds one Redis connection while it waits and gives it back when it returns, times out or is
cancelled. (Keyspace notifications would have needed no announcement, but they are a server
setting, off by default, that a shared Redis may not let an application change.)

Known and unknown. A web tier that accepted a request marks it pending
(:meth:`~ResponseStore.mark_pending`, key ``response:pending:{correlation_id}``), so that
:meth:`~ResponseStore.lookup` can tell a reply still to come (``pending``) from a correlation
id nobody accepted or whose records expired (``unknown``).
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional, Union

from amqprpc.wire import envelope
from amqprpc.config import redis_client
from amqprpc.config import redis_url as default_redis_url

if TYPE_CHECKING:  # redis is imported by the first store, not by `import amqprpc`
    import redis
    import redis.asyncio

DEFAULT_PREFIX = "response:"
DEFAULT_TTL = 300.0
DEFAULT_PENDING_TTL = 3600.0  # a submitted request has no deadline; give it an hour to be answered

STORED, PENDING, UNKNOWN = "stored", "pending", "unknown"


def default_prefix(prefix: str | None = None) -> str:
    """The key prefix: the argument, else ``AMQPRPC_RESPONSE_PREFIX``, else ``response:``."""
    return prefix or os.environ.get("AMQPRPC_RESPONSE_PREFIX") or DEFAULT_PREFIX


class Lookup(NamedTuple):
    """What the store knows of one correlation id: ``state`` is ``"stored"`` (``reply`` is
    the decoded envelope), ``"pending"`` (accepted, no reply yet) or ``"unknown"`` (never
    accepted here, or expired)."""
    state: str
    reply: Any = None


class _Names:
    """Key and channel names shared by the sync and async stores, and how to read them."""

    prefix: str

    def key(self, correlation_id: str) -> str:
        """The key of the stored reply, also the pub/sub channel that announces it."""
        return f"{self.prefix}{correlation_id}"

    channel = key

    def pending_key(self, correlation_id: str) -> str:
        return f"{self.prefix}pending:{correlation_id}"

    @staticmethod
    def _decode(raw: Optional[Union[bytes, str]]) -> Any:
        return None if raw is None else envelope.loads(raw)

    @classmethod
    def _lookup(cls, raw: Optional[bytes], pending: Optional[bytes]) -> Lookup:
        if raw is not None:
            return Lookup(STORED, cls._decode(raw))
        return Lookup(PENDING if pending is not None else UNKNOWN)

    @staticmethod
    def _is_confirmation(message: Optional[dict[str, Any]]) -> bool:
        return message is not None and message["type"] == "subscribe"

    @staticmethod
    def _announced(message: Optional[dict[str, Any]]) -> Optional[bytes]:
        return message["data"] if message is not None and message["type"] == "message" else None


class ResponseStore(_Names):
    """Replies of submitted requests, by correlation id.

    Parameters: ``redis_url`` defaults to ``AMQPRPC_REDIS_URL``; ``prefix`` of the keys
    (default ``response:``, or ``AMQPRPC_RESPONSE_PREFIX``; tests use their own);
    ``client`` an existing ``redis.Redis`` to use instead; ``socket_timeout`` in seconds.
    Thread-safe (redis-py pools its connections).
    """

    def __init__(self, redis_url: str | None = None, *, prefix: str | None = None,
                 client: redis.Redis | None = None, socket_timeout: float = 5.0):
        self.prefix = default_prefix(prefix)
        # redis:// or redis+sentinel:// (config.redis_client); redis-py's own retries kept.
        self.redis = client or redis_client(default_redis_url(redis_url), socket_timeout, retries=None)

    def get(self, correlation_id: str) -> Any:
        """The decoded reply envelope (``{"success": true, "data": ...}`` or
        ``{"success": false, "error": ..., "error_type": ...}``), or None while it is
        pending (or unknown, or expired)."""
        return self._decode(self.redis.get(self.key(correlation_id)))

    def lookup(self, correlation_id: str) -> Lookup:
        """Stored, pending or unknown, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.key(correlation_id))
        pipe.get(self.pending_key(correlation_id))
        return self._lookup(*pipe.execute())

    def mark_pending(self, correlation_id: str, ttl: float = DEFAULT_PENDING_TTL) -> None:
        """Record that a request was accepted and its reply is still to come (for ``ttl``
        seconds): until then :meth:`lookup` says ``pending`` rather than ``unknown``."""
        self.redis.set(self.pending_key(correlation_id), b"1", px=max(1, int(ttl * 1000)))

    def put_many(self, replies: Iterable[tuple[str, bytes]], ttl: float = DEFAULT_TTL) -> None:
        """Store ``(correlation_id, reply body)`` pairs, each expiring after ``ttl`` seconds,
        and announce each to its waiters, in one round trip. Raises ``redis.RedisError``
        when Redis did not take them all (storing and announcing again is harmless)."""
        pipe = self.redis.pipeline(transaction=False)
        ttl_ms = max(1, int(ttl * 1000))
        for correlation_id, body in replies:
            key = self.key(correlation_id)
            pipe.set(key, body, px=ttl_ms)
            pipe.publish(key, body)  # after the SET: a waiter woken by it can also read the key
        pipe.execute()

    def wait(self, correlation_id: str, timeout: float) -> Any:
        """Block until the reply of ``correlation_id`` is stored and return it (the decoded
        envelope, as :meth:`get`), at once if it already is; None when ``timeout`` seconds
        passed first. Raises ``redis.RedisError`` when Redis fails meanwhile."""
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(self.channel(correlation_id))
            while not self._is_confirmation(pubsub.get_message(timeout=_left(deadline))):
                if _left(deadline) == 0:
                    break
            reply = self.get(correlation_id)
            while reply is None and _left(deadline) > 0:
                announced = self._announced(pubsub.get_message(ignore_subscribe_messages=True,
                                                               timeout=_left(deadline)))
                reply = self._decode(announced)
            return reply
        finally:
            pubsub.close()  # unsubscribes: the connection is dropped, not reused subscribed

    def close(self) -> None:
        self.redis.close()


class AsyncResponseStore(_Names):
    """:class:`ResponseStore` for asyncio code, on ``redis.asyncio``: ``get``, ``lookup``,
    ``mark_pending`` and ``wait`` are coroutines with the same meaning; cancelling a task
    in ``wait`` releases its subscription.

    Create it inside the event loop that uses it (e.g. in an ASGI app's lifespan), and
    ``await store.close()`` at the end. Parameters as for :class:`ResponseStore`.
    """

    def __init__(self, redis_url: str | None = None, *, prefix: str | None = None,
                 client: "redis.asyncio.Redis | None" = None, socket_timeout: float = 5.0):
        self.prefix = default_prefix(prefix)
        self.redis = client or redis_client(default_redis_url(redis_url), socket_timeout, asyncio=True, retries=None)

    async def get(self, correlation_id: str) -> Any:
        return self._decode(await self.redis.get(self.key(correlation_id)))

    async def lookup(self, correlation_id: str) -> Lookup:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key(correlation_id))
            pipe.get(self.pending_key(correlation_id))
            return self._lookup(*await pipe.execute())

    async def mark_pending(self, correlation_id: str, ttl: float = DEFAULT_PENDING_TTL) -> None:
        await self.redis.set(self.pending_key(correlation_id), b"1", px=max(1, int(ttl * 1000)))

    async def wait(self, correlation_id: str, timeout: float) -> Any:
        """As :meth:`ResponseStore.wait`, without blocking the event loop."""
        # redis.asyncio (8.1 here) swallows a cancellation that lands while it opens a
        # connection, and the wait would then run to its timeout holding its subscription.
        # So the wait runs as a task of its own, cancelled again until it has ended.
        waiting = asyncio.ensure_future(self._wait(correlation_id, timeout))
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:
            while not waiting.done():
                waiting.cancel()
                await asyncio.wait({waiting}, timeout=0.05)
            raise

    async def _wait(self, correlation_id: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel(correlation_id))
            while not self._is_confirmation(await pubsub.get_message(timeout=_left(deadline))):
                if _left(deadline) == 0:
                    break
            reply = await self.get(correlation_id)
            while reply is None and _left(deadline) > 0:
                announced = self._announced(await pubsub.get_message(ignore_subscribe_messages=True,
                                                                     timeout=_left(deadline)))
                reply = self._decode(announced)
            return reply
        finally:
            # Shielded: a second cancellation must not leave the connection subscribed.
            await asyncio.shield(_aclose(pubsub))

    async def close(self) -> None:
        await _aclose(self.redis)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _aclose(resource: Any) -> None:
    """``aclose()`` where redis-py has it (5.0.1+), the older ``close()`` coroutine before."""
    close = getattr(resource, "aclose", None) or resource.close
    await close()
