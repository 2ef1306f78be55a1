"""ResponseStore.wait / AsyncResponseStore.wait: push on top of the stored replies.

Against the shared Redis, each test on its own key prefix. Race-freedom is proven for both
orders a reply can arrive in around the waiter's own read of the key (just before it, just
after it), and every test counts that no subscription or connection is left behind.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from amqprpc import AsyncResponseStore, ResponseStore
from amqprpc.client.responses import PENDING, STORED, UNKNOWN
from amqprpc.testing import unique_name, wait_for

from procs import free_port

pytestmark = pytest.mark.integration

REPLY = b'{"success": true, "data": {"n": 1}, "message_id": "c1"}'


@pytest.fixture
def store(redis_available):
    prefix = unique_name("test-wait") + ":"
    name = unique_name("waiter")  # names this store's Redis connections, to count them
    store = ResponseStore(f"redis://127.0.0.1:6379/0?client_name={name}", prefix=prefix)
    store.client_name = name
    yield store
    for key in store.redis.scan_iter(prefix + "*"):
        store.redis.delete(key)
    store.close()


def subscriptions(store, *cids: str) -> int:
    return sum(count for _, count in redis.Redis().pubsub_numsub(*(store.channel(cid) for cid in cids)))


def connections(name: str) -> int:
    return sum(1 for client in redis.Redis().client_list() if client.get("name") == name)


def store_later(store: ResponseStore, cid: str, delay: float) -> None:
    threading.Timer(delay, store.put_many, ([(cid, REPLY)], 30)).start()


def test_lookup_tells_stored_pending_and_unknown(store):
    assert store.lookup("c1") == (UNKNOWN, None)
    store.mark_pending("c1", ttl=30)
    assert store.lookup("c1") == (PENDING, None)
    store.put_many([("c1", REPLY)], 30)
    assert store.lookup("c1") == (STORED, {"success": True, "data": {"n": 1}, "message_id": "c1"})
    store.mark_pending("c2", ttl=0.05)
    wait_for(lambda: store.lookup("c2").state == UNKNOWN)  # an expired mark is unknown again


def test_storing_announces_the_body_on_the_channel_of_the_key(store):
    pubsub = redis.Redis().pubsub()
    pubsub.subscribe(store.channel("c1"))
    wait_for(lambda: pubsub.get_message(timeout=1))
    store.put_many([("c1", REPLY)], 30)
    message = wait_for(lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=1))
    assert (message["channel"], message["data"]) == (store.key("c1").encode(), REPLY)
    pubsub.close()


def test_wait_returns_a_stored_reply_at_once_and_a_later_one_when_it_is_stored(store):
    store.put_many([("done", REPLY)], 30)
    assert store.wait("done", 5)["data"] == {"n": 1}
    store_later(store, "later", 0.3)
    started = time.perf_counter()
    assert store.wait("later", 10)["data"] == {"n": 1}
    took = time.perf_counter() - started
    assert 0.25 < took < 5
    assert subscriptions(store, "done", "later") == 0


def test_wait_returns_none_after_its_timeout_and_keeps_no_subscription(store):
    started = time.perf_counter()
    assert store.wait("never", 0.3) is None
    assert 0.3 <= time.perf_counter() - started < 3
    assert subscriptions(store, "never") == 0


class ArrivesAroundTheRead(ResponseStore):
    """A reply that arrives exactly before (``when="before"``) or after (``"after"``) the
    waiter reads the key, i.e. after it subscribed: both must be seen."""

    when = "before"

    def get(self, correlation_id):
        if self.when == "before":
            self.put_many([(correlation_id, REPLY)], 30)
        found = super().get(correlation_id)
        if self.when == "after":
            self.put_many([(correlation_id, REPLY)], 30)
        return found


@pytest.mark.parametrize("when", ["before", "after"])
def test_wait_misses_no_reply_arriving_around_its_read(store, when):
    racy = ArrivesAroundTheRead(prefix=store.prefix)
    racy.when = when
    started = time.perf_counter()
    assert racy.wait(f"race-{when}", 10)["data"] == {"n": 1}
    assert time.perf_counter() - started < 5  # not at the end of the timeout
    racy.close()


def test_many_waits_leave_no_connection_subscribed(store):
    for n in range(20):
        store_later(store, f"c{n}", 0.01)
        assert store.wait(f"c{n}", 10) is not None
    assert subscriptions(store, *(f"c{n}" for n in range(20))) == 0
    assert connections(store.client_name) <= 2  # the pool's idle ones, none subscribed
    assert all(client["sub"] == "0" for client in redis.Redis().client_list()
               if client.get("name") == store.client_name)


def test_wait_raises_when_redis_does_not_answer():
    down = ResponseStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1.0)
    with pytest.raises(redis.ConnectionError):
        down.wait("c1", 5)


def test_async_wait_returns_when_stored_times_out_and_cancelled_waits_release_their_subscriptions(store):
    async def scenario():
        waiter = AsyncResponseStore(f"redis://127.0.0.1:6379/0?client_name={store.client_name}-aio",
                                    prefix=store.prefix)
        store.put_many([("done", REPLY)], 30)
        assert (await waiter.wait("done", 5))["data"] == {"n": 1}
        store_later(store, "later", 0.2)
        assert (await waiter.wait("later", 10))["data"] == {"n": 1}
        assert await waiter.wait("never", 0.2) is None
        assert await waiter.lookup("later") == (STORED, {"success": True, "data": {"n": 1}, "message_id": "c1"})

        # 50 waiters whose clients went away (their tasks cancelled mid-wait).
        tasks = [asyncio.ensure_future(waiter.wait(f"gone{n}", 30)) for n in range(50)]
        cids = [f"gone{n}" for n in range(50)]
        while subscriptions(store, *cids) < 50:
            await asyncio.sleep(0.02)
        during = connections(f"{store.client_name}-aio")
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results), set(map(repr, results))
        assert subscriptions(store, *cids) == 0
        await waiter.close()
        return during

    during = asyncio.run(scenario())
    assert during >= 50
    wait_for(lambda: connections(f"{store.client_name}-aio") == 0)
