"""Accept-then-poll: client.submit, a real `amqprpc collector` process, ResponseStore, Redis TTL.

Every test has its own service, collector queue and Redis key prefix (other helpers' tests
share this broker and Redis), and deletes what it declared.
"""
from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import amqp
import pytest
import redis
from click.testing import CliRunner
from kombu import Connection

from amqprpc import ResponseStore, RpcClient, ServiceUnavailable, Topology
from amqprpc.cli import main
from amqprpc.ops.collector import _reply_entry
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

from procs import collector, free_port
from rabbit_node import broker_address, suite_ctl

pytestmark = pytest.mark.integration


def test_collector_has_help():
    result = CliRunner().invoke(main, ["collector", "--help"])
    assert result.exit_code == 0 and "--ttl" in result.output and "AMQPRPC_REDIS_URL" in result.output


def test_reply_entry_keys_by_correlation_id_and_wraps_non_json():
    ok = amqp.Message(b'{"success": true, "data": 1}', correlation_id="c1")
    assert _reply_entry(ok) == ("c1", b'{"success": true, "data": 1}')
    foreign = amqp.Message(b'{"success": true, "data": 1, "message_id": "m1"}')  # no correlation_id property
    assert _reply_entry(foreign)[0] == "m1"
    cid, body = _reply_entry(amqp.Message(b"not json", correlation_id="c2"))
    assert cid == "c2" and b'"BadReply"' in body
    assert _reply_entry(amqp.Message(b"not json")) is None


@pytest.fixture(scope="module")
def names(broker_url, redis_available):
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    yield queue, prefix
    delete_queues(queue, broker_url=broker_url)
    cleanup = redis.Redis()
    for key in cleanup.scan_iter(prefix + "*"):
        cleanup.delete(key)


@pytest.fixture(scope="module")
def collector_proc(names):
    """One real collector process for this module; it must stop warmly (exit 0) at the end."""
    proc = collector(*names, "--ttl", "60")
    yield proc
    assert proc.stop(signal.SIGTERM) == 0, proc.output
    assert "collector stopped" in proc.output


@pytest.fixture
def store(names):
    return ResponseStore(prefix=names[1])


@pytest.fixture
def client(broker_url, names):
    with RpcClient(unique_name("submitter"), broker_url=broker_url, topology=Topology(collector_queue=names[0])) as c:
        yield c


def test_submit_returns_before_the_reply_and_the_collector_stores_it(collector_proc, client, store, service):
    release = threading.Event()

    @service.handler
    def slow_echo(payload):
        release.wait(10)
        return {"echo": payload["n"]}

    with running_worker(service, concurrency=2):
        started = time.perf_counter()
        cid = client.submit(service.name, "slow_echo", {"n": 7})
        took = time.perf_counter() - started
        # The handler cannot have answered yet: submit did not wait on the consumer.
        assert store.get(cid) is None
        release.set()
        reply = wait_for(lambda: store.get(cid))
    assert reply["success"] is True and reply["data"] == {"echo": 7}
    assert took < 1.0
    print(f"submit took {took * 1000:.1f} ms")


def test_200_submits_from_8_threads_all_stored_with_their_own_answers(collector_proc, client, store, service):
    @service.handler
    def double(payload):
        return {"n": payload["n"], "double": payload["n"] * 2}

    durations: list[float] = []

    def submit(n: int) -> tuple[int, str]:
        started = time.perf_counter()
        cid = client.submit(service.name, "double", {"n": n})
        durations.append(time.perf_counter() - started)
        return n, cid

    with running_worker(service, concurrency=4):
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            submitted = list(pool.map(submit, range(200)))
        wait_for(lambda: all(store.get(cid) is not None for _, cid in submitted), timeout=30, interval=0.1)
        all_stored = time.perf_counter() - started
    assert len({cid for _, cid in submitted}) == 200
    for n, cid in submitted:
        assert store.get(cid) == {"success": True, "data": {"n": n, "double": 2 * n}, "message_id": cid}
    assert max(durations) < 1.0
    print(f"200 submits: median {statistics.median(durations) * 1000:.1f} ms, max {max(durations) * 1000:.1f} ms; "
          f"all 200 stored after {all_stored:.2f} s")


def test_a_failed_handler_is_stored_as_an_error_reply(collector_proc, client, store, service):
    @service.handler
    def fail(payload):
        raise ValueError("out of stock")

    with running_worker(service):
        cid = client.submit(service.name, "fail", {})
        reply = wait_for(lambda: store.get(cid))
    assert reply["success"] is False and reply["error"] == "out of stock" and reply["error_type"] == "ValueError"


def test_submit_to_a_service_nobody_serves_fails_at_once(client):
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable):
        client.submit(unique_name("nobody"), "create_order", {})
    assert time.perf_counter() - started < 5.0


def test_replies_wait_in_the_queue_until_a_collector_runs_and_then_expire_after_the_ttl(broker_url, service):
    """submit declares the collector queue itself, so no reply is dropped before the first
    collector starts; the collector's TTL (1 s here) then removes it from Redis."""
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    store = ResponseStore(prefix=prefix)

    @service.handler
    def ping(payload):
        return "pong"

    try:
        with running_worker(service), RpcClient(unique_name("submitter"), broker_url=broker_url,
                                                topology=Topology(collector_queue=queue)) as client:
            cid = client.submit(service.name, "ping", {})
            wait_for(lambda: _ready_messages(broker_url, queue) == 1)
        assert store.get(cid) is None
        proc = collector(queue, prefix, "--ttl", "1")
        try:
            assert wait_for(lambda: store.get(cid))["data"] == "pong"
            assert 0 < store.redis.pttl(store.key(cid)) <= 1000
            wait_for(lambda: store.get(cid) is None, timeout=10)
        finally:
            assert proc.stop() == 0, proc.output
    finally:
        delete_queues(queue, broker_url=broker_url)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a private Redis")
def test_while_redis_is_down_nothing_is_acked_and_nothing_is_lost(broker_url, service):
    """A private Redis (the shared one is never stopped) goes down under the collector.
    1. The collector retries with backoff and stores everything once Redis is back.
    2. Down again, the collector is stopped cold: every reply it held is back in the queue
       (nothing was acked), and a new collector stores them once Redis is back."""
    port = free_port()
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    redis_url = f"redis://127.0.0.1:{port}/0"

    def start_redis():
        subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                        "no", "--daemonize", "yes", "--dir", "/tmp"], check=True, capture_output=True)
        wait_for(lambda: _redis_up(redis_url))

    def stop_redis():
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        wait_for(lambda: not _redis_up(redis_url))

    @service.handler
    def square(payload):
        return payload["n"] ** 2

    def all_stored(cids):
        wait_for(lambda: all(store.get(cid) is not None for cid in cids.values()), timeout=30, interval=0.1)
        for n, cid in cids.items():
            assert store.get(cid)["data"] == n * n

    start_redis()
    store = ResponseStore(redis_url, prefix=prefix, socket_timeout=1.0)
    procs = []
    try:
        procs.append(collector(queue, prefix, "--redis", redis_url))
        with running_worker(service), RpcClient(unique_name("submitter"), broker_url=broker_url,
                                                topology=Topology(collector_queue=queue)) as client:
            stop_redis()
            first = {n: client.submit(service.name, "square", {"n": n}) for n in range(10)}
            procs[0].wait_for_line("storing replies in Redis failed")
            start_redis()
            all_stored(first)

            stop_redis()
            mark = len(procs[0].lines)
            second = {n: client.submit(service.name, "square", {"n": n}) for n in range(10, 20)}
            procs[0].wait_for_line("storing replies in Redis failed", start=mark)
            assert procs[0].stop(signal.SIGQUIT) == 1
            wait_for(lambda: _ready_messages(broker_url, queue) == 10)
            start_redis()
            procs.append(collector(queue, prefix, "--redis", redis_url))
            all_stored(second)
        wait_for(lambda: _ready_messages(broker_url, queue) == 0)
        assert procs[1].stop() == 0, procs[1].output
    finally:
        for proc in procs:
            if proc.process.poll() is None:
                proc.stop(signal.SIGKILL)
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        delete_queues(queue, broker_url=broker_url)


def _redis_up(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


def _ready_messages(broker_url: str, queue: str) -> int:
    """Messages ready in ``queue`` (not held unacked by a consumer)."""
    with Connection(broker_url) as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (to find the collector's connection)")
def test_the_collector_reconnects_when_the_broker_drops_its_connection(broker_url, service):
    """Only the collector's own connection is closed (the shared broker keeps running):
    it reconnects by itself and replies sent meanwhile are stored."""
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    store = ResponseStore(prefix=prefix)

    @service.handler
    def ping(payload):
        return payload["n"]

    proc = collector(queue, prefix)
    try:
        with running_worker(service), RpcClient(unique_name("submitter"), broker_url=broker_url,
                                                topology=Topology(collector_queue=queue)) as client:
            first = client.submit(service.name, "ping", {"n": 0})
            assert wait_for(lambda: store.get(first))["data"] == 0
            for connection in _amqp_connections_of(proc.process.pid, broker_url):
                suite_ctl("-q", "close_connection", connection, "test: dropped on purpose")
            cids = {n: client.submit(service.name, "ping", {"n": n}) for n in range(1, 11)}
            proc.wait_for_line("broker reconnected")
            wait_for(lambda: all(store.get(cid) is not None for cid in cids.values()), timeout=30, interval=0.1)
        assert all(store.get(cid)["data"] == n for n, cid in cids.items())
        assert proc.stop() == 0, proc.output
    finally:
        if proc.process.poll() is None:
            proc.stop(signal.SIGKILL)
        delete_queues(queue, broker_url=broker_url)


def _amqp_connections_of(pid: int, broker_url: str) -> list[str]:
    """The broker's pids of the AMQP connections process ``pid`` holds (found by its local
    ports: the broker lists them as each connection's peer port)."""
    _, port = broker_address(broker_url)
    sockets = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"], capture_output=True,
                             text=True, check=True).stdout
    local_ports = {line.split()[2].rsplit(":", 1)[1] for line in sockets.splitlines() if f"pid={pid}," in line}
    listed = suite_ctl("-q", "list_connections", "pid", "port", "peer_port")
    found = [fields[0] for fields in (line.split("\t") for line in listed.splitlines())
             if len(fields) == 3 and fields[1] == str(port) and fields[2] in local_ports]
    assert found, f"no AMQP connection of pid {pid} (local ports {local_ports}) in:\n{listed}"
    return found
