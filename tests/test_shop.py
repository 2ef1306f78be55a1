"""The shop's five services running together against the real broker and Redis: an order fans
out through events to payment, inventory and notification, under one trace id."""
import io
import json

import pytest

from amqprpc import RemoteError, RpcClient, Topology, Worker, logs
from amqprpc.events import service_queue_names
from amqprpc.testing import delete_exchanges, delete_queues, unique_name, wait_for
from workers import inventory_service, notification_service, order_service, payment_service, user_service
from workers.shop import Shop

pytestmark = pytest.mark.integration

TOKEN = "a-long-valid-token"
PAYMENT_LIMIT = 500.0  # this shop's card limit, so a failing payment is cheap to provoke


@pytest.fixture(scope="module")
def shop(broker_url, redis_available):
    """The whole shop in this process, on its own exchanges, queues and Redis prefix,
    with every log line captured as JSON."""
    namespace = unique_name("shop")
    shop = Shop(prefix=namespace + ":")
    topology = Topology().namespaced(namespace)
    services = [user_service.service, order_service.build(shop), payment_service.build(shop, limit=PAYMENT_LIMIT),
                inventory_service.build(shop), notification_service.build(shop)]
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


def test_an_order_fans_out_to_payment_inventory_and_notification_under_one_trace_id(shop):
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


def test_a_refused_token_or_suspended_user_creates_nothing(shop):
    shop, client, _ = shop
    with pytest.raises(RemoteError) as refused:
        order(client, ("prod_001", 1), token="short", order_id="o-bad-token")
    assert (refused.value.error_type, refused.value.message) == ("Unauthorized", "Invalid token")
    with pytest.raises(RemoteError, match="user_003 is suspended"):
        order(client, ("prod_001", 1), user_id="user_003", order_id="o-suspended")
    assert not shop.redis.exists(shop.key("order", "o-bad-token"), shop.key("order", "o-suspended"),
                                 shop.key("reservation", "o-bad-token"), shop.key("reservation", "o-suspended"))


def test_concurrent_orders_never_oversell(shop):
    shop, client, _ = shop
    available = stock(client, "prod_003")
    futures = [client.call_async("order-service", "create_order", {
        "token": TOKEN, "user_id": "user_002", "items": [{"product_id": "prod_003", "quantity": 1}]}, timeout=20)
        for _ in range(available + 5)]
    outcomes = [future.exception(25) for future in futures]
    refused = [exc for exc in outcomes if exc is not None]
    assert len(refused) == 5 and all(isinstance(exc, RemoteError) and exc.error_type == "OrderRejected"
                                      and "Out of stock: prod_003" in exc.message for exc in refused)
    assert stock(client, "prod_003") == 0


def test_a_failed_payment_gives_the_stock_back(shop):
    shop, client, _ = shop
    before = stock(client, "prod_002")
    created = order(client, ("prod_002", 30))  # 597.00, over this shop's limit
    wait_for_status(shop, created["order_id"], "payment_failed")
    wait_for(lambda: shop.redis.hget(shop.key("reservation", created["order_id"]), "status") == "released")
    assert stock(client, "prod_002") == before
    wait_for(lambda: len(notifications(shop, created["order_id"])) == 2)
    # order.created and payment.failed are handled by concurrent threads: either may be recorded first.
    assert any("over the limit" in note["message"] for note in notifications(shop, created["order_id"]))


def test_create_order_is_idempotent_per_order_id(shop):
    shop, client, _ = shop
    before = stock(client, "prod_001")
    first = order(client, ("prod_001", 1), order_id="o-" + unique_name("idem"))
    again = order(client, ("prod_001", 1), order_id=first["order_id"])
    assert again["order_id"] == first["order_id"] and again["trace_id"] == first["trace_id"]
    wait_for_status(shop, first["order_id"], "paid")
    assert stock(client, "prod_001") == before - 1
    assert client.call("order-service", "get_order", {"order_id": first["order_id"]})["status"] == "paid"
    with pytest.raises(RemoteError, match="Order not found"):
        client.call("order-service", "get_order", {"order_id": "o-nope"})
