"""The dashboard's page in real headless Chromium (tests/apps/browser.py, scripts/chromium.sh):
a worker that starts shows within 3 s, a queue's depth rises under load, an opened breaker
shows open, and a dead letter is replayed from the browser (Browse, Replay, Confirm) and
runs again. Every section is photographed on the way: into a temporary folder, or into
``$AMQPRPC_DASHBOARD_SHOTS`` (``AMQPRPC_DASHBOARD_SHOTS=docs/img`` refreshes the docs' images).
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import pytest

from amqprpc import RpcClient, Service
from amqprpc.testing import delete_queues, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

from procs import AMQPRPC, Proc
from test_dashboard_live import Dashboard, forget_breaker, make_shop, open_breaker, start_dashboard, worker_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser():
    from browser import Browser, ensure_chromium

    chromium = Browser(ensure_chromium())  # installs Debian's chromium when it is missing
    yield chromium
    chromium.close()


@pytest.fixture
def shots(tmp_path) -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("AMQPRPC_DASHBOARD_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def text_of(page: Any, selector: str) -> str | None:
    return page.eval(f"(e => e && e.textContent.trim())(document.querySelector({selector!r}))")


def click(page: Any, selector: str) -> None:
    assert page.eval(f"(e => e ? (e.click(), true) : false)(document.querySelector({selector!r}))"), selector


def test_the_page_follows_workers_queues_breakers_and_replays_a_dead_letter(browser, shots):
    prefix = unique_name("dash-registry")
    proc, base = start_dashboard("--stale-after", "3", prefix=prefix)
    dashboard = Dashboard(proc, base, prefix)
    orders, control = make_shop(unique_name("orders"))
    payments = Service(unique_name("payments"))

    @payments.handler
    def authorize(payload: dict) -> dict:
        time.sleep(0.002)
        return {"authorized": True}

    absent = unique_name("inventory")
    request_queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=orders.name)
    page = browser.open(f"{base}/#services")
    try:
        wait_for(lambda: text_of(page, "#status") == "live", timeout=15)
        with worker_for(dashboard, payments, concurrency=4), RpcClient("dashboard-tests") as client:
            started = time.monotonic()
            with worker_for(dashboard, orders, concurrency=1, prefetch=1):
                # 1. the worker shows, live, within 3 s of its start
                wait_for(lambda: text_of(page, f'[data-service="{orders.name}"] tr[data-instance] .badge') == "live",
                         timeout=3)
                print(f"worker on the page {time.monotonic() - started:.2f} s after it started")
                for index in range(40):
                    client.call(orders.name, "get_item", {"id": index}, timeout=5)
                    client.call(payments.name, "authorize", {"amount": index}, timeout=5)
                client.cast(orders.name, "charge", {"order": "o-1001", "password": "hunter2"})

                # 2. a queue's depth rises under load
                page.eval("location.hash = '#queues'")
                for index in range(40):
                    client.cast(orders.name, "slow_job", {"n": index})
                samples: list[int] = []

                def risen() -> bool:
                    shown = text_of(page, f'tr[data-queue="{request_queue}"] .ready')
                    if shown and shown.isdigit():
                        samples.append(int(shown))
                    return bool(samples) and samples[-1] >= 30

                wait_for(risen, timeout=10, interval=0.2)
                assert samples == sorted(samples) and samples[-1] > samples[0] or samples[0] >= 30, samples
                time.sleep(1.2)  # a few points of the sparkline
                page.screenshot(shots / "dashboard-queues.png")
                control["release"].set()
                wait_for(lambda: text_of(page, f'tr[data-queue="{request_queue}"] .ready') == "0", timeout=15)

                # 3. an opened breaker
                open_breaker(absent)
                page.eval("location.hash = '#breakers'")
                wait_for(lambda: text_of(page, f'tr[data-breaker="{absent}"] .badge') == "open", timeout=5)
                page.screenshot(shots / "dashboard-breakers.png")

                page.eval("location.hash = '#actions'")
                wait_for(lambda: "get_item" in (text_of(page, "#actions-body") or ""), timeout=5)
                page.screenshot(shots / "dashboard-actions.png")
                page.eval("location.hash = '#services'")
                page.screenshot(shots / "dashboard-services.png")

                # 4. a dead letter replayed from the browser
                page.eval("location.hash = '#dead-letters'")
                wait_for(lambda: text_of(page, f'tr[data-dead="{orders.name}"] td.num') == "1", timeout=10)
                click(page, f'button[data-do="browse"][data-service="{orders.name}"]')
                wait_for(lambda: text_of(page, "#letters tr[data-message] td:nth-child(2)") == "charge", timeout=10)
                preview = text_of(page, "#letters pre") or ""
                assert '"order": "o-1001"' in preview and "hunter2" not in preview
                page.screenshot(shots / "dashboard-dead-letters.png")
                control["fixed"] = True
                click(page, '#letters button[data-do="replay-one"]')
                click(page, "#letters button[data-confirm]")
                wait_for(lambda: (text_of(page, "#action-result") or "").startswith("replayed 1 dead letter"), timeout=10)
                wait_for(lambda: control["charged"] == ["o-1001"], timeout=10)
                wait_for(lambda: text_of(page, f'tr[data-dead="{orders.name}"] td.num') == "0", timeout=10)
                wait_for(lambda: "replay" in (text_of(page, "#recent-body") or ""), timeout=5)
                wait_for(lambda: "0 dead letter(s)" in (text_of(page, "#dead-browser h3") or ""), timeout=5)
                page.screenshot(shots / "dashboard-dead-letters-replayed.png")
                page.eval("location.hash = '#all'")
                page.screenshot(shots / "dashboard-all.png", height=1400)
    finally:
        control["release"].set()
        forget_breaker(absent)
        assert proc.stop() == 0, proc.output
    assert control["charged"] == ["o-1001"]  # replayed once, from the page
    for name in ("queues", "breakers", "actions", "services", "dead-letters", "dead-letters-replayed", "all"):
        assert (shots / f"dashboard-{name}.png").stat().st_size > 5000


SHOP = ("user-service", "order-service", "payment-service", "inventory-service", "notification-service")


def test_the_shops_services_show_live(browser, shots, own_broker):
    """The demo shop's five services as `amqprpc worker NAME` processes (on a broker node of
    this session's own: their queue names are fixed), and the dashboard showing them live."""
    prefix = unique_name("dash-registry")
    env = {"AMQPRPC_BROKER_URL": own_broker.url, "AMQPRPC_REGISTRY_PREFIX": prefix,
           "AMQPRPC_SHOP_PREFIX": unique_name("dash-shop") + ":", "AMQPRPC_REGISTRY_INTERVAL": "1",
           "AMQPRPC_LOG_FORMAT": "json"}
    workers = [Proc(AMQPRPC + ["worker", name, "--concurrency", "4"], env=env) for name in SHOP]
    proc, base = start_dashboard("--broker", own_broker.url, prefix=prefix)
    try:
        for worker in workers:
            worker.wait_for_line("worker ready", timeout=60)
        with RpcClient("dashboard-tests", broker_url=own_broker.url) as client:
            for _ in range(20):
                client.call("user-service", "get_user", {"user_id": "user_001"}, timeout=10)
        page = browser.open(f"{base}/#services")
        wait_for(lambda: all(text_of(page, f'[data-service="{name}"] tr[data-instance] .badge') == "live"
                             for name in SHOP), timeout=15)
        page.screenshot(shots / "dashboard-shop.png", height=1000)
        page.eval("location.hash = '#actions'")
        wait_for(lambda: "get_user" in (text_of(page, "#actions-body") or ""), timeout=10)
        page.eval("location.hash = '#all'")
        page.screenshot(shots / "dashboard-shop-all.png", height=1600)
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.output
        assert proc.stop() == 0, proc.output
        delete_queues(*(f"service.{name}.request" for name in SHOP), broker_url=own_broker.url)
