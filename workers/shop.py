"""What the shop's services share: where their state lives in Redis.

Each shop service module has module-level handler functions (taking the :class:`Shop`, and
for those that call out the Service whose ``client`` they use, before the payload), a
``build(shop)`` factory registering them, and a module-level ``service = build()`` that
``amqprpc worker <name>`` runs (found through the ``amqprpc.services`` entry points).
``workers.build_all(shop)`` builds all five. A :class:`Shop` names the Redis database
(``AMQPRPC_REDIS_URL``) and the key prefix (``AMQPRPC_SHOP_PREFIX``, default ``shop:``), so
that several shops (the demo, tests running side by side) never see each other's state;
a namespaced :class:`~amqprpc.Topology` does the same for their queues and exchanges.

The events of the shop (routing keys on the event exchange):
``order.created`` (order-service), ``payment.completed`` / ``payment.failed`` (payment-service).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import redis

from amqprpc.config import redis_client, redis_url
from amqprpc import current_call

DEFAULT_PREFIX = "shop:"


def _prefix_from_env() -> str:
    return os.environ.get("AMQPRPC_SHOP_PREFIX") or DEFAULT_PREFIX


@dataclass(frozen=True)
class Shop:
    """Where one shop keeps its state. ``prefix`` starts every Redis key it writes."""

    prefix: str = field(default_factory=_prefix_from_env)
    redis_url: str = field(default_factory=redis_url)

    def key(self, *parts: str) -> str:
        """``shop.key("order", "o-1")`` -> ``shop:order:o-1``."""
        return self.prefix + ":".join(parts)

    @property
    def redis(self) -> redis.Redis:
        """A Redis client (thread-safe, pooled), one per URL per process."""
        return _redis(self.redis_url)

    def delete_all(self) -> int:
        """Delete every key of this shop (tests, the demo). Returns how many."""
        keys = list(self.redis.scan_iter(match=self.prefix + "*", count=500))
        return self.redis.delete(*keys) if keys else 0


@functools.lru_cache(maxsize=None)
def _redis(url: str) -> redis.Redis:
    # decode_responses: the shop stores text and JSON, never bytes.
    # redis:// or redis+sentinel:// (amqprpc.config.redis_client), redis-py's own retries kept.
    return redis_client(url, 5.0, decode_responses=True, retries=None)


def trace_id() -> str:
    """The trace id of the request or event being handled ("" outside a handler), stored
    with every record so a record leads to the log lines of every hop."""
    call = current_call()
    return call.trace_id if call is not None else ""
