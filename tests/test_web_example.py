"""examples/web over real HTTP: the server process, a worker of a test-local order service,
a real collector process; and the page driven by headless Chromium where it is installed.

The order service here is this test's own (a unique name answering ``create_order``): the
example's target service is configurable and defaults to the shop's order-service.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest
import redis

from amqprpc import Service
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

from procs import Proc, collector

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "web" / "server.py"
TESTS = pathlib.Path(__file__).resolve().parent


def make_order_service(name: str) -> Service:
    """A stand-in for the shop's order-service: answers ``create_order``."""
    service = Service(name)

    @service.handler
    def create_order(payload: dict) -> dict:
        items = payload.get("items") or []
        if not items:
            raise ValueError("an order needs items")
        return {"order_id": f"order-{payload['user_id']}-{len(items)}", "status": "created", "items": items}

    return service


# What the --with-services test's server process loads with --app (its name comes from there).
order_service = make_order_service(os.environ.get("WEB_TEST_ORDER_SERVICE", "web-test-order-service"))


@pytest.fixture(scope="module")
def shop(broker_url, redis_available):
    """Server, collector (real processes) and the order service's worker, on unique names."""
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    orders = make_order_service(unique_name("web-orders"))
    procs: list[Proc] = []
    try:
        procs.append(collector(queue, prefix))
        server = Proc([sys.executable, str(SERVER), "--port", "0", "--service", orders.name,
                       "--queue", queue, "--key-prefix", prefix, "--log-format", "json"])
        procs.append(server)
        base = server.wait_for_line("listening on").split("listening on ")[1].strip().rstrip("/")
        with running_worker(orders):
            yield base
        for proc in reversed(procs):
            assert proc.stop() == 0, proc.output
    finally:
        for proc in procs:
            if proc.process.poll() is None:
                proc.stop(signal.SIGKILL)
        delete_queues(queue, broker_url=broker_url)
        store = redis.Redis()
        for key in store.scan_iter(prefix + "*"):
            store.delete(key)


def http(method: str, url: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


ORDER = {"user_id": "user_001", "token": "a-long-valid-token", "items": [{"product_id": "prod_001", "quantity": 2}]}


def test_post_answers_202_and_polling_shows_the_created_order(shop):
    status, accepted = http("POST", f"{shop}/api/orders", ORDER)
    assert status == 202 and accepted["status"] == "accepted" and accepted["correlation_id"]
    cid = accepted["correlation_id"]
    polled = wait_for(lambda: (doc := http("GET", f"{shop}/api/status?cid={cid}")[1])["status"] != "pending"
                      and doc)
    assert polled == {"status": "done", "correlation_id": cid,
                      "result": {"order_id": "order-user_001-1", "status": "created", "items": ORDER["items"]}}


def test_a_refused_order_polls_as_failed(shop):
    _, accepted = http("POST", f"{shop}/api/orders", {"user_id": "user_001", "items": []})
    cid = accepted["correlation_id"]
    polled = wait_for(lambda: (doc := http("GET", f"{shop}/api/status?cid={cid}")[1])["status"] != "pending"
                      and doc)
    assert polled["status"] == "failed" and polled["error"] == "an order needs items"
    assert polled["error_type"] == "ValueError"


def test_bad_requests_are_answered_not_crashed(shop):
    assert http("POST", f"{shop}/api/orders", b"[1, 2]")[0] == 400
    assert http("POST", f"{shop}/api/orders", b"{not json")[0] == 400
    assert http("GET", f"{shop}/api/status")[0] == 400
    assert http("GET", f"{shop}/api/status?cid=a%20b")[0] == 400
    assert http("GET", f"{shop}/api/nothing")[0] == 404
    assert http("GET", f"{shop}/api/status?cid=unknown-cid") == (200, {"status": "pending",
                                                                        "correlation_id": "unknown-cid"})
    with urllib.request.urlopen(f"{shop}/", timeout=10) as page:
        assert page.status == 200 and b"/api/orders" in page.read()


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium); the HTTP tests cover the "
                           "same flow without a browser")
def test_the_page_in_headless_chromium_shows_the_created_order(shop):
    """The page submits on load (?autosubmit) and polls; Chromium's virtual time runs its
    timers without real waiting, and network fetches pause virtual time."""
    with tempfile.TemporaryDirectory(prefix="amqprpc-chromium-") as profile:
        result = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", "--virtual-time-budget=600000", "--dump-dom",
             f"{shop}/?autosubmit=1&wait=600"],
            capture_output=True, text=True, timeout=90)
    dom = result.stdout
    assert 'data-state="done"' in dom, dom or result.stderr[-2000:]
    assert 'Order order-user_001-1 created' in dom


def test_one_command_with_services_runs_collector_and_worker_in_process(broker_url, redis_available):
    queue, prefix, name = unique_name("responses"), unique_name("test-response") + ":", unique_name("web-orders")
    server = Proc([sys.executable, str(SERVER), "--port", "0", "--with-services", "--service", name,
                   "--app", "test_web_example:order_service", "--queue", queue, "--key-prefix", prefix],
                  env={"PYTHONPATH": str(TESTS), "WEB_TEST_ORDER_SERVICE": name})
    try:
        base = server.wait_for_line("listening on").split("listening on ")[1].strip().rstrip("/")
        cid = http("POST", f"{base}/api/orders", ORDER)[1]["correlation_id"]
        polled = wait_for(lambda: (doc := http("GET", f"{base}/api/status?cid={cid}")[1])["status"] == "done"
                          and doc)
        assert polled["result"]["order_id"] == "order-user_001-1"
        assert server.stop() == 0, server.output
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
        delete_queues(queue, f"service.{name}.request", broker_url=broker_url)
        store = redis.Redis()
        for key in store.scan_iter(prefix + "*"):
            store.delete(key)


def test_a_taken_port_is_one_line_and_exit_2(broker_url, redis_available):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(SERVER), "--port", str(port)], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
