"""Tasks in time (#22) against the real broker: countdown through a worker restart, priorities
(and migrating a queue to them), a service-wide rate limit. The beat's failover test is in
tests/test_beat.py."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Connection

from amqprpc import RpcClient, Service
from amqprpc.errors import TopologyMismatch
from amqprpc.middleware.ratelimit import RateLimiter
from amqprpc.ops.migrate import migrate_request_queue
from amqprpc.rate import parse_rate
from amqprpc.server.worker import Worker
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

pytestmark = pytest.mark.integration


@pytest.fixture
def client(broker_url):
    with RpcClient("tests", broker_url=broker_url) as client:
        yield client


def ready_count(broker_url: str, queue: str) -> int:
    with Connection(broker_url) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)


def test_a_countdown_waits_in_the_broker_through_a_worker_restart(service, client, broker_url):
    ran: list[float] = []
    service.handler("remind")(lambda payload: ran.append(time.time()))
    request_queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service.name)
    waiting = DEFAULT_TOPOLOGY.countdown_queue(request_queue, 5000).name
    try:
        first = Worker(service, broker_url=broker_url)
        first.start()
        sent = time.time()
        message_id = client.cast(service.name, "remind", {}, countdown=5)
        assert message_id and ready_count(broker_url, waiting) == 1
        time.sleep(0.5)
        assert first.stats["received"] == 0  # nothing held (unacked) by the worker while it waits
        assert first.shutdown(5)
        with running_worker(service, broker_url=broker_url) as second:
            wait_for(lambda: ran, timeout=8)
            assert 5.0 <= ran[0] - sent <= 6.0, ran[0] - sent
            print(f"\n5 s countdown ran {ran[0] - sent:.3f} s after the cast")
            wait_for(lambda: second.stats.get("countdown_due") == 1)
    finally:
        delete_queues(waiting, broker_url=broker_url)


def test_a_countdown_survives_a_broker_restart(service, own_broker):
    own_broker.ensure_running()
    ran: list[float] = []
    service.handler("remind")(lambda payload: ran.append(time.time()))
    with running_worker(service, broker_url=own_broker.url, reconnect_cap=0.5), \
            RpcClient("tests", broker_url=own_broker.url) as client:
        sent = time.time()
        client.cast(service.name, "remind", {}, countdown=4)
        own_broker.stop_app()
        own_broker.start_app()
        wait_for(lambda: ran, timeout=30)
    print(f"\n4 s countdown across a broker restart ran {ran[0] - sent:.2f} s after the cast")
    assert ran[0] - sent >= 4.0


def test_an_early_eta_waits_for_the_rest_and_naive_etas_are_refused(service, client, broker_url):
    ran: list[float] = []
    service.handler("remind")(lambda payload: ran.append(time.time()))
    with pytest.raises(ValueError, match="timezone-aware"):
        client.cast(service.name, "remind", {}, eta=datetime.now())
    with running_worker(service, broker_url=broker_url) as worker:
        due = time.time() + 0.6
        # As a publisher whose clock runs behind: straight to the queue, x-eta still ahead.
        client.cast(service.name, "remind", {}, headers={"x-eta": due})
        wait_for(lambda: ran, timeout=5)
        assert ran[0] >= due - 0.005 and worker.stats.get("delayed") == 1
        client.cast(service.name, "remind", {}, eta=datetime.now(timezone.utc) + timedelta(seconds=0.3))
        wait_for(lambda: len(ran) == 2, timeout=5)


def test_a_priority_9_cast_overtakes_500_queued_priority_0_casts(service_name, client, broker_url):
    order: list[int] = []
    plain = Service(service_name)
    plain.handler("work")(lambda payload: order.append(payload["n"]))
    with running_worker(plain, broker_url=broker_url, delete=False):
        pass  # its queue exists now, without priorities
    prioritised = Service(service_name, max_priority=10)
    prioritised.handler("work")(lambda payload: order.append(payload["n"]))
    try:
        with pytest.raises(TopologyMismatch, match=f"amqprpc migrate-queue {service_name}"):
            Worker(prioritised, broker_url=broker_url).start()
        for n in range(500):
            client.cast(service_name, "work", {"n": n}, priority=0)
        migrated = migrate_request_queue(broker_url, service_name, DEFAULT_TOPOLOGY, max_priority=10)
        assert migrated.moved == 500 and migrated.arguments == {"x-max-priority": 10}
        client.cast(service_name, "work", {"n": -1}, priority=9)
        with running_worker(prioritised, broker_url=broker_url, concurrency=1, prefetch=1):
            wait_for(lambda: len(order) == 501, timeout=30)
        print(f"\npriority 9 ran at position {order.index(-1)} of 501")
        assert order.index(-1) <= 1  # the next prefetch (one may already be held)
    finally:
        delete_queues(DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name), broker_url=broker_url)


def test_two_workers_keep_a_rate_limit_together_and_other_actions_answer(service, client, broker_url):
    runs: list[float] = []
    lock = threading.Lock()

    @service.handler("send_email", rate_limit="20/s")
    def send_email(payload):
        with lock:
            runs.append(time.time())

    service.handler("lookup")(lambda payload: {"ok": True})
    request_queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service.name)
    with running_worker(service, broker_url=broker_url) as one, \
            running_worker(service, broker_url=broker_url, delete=False) as two:
        for n in range(60):
            client.cast(service.name, "send_email", {"n": n})
        time.sleep(0.5)  # the backlog has taken its slots; measure while it drains
        latencies = []
        while len(runs) < 60 and len(latencies) < 100:
            started = time.perf_counter()
            assert client.call(service.name, "lookup", {}) == {"ok": True}
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
        wait_for(lambda: len(runs) == 60, timeout=10)
        limited = one.stats.get("rate_limited", 0) + two.stats.get("rate_limited", 0)
    runs.sort()
    overall = (len(runs) - 1) / (runs[-1] - runs[0])
    busiest = max(sum(1 for t in runs if start <= t < start + 1.0) for start in runs)
    latencies.sort()
    print(f"\nrate limit 20/s on 2 workers: {overall:.1f}/s overall, at most {busiest} in any 1 s; "
          f"{limited} put off; lookup median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p90 {latencies[int(len(latencies) * 0.9)] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert overall <= 22 and busiest <= 22 and limited > 0
    assert latencies[int(len(latencies) * 0.9)] < 0.05
    delete_queues(*[DEFAULT_TOPOLOGY.countdown_queue(request_queue, ms).name for ms in range(50, 3200, 50)],
                  broker_url=broker_url)


def test_quorum_queues_on_rabbitmq_4_honour_two_priority_levels(service_name, client, broker_url):
    with Connection(broker_url) as conn:
        conn.connect()
        version = conn.connection.server_properties.get("version", "0")
    if isinstance(version, bytes):
        version = version.decode()
    if int(str(version).split(".")[0]) < 4:
        pytest.skip(f"RabbitMQ {version}: quorum queues have priorities from 4.0 on")
    order: list[int] = []
    service = Service(service_name)
    service.handler("work")(lambda payload: order.append(payload["n"]))
    with running_worker(service, broker_url=broker_url, queue_type="quorum", delete=False):
        pass
    try:
        for n in range(50):
            client.cast(service_name, "work", {"n": n}, priority=0)
        client.cast(service_name, "work", {"n": -1}, priority=5)  # 5 and above: "high"
        with running_worker(service, broker_url=broker_url, queue_type="quorum", concurrency=1, prefetch=1):
            wait_for(lambda: len(order) == 51, timeout=30)
        print(f"\nquorum (4.x): the priority-5 cast ran at position {order.index(-1)} of 51")
        assert order.index(-1) <= 2
    finally:
        delete_queues(DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name), broker_url=broker_url)


def test_async_casts_and_submits_take_a_countdown_too(service, broker_url):
    import asyncio

    from amqprpc import AsyncRpcClient

    ran: list[float] = []
    service.handler("remind")(lambda payload: ran.append(time.time()))
    request_queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service.name)
    waiting = DEFAULT_TOPOLOGY.countdown_queue(request_queue, 1000).name

    async def cast() -> str:
        async with AsyncRpcClient("tests", broker_url=broker_url) as aio:
            return await aio.cast(service.name, "remind", {}, countdown=1, priority=3)

    replies = unique_name("replies")  # a collector queue of this test's own
    with running_worker(service, broker_url=broker_url), \
            RpcClient("tests", broker_url=broker_url, topology=Topology(collector_queue=replies)) as submitter:
        sent = time.time()
        assert asyncio.run(cast())
        correlation_id = submitter.submit(service.name, "remind", {}, countdown=1)
        assert correlation_id and ready_count(broker_url, waiting) == 2
        wait_for(lambda: len(ran) == 2, timeout=5)
        assert min(ran) - sent >= 1.0
        wait_for(lambda: ready_count(broker_url, replies) == 1)
    delete_queues(waiting, replies, broker_url=broker_url)


def test_redis_gcra_is_shared_and_falls_back_alone(redis_server):
    url, process = redis_server()
    rate = parse_rate("10/s")
    first, second = RateLimiter("svc", redis_url=url), RateLimiter("svc", redis_url=url)
    waits = [limiter.reserve("send", rate) for limiter in (first, second) * 10]
    assert waits[0] == 0 and sorted(waits) == pytest.approx(waits, abs=1e-6)  # one shared timeline
    assert waits[-1] == pytest.approx(1.9, abs=0.05)
    process.terminate()
    process.wait(10)
    assert first.reserve("send", rate) == 0 and first.redis_down  # alone now: its own timeline
    assert first.reserve("send", rate) == pytest.approx(0.1, abs=0.02)
