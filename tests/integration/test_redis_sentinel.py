"""Redis Sentinel for every Redis use (#26): ``AMQPRPC_REDIS_URL`` / ``--redis`` given as
``redis+sentinel://[:password@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``, and a real
failover (master kill -9'd, a replica promoted by three real sentinels) under the breaker,
the registry and the collector."""
from __future__ import annotations

import time

import pytest
import redis

from amqprpc import CircuitOpen, ResponseStore, RpcClient, ServiceUnavailable, Topology
from amqprpc.client.breaker import CircuitBreaker
from amqprpc.config import parse_sentinel_url, redact, redis_client
from amqprpc.ops.registry import Registry
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

from procs import collector


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_db():
    parsed = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:5000/mymaster/3")
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 5000))
    assert (parsed.master, parsed.db, parsed.password, parsed.username) == ("mymaster", 3, "s@cret", None)
    assert parse_sentinel_url("redis+sentinel://h:1/m").db == 0
    assert parse_sentinel_url("redis+sentinel://u:p@h:1/m?sentinel_password=q").sentinel_password == "q"
    for bad in ("redis+sentinel://h:1", "redis+sentinel:///m", "redis+sentinel://h:x/m",
                "redis+sentinel://:pw@h:1/m/notadb"):
        with pytest.raises(ValueError) as error:
            parse_sentinel_url(bad)
        assert "pw" not in str(error.value)


def test_passwords_of_every_redis_url_form_are_redacted():
    text = ("redis+sentinel://:s3cret@h1:26379,h2:26380/mymaster/2 redis://pw2@host/0 "
            "rediss://user:pw3@host/0 redis+sentinel://h:1/m?sentinel_password=pw4&x=1")
    out = redact(text)
    assert not any(secret in out for secret in ("s3cret", "pw2", "pw3", "pw4")), out
    assert "h1:26379,h2:26380/mymaster/2" in out and "x=1" in out


def test_redis_client_speaks_both_url_forms():
    from redis.sentinel import SentinelConnectionPool

    plain = redis_client("redis://127.0.0.1:6379/0", 1.0)
    assert not isinstance(plain.connection_pool, SentinelConnectionPool)
    managed = redis_client("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/mymaster/4", 1.0, decode_responses=True)
    assert isinstance(managed.connection_pool, SentinelConnectionPool)
    kwargs = managed.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["decode_responses"]) == (4, "pw", True)
    from redis.asyncio.sentinel import SentinelConnectionPool as AsyncPool

    assert isinstance(redis_client("redis+sentinel://127.0.0.1:1/m", 1.0, asyncio=True).connection_pool, AsyncPool)


@pytest.mark.integration
def test_breaker_and_registry_through_a_sentinel_failover(redis_sentinel):
    """The breaker keeps failing fast through a master kill -9 and the failover; what the
    registry and a response store wrote is there afterwards, and writes after it land."""
    url = redis_sentinel.url
    prefix = unique_name("sentinel-test")
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60, redis_url=url, key_prefix=prefix + ":breaker")
    registry = Registry(url, prefix=prefix + ":registry")
    store = ResponseStore(url, prefix=prefix + ":response:", socket_timeout=1.0)

    def down():
        raise ServiceUnavailable("nobody home")

    with pytest.raises(ServiceUnavailable):
        breaker.call("payments", "charge", {}, down)
    assert breaker.state("payments") == "open"
    registry.announce({"service": "payments", "instance_id": "before", "pid": 1})
    store.put_many([("cid-before", b"{\"success\": true, \"data\": 1}")])
    redis_sentinel.wait_replicated()
    old_master = redis_sentinel.master_address()

    redis_sentinel.kill_master()
    killed = time.monotonic()
    rejected, slowest = 0, 0.0
    failover_over = time.monotonic() + 30
    while time.monotonic() < failover_over:
        started = time.monotonic()
        with pytest.raises(CircuitOpen):
            breaker.call("payments", "charge", {}, down)
        slowest = max(slowest, time.monotonic() - started)
        rejected += 1
        try:
            redis_sentinel.wait_failover(timeout=0.05)
            break
        except AssertionError:
            pass
    redis_sentinel.wait_failover()
    failover = time.monotonic() - killed
    assert redis_sentinel.master_address() != old_master
    assert rejected >= 5 and slowest < 0.05, (rejected, slowest)
    print(f"failover in {failover:.1f} s; the open breaker rejected {rejected} calls meanwhile, "
          f"slowest {slowest * 1000:.2f} ms")

    # A process that starts after the failover (no cached view) reads the shared state.
    fresh = CircuitBreaker(failure_threshold=1, reset_timeout=60, redis_url=url, key_prefix=prefix + ":breaker")
    with pytest.raises(CircuitOpen):
        fresh.call("payments", "charge", {}, down)
    wait_for(lambda: _reachable(registry), timeout=10)
    registry.announce({"service": "payments", "instance_id": "after", "pid": 2})
    assert {entry["instance_id"] for entry in registry.instances("payments")} == {"before", "after"}
    assert store.get("cid-before") == {"success": True, "data": 1}
    store.put_many([("cid-after", b"{\"success\": true, \"data\": 2}")])
    assert ResponseStore(url, prefix=prefix + ":response:").get("cid-after") == {"success": True, "data": 2}


@pytest.mark.integration
def test_the_collector_stores_every_reply_through_a_sentinel_failover(redis_sentinel, broker_url, service):
    """Replies arriving while the master is dead wait in the queue (unacked) and are stored
    on the promoted replica: all 40 readable afterwards, by the sync and the asyncio store."""
    queue, prefix = unique_name("responses"), unique_name("sentinel-response") + ":"
    url = redis_sentinel.url

    @service.handler
    def square(payload):
        return payload["n"] ** 2

    proc = collector(queue, prefix, "--redis", url)
    try:
        with running_worker(service), RpcClient(unique_name("submitter"), broker_url=broker_url,
                                                topology=Topology(collector_queue=queue)) as client:
            store = ResponseStore(url, prefix=prefix, socket_timeout=1.0)
            first = {n: client.submit(service.name, "square", {"n": n}) for n in range(20)}
            wait_for(lambda: all(store.get(cid) is not None for cid in first.values()), timeout=20, interval=0.1)
            redis_sentinel.wait_replicated()
            redis_sentinel.kill_master()
            second = {n: client.submit(service.name, "square", {"n": n}) for n in range(20, 40)}
            redis_sentinel.wait_failover()
            cids = {**first, **second}
            wait_for(lambda: _all_stored(store, cids), timeout=30, interval=0.2)
            for n, cid in cids.items():
                assert store.get(cid)["data"] == n * n
            print(f"collector through a failover: {len(cids)} of {len(cids)} replies stored")

            async def read_async() -> list:
                from amqprpc import AsyncResponseStore

                async_store = AsyncResponseStore(url, prefix=prefix)
                try:
                    return [await async_store.get(cid) for cid in cids.values()]
                finally:
                    await async_store.close()

            import asyncio

            assert [reply["data"] for reply in asyncio.run(read_async())] == [n * n for n in cids]
        assert proc.stop() == 0, proc.output
    finally:
        if proc.process.poll() is None:
            proc.process.kill()
        delete_queues(queue, broker_url=broker_url)


def _reachable(registry: Registry) -> bool:
    try:
        return bool(registry.redis.ping())
    except (redis.RedisError, OSError):
        return False


def _all_stored(store: ResponseStore, cids: dict) -> bool:
    try:
        return all(store.get(cid) is not None for cid in cids.values())
    except (redis.RedisError, OSError):
        return False
