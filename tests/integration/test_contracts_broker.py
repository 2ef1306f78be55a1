"""Typed handlers against the real broker: a bad payload gets a ValidationError reply naming
the field, a bad cast or event is dead-lettered at once (not retried), and a typed call
round-trips with returns=."""
from __future__ import annotations

import asyncio
import json

import pytest
from kombu import Connection

from amqprpc import AsyncRpcClient, RemoteError, RemoteValidationError, Retry, RpcClient, ValidationError
from amqprpc.testing import delete_exchanges, running_worker, unique_name, wait_for
from amqprpc.wire.topology import Topology

import contract_app

pytestmark = pytest.mark.integration


@pytest.fixture
def topology(broker_url):
    """Exchanges of this test's own: its payment.completed events meet nobody else's."""
    topology = Topology().namespaced(unique_name("contracts"))
    yield topology
    delete_exchanges(topology.service_exchange, topology.event_exchange)


@pytest.fixture
def shop(broker_url, topology):
    """(service name, client) with the typed contract service running in a worker."""
    name = unique_name("contracts")
    service = contract_app.build(name)
    service.events["on_paid"].retry = Retry(max_attempts=5, base_delay=0.1)  # must not apply to a bad payload
    with running_worker(service, broker_url=broker_url, topology=topology, concurrency=2), \
            RpcClient("tests", broker_url=broker_url, topology=topology) as client:
        yield name, client


def dead_letters(broker_url, topology, name):
    found = []
    with Connection(broker_url) as conn:
        channel = conn.channel()
        try:
            while (message := channel.basic_get(topology.dead_queue_name(name), no_ack=True)):
                found.append(message)
        except Exception:  # noqa: BLE001 - not declared yet: nothing dead-lettered
            pass
    return found


def test_a_bad_payload_gets_a_validation_error_reply_naming_the_field(shop):
    name, client = shop
    with pytest.raises(RemoteError) as caught:
        client.call(name, "create_order", {"user_id": "u1", "items": [{"product_id": "p1", "quantity": 0}]})
    assert caught.value.error_type == "ValidationError"
    assert caught.value.message == (f"Invalid payload for {name}.create_order (1 error): "
                                    "items.0.quantity: Input should be greater than 0")


def test_a_validation_error_reply_carries_each_failing_field_for_any_caller(shop, broker_url, topology):
    name, client = shop
    items = [{"product_id": "p1", "quantity": 0}] * 60
    with pytest.raises(RemoteValidationError) as caught:  # a RemoteError and a ValidationError
        client.call(name, "create_order", {"items": items})
    errors = caught.value.errors
    assert errors[:2] == [{"loc": "user_id", "msg": "Field required", "type": "missing"},
                          {"loc": "items.0.quantity", "msg": "Input should be greater than 0", "type": "greater_than"}]
    assert len(errors) == 50 and "(61 errors)" in caught.value.message  # the list is bounded, the text counts all
    # What a caller in another language reads: the reply's JSON, "errors" beside "error".
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        reply_queue = channel.queue_declare("", exclusive=True).queue
        channel.basic_publish(channel.prepare_message(
            b'{"action": "create_order", "payload": {"user_id": "u1", "items": []}, "correlation_id": "php-1"}',
            content_type="application/json", properties={"reply_to": reply_queue}),
            exchange=topology.service_exchange, routing_key=topology.request_key(name))
        reply = wait_for(lambda: channel.basic_get(reply_queue, no_ack=True), timeout=10)
    doc = json.loads(reply.body)
    assert doc["success"] is False and doc["error_type"] == "ValidationError"
    assert doc["errors"] == [{"loc": "items", "msg": "List should have at least 1 item after validation, not 0",
                              "type": "too_short"}]


def test_a_typed_call_round_trips_with_returns(shop):
    name, client = shop
    order = client.call(name, "create_order",
                        contract_app.NewOrder(user_id="u1", items=[contract_app.Item(product_id="p1", quantity=2)]),
                        returns=contract_app.Order)
    assert isinstance(order, contract_app.Order) and order.created_at.year == 2024 and order.items[0].quantity == 2
    later = client.call_async(name, "get_order", {"order_id": "o-7"}, returns=contract_app.Later).result(10)
    assert later == contract_app.Later(order_id="o-7", status="paid")
    assert client.proxy(name).get_order(order_id="o-8", returns=contract_app.Later).status == "paid"
    with pytest.raises(ValidationError, match=rf"^Invalid reply from {name}.echo \(1 error\): status: Field required"):
        client.call(name, "echo", {"order_id": "o-9"}, returns=contract_app.Later)

    async def via_asyncio():
        async with AsyncRpcClient("tests", broker_url=client.url, topology=client.topology) as aio:
            return await aio.call(name, "get_order", {"order_id": "o-10"}, returns=contract_app.Later)

    assert asyncio.run(via_asyncio()).order_id == "o-10"


def test_a_bad_cast_and_a_bad_event_are_dead_lettered_at_once(shop, broker_url, topology):
    name, client = shop
    contract_app.SEEN.clear()
    client.cast(name, "quote", {"product_id": "p1"})
    client.publish_event("payment.completed", {"order_id": "o-1", "amount": "not a number"})
    client.publish_event("payment.completed", {"order_id": "o-2", "amount": 3})
    wait_for(lambda: contract_app.SEEN, timeout=10)
    letters = []
    wait_for(lambda: letters.extend(dead_letters(broker_url, topology, name)) or len(letters) >= 2, timeout=10)
    headers = sorted((letter.properties["application_headers"] for letter in letters),
                     key=lambda h: h["x-original-queue"])
    assert [h["x-error-type"] for h in headers] == ["ValidationError", "ValidationError"]
    assert [h["x-attempts"] for h in headers] == [1, 1]  # dead at the first attempt: never retried
    assert "amount: Input should be a valid number" in headers[0]["x-error"]
    assert "quantity: Field required" in headers[1]["x-error"]
    assert contract_app.SEEN == [contract_app.Paid(order_id="o-2", amount=3.0)]
