"""The service the daemon tests run in real worker processes (``--app daemon_app:service``).

Its name comes from ``AMQPRPC_TEST_SERVICE`` so every test has its own queue; it counts
in Redis, under keys the test passes in, how often each request started and finished.
"""
import os
import time

import redis

from amqprpc import Service
from amqprpc.config import redis_url

service = Service(os.environ.get("AMQPRPC_TEST_SERVICE", "daemon-test"))
_redis = redis.Redis.from_url(redis_url())


@service.handler
def work(payload: dict) -> dict:
    """Mark request ``n`` started, sleep ``sleep`` seconds (or, given ``hold``, until that
    Redis key exists, at most 60 s), mark it done."""
    n = str(payload["n"])
    if payload.get("started"):
        _redis.hincrby(payload["started"], n, 1)
    if payload.get("hold"):
        deadline = time.monotonic() + 60
        while not _redis.exists(payload["hold"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        time.sleep(float(payload.get("sleep", 0.1)))
    _redis.hincrby(payload["done"], n, 1)
    return {"n": n}


@service.event(f"{service.name}.happened")
def happened(payload: dict) -> None:
    """An event of this test's own: counted like a request, under ``event`` (``event.{n}``
    when the payload numbers it)."""
    _redis.hincrby(payload["done"], f"event.{payload['n']}" if "n" in payload else "event", 1)


@service.handler
def fail(payload: dict) -> None:
    """Always raises: a cast of it (nobody to answer) is dead-lettered."""
    raise ValueError("failing on purpose")


@service.handler
def ask(payload: dict) -> dict:
    """Calls ``work`` of this same service through ``service.client`` (a nested call: what
    the client metrics of ``--metrics-port`` count)."""
    return service.client.call(service.name, "work", payload, timeout=10)
