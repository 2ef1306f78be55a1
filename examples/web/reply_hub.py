"""One Redis pub/sub connection for every socket and long poll of the web tier.

Each waiting WebSocket used to subscribe on a connection of its own
(:meth:`amqprpc.AsyncResponseStore.wait`): about 100 open sockets took redis-py's whole
asyncio pool (100 connections), and then orders and polls answered 503. Here one task holds
ONE pattern subscription to every reply announcement of the store's prefix
(``{prefix}*``, published by the collector) and hands each to the waiters of its
correlation id, kept in a dict in this process: any number of sockets, one connection.

Order of events that makes it lose nothing: a waiter registers, then reads the key (a reply
stored before it registered); an announcement after that reaches it through the
subscription. When the subscription drops (Redis restarted, failed over), the hub
subscribes again and then reads the key of every registered waiter, for what was announced
meanwhile. While Redis is down the waiters keep waiting (until their own timeout), and
:meth:`ReplyHub.wait` raises ``redis.RedisError`` for a new one whose read fails.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

import redis

from amqprpc import AsyncResponseStore, logs
from amqprpc.config import redact

log = logs.get_logger("amqprpc.examples.web.hub")

_GLOB = re.compile(r"([*?\[\]\\])")


class ReplyHub:
    """Fans the store's reply announcements out to waiters. :meth:`start` it inside the
    event loop that uses it; :meth:`close` at the end."""

    def __init__(self, store: AsyncResponseStore, *, retry_cap: float = 2.0) -> None:
        self.store = store
        self.retry_cap = retry_cap
        self.pattern = _GLOB.sub(r"\\\1", store.prefix) + "*"
        self._waiters: dict[str, set[asyncio.Future[Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.stats = {"delivered": 0, "resubscribed": 0}

    @property
    def waiting(self) -> int:
        """Waiters registered now (sockets and long polls)."""
        return sum(len(futures) for futures in self._waiters.values())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reply-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()
        self._waiters.clear()

    async def wait(self, correlation_id: str, timeout: float) -> Any:
        """The decoded reply of ``correlation_id`` once stored (at once if it is), or None
        after ``timeout`` seconds. Cancelling it (a socket whose client left) unregisters it."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(correlation_id, set()).add(future)
        try:
            reply = await self.store.get(correlation_id)  # after registering: nothing falls in between
            if reply is not None:
                return reply
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                return None
        finally:
            futures = self._waiters.get(correlation_id)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self._waiters[correlation_id]

    def _deliver(self, correlation_id: str, reply: Any) -> None:
        for future in self._waiters.get(correlation_id, ()):
            if not future.done():
                future.set_result(reply)
                self.stats["delivered"] += 1

    async def _recheck(self) -> None:
        """After (re)subscribing: read what was stored while nobody listened."""
        for correlation_id in list(self._waiters):
            reply = await self.store.get(correlation_id)
            if reply is not None:
                self._deliver(correlation_id, reply)

    async def _run(self) -> None:
        start = len(self.store.prefix)
        delay = 0.05
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                await pubsub.psubscribe(self.pattern)
                while True:  # the confirmation: from here on every announcement reaches us
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message["type"] == "psubscribe":
                        break
                self.subscribed.set()
                delay = 0.05
                await self._recheck()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message["type"] == "pmessage":
                        channel = message["channel"]
                        channel = channel.decode() if isinstance(channel, bytes) else channel
                        self._deliver(channel[start:], self.store._decode(message["data"]))
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("reply subscription lost; subscribing again", error=redact(str(exc)).splitlines()[0])
                self.stats["resubscribed"] += 1
            finally:
                self.subscribed.clear()
                await asyncio.shield(_close_quietly(pubsub))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_cap)


async def _close_quietly(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except (redis.RedisError, OSError):
        pass
