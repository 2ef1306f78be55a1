"""AsyncRpcClient against the real broker: many calls in flight on one event loop, which
never blocks; cast, publish_event and submit; errors as for the sync client."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from kombu import Connection

from amqprpc import AsyncRpcClient, CallTimeout, RemoteError, ResponseStore, ServiceUnavailable, Topology
from amqprpc.ops.collector import Collector
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

pytestmark = pytest.mark.integration


def test_200_concurrent_calls_return_their_own_answers_while_the_loop_keeps_ticking(broker_url, service):
    """The handler holds every call until the ticker has ticked 20 times while all 200 are
    in flight: if awaiting a call blocked the event loop, the ticker could never tick and
    the handlers would never be released (the test would time out, not pass)."""
    release = threading.Event()

    @service.handler
    def echo(payload):
        if not release.wait(20):
            raise TimeoutError("never released")
        return {"n": payload["n"], "square": payload["n"] ** 2}

    async def scenario():
        async with AsyncRpcClient(unique_name("aio"), broker_url=broker_url, timeout=30) as client:
            calls = [asyncio.ensure_future(client.call(service.name, "echo", {"n": n})) for n in range(200)]
            gaps: list[float] = []
            last = time.perf_counter()
            for _ in range(20):
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            in_flight = sum(not call.done() for call in calls)
            release.set()
            started = time.perf_counter()
            results = await asyncio.gather(*calls)
            return results, in_flight, gaps, time.perf_counter() - started

    with running_worker(service, concurrency=8):
        results, in_flight, gaps, took = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert in_flight == 200
    assert results == [{"n": n, "square": n * n} for n in range(200)]
    print(f"ticker: 20 ticks with 200 calls in flight, largest gap {max(gaps) * 1000:.1f} ms "
          f"(5 ms asked); 200 answers {took * 1000:.0f} ms after release")


def test_errors_are_raised_as_by_the_sync_client(broker_url, service):
    @service.handler
    def fail(payload):
        raise KeyError("nope")

    async def scenario():
        async with AsyncRpcClient(unique_name("aio"), broker_url=broker_url) as client:
            with pytest.raises(RemoteError) as error:
                await client.call(service.name, "fail", {})
            assert error.value.error_type == "KeyError"
            with pytest.raises(ServiceUnavailable):
                await client.call(unique_name("nobody"), "x", {})
            with pytest.raises(ServiceUnavailable):
                await client.cast(unique_name("nobody"), "x", {})

    with running_worker(service):
        asyncio.run(asyncio.wait_for(scenario(), 30))


def test_cast_publish_event_and_submit(broker_url, redis_available, service):
    seen: list[int] = []
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    event_queue, event = unique_name("events"), unique_name("test") + ".created"
    store = ResponseStore(prefix=prefix)

    @service.handler
    def record(payload):
        seen.append(payload["n"])
        return {"recorded": payload["n"]}

    with Connection(broker_url) as conn:  # a subscriber, so the event is seen arriving
        channel = conn.default_channel
        Topology().events_exchange()(channel).declare()
        channel.queue_declare(event_queue, durable=True, auto_delete=False)  # RabbitMQ 4.3 refuses transient ones
        channel.queue_bind(event_queue, Topology().event_exchange, event)

    async def scenario():
        async with AsyncRpcClient(unique_name("aio"), broker_url=broker_url,
                                  topology=Topology(collector_queue=queue)) as client:
            await asyncio.gather(*(client.cast(service.name, "record", {"n": n}) for n in range(20)))
            await client.publish_event(event, {"order_id": "o1"})
            return await client.submit(service.name, "record", {"n": 99})

    collector = Collector(store, broker_url=broker_url, topology=Topology(collector_queue=queue), ttl=30)
    cid = None
    try:
        with running_worker(service):
            collector.start()
            cid = asyncio.run(asyncio.wait_for(scenario(), 30))
            assert wait_for(lambda: store.get(cid))["data"] == {"recorded": 99}
            wait_for(lambda: len(seen) == 21)
        assert sorted(seen) == list(range(20)) + [99]
        with Connection(broker_url) as conn:
            message = conn.default_channel.basic_get(event_queue, no_ack=True)
            assert message is not None and b'"order_id":"o1"' in message.body
    finally:
        collector.shutdown(5)
        delete_queues(queue, event_queue, broker_url=broker_url)
        if cid is not None:
            store.redis.delete(store.key(cid))


def test_using_it_unconnected_says_how(broker_url):
    client = AsyncRpcClient(unique_name("aio"), broker_url=broker_url)
    with pytest.raises(RuntimeError, match="async with"):
        asyncio.run(client.call("x", "y"))


def test_a_cancelled_call_is_abandoned_and_a_slow_one_times_out_on_time(broker_url, service):
    release = threading.Event()

    @service.handler
    def slow(payload):
        release.wait(10)
        return payload["n"]

    async def scenario():
        async with AsyncRpcClient(unique_name("aio"), broker_url=broker_url) as client:
            task = asyncio.ensure_future(client.call(service.name, "slow", {"n": 1}, timeout=10))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.monotonic()
            with pytest.raises(CallTimeout):
                await client.call(service.name, "slow", {"n": 2}, timeout=0.5)
            took = time.monotonic() - started
            release.set()
            answers = await asyncio.gather(*(client.call(service.name, "slow", {"n": n}) for n in range(3, 40)))
            return took, answers

    with running_worker(service, concurrency=4):
        took, answers = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert took < 0.5 + 1.0  # the call's own timeout holds (its deadline timer, at worst the grace after it)
    assert answers == list(range(3, 40))  # the abandoned and the timed-out answers went nowhere else
