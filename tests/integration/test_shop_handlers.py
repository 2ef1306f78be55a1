"""The shop's handlers without a broker: the whole shop wired through the in-memory client
(calls, and events fanning out, in milliseconds), and single services under worker_factory
with a fake client. Redis is real (the shop keeps its state there), under a prefix per test."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from amqprpc import RemoteError
from amqprpc.testing import FakeClient, InMemoryClient, unique_name, worker_factory
from workers import inventory_service, notification_service, order_service, payment_service, user_service
from workers.models import OrderLine, TokenCheck, User, UserRef
from workers.shop import Shop

TOKEN = "a-long-valid-token"
PAYMENT_LIMIT = 500.0  # this shop's card limit, so a failing payment is cheap to provoke


@pytest.fixture
def shop(redis_available):
    shop = Shop(prefix=unique_name("shop") + ":")
    yield shop
    shop.delete_all()


@pytest.fixture
def client(shop):
    """The five services of the shop, served in this process."""
    return InMemoryClient(user_service.build(), order_service.build(shop), inventory_service.build(shop),
                          payment_service.build(shop, limit=PAYMENT_LIMIT), notification_service.build(shop),
                          timeout=10)


def order(client, *items, user_id="user_001", token=TOKEN, **extra):
    return client.call("order-service", "create_order", {
        "token": token, "user_id": user_id, "items": [{"product_id": p, "quantity": qty} for p, qty in items], **extra})


def stock(client, product_id):
    return client.call("inventory-service", "check_stock", {"product_id": product_id})["stock"]


def notifications(shop, order_id):
    return [json.loads(n) for n in shop.redis.lrange(shop.key("notifications", order_id), 0, -1)]


@pytest.mark.integration
def test_an_order_is_paid_committed_and_notified_under_one_trace_id_once_the_call_returns(shop, client):
    before = stock(client, "prod_001")
    created = order(client, ("prod_001", 2))
    order_id, trace = created["order_id"], created["trace_id"]
    assert created["status"] == "created" and created["total"] == pytest.approx(99.8)
    # Every event the order caused was handled before the call returned: nothing to wait for.
    assert client.call("order-service", "get_order", {"order_id": order_id})["status"] == "paid"
    assert shop.redis.hget(shop.key("reservation", order_id), "status") == "committed"
    payment = json.loads(shop.redis.get(shop.key("payment", order_id)))
    sent = notifications(shop, order_id)
    assert [n["event"] for n in sent] == ["order.created", "payment.completed"]
    assert payment["payment_id"] in sent[1]["message"]
    assert stock(client, "prod_001") == before - 2
    assert {payment["trace_id"], shop.redis.hget(shop.key("reservation", order_id), "trace_id"),
            *(n["trace_id"] for n in sent)} == {trace}
    assert [e.action for e in client.events] == ["order.created", "payment.completed"]
    assert not client.dead_letters


@pytest.mark.integration
def test_a_refused_token_or_suspended_user_creates_nothing(shop, client):
    with pytest.raises(RemoteError) as refused:
        order(client, ("prod_001", 1), token="short", order_id="o-bad-token")
    assert (refused.value.error_type, refused.value.message) == ("Unauthorized", "Invalid token")
    with pytest.raises(RemoteError, match="user_003 is suspended"):
        order(client, ("prod_001", 1), user_id="user_003", order_id="o-suspended")
    assert not shop.redis.exists(shop.key("order", "o-bad-token"), shop.key("order", "o-suspended"),
                                 shop.key("reservation", "o-bad-token"), shop.key("reservation", "o-suspended"))
    assert not client.events


@pytest.mark.integration
def test_concurrent_orders_never_oversell(client):
    available = stock(client, "prod_003")
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: _outcome(client), range(available + 5)))
    refused = [exc for exc in outcomes if exc is not None]
    assert len(refused) == 5 and all(isinstance(exc, RemoteError) and exc.error_type == "OrderRejected"
                                      and "Out of stock: prod_003" in exc.message for exc in refused)
    assert stock(client, "prod_003") == 0


def _outcome(client):
    try:
        order(client, ("prod_003", 1), user_id="user_002")
    except RemoteError as exc:
        return exc
    return None


@pytest.mark.integration
def test_a_failed_payment_gives_the_stock_back(shop, client):
    before = stock(client, "prod_002")
    created = order(client, ("prod_002", 30))  # 597.00, over this shop's limit
    assert client.call("order-service", "get_order", {"order_id": created["order_id"]})["status"] == "payment_failed"
    assert shop.redis.hget(shop.key("reservation", created["order_id"]), "status") == "released"
    assert stock(client, "prod_002") == before
    assert any("over the limit" in note["message"] for note in notifications(shop, created["order_id"]))


@pytest.mark.integration
def test_create_order_is_idempotent_per_order_id(client):
    before = stock(client, "prod_001")
    first = order(client, ("prod_001", 1), order_id="o-idem")
    again = order(client, ("prod_001", 1), order_id="o-idem")
    assert again["order_id"] == first["order_id"] and again["trace_id"] == first["trace_id"]
    assert stock(client, "prod_001") == before - 1
    assert client.call("order-service", "get_order", {"order_id": "o-idem"})["status"] == "paid"
    with pytest.raises(RemoteError, match="Order not found"):
        client.call("order-service", "get_order", {"order_id": "o-nope"})


# --- one service at a time, its calls answered by a fake client --------------------------
def users_answering(status="active"):
    return (FakeClient().answer("user-service", "validate_token", {"valid": True})
            .answer("user-service", "get_user", lambda payload: {"id": payload["user_id"], "status": status}))


@pytest.mark.integration
def test_create_order_asks_user_service_then_reserves_then_announces(shop):
    fake = users_answering().answer("inventory-service", "reserve", lambda payload: {
        "order_id": payload["order_id"], "total": 9.5, "status": "reserved",
        "items": [{**line, "name": "Keyboard", "price": 9.5} for line in payload["items"]]})
    worker = worker_factory(order_service.build, client=fake, shop=shop)
    created = worker.create_order(token=TOKEN, user_id="user_009", items=[{"product_id": "prod_001", "quantity": 1}])
    assert [(c.service, c.action) for c in fake.calls] == [
        ("user-service", "validate_token"), ("user-service", "get_user"), ("inventory-service", "reserve")]
    assert fake.events == [("event", None, "order.created", {
        "order_id": created["order_id"], "user_id": "user_009", "total": 9.5,
        "items": [{"product_id": "prod_001", "quantity": 1, "name": "Keyboard", "price": 9.5}]})]
    assert worker.get_order(order_id=created["order_id"])["status"] == "created"


@pytest.mark.integration
def test_create_order_turns_refusals_into_its_own_errors(shop):
    worker = worker_factory(order_service.build, client=users_answering("suspended"), shop=shop)
    with pytest.raises(order_service.Unauthorized, match="is suspended"):
        worker.create_order(token=TOKEN, user_id="user_003", items=[{"product_id": "prod_001"}])
    fake = users_answering().answer("inventory-service", "reserve", RemoteError("Out of stock: prod_003", "OutOfStock"))
    with pytest.raises(order_service.OrderRejected, match="Out of stock"):
        worker_factory(order_service.build, client=fake, shop=shop).create_order(
            token=TOKEN, user_id="user_001", items=[{"product_id": "prod_003", "quantity": 99}])
    assert not fake.events


@pytest.mark.integration
def test_payment_charges_an_order_once_and_says_the_same_again(shop):
    worker = worker_factory(payment_service.build, shop=shop, limit=100.0)
    assert worker.event("order.created", {"order_id": "o-1", "user_id": "u", "total": 99.0}) == 1
    worker.event("order.created", {"order_id": "o-1", "user_id": "u", "total": 99.0})
    worker.event("order.created", {"order_id": "o-2", "user_id": "u", "total": 101.0})
    first, again, failed = (sent.payload for sent in worker.client.events)
    assert [sent.action for sent in worker.client.events] == ["payment.completed"] * 2 + ["payment.failed"]
    assert first == again and "over the limit" in failed["reason"]


@pytest.mark.integration
def test_a_notification_is_recorded_once_per_order_and_event(shop):
    worker = worker_factory(notification_service.build, shop=shop)
    worker.event("order.created", {"order_id": "o-1", "total": 5})
    worker.event("order.created", {"order_id": "o-1", "total": 5})
    worker.event("payment.failed", {"order_id": "o-1", "reason": "declined"})
    assert [n["message"] for n in notifications(shop, "o-1")] == [
        "Order o-1 received: 5.00 to pay.", "Payment for order o-1 failed: declined"]


def test_user_service_handlers_are_plain_functions():
    assert user_service.get_user(UserRef(user_id="user_001")).name == "Alice Zhang"
    with pytest.raises(ValueError, match="Invalid token"):
        user_service.validate_token(TokenCheck(token="short"))
    with pytest.raises(inventory_service.UnknownProduct):
        inventory_service.wanted_units([OrderLine(product_id="nope")])


@pytest.mark.integration
def test_a_payload_that_does_not_fit_the_shops_models_is_refused_before_any_handler_runs(client):
    with pytest.raises(RemoteError) as refused:
        order(client, ("prod_001", 0), user_id=7)
    assert refused.value.error_type == "ValidationError"
    assert refused.value.message == ("Invalid payload for order-service.create_order (2 errors): user_id: Input "
                                     "should be a valid string; items.0.quantity: Input should be greater than or "
                                     "equal to 1")
    assert not client.calls[1:]  # nothing went on to user- or inventory-service
    user = client.call("user-service", "get_user", UserRef(user_id="user_002"), returns=User)
    assert user == User(id="user_002", name="Bob Li", email="bob@example.com", status="active")
