"""The shop's five services running together against the real broker and Redis: an order fans
out through events to payment, inventory and notification, under one trace id, on every
hop's records and log lines. What the handlers decide (refusals, overselling, idempotence,
a failed payment) is tested without the broker, in test_shop_handlers.py."""
import io
import json

import pytest

from amqprpc import RpcClient, Topology, Worker, logs
from amqprpc.server.events import service_queue_names
from amqprpc.testing import delete_exchanges, delete_queues, unique_name, wait_for
from workers import build_all
from workers.shop import Shop

pytestmark = pytest.mark.integration

TOKEN = "a-long-valid-token"


@pytest.fixture(scope="module")
def shop(broker_url, redis_available):
    """The whole shop in this process, on its own exchanges, queues and Redis prefix,
    with every log line captured as JSON."""
    namespace = unique_name("shop")
    shop = Shop(prefix=namespace + ":")
    topology = Topology().namespaced(namespace)
    services = build_all(shop)
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    workers = [Worker(service, broker_url=broker_url, topology=topology, concurrency=4) for service in services]
    try:
        for worker in workers:
            worker.start()
        with RpcClient("shop-tests", broker_url=broker_url, topology=topology, timeout=10) as client:
            yield shop, client, stream
    finally:
        for worker in workers:
            worker.shutdown(10)
        logs.configure("console", "warning")
        delete_queues(*[name for service in services for name in service_queue_names(service, topology)],
                      broker_url=broker_url)
        delete_exchanges(topology.service_exchange, topology.event_exchange, broker_url=broker_url)
        shop.delete_all()


def order(client, *items, user_id="user_001", token=TOKEN, **extra):
    return client.call("order-service", "create_order", {
        "token": token, "user_id": user_id, "items": [{"product_id": p, "quantity": qty} for p, qty in items], **extra})


def stock(client, product_id):
    return client.call("inventory-service", "check_stock", {"product_id": product_id})["stock"]


def wait_for_status(shop, order_id, status):
    wait_for(lambda: shop.redis.hget(shop.key("order", order_id), "status") == status, timeout=10)


def notifications(shop, order_id):
    return [json.loads(n) for n in shop.redis.lrange(shop.key("notifications", order_id), 0, -1)]


def test_an_order_fans_out_over_the_broker_to_payment_inventory_and_notification_under_one_trace_id(shop):
    shop, client, stream = shop
    before = stock(client, "prod_001")
    created = order(client, ("prod_001", 2))
    order_id, trace = created["order_id"], created["trace_id"]
    assert created["status"] == "created" and created["total"] == pytest.approx(99.8)
    wait_for_status(shop, order_id, "paid")
    wait_for(lambda: len(notifications(shop, order_id)) == 2, timeout=10)
    wait_for(lambda: shop.redis.hget(shop.key("reservation", order_id), "status") == "committed", timeout=10)

    payment = json.loads(shop.redis.get(shop.key("payment", order_id)))
    assert payment["status"] == "completed" and payment["amount"] == pytest.approx(99.8)
    reservation = shop.redis.hgetall(shop.key("reservation", order_id))
    assert json.loads(reservation["items"])[0]["quantity"] == 2
    sent = notifications(shop, order_id)
    assert [n["event"] for n in sent] == ["order.created", "payment.completed"]
    assert "received" in sent[0]["message"] and payment["payment_id"] in sent[1]["message"]
    assert stock(client, "prod_001") == before - 2
    # One trace id in every record of every service...
    assert {shop.redis.hget(shop.key("order", order_id), "trace_id"), payment["trace_id"],
            reservation["trace_id"], *(n["trace_id"] for n in sent)} == {trace}
    # ... and on every log line about the order, from all four services.
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if order_id in line]
    assert {line["service"] for line in lines} == {"order-service", "inventory-service", "payment-service",
                                                    "notification-service"}
    assert {line["trace_id"] for line in lines} == {trace}
    assert {line["event"] for line in lines} >= {"order created", "inventory reserved", "payment completed",
                                                  "inventory committed", "notification sent", "order status"}
