"""examples/web over real HTTP and WebSockets: the FastAPI server process (uvicorn), a real
collector process, a worker of a test-local order service; and the page in headless Chromium.

The order service here is this test's own (a unique name answering ``create_order`` and
``get_order``): the example's target service is configurable and defaults to the shop's
order-service. An order with ``"hold": NAME`` is not answered until the test releases NAME,
so a test can hold a reply back while it watches a socket wait for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.cookiejar import CookieJar

import pytest
import redis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from amqprpc import Service
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

from procs import Proc, collector

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVER = ROOT / "examples" / "web" / "server.py"
TESTS = pathlib.Path(__file__).resolve().parent
WS_WAIT = 2.0  # the server's --ws-wait: short, so that a socket's "pending, open another" is exercised

HOLDS: dict[str, threading.Event] = {}
RAN: set[str] = set()  # the "note" of every order create_order started
SESSION = CookieJar()  # this module's browser session: the shop_session cookie the server sets


def hold(name: str) -> threading.Event:
    return HOLDS.setdefault(name, threading.Event())


class OrderNotFound(Exception):
    pass


def make_order_service(name: str) -> Service:
    """A stand-in for the shop's order-service: ``create_order`` and ``get_order``."""
    service = Service(name)

    @service.handler
    def create_order(payload: dict) -> dict:
        if payload.get("note"):
            RAN.add(payload["note"])
        if payload.get("hold"):
            hold(payload["hold"]).wait(30)
        items = payload.get("items") or []
        if not items:
            raise ValueError("an order needs items")
        return {"order_id": f"order-{payload['user_id']}-{len(items)}", "status": "created", "items": items}

    @service.handler
    def get_order(payload: dict) -> dict:
        if payload["order_id"] == "slow":
            time.sleep(3)  # past the server's --call-timeout
        if payload["order_id"] == "missing":
            raise OrderNotFound("no such order")
        return {"order_id": payload["order_id"], "status": "created"}

    return service


# What the --with-services test's server process loads with --app (its name comes from there).
order_service = make_order_service(os.environ.get("WEB_TEST_ORDER_SERVICE", "web-test-order-service"))


def start_server(*args: str, env: dict | None = None) -> tuple[Proc, str]:
    server = Proc([sys.executable, str(SERVER), "--port", "0", "--log-format", "json", *args], env=env)
    base = server.wait_for_line("listening on", timeout=60).split("listening on ")[1].strip().rstrip("/")
    return server, base


class Shop:
    """The module's server, its collector (which a test may stop and start again) and names."""

    def __init__(self, server: Proc, base: str, queue: str, prefix: str, redis_name: str, service: str = ""):
        self.server, self.base, self.queue, self.prefix, self.redis_name = server, base, queue, prefix, redis_name
        self.service = service
        self.collector = collector(queue, prefix)

    @property
    def ws(self) -> str:
        return "ws" + self.base[len("http"):]

    def requests(self, path: str, start: int = 0) -> list[dict]:
        """The server's request log: its ``http request`` lines for ``path``."""
        lines = [json.loads(line) for line in self.server.lines[start:] if line.startswith("{")]
        return [line for line in lines if line.get("event") == "http request" and line["path"] == path]

    def waiting(self, cid: str) -> bool:
        """Whether a socket of ``cid`` is open and waiting (the server logged it)."""
        return any(line.startswith("{") and json.loads(line).get("event") == "websocket open"
                   and f'"{cid}"' in line and json.loads(line).get("state") == "pending"
                   for line in list(self.server.lines))


@pytest.fixture(scope="module")
def shop(broker_url, redis_available):
    queue, prefix = unique_name("responses"), unique_name("test-response") + ":"
    redis_name = unique_name("shop-web")  # names the server's Redis connections, to count them
    orders = make_order_service(unique_name("web-orders"))
    server, base = start_server("--service", orders.name, "--queue", queue, "--key-prefix", prefix,
                                "--ws-wait", str(WS_WAIT), "--call-timeout", "1",
                                "--redis", f"redis://127.0.0.1:6379/0?client_name={redis_name}")
    state = None
    try:
        state = Shop(server, base, queue, prefix, redis_name, orders.name)
        with running_worker(orders):
            try:
                yield state
            finally:
                for event in HOLDS.values():  # no handler left waiting for a test that failed
                    event.set()
        assert state.collector.stop() == 0, state.collector.output
        assert server.stop() == 0, server.output
    finally:
        for proc in (server, state and state.collector):
            if proc is not None and proc.process.poll() is None:
                proc.stop(signal.SIGKILL)
        delete_queues(queue, broker_url=broker_url)
        store = redis.Redis()
        for key in store.scan_iter(prefix + "*"):
            store.delete(key)


def http(method: str, url: str, body: object = None, headers: dict | None = None,
         jar: CookieJar = SESSION) -> tuple[int, dict]:
    """One request in the session of ``jar`` (the module's own unless given): it sends the
    cookies the server set there, and keeps those it sets."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body  # else bytes, chunks or None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    try:
        with opener.open(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ws_connect(url: str, jar: CookieJar = SESSION, open_timeout: float = 20):
    """A WebSocket in the session of ``jar``: its cookies go with the upgrade, as a browser's."""
    cookies = "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)
    return connect(url, open_timeout=open_timeout, additional_headers={"Cookie": cookies} if cookies else None)


def refused(url: str, jar: CookieJar = SESSION) -> tuple[int, dict]:
    """The HTTP status and JSON body with which the server refused a WebSocket upgrade."""
    with pytest.raises(InvalidStatus) as refusal:
        ws_connect(url, jar)
    response = refusal.value.response
    return response.status_code, json.loads(bytes(response.body))


ORDER = {"user_id": "user_001", "token": "a-long-valid-token", "items": [{"product_id": "prod_001", "quantity": 2}]}
CREATED = {"order_id": "order-user_001-1", "status": "created", "items": ORDER["items"]}


def place(shop: Shop, **extra) -> str:
    status, accepted = http("POST", f"{shop.base}/api/orders", {**ORDER, **extra})
    assert status == 202 and accepted["status"] == "accepted", accepted
    return accepted["correlation_id"]


def test_the_socket_sends_the_result_the_moment_the_collector_stores_it(shop):
    """Held replies: each socket is open and waiting before its reply exists. The latency
    measured is from the collector's announcement (as this test's own subscriber sees it)
    to the socket's message."""
    latencies = []
    for _ in range(10):
        name = unique_name("hold")
        cid = place(shop, hold=name)
        announced = watch_announcement(shop.prefix + cid)
        with ws_connect(f"{shop.ws}/ws?cid={cid}") as socket:
            wait_for(lambda: shop.waiting(cid))
            hold(name).set()
            message = json.loads(socket.recv(20))
            received = time.perf_counter()
        assert message == {"status": "done", "correlation_id": cid, "result": CREATED}
        latencies.append(received - wait_for(lambda: announced.get("at")))
    print(f"announce -> socket message: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} orders")


def watch_announcement(channel: str) -> dict:
    """Subscribe to ``channel`` now; the returned dict gets ``at`` (perf_counter) when the
    announcement arrives."""
    pubsub = redis.Redis().pubsub()
    pubsub.subscribe(channel)
    wait_for(lambda: pubsub.get_message(timeout=1))  # the confirmation
    seen: dict = {}

    def listen() -> None:
        try:
            while not pubsub.get_message(ignore_subscribe_messages=True, timeout=30):
                pass
            seen["at"] = time.perf_counter()
        finally:
            pubsub.close()
    threading.Thread(target=listen, daemon=True).start()
    return seen


def test_a_refused_order_arrives_as_failed_on_the_socket_and_the_poll(shop):
    cid = place(shop, items=[])
    with ws_connect(f"{shop.ws}/ws?cid={cid}") as socket:
        message = json.loads(socket.recv(20))
    assert message == {"status": "failed", "correlation_id": cid, "error": "an order needs items",
                       "error_type": "ValueError"}
    assert http("GET", f"{shop.base}/api/status?cid={cid}") == (200, message)


def test_polling_and_long_polling_show_the_created_order(shop):
    name = unique_name("hold")
    cid = place(shop, hold=name)
    assert http("GET", f"{shop.base}/api/status?cid={cid}") == (200, {"status": "pending", "correlation_id": cid})
    threading.Timer(0.3, hold(name).set).start()
    started = time.perf_counter()
    status, doc = http("GET", f"{shop.base}/api/status?cid={cid}&wait={WS_WAIT * 5}")
    assert (status, doc) == (200, {"status": "done", "correlation_id": cid, "result": CREATED})
    assert time.perf_counter() - started < WS_WAIT  # answered when stored, not at the end of the wait


def test_a_socket_with_no_reply_yet_answers_pending_after_its_wait(shop):
    name = unique_name("hold")
    cid = place(shop, hold=name)
    try:
        with ws_connect(f"{shop.ws}/ws?cid={cid}") as socket:
            assert json.loads(socket.recv(WS_WAIT * 10)) == {"status": "pending", "correlation_id": cid}
    finally:
        hold(name).set()


def test_unknown_and_malformed_ids_oversized_and_bad_bodies_are_answered_not_crashed(shop):
    assert http("GET", f"{shop.base}/api/status?cid=unknown-cid")[0] == 404
    assert refused(f"{shop.ws}/ws?cid=unknown-cid") == (404, {"status": "error",
                                                             "error": "unknown or expired correlation id"})
    assert http("GET", f"{shop.base}/api/status")[0] == 400
    assert http("GET", f"{shop.base}/api/status?cid=a%20b")[0] == 400
    assert refused(f"{shop.ws}/ws?cid=a%20b")[0] == 400
    assert http("POST", f"{shop.base}/api/orders", b"[1, 2]")[0] == 400
    assert http("POST", f"{shop.base}/api/orders", b"{not json")[0] == 400
    big = json.dumps({**ORDER, "note": "x" * 70_000}).encode()
    assert http("POST", f"{shop.base}/api/orders", big) == (413, {"status": "error",
                                                                  "error": "the body is over 65536 bytes"})
    assert _chunked_post(f"{shop.base}/api/orders", big)[0] == 413  # no Content-Length to trust
    assert http("GET", f"{shop.base}/api/nothing")[0] == 404
    with urllib.request.urlopen(f"{shop.base}/", timeout=10) as page:
        assert page.status == 200 and b"/ws?cid=" in page.read()


def _chunked_post(url: str, body: bytes) -> tuple[int, dict]:
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
    return http("POST", url, chunks, {"Transfer-Encoding": "chunked"})  # type: ignore[arg-type]


def test_the_synchronous_endpoint_maps_timeouts_to_504_and_remote_errors(shop):
    assert http("GET", f"{shop.base}/api/orders/o-1") == (200, {"order_id": "o-1", "status": "created"})
    status, doc = http("GET", f"{shop.base}/api/orders/slow")
    assert status == 504 and doc["status"] == "timeout", doc
    assert http("GET", f"{shop.base}/api/orders/missing") == (404, {"status": "failed", "error": "no such order",
                                                                   "error_type": "OrderNotFound"})


def server_connections(redis_name: str) -> list[dict]:
    """The Redis connections of the server process named ``redis_name`` (CLIENT LIST)."""
    return [client for client in redis.Redis().client_list() if client.get("name") == redis_name]


def test_waiting_sockets_share_one_redis_subscription_and_leave_nothing_behind(shop):
    """20 sockets wait on held orders, then their clients go away. All of them wait through
    the server's one pattern subscription (no connection, no channel of their own), and each
    stops waiting at once (the server logs it)."""
    names = [unique_name("hold") for _ in range(20)]
    cids = [place(shop, hold=name) for name in names]
    store = redis.Redis()
    before = len(server_connections(shop.redis_name))
    with contextlib.ExitStack() as sockets:
        for cid in cids:
            sockets.enter_context(ws_connect(f"{shop.ws}/ws?cid={cid}"))
        wait_for(lambda: all(shop.waiting(cid) for cid in cids))
        during = server_connections(shop.redis_name)
        assert sum(int(client["sub"]) for client in during) == 0  # no per-socket channel...
        assert [int(client["psub"]) for client in during if int(client["psub"])] == [1]  # ...one pattern
        assert sum(count for _, count in store.pubsub_numsub(*(shop.prefix + cid for cid in cids))) == 0
        assert len(during) <= before + 2
    wait_for(lambda: sum(1 for line in list(shop.server.lines) if '"websocket gone while waiting"' in line
                         and any(f'"{cid}"' in line for cid in cids)) == 20)
    print(f"20 sockets: {len(during)} Redis connections while they waited ({before} before), 1 subscription")
    for name in names:
        hold(name).set()


def test_only_the_session_that_placed_an_order_can_read_it(shop):
    """A correlation id alone (guessed, leaked) reads nothing: another session, or a forged
    cookie, gets the 404 of an unknown order from the poll and the socket."""
    cid = place(shop)
    done = http("GET", f"{shop.base}/api/status?cid={cid}&wait=10")
    assert done == (200, {"status": "done", "correlation_id": cid, "result": CREATED})
    stranger = CookieJar()
    assert http("GET", f"{shop.base}/api/status?cid={cid}", jar=stranger)[0] == 404
    assert refused(f"{shop.ws}/ws?cid={cid}", stranger)[0] == 404
    status, doc = http("GET", f"{shop.base}/api/status?cid={cid}", jar=stranger,
                       headers={"Cookie": "shop_session=" + "A" * 43})
    assert status == 404 and doc["error"] == "unknown or expired correlation id"
    # The stranger's own order is theirs alone, and does not change the first session's.
    other = http("POST", f"{shop.base}/api/orders", ORDER, jar=stranger)[1]["correlation_id"]
    assert http("GET", f"{shop.base}/api/status?cid={other}&wait=10", jar=stranger)[0] == 200
    assert http("GET", f"{shop.base}/api/status?cid={other}")[0] == 404
    assert http("GET", f"{shop.base}/api/status?cid={cid}")[0] == 200


def test_many_sockets_wait_at_once_and_all_get_their_own_result(shop):
    names = [unique_name("hold") for _ in range(30)]
    cids = [place(shop, hold=name, user_id=f"user_{n}") for n, name in enumerate(names)]

    def wait_on(cid: str) -> dict:
        with ws_connect(f"{shop.ws}/ws?cid={cid}") as socket:
            return json.loads(socket.recv(WS_WAIT * 10))

    with ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(wait_on, cid) for cid in cids]
        wait_for(lambda: all(shop.waiting(cid) for cid in cids), timeout=30)
        for name in names:
            hold(name).set()
        answers = [future.result(60) for future in futures]
    assert [answer["result"]["order_id"] for answer in answers] == [f"order-user_{n}-1" for n in range(30)]


@pytest.fixture(scope="module")
def patient(shop, tmp_path_factory):
    """A second server on the shop's service, queue and key prefix (its collector stores the
    replies), whose sockets wait 30 s; in its process Python's ``random`` is pinned
    (``random.getrandbits`` returns 0, by a sitecustomize), so any id it made with ``random``
    would be all zeros, and every one the same."""
    hook = tmp_path_factory.mktemp("pinned-random")
    (hook / "sitecustomize.py").write_text("import random\nrandom.getrandbits = lambda bits: 0\n")
    redis_name = unique_name("shop-web-patient")
    server, base = start_server("--service", shop.service, "--queue", shop.queue, "--key-prefix", shop.prefix,
                                "--ws-wait", "30", "--redis", f"redis://127.0.0.1:6379/0?client_name={redis_name}",
                                env={"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])})
    try:
        yield server, base, redis_name
        assert server.stop() == 0, server.output
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)


def test_correlation_ids_come_from_secrets_not_from_random(patient):
    _, base, _ = patient
    cids = [http("POST", f"{base}/api/orders", ORDER)[1]["correlation_id"] for _ in range(3)]
    assert len(set(cids)) == 3 and all(len(cid) == 32 and cid != "0" * 32 for cid in cids), cids


def test_150_open_sockets_and_orders_and_polls_still_answer(shop, patient):
    """150 sockets wait on held orders at once (each used to hold a Redis connection of its
    own: past 100, redis-py's pool was empty and every order and poll answered 503). Now they
    share one subscription; a new order is accepted and polled to its result meanwhile, the
    synchronous endpoint answers, and each socket then gets its own result."""
    server, base, redis_name = patient
    ws = "ws" + base[len("http"):]
    names = [unique_name("hold") for _ in range(150)]
    cids = []
    for n, name in enumerate(names):
        status, accepted = http("POST", f"{base}/api/orders", {**ORDER, "hold": name, "user_id": f"user_{n}"})
        assert status == 202, accepted
        cids.append(accepted["correlation_id"])
    try:
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(ws_connect(f"{ws}/ws?cid={cid}")) for cid in cids]

            def waiting() -> int:
                return sum(1 for line in list(server.lines) if '"websocket open"' in line and '"pending"' in line)

            wait_for(lambda: waiting() >= 150, timeout=60)
            # The order service's threads are all held: a new order queues behind them.
            started = time.perf_counter()
            status, accepted = http("POST", f"{base}/api/orders", ORDER)
            assert status == 202, accepted
            cid = accepted["correlation_id"]
            assert http("GET", f"{base}/api/status?cid={cid}") == (200, {"status": "pending", "correlation_id": cid})
            took = time.perf_counter() - started
            connections = server_connections(redis_name)
            assert [int(client["psub"]) for client in connections if int(client["psub"])] == [1]
            for name in names:
                hold(name).set()
            answers = [json.loads(socket.recv(30)) for socket in sockets]
            polled = http("GET", f"{base}/api/status?cid={cid}&wait=20")
            assert polled == (200, {"status": "done", "correlation_id": cid, "result": CREATED})
        assert [answer["result"]["order_id"] for answer in answers] == [f"order-user_{n}-1" for n in range(150)]
        print(f"150 sockets open: an order accepted and polled in {took * 1000:.0f} ms, "
              f"{len(connections)} Redis connections, 1 subscription")
    finally:
        for name in names:
            hold(name).set()


@pytest.fixture(scope="module")
def browser():
    from browser import Browser, ensure_chromium

    started = time.perf_counter()
    binary = ensure_chromium()  # installs Debian's chromium when it is missing
    chromium = Browser(binary)
    print(f"chromium ready after {time.perf_counter() - started:.1f} s")
    yield chromium
    chromium.close()


def page_state(page) -> dict:
    """What the page shows (empty while it is still loading)."""
    return page.eval("document.getElementById('order') === null ? {} : "
                     "({state: document.getElementById('state').dataset.state,"
                     " transport: document.getElementById('state').dataset.transport,"
                     " order: document.getElementById('order').textContent,"
                     " cid: document.getElementById('correlation').textContent.replace('correlation id: ', '')})"
                     ) or {}


def test_the_page_shows_the_created_order_through_the_websocket_without_polling(shop, browser):
    mark = len(shop.server.lines)
    page = browser.open(f"{shop.base}/?autosubmit=1")
    shown = wait_for(lambda: (state := page_state(page)).get("state") in ("done", "failed", "gave-up") and state,
                     timeout=30)
    assert shown["state"] == "done" and shown["transport"] == "websocket", shown
    assert shown["order"] == "Order order-user_001-1 created"
    assert len(shop.requests("/api/orders", mark)) == 1
    assert shop.requests("/api/status", mark) == []  # not one poll
    print(f"page: 1 POST, 0 polls, {_sockets_opened(shop, shown['cid'], mark)} socket(s) for order {shown['cid']}")


def test_the_page_completes_once_a_stopped_collector_is_back(shop, browser):
    """The collector is down when the order is placed: the reply waits in its queue, the
    page's socket answers pending after --ws-wait and the page opens another, until a new
    collector stores the reply; the page shows it, still without one poll."""
    assert shop.collector.stop() == 0, shop.collector.output
    mark = len(shop.server.lines)
    try:
        page = browser.open(f"{shop.base}/?autosubmit=1")
        wait_for(lambda: page_state(page).get("cid"), timeout=30)
        cid = page_state(page)["cid"]
        # Waiting through at least one "pending, open another socket" round.
        wait_for(lambda: _sockets_opened(shop, cid, mark) >= 2, timeout=WS_WAIT * 10)
        assert page_state(page)["state"] == "pending"
    finally:
        shop.collector = collector(shop.queue, shop.prefix)
    shown = wait_for(lambda: (state := page_state(page)).get("state") != "pending" and state, timeout=30)
    assert shown["state"] == "done" and shown["transport"] == "websocket", shown
    assert shop.requests("/api/status", mark) == []
    print(f"collector down then back: 0 polls, {_sockets_opened(shop, cid, mark)} sockets opened")


def test_the_page_falls_back_to_polling_when_the_socket_fails(shop, browser):
    """A refused upgrade (an unknown order: 404) sends the page to polling, which says so;
    with sockets off (?poll=1) it polls to the end."""
    mark = len(shop.server.lines)
    page = browser.open(f"{shop.base}/?cid=unknown-cid")
    shown = wait_for(lambda: (state := page_state(page)).get("state") not in (None, "idle", "pending") and state,
                     timeout=30)
    assert shown["state"] == "unknown" and shown["transport"] == "poll", shown
    assert [line["status"] for line in shop.requests("/api/status", mark)] == [404]

    mark = len(shop.server.lines)
    page = browser.open(f"{shop.base}/?autosubmit=1&poll=1")
    shown = wait_for(lambda: (state := page_state(page)).get("state") in ("done", "failed", "gave-up") and state,
                     timeout=30)
    assert shown["state"] == "done" and shown["transport"] == "poll", shown
    assert shop.requests("/api/status", mark) and _sockets_opened(shop, shown["cid"], mark) == 0


def _sockets_opened(shop: Shop, cid: str, start: int = 0) -> int:
    return sum(1 for line in shop.server.lines[start:] if '"websocket open"' in line and f'"{cid}"' in line)


def test_broker_or_redis_down_and_a_service_nobody_serves_are_503_with_a_reason(own_broker, redis_server, tmp_path):
    """Its own broker node and Redis, which this test stops (the shared ones never are)."""
    own_broker.ensure_running()
    redis_url, redis_process = redis_server()
    orders = make_order_service(unique_name("web-orders"))
    server, base = start_server("--service", orders.name, "--broker", own_broker.url, "--redis", redis_url,
                                "--queue", unique_name("responses"), "--call-timeout", "2")
    ws = "ws" + base[len("http"):]
    try:
        with running_worker(orders, broker_url=own_broker.url):
            cid = http("POST", f"{base}/api/orders", ORDER)[1]["correlation_id"]
            redis_process.terminate()
            redis_process.wait(10)
            refused_note, later_note = unique_name("refused-order"), unique_name("later-order")
            status, doc = http("POST", f"{base}/api/orders", {**ORDER, "note": refused_note})
            assert status == 503 and doc["error"].startswith("Redis: ") and "\n" not in doc["error"], doc
            assert http("GET", f"{base}/api/status?cid={cid}")[0] == 503
            status, doc = refused(f"{ws}/ws?cid={cid}")
            assert status == 503 and doc["error"].startswith("Redis: "), doc
            # An order answered 503 never runs (a customer who retries pays once): once Redis
            # is back, an order placed after it runs, and the refused one still has not.
            redis_server(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
            assert wait_for(lambda: http("POST", f"{base}/api/orders", {**ORDER, "note": later_note})[0] == 202,
                            timeout=20)
            wait_for(lambda: later_note in RAN, timeout=20)
            assert refused_note not in RAN
        status, doc = http("POST", f"{base}/api/orders", ORDER)  # the worker is gone, its queue deleted
        assert status == 503 and orders.name in doc["error"], doc
        assert http("GET", f"{base}/api/orders/o-1")[0] == 503
        own_broker.stop_app()
        try:
            started = time.perf_counter()
            status, doc = http("POST", f"{base}/api/orders", ORDER)
            assert status == 503 and "\n" not in doc["error"], doc
            assert time.perf_counter() - started < 10
            assert http("GET", f"{base}/api/orders/o-1")[0] == 503
        finally:
            own_broker.start_app()
        print(f"broker down: POST answered 503 in {time.perf_counter() - started:.2f} s: {doc['error']}")
        assert server.stop() == 0, server.output
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)


def test_one_command_with_services_runs_collector_and_worker_in_process(broker_url, redis_available):
    queue, prefix, name = unique_name("responses"), unique_name("test-response") + ":", unique_name("web-orders")
    server, base = start_server("--with-services", "--service", name, "--app", "test_web_example:order_service",
                                "--queue", queue, "--key-prefix", prefix,
                                env={"PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "apps")]),
                                     "WEB_TEST_ORDER_SERVICE": name})
    try:
        cid = http("POST", f"{base}/api/orders", ORDER)[1]["correlation_id"]
        with ws_connect(f"{'ws' + base[len('http'):]}/ws?cid={cid}") as socket:
            assert json.loads(socket.recv(20))["result"]["order_id"] == "order-user_001-1"
        assert server.stop() == 0, server.output
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
        delete_queues(queue, f"service.{name}.request", broker_url=broker_url)
        store = redis.Redis()
        for key in store.scan_iter(prefix + "*"):
            store.delete(key)


def test_a_broker_that_does_not_answer_at_start_is_one_line_and_exit_4():
    from procs import free_port

    server = Proc([sys.executable, str(SERVER), "--port", "0", "--broker", f"amqp://guest:guest@127.0.0.1:{free_port()}//"])
    assert server.process.wait(60) == 4, server.output
    assert "cannot start" in server.output.splitlines()[-1]
