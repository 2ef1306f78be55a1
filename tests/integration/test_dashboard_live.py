"""``amqprpc dashboard`` as a real process against the real broker and Redis: what its API
shows of workers, queues, actions, breakers and dead letters, the changes it makes, its
daemon behaviour (signals, exit codes, sd_notify, Redis down); and the page in real
Chromium (tests/apps/browser.py), whose screenshots go to docs/img/dashboard-*.png.

Each dashboard here reads a registry of its own (AMQPRPC_REGISTRY_PREFIX) so that the
shared Redis's other services do not show up; breakers are told apart by unique names.
"""
from __future__ import annotations

import dataclasses
import http.cookiejar
import json
import re
import os
import pathlib
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest
import redis

from amqprpc import RpcClient, Service, ServiceUnavailable
from amqprpc.client.breaker import CircuitBreaker
from amqprpc.config import redis_url
from amqprpc.ops.registry import Registry
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

from procs import AMQPRPC, Proc, free_port

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "img"


@dataclasses.dataclass
class Dashboard:
    proc: Proc
    base: str
    prefix: str

    def __post_init__(self) -> None:
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        with self.opener.open(request, timeout=10) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: dict[str, Any], csrf: str | None = None) -> tuple[int, Any]:
        token = csrf if csrf is not None else self.get("/api/csrf")["csrf"]
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "X-CSRF-Token": token})
        try:
            with self.opener.open(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def service(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.get("/api/services") if s["name"] == name), None)

    def queue(self, name: str) -> dict[str, Any] | None:
        return next((q for q in self.get("/api/queues") if q["name"] == name), None)


def start_dashboard(*args: str, prefix: str | None = None, env: dict[str, str] | None = None,
                    ready: bool = True) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(AMQPRPC + ["dashboard", "--port", str(port), "--interval", "0.5", "--log-format", "json", *args],
                env={"AMQPRPC_REGISTRY_PREFIX": prefix or unique_name("dash-registry"), **(env or {})})
    if ready:
        proc.wait_for_line("dashboard ready", timeout=30)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def dashboard() -> Iterator[Dashboard]:
    prefix = unique_name("dash-registry")
    proc, base = start_dashboard("--stale-after", "3", prefix=prefix)
    yield Dashboard(proc, base, prefix)
    assert proc.stop() == 0, proc.output  # SIGTERM: a warm stop, event streams and all
    shared = redis.Redis.from_url(redis_url())
    for key in shared.scan_iter(f"{prefix}:*"):
        shared.delete(key)


def make_shop(name: str) -> tuple[Service, dict[str, Any]]:
    """A service with a quick action, one that holds until released, and one that fails
    (its casts become dead letters) until ``control["fixed"]``."""
    service = Service(name)
    control: dict[str, Any] = {"release": threading.Event(), "fixed": False, "charged": []}

    @service.handler
    def get_item(payload: dict) -> dict:
        return {"item": payload.get("id")}

    @service.handler
    def slow_job(payload: dict) -> None:
        control["release"].wait(20)

    @service.handler
    def charge(payload: dict) -> None:
        if not control["fixed"]:
            raise ValueError(f"order {payload['order']} declined")
        control["charged"].append(payload["order"])

    return service, control


def worker_for(dashboard: Dashboard, service: Service, **options: Any):
    return running_worker(service, registry=Registry(prefix=dashboard.prefix), registry_interval=0.5, **options)


def open_breaker(name: str) -> None:
    """Calls to a service nobody serves fail as unavailable: two of them open its breaker."""
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=300, redis_url=redis_url(), sync_interval=0)
    with RpcClient("dashboard-tests", breaker=breaker) as client:
        for _ in range(2):
            with pytest.raises(ServiceUnavailable):
                client.call(name, "anything", {}, timeout=2)


def forget_breaker(name: str) -> None:
    redis.Redis.from_url(redis_url()).delete(f"amqprpc:breaker:{name}")


# --- the API -----------------------------------------------------------------------------
def test_a_worker_shows_with_its_instance_and_a_dead_one_is_marked_stale(dashboard):
    service, _ = make_shop(unique_name("dash-svc"))
    started = time.monotonic()
    with worker_for(dashboard, service, concurrency=3) as worker:
        found = wait_for(lambda: dashboard.service(service.name), timeout=3)
        shown = time.monotonic() - started
        instance = found["instances"][0]
        assert found["live"] == 1 and instance["instance_id"] == worker.instance_id
        assert instance["pid"] == os.getpid() and instance["host"] == socket.gethostname()
        assert instance["concurrency"] == 3 and instance["uptime"] >= 0 and instance["stale"] is False
        assert instance["heartbeat_age"] < 3
        # One that died without withdrawing (kill -9): its heartbeat stops, the page marks it.
        registry = Registry(prefix=dashboard.prefix)
        registry.announce({"instance_id": "ghost.1", "service": service.name, "host": "gone", "pid": 1})
        registry.redis.hset(registry.key(service.name), "ghost.1", json.dumps(
            {"instance_id": "ghost.1", "service": service.name, "host": "gone", "pid": 1,
             "heartbeat_at": time.time() - 10}))
        wait_for(lambda: any(i["instance_id"] == "ghost.1" and i["stale"]
                             for i in (dashboard.service(service.name) or {"instances": []})["instances"]))
        assert dashboard.service(service.name)["live"] == 1
    print(f"worker shown {shown:.2f} s after it started")


def test_actions_report_counts_and_latency_from_the_heartbeats(dashboard, broker_url):
    service, control = make_shop(unique_name("dash-svc"))
    with worker_for(dashboard, service), RpcClient("dashboard-tests") as client:
        for index in range(20):
            client.call(service.name, "get_item", {"id": index}, timeout=5)
        client.cast(service.name, "charge", {"order": "4111"})

        def rows() -> dict[str, Any]:
            return {row["action"]: row for row in dashboard.get("/api/actions") if row["service"] == service.name}

        wait_for(lambda: rows().get("get_item", {}).get("succeeded") == 20
                 and rows().get("charge", {}).get("dead_lettered") == 1, timeout=5)
        get_item = rows()["get_item"]
        assert get_item["failed"] == 0 and 0 < get_item["p50"] <= get_item["p95"] < 1.0
        assert rows()["charge"]["failed"] == 1


def test_queue_depth_rises_under_load(dashboard):
    service, control = make_shop(unique_name("dash-svc"))
    queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service.name)
    try:
        with worker_for(dashboard, service, concurrency=1, prefetch=1), RpcClient("dashboard-tests") as client:
            wait_for(lambda: dashboard.queue(queue), timeout=5)
            for index in range(30):
                client.cast(service.name, "slow_job", {"n": index})
            seen = wait_for(lambda: (dashboard.queue(queue) or {}).get("ready", 0) >= 25 and dashboard.queue(queue))
            assert seen["consumers"] == 1 and seen["kind"] == "request"
            control["release"].set()
            wait_for(lambda: dashboard.queue(queue)["ready"] == 0, timeout=10)
    finally:
        control["release"].set()


def test_an_open_breaker_is_shown_from_redis(dashboard):
    name = unique_name("dash-absent")
    try:
        open_breaker(name)
        breaker = wait_for(lambda: next((b for b in dashboard.get("/api/breakers") if b["name"] == name), None))
        assert breaker["state"] == "open" and breaker["failures"] >= 2 and breaker["open_for"] >= 0
    finally:
        forget_breaker(name)


def test_dead_letters_browse_redacted_replay_one_idempotently_then_purge(dashboard, broker_url):
    service, control = make_shop(unique_name("dash-svc"))
    dead = DEFAULT_TOPOLOGY.dead_queue_name(service.name)
    with worker_for(dashboard, service), RpcClient("dashboard-tests") as client:
        for order in ("c1", "c2", "c3"):
            client.cast(service.name, "charge", {"order": order, "password": "hunter2",
                                                 "callback": "amqp://shop:s3cr3t@rabbit//"})
        wait_for(lambda: dashboard.get("/api/dead-letters").get(service.name) == 3, timeout=10)
        letters = dashboard.get(f"/api/dead-letters/{service.name}?limit=2")
        assert letters["count"] == 3 and len(letters["messages"]) == 2 and letters["queue"] == dead
        first = letters["messages"][0]
        assert first["action"] == "charge" and first["error_type"] == "ValueError" and first["attempts"] == 1
        assert "hunter2" not in json.dumps(letters) and "s3cr3t" not in json.dumps(letters)
        # The worker's handler threads dead-letter the three in any order: replay whichever is first.
        (order,) = re.findall(r'"order": "(c[123])"', first["body_preview"])

        control["fixed"] = True
        assert dashboard.post(f"/api/dead-letters/{service.name}/replay",
                              {"action_id": "x" * 16, "message_id": first["message_id"]}, csrf="0" * 64)[0] == 403
        body = {"action_id": unique_name("replay").replace("replay-", "r"), "message_id": first["message_id"]}
        status, result = dashboard.post(f"/api/dead-letters/{service.name}/replay", body)
        assert status == 200 and result == {"ok": True, "replayed": 1, "unroutable": 0, "duplicate": False}
        wait_for(lambda: control["charged"] == [order])
        status, again = dashboard.post(f"/api/dead-letters/{service.name}/replay", body)  # a double submission
        assert again["duplicate"] is True and again["replayed"] == 1
        # A new request for the same letter (another confirmation) finds it gone: nothing replayed twice.
        status, late = dashboard.post(f"/api/dead-letters/{service.name}/replay",
                                      {**body, "action_id": body["action_id"] + "b"})
        assert late["replayed"] == 0
        time.sleep(0.5)
        assert control["charged"] == [order]

        status, purged = dashboard.post(f"/api/dead-letters/{service.name}/purge", {"action_id": body["action_id"] + "p"})
        assert purged["purged"] == 2
        wait_for(lambda: dashboard.get("/api/dead-letters").get(service.name) == 0)
        recent = dashboard.get("/api/recent-actions")
        assert [r["what"] for r in recent[:3]] == ["purge", "replay", "replay"]
        assert all(r["who"].startswith("local@127.0.0.1") for r in recent[:3])
    logged = [json.loads(line) for line in dashboard.proc.lines if '"dashboard action"' in line]
    assert {(entry["what"], entry["service"]) for entry in logged} >= {("replay", service.name), ("purge", service.name)}


def test_the_event_stream_pushes_a_snapshot_at_least_every_two_seconds(dashboard):
    with urllib.request.urlopen(dashboard.base + "/api/events", timeout=10) as stream:
        stamps = []
        for raw in stream:
            line = raw.decode()
            if line.startswith("data: "):
                stamps.append((time.monotonic(), json.loads(line[6:])["version"]))
                if len(stamps) == 4:
                    break
    gaps = [later[0] - earlier[0] for earlier, later in zip(stamps, stamps[1:])]
    assert max(gaps) <= 2.0 and stamps[-1][1] > stamps[0][1]


# --- the daemon ------------------------------------------------------------------------------
def test_token_mode_over_http_and_no_token_in_the_logs():
    token = "tok-" + os.urandom(12).hex()
    proc, base = start_dashboard("--host", "127.0.0.1", "--token", token)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/api/snapshot", timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(base + "/api/snapshot", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200 and "services" in json.loads(answer.read())
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with opener.open(base + f"/?token={token}", timeout=5) as page:  # redirected, then the cookie alone
            assert page.status == 200 and page.url == base + "/" and token not in page.read().decode()
        with opener.open(base + "/api/snapshot", timeout=5) as answer:
            assert answer.status == 200
    finally:
        assert proc.stop() == 0
    assert token not in proc.output


def test_a_taken_port_exits_2_and_a_missing_broker_exits_4():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = Proc(AMQPRPC + ["dashboard", "--port", str(port)])
        assert proc.process.wait(30) == 2 and "cannot serve the dashboard" in proc.output
    proc = Proc(AMQPRPC + ["dashboard", "--port", str(free_port()), "--broker-wait", "0",
                           "--broker", f"amqp://guest:secretpw@127.0.0.1:{free_port()}//"])
    assert proc.process.wait(30) == 4 and "secretpw" not in proc.output


def test_it_tells_systemd_when_it_is_ready_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(30)
        proc, base = start_dashboard(env={"NOTIFY_SOCKET": path})
        states = []
        while not any("READY=1" in s for s in states):
            states.append(listener.recv(4096).decode())
        assert proc.stop() == 0
        while not any("STOPPING=1" in s for s in states):
            states.append(listener.recv(4096).decode())


def test_with_redis_down_the_page_says_so_and_still_shows_the_queues(dashboard):
    proc, base = start_dashboard("--redis", f"redis://127.0.0.1:{free_port()}/0")
    try:
        with urllib.request.urlopen(base + "/api/snapshot", timeout=5) as answer:
            snapshot = json.loads(answer.read())
        assert "redis" in snapshot["errors"] and "broker" not in snapshot["errors"]
    finally:
        assert proc.stop() == 0


def test_a_retry_waiting_in_a_delay_queue_is_shown(dashboard):
    from amqprpc.retry import Retry

    service = Service(unique_name("dash-svc"))
    attempts: list[float] = []

    @service.handler(retry=Retry(max_attempts=2, base_delay=30, max_delay=30, jitter=False))
    def flaky(payload: dict) -> None:
        attempts.append(time.monotonic())
        raise ConnectionError("not yet")

    with worker_for(dashboard, service), RpcClient("dashboard-tests") as client:
        client.cast(service.name, "flaky", {})
        wait_for(lambda: attempts)
        delayed = wait_for(lambda: next((q for q in dashboard.get("/api/queues")
                                         if q["service"] == service.name and q["kind"] == "delay"), None), timeout=10)
        assert delayed["name"].endswith(".delay.30000") and delayed["ready"] == 1
        retried = wait_for(lambda: next((a for a in dashboard.get("/api/actions")
                                         if a["service"] == service.name and a["retried"] == 1), None))
        assert retried["action"] == "flaky"
