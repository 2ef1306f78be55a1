"""Broker loss, failover and heartbeats, against a RabbitMQ node of this session's own
(``own_broker``: these tests stop it) with real worker processes."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from amqprpc import RpcClient, ServiceUnavailable
from amqprpc.testing import delete_queues, unique_name, wait_for
from rabbit_node import free_port
from workerproc import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def svc(own_broker):
    name = unique_name("loss")
    yield name
    own_broker.ensure_running()
    delete_queues(f"service.{name}.request", f"service.{name}.event.happened", f"service.{name}.dead", broker_url=own_broker.url)


@pytest.fixture
def client(own_broker):
    with RpcClient("loss-test", broker_url=own_broker.url, timeout=5, reconnect_cap=1.0) as rpc:
        yield rpc


def start(svc, tmp_path, broker_url, *args, label="w") -> WorkerProcess:
    worker = WorkerProcess(svc, str(tmp_path / f"{label}.log"), "--reconnect-cap", "1", *args,
                           broker_url=broker_url)
    worker.wait_event("worker ready")
    return worker


def stop(worker: WorkerProcess) -> None:
    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0, worker.text()


def answers(client, svc) -> bool:
    return bool(client.call(svc, "ping", timeout=5))


def test_idle_worker_and_client_resume_after_broker_restart(own_broker, svc, client, done_counts, tmp_path):
    redis_client, done = done_counts
    worker = start(svc, tmp_path, own_broker.url)
    try:
        assert answers(client, svc)
        # Held until the broker is back: its reply cannot race the broker's stop (stop_app
        # takes seconds on a loaded machine).
        started, hold = f"{done}:started", f"{done}:hold"
        in_flight = client.call_async(svc, "work", {"n": 0, "done": done, "started": started, "hold": hold},
                                      timeout=60)
        wait_for(lambda: redis_client.hlen(started) == 1, timeout=10)
        own_broker.stop_app()
        worker.wait_event("broker connection lost")
        # The call in flight fails when the connection drops, not after its 60 s timeout.
        with pytest.raises(ServiceUnavailable, match="connection to the broker lost"):
            in_flight.result(10)
        wait_for(lambda: not client._loop.connected.is_set(), timeout=10)
        began = time.monotonic()
        with pytest.raises(ServiceUnavailable):  # fails, never waits for its timeout
            client.call(svc, "ping", timeout=60)
        # At worst it waits for the reconnect attempt under way (connect_timeout 5 s).
        assert time.monotonic() - began < 20
        own_broker.start_app()
        redis_client.set(hold, 1, ex=120)
        worker.wait_event("broker reconnected", timeout=30)
        wait_for(client._loop.connected.is_set, timeout=30)
        assert answers(client, svc)
        assert worker.process.poll() is None  # same process, no restart
        attempts = worker.events("broker connect failed")
        assert attempts, "no reconnect attempt was logged"
        assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
        assert all(0 <= a["retry_in"] <= 1.0 for a in attempts)  # capped by --reconnect-cap
        # The request that was running when the broker went is run again (at least once).
        wait_for(lambda: redis_client.hlen(done) == 1, timeout=30)
    finally:
        # Stop first: the redelivered request may still be running, and waits for the hold key.
        try:
            stop(worker)
        finally:
            redis_client.delete(f"{done}:started", f"{done}:hold")


def test_no_accepted_cast_is_lost_when_the_broker_restarts_under_load(own_broker, svc, client, done_counts, tmp_path):
    redis_client, done = done_counts
    worker = start(svc, tmp_path, own_broker.url, "--concurrency", "4")
    accepted: list[int] = []
    refused = [0]
    halt = threading.Event()

    def produce():
        n = 0
        while not halt.is_set():
            try:
                client.cast(svc, "work", {"n": n, "done": done, "sleep": 0.02}, timeout=5)
                accepted.append(n)
            except Exception:  # noqa: BLE001 - not accepted: allowed to be lost
                refused[0] += 1
                time.sleep(0.05)
            n += 1

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        wait_for(lambda: redis_client.hlen(done) >= 50, timeout=30)
        own_broker.stop_app()
        before_restart = len(accepted)
        own_broker.start_app()
        worker.wait_event("broker reconnected", timeout=30)
        wait_for(lambda: len(accepted) >= before_restart + 100, timeout=30)
    finally:
        halt.set()
        producer.join(10)
    try:
        # Not a count: a cast refused because its confirm was cut off may still have been
        # stored and processed; what matters is that every accepted one is.
        def processed() -> dict:
            return {int(n): int(c) for n, c in redis_client.hgetall(done).items()}

        try:
            wait_for(lambda: set(accepted) <= set(processed()), timeout=60)
        except AssertionError:
            lost = sorted(set(accepted) - set(processed()))
            raise AssertionError(f"{len(lost)} accepted casts were lost: {lost[:20]}\n{worker.text()}") from None
        counts = processed()
        duplicates = sum(counts.values()) - len(counts)
        print(f"\nbroker restart under load: {len(accepted)} casts accepted, {refused[0]} refused during "
              f"the outage, {len(counts)} processed, 0 lost, {duplicates} duplicates")
    finally:
        stop(worker)


def test_failover_to_the_next_broker_url(own_broker, svc, client, tmp_path):
    dead = f"amqp://guest:secret@127.0.0.1:{free_port()}//"
    worker = start(svc, tmp_path, f"{dead};{own_broker.url}")
    try:
        assert answers(client, svc)
        assert "secret" not in worker.text()
    finally:
        stop(worker)


def test_heartbeats_flow_while_every_handler_is_busy(own_broker, svc, client, done_counts, tmp_path):
    redis_client, done = done_counts
    worker = start(svc, tmp_path, own_broker.url, "--heartbeat", "2", "--concurrency", "3", "--prefetch", "3")
    try:
        connections = own_broker.connections()
        for n in range(3):
            client.cast(svc, "work", {"n": n, "done": done, "sleep": 10})
        # 10 s of busy handlers = 5 heartbeat intervals; the broker drops a connection
        # after 2 missed ones.
        wait_for(lambda: redis_client.hlen(done) == 3, timeout=30)
        assert answers(client, svc)
        assert own_broker.connections() == connections, "the broker saw the connection closed and re-opened"
        assert not worker.events("broker connection lost")
        assert [int(c) for c in redis_client.hgetall(done).values()] == [1, 1, 1]
    finally:
        stop(worker)


def test_a_worker_and_a_collector_started_before_their_broker_serve_once_it_is_up(own_broker, svc, tmp_path):
    """Daemons that boot before RabbitMQ wait for it (each attempt logged), then serve:
    a call reaches the worker, and its reply to a submit reaches Redis through the collector."""
    from amqprpc import ResponseStore, Topology

    from procs import AMQPRPC, Proc

    queue, prefix = unique_name("responses"), unique_name("amqprpc-test-response") + ":"
    own_broker.stop_app()
    worker = collector = None
    try:
        worker = WorkerProcess(svc, str(tmp_path / "w.log"), "--reconnect-cap", "1", broker_url=own_broker.url)
        collector = Proc(AMQPRPC + ["collector", "--queue", queue, "--key-prefix", prefix, "--log-format", "json",
                                    "--reconnect-cap", "1"], env={"AMQPRPC_BROKER_URL": own_broker.url})
        worker.wait_event("broker connect failed", count=2)
        collector.wait_for_line('"attempt": 2')
        assert worker.process.poll() is None and collector.process.poll() is None
    finally:
        own_broker.start_app()
    try:
        worker.wait_event("worker ready", timeout=60)
        collector.wait_for_line("collector ready", timeout=60)
        with RpcClient("late-test", broker_url=own_broker.url, topology=Topology(collector_queue=queue)) as rpc:
            assert rpc.call(svc, "ping", timeout=10)["pid"] == worker.pid
            cid = rpc.submit(svc, "ping", {})
        store = ResponseStore(prefix=prefix)
        assert wait_for(lambda: store.get(cid), timeout=20)["data"]["pid"] == worker.pid
        stop(worker)
        assert collector.stop() == 0, collector.output
    finally:
        if worker is not None:
            worker.kill()
        if collector is not None and collector.process.poll() is None:
            collector.stop(signal.SIGKILL)
        delete_queues(queue, broker_url=own_broker.url)
        replies = ResponseStore(prefix=prefix).redis
        for key in replies.scan_iter(prefix + "*"):
            replies.delete(key)
