"""Events against the real broker and Redis: service-pool and broadcast delivery, durability,
failing handlers, trace ids across hops, and the handlers' shared client."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from amqprpc import RpcClient, Service, Topology, logs
from amqprpc.middleware import shared_client
from amqprpc.context import CallContext, current
from amqprpc.server.events import service_queue_names
from amqprpc.testing import delete_exchanges, delete_queues, running_worker, unique_name, wait_for

pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent.parent / "apps"  # the helper apps


@pytest.fixture
def r(redis_available):
    client = redis.Redis(decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def topology(broker_url):
    """A namespaced topology: this test's own exchanges and queues, so plain event names
    (thing.happened) meet nobody else's."""
    topology = Topology().namespaced(unique_name("ev"))
    yield topology
    delete_exchanges(topology.service_exchange, topology.event_exchange)


@pytest.fixture
def client(broker_url, topology):
    with RpcClient("tests", broker_url=broker_url, topology=topology) as client:
        yield client


def _queue_exists(broker_url: str, name: str) -> bool:
    from amqp.exceptions import NotFound, ResourceLocked
    from kombu import Connection

    with Connection(broker_url) as conn:
        try:
            conn.channel().queue_declare(name, passive=True)
        except ResourceLocked:  # exclusive to another connection: it exists
            return True
        except NotFound:
            return False
        return True


# --- real worker processes ------------------------------------------------------------
def _start_worker(app: str, ns: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "EVENT_TEST_NS": ns, "PYTHONPATH": str(TESTS)}
    out = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "amqprpc", "worker", f"{ns}-{app}", "--app", f"event_apps:{app}",
                             "--log-format", "json", "--concurrency", "2", "--prefetch", "2"],
                            stdout=out, stderr=subprocess.STDOUT, env=env)


def test_each_service_gets_each_event_once_and_broadcast_reaches_every_instance(broker_url, r, tmp_path):
    """Two worker processes of billing and one of audit; 50 events. Service pool: billing and
    audit each count every event exactly once, billing's two instances share the work.
    Broadcast: each billing instance runs its broadcast handler for every event."""
    ns = unique_name("evproc")
    logs_of = {name: tmp_path / f"{name}.log" for name in ("billing-1", "billing-2", "audit-1")}
    processes = {name: _start_worker(name.split("-")[0], ns, path) for name, path in logs_of.items()}
    try:
        for name, path in logs_of.items():
            wait_for(lambda: "worker ready" in path.read_text() or processes[name].poll() is not None, timeout=30)
            assert processes[name].poll() is None, path.read_text()
        trace = "trace-" + ns
        token = current.set(CallContext("tests", "publish", "c-" + ns, trace, None))
        try:
            with RpcClient("tests", broker_url=broker_url) as client:
                for n in range(50):
                    client.publish_event(f"{ns}.thing.happened", {"n": n})
        finally:
            current.reset(token)
        counts = {f"{ns}-billing:count": 50, f"{ns}-audit:count": 50, f"{ns}-billing:refresh": 100}

        def all_counted():
            return all(sum(map(int, r.hvals(f"{ns}:{key}:by-pid"))) >= want for key, want in counts.items())

        wait_for(all_counted, timeout=30)
        broadcast_queues = {name for path in logs_of.values() for name in _ready_line(path)["event_queues"]
                            if ".event.refresh." in name}
        assert len(broadcast_queues) == 2 and all(_queue_exists(broker_url, q) for q in broadcast_queues)
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        codes = {name: process.wait(30) for name, process in processes.items()}
        delete_queues(*[f"service.{ns}-{svc}.{kind}" for svc in ("billing", "audit")
                        for kind in ("request", "event.count")], broker_url=broker_url)
    try:
        assert codes == {name: 0 for name in processes}
        billing_pids = {str(processes[name].pid) for name in ("billing-1", "billing-2")}
        for service in ("billing", "audit"):
            per_event = r.hgetall(f"{ns}:{ns}-{service}:count")
            assert per_event == {str(n): "1" for n in range(50)}, f"{service}: not exactly once"
        pool = r.hgetall(f"{ns}:{ns}-billing:count:by-pid")
        assert set(pool) == billing_pids and all(int(count) > 0 for count in pool.values()), pool
        assert sum(map(int, pool.values())) == 50
        broadcast = r.hgetall(f"{ns}:{ns}-billing:refresh:by-pid")
        assert broadcast == {pid: "50" for pid in billing_pids}
        assert r.hgetall(f"{ns}:{ns}-billing:refresh") == {str(n): "2" for n in range(50)}
        # The handlers' log lines carry the publisher's trace id.
        counted = [json.loads(line) for path in logs_of.values() for line in path.read_text().splitlines()
                   if '"counted"' in line]
        assert len(counted) == 200
        assert {line["trace_id"] for line in counted} == {trace}
        assert all(line["action"] == f"{ns}.thing.happened" and line["service"].startswith(ns) for line in counted)
        # Broadcast queues lived as long as their instance.
        assert not any(_queue_exists(broker_url, q) for q in broadcast_queues)
    finally:
        r.delete(*r.keys(f"{ns}:*") or ["-"])


def _ready_line(path: Path) -> dict:
    return next(json.loads(line) for line in path.read_text().splitlines() if '"worker ready"' in line)


# --- in-process workers ---------------------------------------------------------------
def test_events_wait_in_the_durable_queue_while_the_service_is_down(broker_url, topology, client):
    seen = []
    service = Service("ledger")
    service.event("thing.*")(lambda payload: seen.append(payload["n"]))
    with running_worker(service, broker_url=broker_url, topology=topology, delete=False):
        pass  # declares the queue and its binding, then goes away
    try:
        for n in range(5):
            client.publish_event("thing.happened", {"n": n})
        client.publish_event("other.thing", {"n": 99})  # not bound: never delivered
        with running_worker(service, broker_url=broker_url, topology=topology, delete=False) as worker:
            wait_for(lambda: len(seen) >= 5)
            client.publish_event("thing.more", {"n": 5})
            wait_for(lambda: len(seen) >= 6)
    finally:
        delete_queues(*service_queue_names(service, topology), broker_url=broker_url)
    assert sorted(seen) == list(range(6)) and worker.stats["succeeded"] == 6


def test_a_failing_event_handler_is_rejected_once_not_requeued(broker_url, topology, client):
    calls = []
    service = Service("fragile")

    @service.event("thing.*")
    def on_thing(payload):
        calls.append(payload["n"])
        if payload["n"] == 0:
            raise RuntimeError("cannot handle 0")

    with running_worker(service, broker_url=broker_url, topology=topology, concurrency=1, prefetch=1) as worker:
        client.publish_event("thing.happened", {"n": 0})
        client.publish_event("thing.happened", {"n": 1})
        wait_for(lambda: 1 in calls)
        wait_for(lambda: worker.stats["succeeded"] == 1)
    # A requeued 0 would have come back before 1 (same queue, one message at a time).
    assert calls == [0, 1]
    assert worker.stats["failed"] == 1 and worker.stats["succeeded"] == 1


def test_trace_id_flows_from_a_request_through_its_event_into_log_lines(broker_url, topology, client):
    orders, mailer = Service("orders"), Service("mailer")
    seen = {}

    @orders.handler
    def place(payload):
        seen["request"] = current.get()
        orders.client.publish_event("order.placed", {"order_id": payload["order_id"]})
        return "ok"

    @mailer.event("order.*")
    def mail(payload):
        seen["event"] = current.get()
        logs.get_logger("test").info("mailed", order_id=payload["order_id"])

    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    try:
        with running_worker(mailer, broker_url=broker_url, topology=topology), \
                running_worker(orders, broker_url=broker_url, topology=topology):
            assert client.call("orders", "place", {"order_id": "o-1"}) == "ok"
            wait_for(lambda: "event" in seen)
    finally:
        logs.configure("console", "warning")
    assert seen["event"].trace_id == seen["request"].trace_id
    assert seen["event"].action == "order.placed" and seen["event"].deadline is None
    mailed = [json.loads(line) for line in stream.getvalue().splitlines() if '"mailed"' in line]
    assert len(mailed) == 1
    assert {k: mailed[0][k] for k in ("service", "action", "handler", "trace_id")} == {
        "service": "mailer", "action": "order.placed", "handler": "mail", "trace_id": seen["request"].trace_id}


def test_handlers_share_one_client_per_service_closed_with_the_last_worker(broker_url, topology, client):
    service = Service("relay")
    clients = []
    service.handler("which")(lambda payload: clients.append(service.client) or "ok")
    with running_worker(service, broker_url=broker_url, topology=topology):
        with running_worker(service, broker_url=broker_url, topology=topology, delete=False) as second:
            futures = [client.call_async("relay", "which", {}) for _ in range(40)]
            assert [future.result(5) for future in futures] == ["ok"] * 40
            assert second.stats["succeeded"] > 0  # both workers served, one client between them
        shared = clients[0]
        assert len(clients) == 40 and all(c is shared for c in clients) and shared.topology == topology
        assert shared._loop.alive  # a worker of the service still runs
    assert not shared._loop.alive and "relay" not in shared_client._clients


def test_cli_publish_reaches_a_subscriber(broker_url):
    event = unique_name("cli") + ".happened"
    seen = []
    service = Service(unique_name("cli-sub"))
    service.event(event)(seen.append)
    with running_worker(service, broker_url=broker_url):
        result = subprocess.run([sys.executable, "-m", "amqprpc", "publish", event, '{"n": 7}'],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "published"
        wait_for(lambda: seen)
    assert seen == [{"n": 7}]
