"""The worker as a daemon, in real processes against the real broker and Redis:
warm stop, kill -9, cold stop, pidfile, sd_notify, process title, SIGHUP, metrics."""
from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from amqprpc import RemoteError, RpcClient
from amqprpc.config import broker_url as configured_broker_url
from amqprpc.config import redis_url
from amqprpc.testing import delete_queues, unique_name, wait_for
from rabbit_node import free_port
from workerproc import WorkerProcess

pytestmark = pytest.mark.integration

REQUESTS = 120


@pytest.fixture
def r(redis_available):
    client = redis.Redis.from_url(redis_url(), decode_responses=True)
    keys = []
    client.test_key = lambda kind: keys.append(unique_name(f"amqprpc-test-{kind}")) or keys[-1]
    yield client
    if keys:
        client.delete(*keys)


@pytest.fixture
def svc(broker_url):
    name = unique_name("daemon")
    yield name
    delete_queues(f"service.{name}.request", f"service.{name}.event.happened", f"service.{name}.dead")


@pytest.fixture
def client(broker_url):
    with RpcClient("daemon-test", timeout=10) as rpc:
        yield rpc


def start(svc, tmp_path, *args, label="w", **kw) -> WorkerProcess:
    worker = WorkerProcess(svc, str(tmp_path / f"{label}.log"), *args, **kw)
    worker.wait_event("worker ready")
    return worker


def cast_all(client, svc, done, count=REQUESTS, **payload):
    for n in range(count):
        client.cast(svc, "work", {"n": n, "done": done, **payload})


def test_sigterm_mid_load_exits_0_in_time_and_every_request_runs_exactly_once(svc, client, r, tmp_path):
    done = r.test_key("done")
    first = start(svc, tmp_path, "--concurrency", "4", "--shutdown-timeout", "10", label="first")
    cast_all(client, svc, done, sleep=0.1)
    wait_for(lambda: r.hlen(done) >= 30, timeout=30)
    began = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0, first.text()
    took = time.monotonic() - began
    assert took < 10, f"warm stop took {took:.1f}s, over the shutdown timeout"
    stopped = first.events("worker stopped")[-1]
    assert stopped["clean"] is True
    ran_before = r.hlen(done)
    assert ran_before < REQUESTS, "the worker finished everything before the signal: the test proves nothing"

    second = start(svc, tmp_path, "--concurrency", "8", label="second")
    wait_for(lambda: r.hlen(done) == REQUESTS, timeout=30)
    second.process.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
    counts = {int(n): int(c) for n, c in r.hgetall(done).items()}
    assert counts == {n: 1 for n in range(REQUESTS)}
    print(f"\nSIGTERM: {ran_before} ran before the stop (took {took:.2f}s), "
          f"{REQUESTS - ran_before} after the restart, 0 lost, 0 duplicates")


def test_kill_9_mid_load_loses_nothing(svc, client, r, tmp_path):
    done = r.test_key("done")
    first = start(svc, tmp_path, "--concurrency", "4", label="first")
    cast_all(client, svc, done, sleep=0.1)
    wait_for(lambda: r.hlen(done) >= 30, timeout=30)
    first.process.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    ran_before = r.hlen(done)

    second = start(svc, tmp_path, "--concurrency", "8", label="second")
    wait_for(lambda: r.hlen(done) == REQUESTS, timeout=30)
    second.process.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
    counts = {int(n): int(c) for n, c in r.hgetall(done).items()}
    assert set(counts) == set(range(REQUESTS)), "a request was lost"
    duplicates = sum(counts.values()) - REQUESTS
    # At most what was running or finished-but-unacked at the kill runs twice.
    assert duplicates <= 8
    print(f"\nkill -9: {ran_before} ran before the kill, 0 lost, {duplicates} duplicates")


def _ready_in_queue(svc: str) -> int:
    from kombu import Connection

    with Connection(configured_broker_url()) as conn:
        return conn.default_channel.queue_declare(f"service.{svc}.request", passive=True).message_count


def test_second_sigterm_stops_at_once_and_requeues_what_was_running(svc, client, r, tmp_path):
    started, done = r.test_key("started"), r.test_key("done")
    worker = start(svc, tmp_path, "--concurrency", "2", "--prefetch", "4", "--shutdown-timeout", "60")
    cast_all(client, svc, done, count=4, started=started, sleep=60)
    wait_for(lambda: r.hlen(started) == 2, timeout=20)
    worker.process.send_signal(signal.SIGTERM)
    # The warm stop gives back what no handler took (logged once the broker cancelled the
    # consumer); only then is the second signal the "second signal during a warm stop".
    assert worker.wait_event("requeued prefetched messages")["count"] == 2
    began = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 1
    assert time.monotonic() - began < 10  # not the 60 s the handlers would take
    # The 2 requeued at the first signal, and the 2 that were running, are all back.
    wait_for(lambda: _ready_in_queue(svc) == 4, timeout=10)
    assert r.hlen(done) == 0


def test_shutdown_timeout_is_a_cold_stop(svc, client, r, tmp_path):
    started, done = r.test_key("started"), r.test_key("done")
    worker = start(svc, tmp_path, "--concurrency", "1", "--shutdown-timeout", "1")
    cast_all(client, svc, done, count=1, started=started, sleep=60)
    wait_for(lambda: r.hlen(started) == 1, timeout=20)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 1
    assert worker.events("worker stopped")[-1]["clean"] is False
    wait_for(lambda: _ready_in_queue(svc) == 1, timeout=10)  # the running one went back


def _notify_socket(tmp_path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)
    return sock


def _receive_until(sock: socket.socket, wanted: str) -> list[str]:
    seen = []
    while wanted not in seen:
        seen.extend(sock.recv(4096).decode().splitlines())
    return seen


def test_systemd_notify_pidfile_title_and_sighup(svc, client, tmp_path):
    sock = _notify_socket(tmp_path)
    pidfile = tmp_path / "worker.pid"
    worker = WorkerProcess(svc, str(tmp_path / "w.log"), "--pidfile", str(pidfile),
                           env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    try:
        seen = _receive_until(sock, "READY=1")
        worker.wait_event("worker ready")
        assert f"MAINPID={worker.pid}" in seen
        assert "WATCHDOG=1" in _receive_until(sock, "WATCHDOG=1")  # every 0.2 s (half of WATCHDOG_USEC)
        assert pidfile.read_text().strip() == str(worker.pid)
        with open(f"/proc/{worker.pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[0].startswith(f"amqprpc worker {svc}".encode())

        # A second worker with the same pidfile is refused (usage error), the first is untouched.
        refused = WorkerProcess(svc, str(tmp_path / "refused.log"), "--pidfile", str(pidfile))
        assert refused.wait(20) == 2
        assert "names running process" in refused.text()

        worker.process.send_signal(signal.SIGHUP)
        worker.wait_event("SIGHUP ignored: stop with SIGTERM and let the supervisor start a new worker")
        assert client.call(svc, "ping", timeout=5)["pid"] == worker.pid  # still serving

        worker.process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _receive_until(sock, "STOPPING=1")
        assert worker.wait(15) == 0
        assert not pidfile.exists()
    finally:
        worker.kill()
        sock.close()


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "service"))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_metrics_endpoint_counts_requests(svc, client, r, tmp_path):
    done = r.test_key("done")
    port = free_port()
    worker = start(svc, tmp_path, "--metrics-port", str(port))
    try:
        before = _scrape(port)
        success = ("amqprpc_requests_total", (("action", "work"), ("outcome", "replied")))
        assert before[success] == 0
        for n in range(3):
            client.call(svc, "work", {"n": n, "done": done, "sleep": 0})
        with pytest.raises(RemoteError):
            client.call(svc, "no_such_action", timeout=5)
        client.cast(svc, "fail", {})  # no reply_to and no retry policy: dead-lettered at once
        client.publish_event(f"{svc}.happened", {"done": done})
        wait_for(lambda: r.hget(done, "event"), timeout=10)
        event_ok = ("amqprpc_requests_total", (("action", "happened"), ("outcome", "done")))
        after = wait_for(lambda: (scraped := _scrape(port)).get(event_ok) and scraped, timeout=10)
        assert after[success] == 3
        assert after[("amqprpc_requests_total", (("action", "<unknown>"), ("outcome", "failed")))] == 1
        assert after[("amqprpc_handler_duration_seconds_count", (("action", "work"),))] == 3
        assert after[("amqprpc_requests_in_flight", ())] == 0
        assert after[("amqprpc_redeliveries_total", ())] == 0
        dead = ("amqprpc_dead_letters_total", (("reason", "ValueError"),))
        after = wait_for(lambda: (scraped := _scrape(port)).get(dead) and scraped, timeout=10)
        assert after[dead] == 1
        assert after[("amqprpc_requests_total", (("action", "fail"), ("outcome", "dead_lettered")))] == 1

        # What the handlers' service.client sees of the services it calls, on the same endpoint.
        client.call(svc, "ask", {"n": 9, "done": done, "sleep": 0})
        nested = ("amqprpc_client_duration_seconds_count",
                  (("action", "work"), ("kind", "call"), ("outcome", "ok")))
        after = wait_for(lambda: (scraped := _scrape(port)).get(nested) and scraped, timeout=10)
        assert after[nested] == 1 and after[("amqprpc_client_calls_in_flight", ())] == 0

        # A second worker on a port already taken is a usage error (exit 2), not "no broker".
        taken = WorkerProcess(svc, str(tmp_path / "taken.log"), "--metrics-port", str(port))
        assert taken.wait(20) == 2
        assert "cannot serve metrics on port" in taken.text()
    finally:
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0


NO_BROKER = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens on port 1: connection refused


def test_a_worker_waits_for_its_broker_logging_each_attempt_and_a_sigterm_ends_the_wait_with_0(svc, tmp_path):
    worker = WorkerProcess(svc, str(tmp_path / "w.log"), "--reconnect-cap", "0.5", broker_url=NO_BROKER)
    try:
        attempt = worker.wait_event("broker connect failed", count=3)
        assert attempt["attempt"] == 3 and 0 <= attempt["retry_in"] <= 0.5 and "refused" in attempt["error"]
        assert worker.process.poll() is None
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.text()
        assert worker.events("worker exiting")[-1]["reason"] == "stopped while waiting for the broker"
    finally:
        worker.kill()


@pytest.mark.parametrize("wait, attempts", [("0", 0), ("1.5", 2)])
def test_broker_wait_bounds_the_wait_then_exit_4_in_one_line(svc, tmp_path, wait, attempts):
    began = time.monotonic()
    worker = WorkerProcess(svc, str(tmp_path / "w.log"), "--broker-wait", wait, "--reconnect-cap", "0.3",
                           broker_url=NO_BROKER)
    assert worker.wait(30) == 4, worker.text()
    took = time.monotonic() - began
    assert len(worker.events("broker connect failed")) >= attempts
    assert took >= float(wait)
    errors = [line["event"] for line in worker.lines() if line["event"].startswith("Error:")]
    assert errors == ["Error: cannot connect to broker amqp://guest:***@127.0.0.1:1//: [Errno 111] Connection refused"]
