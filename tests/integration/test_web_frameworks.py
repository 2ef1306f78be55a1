"""The FastAPI and Flask modules of the web tier guide (docs/guides/web-tier.md and
examples/frameworks/), run as written against the shipped shop: its services and a collector on
this session's own broker node (the shop's service names are not unique, and the shared broker
serves other runs' shops).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
import signal
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from websockets.sync.client import connect

from amqprpc import ResponseStore
from amqprpc.ops.collector import Collector
from amqprpc.testing import running_worker, unique_name

from procs import Proc, free_port

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
FRAMEWORKS = ROOT / "examples" / "frameworks"
ORDER = {"user_id": "user_001", "token": "a-long-valid-token", "items": [{"product_id": "prod_001", "quantity": 1}]}


@pytest.fixture(scope="module")
def shop(own_broker, redis_available):
    """The shipped shop's five services and a collector, on the own broker; the apps' env."""
    from workers import build_all
    from workers.shop import Shop

    own_broker.ensure_running()
    shop_state = Shop(prefix=unique_name("shop") + ":")
    replies = ResponseStore(prefix=unique_name("test-response") + ":")
    collector = Collector(replies, broker_url=own_broker.url)
    with contextlib.ExitStack() as stack:
        for service in build_all(shop_state):
            stack.enter_context(running_worker(service, broker_url=own_broker.url, concurrency=4))
        collector.start()
        stack.callback(collector.shutdown, 5.0)
        yield {"AMQPRPC_BROKER_URL": own_broker.url, "AMQPRPC_RESPONSE_PREFIX": replies.prefix}, replies
    shop_state.delete_all()
    for key in replies.redis.scan_iter(replies.prefix + "*"):
        replies.redis.delete(key)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status, json.loads(response.read())


@pytest.mark.parametrize("module", ["fastapi_app.py", "flask_app.py"])
def test_the_web_tier_guide_shows_each_framework_module_as_shipped(module):
    assert (FRAMEWORKS / module).read_text() in (ROOT / "docs" / "guides" / "web-tier.md").read_text()


def test_fastapi_module_calls_submits_and_pushes_the_result(shop):
    env, _ = shop
    port = free_port()
    server = Proc([sys.executable, "-m", "uvicorn", "--app-dir", str(FRAMEWORKS), "fastapi_app:app",
                   "--port", str(port)], env=env)
    try:
        server.wait_for_line("Uvicorn running on", timeout=60)  # bound (startup completes before it binds)
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/users/user_001") == (200, {"id": "user_001", "name": "Alice Zhang",
                                                       "email": "alice@example.com", "status": "active"})
        assert get(f"{base}/users/nobody") == (404, {"detail": "User not found: nobody"})
        status, accepted = post(f"{base}/orders", ORDER)
        assert status == 202 and accepted["status"] == "accepted"
        with connect(f"ws://127.0.0.1:{port}/orders/ws?cid={accepted['correlation_id']}", open_timeout=20) as ws:
            reply = json.loads(ws.recv(30))
        assert reply["success"] is True and reply["data"]["user_id"] == "user_001", reply
    finally:
        server.stop(signal.SIGTERM)


def test_flask_module_shares_one_client_among_request_threads(shop, monkeypatch):
    from werkzeug.serving import make_server

    env, replies = shop
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location(unique_name("flask_app").replace("-", "_"),
                                                  FRAMEWORKS / "flask_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    created = []

    class CountedClient(module.RpcClient):
        def __init__(self, *args, **kwargs):
            created.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, "RpcClient", CountedClient)
    served_by: set[int] = set()
    module.app.before_request(lambda: served_by.add(threading.get_ident()))
    server = make_server("127.0.0.1", 0, module.app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda n: get(f"{base}/users/user_00{n % 2 + 1}"), range(32)))
        assert all(status == 200 for status, _ in answers)
        assert {user["name"] for _, user in answers} == {"Alice Zhang", "Bob Li"}
        assert get(f"{base}/users/nobody")[0] == 404
        status, accepted = post(f"{base}/orders", ORDER)
        assert status == 202
        assert replies.wait(accepted["correlation_id"], 30)["data"]["user_id"] == "user_001"
        assert len(created) == 1, created  # one client for all of them
        assert len(served_by) > 1          # served by more than one thread
        print(f"flask: 34 requests on {len(served_by)} threads through {len(created)} RpcClient")
    finally:
        server.shutdown()
        if module._client is not None:
            module._client.close()
