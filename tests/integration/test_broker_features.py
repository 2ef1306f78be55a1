"""What RabbitMQ 4.x brings or refuses, on whichever broker the suite runs against (3.10 and
4.x alike): broker-sent basic.cancel answered by consuming again, refused (nacked) publishes
failing at once and their channel replaced, quorum queues' delivery limit and at-least-once
dead-lettering, and no declare that 4.3 refuses (transient non-exclusive queues)."""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable

import pytest
from kombu import Connection, Queue

from amqprpc import PublishRefused, ResponseStore, RpcClient, Service, Topology
from amqprpc.ops.collector import Collector
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for
from amqprpc.wire.topology import AT_LEAST_ONCE, DEFAULT_TOPOLOGY
from amqprpc.server.worker import Worker

from rabbit_node import suite_ctl


def _consumers(broker_url: str, queue: str) -> int:
    with Connection(broker_url) as conn:
        try:
            return conn.channel().queue_declare(queue, passive=True).consumer_count
        except conn.channel_errors:
            return 0


# --- no transient non-exclusive queue (RabbitMQ 4.3 refuses them) ---------------------------
def test_every_queue_amqprpc_declares_is_durable_or_exclusive():
    topology = Topology()
    queues = [topology.reply_queue("caller"), topology.responses_queue(),
              topology.broadcast_queue("svc", "h", "a.*", "instance")]
    for queue_type in ("classic", "quorum"):
        queues += [topology.request_queue("svc", queue_type), topology.event_queue("svc", "h", "a.*", queue_type),
                   topology.dead_queue("svc", queue_type), topology.delay_queue("q", 100, queue_type)]
    for queue in queues:
        assert queue.durable or queue.exclusive, queue.name


def test_quorum_queues_get_the_delivery_limit_from_max_redeliveries_and_dead_letter_at_least_once():
    service = Service("limits")
    service.event("thing.*")(lambda payload: None)
    worker = Worker(service, queue_type="quorum", max_redeliveries=30)
    request = DEFAULT_TOPOLOGY.request_queue("limits", "quorum", worker.delivery_limit)
    (event,) = worker.event_consumers.values()
    for queue in (request, event.queue):
        # Above the worker's own count (it dead-letters with the reason), and set explicitly:
        # RabbitMQ 4's default limit of 20 would cut a --max-redeliveries of 30 short.
        assert queue.queue_arguments["x-delivery-limit"] == 32
        assert queue.queue_arguments.items() >= AT_LEAST_ONCE.items()
    assert DEFAULT_TOPOLOGY.delay_queue("q", 100, "quorum").queue_arguments.items() >= AT_LEAST_ONCE.items()
    assert DEFAULT_TOPOLOGY.request_queue("limits").queue_arguments is None  # classic: untouched


@pytest.mark.integration
def test_a_quorum_queue_declared_before_at_least_once_dead_lettering_is_used_as_it_is(service, broker_url):
    service.handler("ping")(lambda payload: "pong")
    earlier = DEFAULT_TOPOLOGY.request_queue(service.name, "quorum", 7)
    earlier.queue_arguments = {k: v for k, v in earlier.queue_arguments.items() if k not in AT_LEAST_ONCE}
    with Connection(broker_url) as conn:
        earlier(conn.channel()).declare()
    try:
        with running_worker(service, queue_type="quorum", max_redeliveries=5), \
                RpcClient("features", broker_url=broker_url) as client:
            assert client.call(service.name, "ping", timeout=10) == "pong"
    finally:
        delete_queues(earlier.name, broker_url=broker_url)


# --- broker-sent basic.cancel: consume again -------------------------------------------------
@pytest.mark.integration
def test_worker_consumes_again_when_the_broker_cancels_its_consumers(service, broker_url):
    seen = []
    service.handler("ping")(lambda payload: "pong")

    @service.event("feature.*")
    def on_feature(payload):
        seen.append(payload["n"])

    request, events = f"service.{service.name}.request", f"service.{service.name}.event.on_feature"
    with running_worker(service) as worker, RpcClient("features", broker_url=broker_url) as client:
        generation = worker._loop.generation
        delete_queues(request, events, broker_url=broker_url)  # the broker cancels both consumers
        wait_for(lambda: _consumers(broker_url, request) == 1 and _consumers(broker_url, events) == 1)
        assert client.call(service.name, "ping", timeout=10) == "pong"
        client.publish_event("feature.on", {"n": 1})
        wait_for(lambda: seen == [1])
        assert worker._loop.generation == generation, "it reconnected instead of consuming again"


@pytest.mark.integration
def test_client_consumes_again_when_its_reply_queue_is_deleted(service, broker_url):
    service.handler("ping")(lambda payload: "pong")
    with running_worker(service), RpcClient("features", broker_url=broker_url) as client:
        generation = client._loop.generation
        suite_ctl("delete_queue", client.reply_queue.name)  # exclusive: only an operator can
        # Declared and consumed again by the loop thread; calls made meanwhile may time out.
        wait_for(lambda: _answers(client, service.name), timeout=20, interval=0.2)
        assert client._loop.generation == generation, "it reconnected instead of consuming again"


def _answers(client: RpcClient, service: str) -> bool:
    try:
        return client.call(service, "ping", timeout=1) == "pong"
    except Exception:  # noqa: BLE001 - not yet
        return False


@pytest.mark.integration
def test_collector_consumes_again_when_its_queue_is_deleted(service, broker_url, redis_available):
    service.handler("ping")(lambda payload: payload["n"])
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    topology = Topology(collector_queue=queue)
    store = ResponseStore(prefix=prefix)
    collector = Collector(store, broker_url=broker_url, topology=topology, ttl=30)
    collector.start()
    try:
        with running_worker(service), RpcClient("features", broker_url=broker_url, topology=topology) as client:
            generation = collector._loop.generation
            delete_queues(queue, broker_url=broker_url)
            wait_for(lambda: _consumers(broker_url, queue) == 1)
            cid = client.submit(service.name, "ping", {"n": 7})
            assert wait_for(lambda: store.get(cid))["data"] == 7
            assert collector._loop.generation == generation
            store.redis.delete(store.key(cid))
    finally:
        collector.shutdown(5)
        delete_queues(queue, broker_url=broker_url)


# --- refused publishes: fail at once, replace the channel ------------------------------------
@pytest.fixture
def refusing_queue(service_name, broker_url):
    """The service's request queue, refusing every publish (length 0, reject-publish): the
    broker nacks what is sent to it, as a quorum queue without a leader does."""
    queue = Queue(f"service.{service_name}.request", DEFAULT_TOPOLOGY.request_exchange(),
                  routing_key=f"request.{service_name}", durable=True,
                  queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    with Connection(broker_url) as conn:
        queue(conn.channel()).declare()
    yield queue
    delete_queues(queue.name, broker_url=broker_url)


@pytest.mark.integration
def test_refused_calls_and_casts_fail_at_once_and_their_channels_are_replaced(service_name, refusing_queue,
                                                                             broker_url):
    with RpcClient("features", broker_url=broker_url) as client:
        began = time.monotonic()
        with pytest.raises(PublishRefused, match="refused"):
            client.call(service_name, "x", timeout=30)
        assert time.monotonic() - began < 5, "a refused call waited for its timeout"
        with pytest.raises(PublishRefused):  # re-sent under the bounded policy, then reported
            client.cast(service_name, "x", timeout=3)
        # A channel is replaced once it is older than a second and still refused.
        wait_for(lambda: _refused_call(client, service_name) and client.channels_replaced["call"] >= 1, timeout=10)
        with pytest.raises(PublishRefused):
            client.cast(service_name, "x", timeout=3)
        assert client.channels_replaced["confirm"] >= 1
        # The fresh channels work.
        delete_queues(refusing_queue.name, broker_url=broker_url)
        service = Service(service_name)
        service.handler("ping")(lambda payload: "pong")
        with running_worker(service, broker_url=broker_url):
            assert client.call(service_name, "ping", timeout=10) == "pong"
            client.cast(service_name, "ping", timeout=10)


def _refused_call(client: RpcClient, service: str) -> bool:
    try:
        client.call(service, "x", timeout=5)
    except PublishRefused:
        return True
    return False


@pytest.mark.integration
def test_calls_waiting_on_a_replaced_call_channel_fail_at_once(service_name, refusing_queue, broker_url, monkeypatch):
    """Every publish is refused, and a refused channel older than 0.2 s is replaced, while
    8 threads keep calling for 1.5 s: calls published on a channel just before it is
    replaced are never confirmed (the broker's nacks arriving while it closes are ignored).
    Each of them fails at once with PublishRefused; before, some waited out their whole
    timeout (they were forgotten with the channel's confirm numbers)."""
    monkeypatch.setattr("amqprpc.transport.ioloop.REFUSED_CHANNEL_MIN_AGE_S", 0.2)
    threads, sending_for, timeout = 8, 1.5, 10.0
    latencies: list[float] = []
    failures: list[BaseException | None] = []
    sent = collections.Counter()

    def settled(began: float) -> Callable[[Future], None]:
        def done(future: Future) -> None:
            latencies.append(time.monotonic() - began)
            failures.append(future.exception())
        return done

    with RpcClient("replaced", broker_url=broker_url) as client:
        def send() -> None:
            until = time.monotonic() + sending_for
            for _ in range(500):
                if time.monotonic() > until:
                    break
                sent[threading.get_ident()] += 1
                client.call_async(service_name, "x", timeout=timeout).add_done_callback(settled(time.monotonic()))
                time.sleep(0.003)  # pace: a steady stream, not a backlog that delays every answer

        senders = [threading.Thread(target=send) for _ in range(threads)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        wait_for(lambda: len(latencies) == sum(sent.values()), timeout=timeout + 5)
        replaced = client.channels_replaced["call"]
    kinds = collections.Counter(type(failure).__name__ for failure in failures)
    assert set(kinds) == {"PublishRefused"}, kinds
    assert max(latencies) < 2, f"slowest of {len(latencies)} refused calls failed after {max(latencies):.1f}s"
    assert replaced >= 3
