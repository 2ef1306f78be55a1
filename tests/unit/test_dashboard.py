"""The dashboard without a broker: who may see it (bind check, Basic and Bearer auth, the
token cookie, DNS rebinding), CSRF and double submission, body redaction, the per-action
stats that ride in the registry heartbeat, and the JSON API over FastAPI's TestClient with a
stand-in collector. The same over the real broker, Redis and Chromium: test_dashboard_live.py."""
from __future__ import annotations

import base64
import json
import sys
import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from amqprpc.cli import main
from amqprpc.dashboard.app import create_app
from amqprpc.dashboard.auth import AUTH_COOKIE, Auth, bind_refusal, is_loopback
from amqprpc.dashboard.deadletters import DuplicateAction, Operations, preview
from amqprpc.ops.actionstats import BUCKETS, OTHER, ActionStats, merge, quantile
from amqprpc.outcome import Outcome, OutcomeKind

TOKEN = "s3cret-token-0123456789"


class StandInCollector:
    """What the app reads of a Collector."""

    stopping = False

    def __init__(self) -> None:
        self.refreshed = 0
        self.data: dict[str, Any] = {"at": time.time(), "version": 1, "services": [], "queues": [], "actions": [],
                                     "breakers": [{"name": "svc", "state": "open", "failures": 5}],
                                     "dead_letters": {"svc": 2}, "errors": {}, "queue_source": "amqp"}

    def snapshot(self) -> dict[str, Any]:
        return self.data

    def refresh(self) -> dict[str, Any]:
        self.refreshed += 1
        return self.data


class CountingOperations(Operations):
    """Operations whose replay and purge only count (no broker)."""

    def __init__(self) -> None:
        super().__init__("amqp://unused")
        self.calls: list[tuple[str, str, dict]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.handlers = {"replay": self.count("replay"), "purge": self.count("purge")}

    def count(self, what: str):
        def carry_out(service: str, parameters: dict) -> dict:
            self.gate.wait(5)
            self.calls.append((what, service, parameters))
            return {"replayed": 1, "unroutable": 0} if what == "replay" else {"purged": 2}
        return carry_out


def client_for(auth: Auth, operations: Operations | None = None, base_url: str = "http://127.0.0.1:8765"):
    app = create_app(StandInCollector(), operations or CountingOperations(), auth, broker_url="amqp://unused")  # type: ignore[arg-type]
    return TestClient(app, base_url=base_url)


def csrf_of(client: TestClient, **kwargs: Any) -> str:
    answer = client.get("/api/csrf", **kwargs)
    assert answer.status_code == 200
    return answer.json()["csrf"]


# --- the bind rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_credentials(host):
    assert is_loopback(host) and bind_refusal(host, None, None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "dashboard.example.com"])
def test_any_other_bind_needs_auth_or_token(host):
    assert "without authentication" in (bind_refusal(host, None, None) or "")
    assert bind_refusal(host, "ops:pw", None) is None and bind_refusal(host, None, TOKEN) is None


def test_bad_credentials_options_are_refused():
    assert bind_refusal("0.0.0.0", "nopassword", None)
    assert bind_refusal("0.0.0.0", None, "short")
    assert bind_refusal("0.0.0.0", "a:b", TOKEN)


def test_the_command_refuses_a_public_bind_without_auth_in_one_line_exit_2():
    result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "--auth" in result.output and "--token" in result.output


# --- requests ------------------------------------------------------------------------------
def test_token_mode_refuses_anything_but_the_bearer_token():
    client = client_for(Auth(token=TOKEN, loopback_only=False))
    assert client.get("/api/snapshot").status_code == 401
    assert client.get("/api/snapshot", headers={"Authorization": "Bearer wrong-token-000000"}).status_code == 401
    assert client.get("/api/snapshot", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    answer = client.get("/api/snapshot", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.json()["breakers"][0]["state"] == "open"
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_the_page_takes_the_token_once_and_keeps_a_cookie_that_is_not_the_token():
    client = client_for(Auth(token=TOKEN, loopback_only=False))
    assert client.get("/?token=wrong-token-0000000", follow_redirects=False).status_code == 401
    answer = client.get(f"/?token={TOKEN}&x=1", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/?x=1"  # out of the address bar
    cookie = answer.cookies[AUTH_COOKIE]
    assert TOKEN not in cookie and TOKEN not in answer.headers["set-cookie"]
    assert "httponly" in answer.headers["set-cookie"].lower() and "samesite=strict" in answer.headers["set-cookie"].lower()
    page = client.get("/")  # the cookie alone now
    assert page.status_code == 200 and TOKEN not in page.text
    # Another process (another secret) does not accept this cookie.
    other = client_for(Auth(token=TOKEN, loopback_only=False))
    other.cookies.set(AUTH_COOKIE, cookie)
    assert other.get("/api/snapshot").status_code == 401


def test_basic_auth():
    client = client_for(Auth("ops:pa:ss", loopback_only=False))
    refused = client.get("/api/snapshot")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"ops:nope").decode()
    assert client.get("/api/snapshot", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert client.get("/api/snapshot", headers={"Authorization": "Basic !!notbase64"}).status_code == 401
    right = base64.b64encode(b"ops:pa:ss").decode()
    assert client.get("/api/snapshot", headers={"Authorization": f"Basic {right}"}).status_code == 200


def test_without_credentials_only_a_loopback_host_header_is_served():
    """A site on the internet that rebinds its name to 127.0.0.1 sends its own Host."""
    assert client_for(Auth(), base_url="http://evil.example:8765").get("/api/snapshot").status_code == 403
    # (the starlette that installs on Python 3.9 cannot parse an IPv6 base URL in its test client)
    ipv6 = ("http://[::1]:8765",) if sys.version_info >= (3, 10) else ()
    for base in ("http://127.0.0.1:8765", "http://localhost:8765", *ipv6):
        assert client_for(Auth(), base_url=base).get("/api/snapshot").status_code == 200


def test_every_part_of_the_snapshot_has_its_route():
    client = client_for(Auth())
    assert client.get("/api/breakers").json() == [{"name": "svc", "state": "open", "failures": 5}]
    assert client.get("/api/dead-letters").json() == {"svc": 2}
    for part in ("services", "queues", "actions"):
        assert client.get(f"/api/{part}").json() == []


def test_the_page_embeds_a_csrf_token_and_forbids_framing_and_inline_script():
    client = client_for(Auth())
    page = client.get("/")
    assert page.status_code == 200 and 'name="csrf-token" content="' in page.text and "{{csrf}}" not in page.text
    assert page.headers["x-frame-options"] == "DENY" and "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/dashboard.js").status_code == 200


# --- CSRF and double submission -----------------------------------------------------------------
def test_mutations_need_the_sessions_csrf_token():
    operations = CountingOperations()
    client = client_for(Auth(), operations)
    body = {"action_id": "a" * 16}
    assert client.post("/api/dead-letters/svc/purge", json=body).status_code == 403  # no token
    token = csrf_of(client)
    assert client.post("/api/dead-letters/svc/purge", json=body, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    stranger = client_for(Auth(), operations)  # another session's token is not this one's
    assert stranger.post("/api/dead-letters/svc/purge", json=body, headers={"X-CSRF-Token": token}).status_code == 403
    cross = client.post("/api/dead-letters/svc/purge", json=body,
                        headers={"X-CSRF-Token": token, "Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert operations.calls == []
    done = client.post("/api/dead-letters/svc/purge", json=body, headers={"X-CSRF-Token": token})
    assert done.status_code == 200 and done.json() == {"ok": True, "purged": 2, "duplicate": False}
    assert operations.calls == [("purge", "svc", {})]


def test_a_repeated_action_id_is_carried_out_once():
    operations = CountingOperations()
    client = client_for(Auth("ops:pw"), operations)
    headers = {"Authorization": "Basic " + base64.b64encode(b"ops:pw").decode()}
    headers["X-CSRF-Token"] = csrf_of(client, headers=headers)
    body = {"action_id": "b" * 16, "message_id": "m-1"}
    first = client.post("/api/dead-letters/svc/replay", json=body, headers=headers).json()
    again = client.post("/api/dead-letters/svc/replay", json=body, headers=headers).json()
    assert first["duplicate"] is False and again["duplicate"] is True and first["replayed"] == again["replayed"] == 1
    assert operations.calls == [("replay", "svc", {"message_id": "m-1"})]
    recent = client.get("/api/recent-actions", headers=headers).json()
    assert [(r["who"].split("@")[0], r["what"], r["message_id"]) for r in recent] == [("ops", "replay", "m-1")]
    assert client.post("/api/dead-letters/svc/replay", json={"action_id": "bad id"}, headers=headers).status_code == 400
    assert client.post("/api/dead-letters/svc/replay", json=[], headers=headers).status_code == 400
    assert client.post("/api/revoke/svc", json={"action_id": "c" * 16}, headers=headers).status_code == 404


def test_the_same_action_id_while_it_runs_is_refused():
    operations = CountingOperations()
    operations.gate.clear()
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(operations.run("purge", "svc", "d" * 16, "me", {})))
    worker.start()
    time.sleep(0.2)
    with pytest.raises(DuplicateAction):
        operations.run("purge", "svc", "d" * 16, "me", {})
    operations.gate.set()
    worker.join(5)
    assert results[0]["purged"] == 2 and len(operations.calls) == 1


def test_a_failing_action_is_reported_and_logged_without_credentials(caplog):
    operations = Operations("amqp://user:hunter2@127.0.0.1:1//")

    def broken(service: str, parameters: dict) -> dict:
        raise ConnectionError("cannot reach amqp://user:hunter2@127.0.0.1:1//")

    operations.handlers["purge"] = broken
    result = operations.run("purge", "svc", "e" * 16, "ops@127.0.0.1", {})
    assert result["ok"] is False and "hunter2" not in result["error"] and "***" in result["error"]
    assert "hunter2" not in json.dumps(list(operations.recent))


# --- redaction -----------------------------------------------------------------------------
def test_body_previews_hide_secret_fields_and_url_passwords():
    body = json.dumps({"payload": {"user": "u1", "password": "pw1", "api_key": "k", "nested": [{"token": "t"}],
                                   "callback": "amqp://svc:pw2@host//"}}).encode()
    shown = preview(body)
    for secret in ("pw1", '"k"', '"t"', "pw2"):
        assert secret not in shown
    assert '"user": "u1"' in shown and "***" in shown
    assert preview(b"\xff\xfe not json amqp://a:b@h//") .endswith("amqp://a:***@h//")
    assert len(preview(b"x" * 10000, limit=100)) < 200


# --- per-action stats in the heartbeat -------------------------------------------------------
def outcome(kind: OutcomeKind, seconds: float = 0.01) -> Outcome:
    return Outcome(kind, None, seconds)


def test_action_stats_count_outcomes_and_sketch_latency():
    stats = ActionStats()
    for _ in range(90):
        stats.record("get_user", outcome(OutcomeKind.REPLIED, 0.002))
    for _ in range(10):
        stats.record("get_user", outcome(OutcomeKind.RETRIED, 0.2))
    stats.record("get_user", outcome(OutcomeKind.EXPIRED, 0.0))
    summary = stats.summary()["get_user"]
    assert (summary["succeeded"], summary["failed"], summary["retried"], summary["expired"]) == (90, 10, 10, 1)
    assert 0.002 <= summary["p50"] <= 0.0026 and 0.2 <= summary["p95"] <= 0.26  # bucket upper bounds, <= ~26 % high
    stats.amend("get_user", outcome(OutcomeKind.REPLIED), outcome(OutcomeKind.DEAD_LETTERED))
    amended = stats.summary()["get_user"]
    assert (amended["succeeded"], amended["dead_lettered"], amended["failed"]) == (89, 1, 11)


def test_action_stats_stay_small_whatever_the_traffic():
    stats = ActionStats(max_actions=5)
    for index in range(1000):
        stats.record(f"action-{index}", outcome(OutcomeKind.REPLIED, index / 1000))
    summary = stats.summary()
    assert len(summary) <= 6 and summary[OTHER]["succeeded"] == 995
    assert len(json.dumps(summary)) < 5000
    assert quantile({}, 0.5) is None and BUCKETS[0] == 1e-4 and BUCKETS[-1] >= 99


def test_merge_adds_instances_and_skips_junk():
    one, two = ActionStats(), ActionStats()
    one.record("a", outcome(OutcomeKind.REPLIED, 0.001))
    two.record("a", outcome(OutcomeKind.FAILED, 1.0))
    wire = json.loads(json.dumps([one.summary(), two.summary()]))  # as read back from the registry
    merged = merge(wire + [{"a": "junk"}, {"b": {"succeeded": "x", "latency": {"999": 1, "z": 2}}}, []])  # type: ignore[list-item]
    assert merged["a"]["succeeded"] == 1 and merged["a"]["failed"] == 1 and merged["a"]["runs"] == 2
    assert merged["a"]["p95"] >= 1.0 and merged["b"]["runs"] == 0


def test_an_outcome_kind_added_later_counts_under_its_own_name():
    class Later:  # stands for a kind a feature adds to OutcomeKind (revoked, duplicate...)
        value = "revoked"

    stats = ActionStats()
    stats.record("a", Outcome(Later(), None, 0.001))  # type: ignore[arg-type]
    summary = stats.summary()
    assert summary["a"]["revoked"] == 1 and merge([summary, summary])["a"]["revoked"] == 2


def test_the_management_api_gives_unacked_and_rates_for_every_queue_of_a_service():
    """A stand-in for RabbitMQ's management API (this machine's broker may not enable it)."""
    import http.server

    from amqprpc.dashboard.queues import ManagementQueues

    seen: list[tuple[str, str]] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization", "")))
            body = json.dumps([
                {"name": "service.shop.request", "messages_ready": 7, "messages_unacknowledged": 3, "consumers": 2,
                 "message_stats": {"publish_details": {"rate": 12.5}, "deliver_get_details": {"rate": 11.0}}},
                {"name": "service.shop.event.on_order", "messages_ready": 0, "messages_unacknowledged": 0,
                 "consumers": 1},
                {"name": "service.other.request", "messages_ready": 1, "messages_unacknowledged": 0, "consumers": 0},
            ]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = ManagementQueues(f"http://127.0.0.1:{server.server_port}", "amqp://ops:pw@rabbit:5672/shop")
        rows = {row["name"]: row for row in source.queues(["shop"])}
        assert "pw" not in repr(source)
    finally:
        server.shutdown()
    assert set(rows) == {"service.shop.request", "service.shop.event.on_order"}
    request = rows["service.shop.request"]
    assert (request["ready"], request["unacked"], request["consumers"], request["publish_rate"],
            request["deliver_rate"], request["kind"]) == (7, 3, 2, 12.5, 11.0, "request")
    assert rows["service.shop.event.on_order"]["kind"] == "event"
    path, authorization = seen[0]
    assert path.startswith("/api/queues/shop?columns=") and authorization == "Basic " + base64.b64encode(b"ops:pw").decode()
