"""A worker's idle handler thread that reads its next delivery itself (leader/follower,
:meth:`amqprpc.transport.consumer.Consumer.next_delivery`): it leads one call at a time, a
burst is handled exactly once, a warm stop (SIGTERM) while it leads is prompt and loses
nothing, and the broker closing the connection under it reconnects and loses nothing."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from amqprpc import RpcClient
from amqprpc.config import redis_url
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for
from rabbit_node import suite_ctl
from workerproc import WorkerProcess

pytestmark = pytest.mark.integration


def test_a_worker_serving_one_call_at_a_time_leads_and_wakes_nobody(service, broker_url):
    @service.handler
    def echo(payload):
        return payload

    with running_worker(service, concurrency=8) as worker, \
            RpcClient(unique_name("one"), broker_url=broker_url, timeout=10) as client:
        token = worker.read_token
        wait_for(lambda: client.call(service.name, "echo", {}) == {} and token.lent, timeout=5)
        lends, leads, reclaims = token.lends, token.leads, token.reclaims
        for n in range(200):
            assert client.call(service.name, "echo", {"n": n}) == {"n": n}
        report = f"lent {token.lends - lends}, led {token.leads - leads}, taken back {token.reclaims - reclaims}"
        print("\n" + report)
        # Every call was read by the thread that ran it: a lead per call, the socket lent (almost) all
        # along (a handler thread held off the CPU past a lease on this shared machine: taken back once).
        assert token.leads - leads >= 200, report
        assert token.reclaims - reclaims <= 5, report
        assert worker.stats["succeeded"] >= 200


def test_a_burst_of_200_casts_is_handled_exactly_once(service, broker_url):
    counts: dict[int, int] = {}
    lock = threading.Lock()

    @service.handler
    def echo(payload):
        return payload

    @service.handler
    def count(payload):
        time.sleep(0.001)
        with lock:
            counts[payload["n"]] = counts.get(payload["n"], 0) + 1

    with running_worker(service, concurrency=8, prefetch=64) as worker, \
            RpcClient(unique_name("burst"), broker_url=broker_url, timeout=10) as client:
        token = worker.read_token
        wait_for(lambda: client.call(service.name, "echo", {}) == {} and token.lent, timeout=5)
        leads = token.leads
        for n in range(200):
            client.cast(service.name, "count", {"n": n})
        wait_for(lambda: len(counts) == 200, timeout=30)
        # Quiet again: the socket is lent again and a call is read by the thread that runs it.
        wait_for(lambda: client.call(service.name, "echo", {}) == {} and token.lent, timeout=10)
        report = f"lent {token.lends}, led {token.leads}, taken back {token.reclaims}"
    assert counts == {n: 1 for n in range(200)}, report
    assert token.leads > leads and token.reclaims >= 1, report  # the burst went back to the loop


@pytest.fixture
def r(redis_available):
    client = redis.Redis.from_url(redis_url(), decode_responses=True)
    keys: list[str] = []
    client.test_key = lambda kind: keys.append(unique_name(f"amqprpc-test-{kind}")) or keys[-1]
    yield client
    if keys:
        client.delete(*keys)


def test_sigterm_while_a_handler_thread_leads_stops_at_once_and_loses_nothing(broker_url, r, tmp_path):
    svc = unique_name("leads")
    done = r.test_key("done")
    try:
        worker = WorkerProcess(svc, str(tmp_path / "w.log"), "--concurrency", "8", "--shutdown-timeout", "20")
        worker.wait_event("worker ready")
        with RpcClient(unique_name("term"), broker_url=broker_url, timeout=10) as client:
            for n in range(30):  # one at a time: a handler thread reads the next one itself
                assert client.call(svc, "work", {"n": n, "done": done, "sleep": 0}) == {"n": str(n)}
            began = time.monotonic()
            worker.process.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0, worker.text()
            took = time.monotonic() - began
            stopped = worker.events("worker stopped")[-1]
            assert stopped["clean"] is True, stopped
            assert stopped["led"] >= 25, stopped  # it stopped while a handler thread led
            assert took < 3.0, f"warm stop took {took:.2f}s"

            # Casts sent to a worker whose handler thread leads, then SIGTERM at once: each runs once.
            second = WorkerProcess(svc, str(tmp_path / "w2.log"), "--concurrency", "8")
            second.wait_event("worker ready")
            assert client.call(svc, "work", {"n": 30, "done": done, "sleep": 0}) == {"n": "30"}
            for n in range(31, 130):
                client.cast(svc, "work", {"n": n, "done": done, "sleep": 0.01})
            second.process.send_signal(signal.SIGTERM)
            assert second.wait(15) == 0, second.text()
            assert second.events("worker stopped")[-1]["clean"] is True
            third = WorkerProcess(svc, str(tmp_path / "w3.log"), "--concurrency", "8")
            third.wait_event("worker ready")
            wait_for(lambda: r.hlen(done) == 130, timeout=30)
            third.process.send_signal(signal.SIGTERM)
            assert third.wait(15) == 0
        counts = {int(n): int(c) for n, c in r.hgetall(done).items()}
        assert counts == {n: 1 for n in range(130)}
        print(f"\nSIGTERM while leading: stopped in {took:.2f}s after {stopped['led']} leads; 130 ran once each")
    finally:
        delete_queues(f"service.{svc}.request", f"service.{svc}.event.{svc}.happened", f"service.{svc}.dead")


def _connection_of(sock) -> str:
    """The broker's name (pid) of the AMQP connection on ``sock``, found by its local port."""
    port = sock.getsockname()[1]
    listed = suite_ctl("-q", "list_connections", "pid", "peer_port")
    found = [fields[0] for fields in (line.split("\t") for line in listed.splitlines())
             if len(fields) == 2 and fields[1] == str(port)]
    assert found, f"no connection with peer port {port} in:\n{listed}"
    return found[0]


def test_the_broker_closing_the_connection_under_a_leading_handler_thread_reconnects_and_loses_nothing(
        service, broker_url):
    @service.handler
    def echo(payload):
        return payload

    with running_worker(service, concurrency=8, reconnect_cap=1.0) as worker, \
            RpcClient(unique_name("closed"), broker_url=broker_url, timeout=30) as client:
        token, loop = worker.read_token, worker._loop
        wait_for(lambda: client.call(service.name, "echo", {}) == {} and token.lent, timeout=5)
        wait_for(lambda: token._token.locked() and token.leads > 0, timeout=5)  # a handler thread leads
        leads = token.leads
        suite_ctl("-q", "close_connection", _connection_of(loop.link.sock), "test: closed under a leader")
        wait_for(lambda: loop.connects == 2 and loop.connected.is_set(), timeout=30)
        # Calls made right after: answered by the new connection, read again by the thread that runs them.
        answers = [client.call(service.name, "echo", {"n": n}) for n in range(50)]
        assert answers == [{"n": n} for n in range(50)]
        wait_for(lambda: token.lent, timeout=5)
        assert token.leads > leads + 40, (token.lends, token.leads, token.reclaims)
        assert worker.alive
