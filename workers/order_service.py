"""The article's order-service: takes orders, and follows them as payments come in.

``create_order`` validates the caller's token and the user with user-service, reserves the
stock with inventory-service (both nested calls, so they carry this request's trace id and
what is left of its deadline), stores the order in Redis and publishes ``order.created``.

Redis: ``{prefix}order:{order_id}``, a hash ``order_id, user_id, items (JSON), total,
status, trace_id, created_at``; status ``created`` -> ``paid`` or ``payment_failed``.

Idempotent per ``order_id``: a caller may pass its own ``order_id`` (a web tier that
accepted the order before calling); calling again with it returns the stored order and, while
it is still unpaid, publishes ``order.created`` again (its consumers are idempotent too).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Dict

from amqprpc import Caller, RemoteError, Service, current_call
from amqprpc.logs import get_logger

from .models import NewOrder, Order, OrderCreated, OrderRef, PaymentOutcome
from .shop import Shop, trace_id

log = get_logger("workers.order")

USERS = "user-service"
INVENTORY = "inventory-service"
_STATUS_AFTER = {"payment.completed": "paid", "payment.failed": "payment_failed"}


class Unauthorized(Exception):
    """The token or the user was refused by user-service."""


class OrderRejected(Exception):
    """inventory-service could not reserve the items (out of stock, unknown product)."""


class OrderNotFound(Exception):
    pass


def load(shop: Shop, order_id: str) -> dict | None:
    """The order as stored, or None."""
    stored = shop.redis.hgetall(shop.key("order", order_id))
    if not stored:
        return None
    return {**stored, "items": json.loads(stored["items"]), "total": float(stored["total"]),
            "created_at": int(stored["created_at"])}


def announce(client: Caller, order: dict) -> None:
    client.publish_event("order.created", {
        "order_id": order["order_id"], "user_id": order["user_id"], "total": order["total"], "items": order["items"]})


def create_order(shop: Shop, service: Service, payload: NewOrder) -> Order:
    """Place an order: the order as stored, status created.

    Checks the token and the user with user-service, reserves the items with
    inventory-service, stores the order and publishes order.created. Fails with
    Unauthorized (token or user refused) or OrderRejected (stock, unknown product)."""
    # Calls out through service.client, taken only when needed (a worker that never calls opens no client).
    order_id = payload.order_id or f"o-{os.urandom(6).hex()}"
    existing = load(shop, order_id)
    if existing is not None:
        if existing["status"] == "created":
            announce(service.client, existing)
        return Order(**existing)
    user_id = payload.user_id
    rpc = service.client
    try:
        rpc.call(USERS, "validate_token", {"token": payload.token, "user_id": user_id})
        user = rpc.call(USERS, "get_user", {"user_id": user_id})
    except RemoteError as exc:
        raise Unauthorized(exc.message) from None
    if user.get("status") != "active":
        raise Unauthorized(f"User {user_id} is {user.get('status')}")
    try:
        reservation = rpc.call(INVENTORY, "reserve", {"order_id": order_id,
                                                     "items": [line.model_dump() for line in payload.items]})
    except RemoteError as exc:
        raise OrderRejected(exc.message) from None
    order: Dict[str, Any] = {"order_id": order_id, "user_id": user_id, "items": reservation["items"],
             "total": reservation["total"], "status": "created", "trace_id": trace_id(),
             "created_at": int(time.time())}
    stored: Dict[Any, Any] = {**order, "items": json.dumps(order["items"])}  # a hash: the lines as JSON
    shop.redis.hset(shop.key("order", order_id), mapping=stored)
    log.info("order created", order_id=order_id, user_id=user_id, total=order["total"])
    announce(rpc, order)
    return Order(**order)


def get_order(shop: Shop, payload: OrderRef) -> Order:
    """The order as stored, with its current status. Raises OrderNotFound."""
    order = load(shop, payload.order_id)
    if order is None:
        raise OrderNotFound(f"Order not found: {payload.order_id}")
    return Order(**order)


def on_payment(shop: Shop, payload: PaymentOutcome) -> None:
    """payment.completed marks the order paid, payment.failed marks it payment_failed."""
    call = current_call()
    status = _STATUS_AFTER.get(call.action if call is not None else "")
    key = shop.key("order", payload.order_id)
    if status is None:
        return
    if shop.redis.exists(key):
        shop.redis.hset(key, "status", status)
    log.info("order status", order_id=payload.order_id, status=status)


def build(shop: Shop | None = None, name: str = "order-service") -> Service:
    """order-service keeping its state under ``shop`` (default: from the environment)."""
    shop = shop or Shop()
    service = Service(name)
    service.handler("create_order")(functools.partial(create_order, shop, service))
    service.handler("get_order")(functools.partial(get_order, shop))
    service.event("payment.*", name="on_payment")(functools.partial(on_payment, shop))
    service.publishes("order.created", OrderCreated, description=(
        "An order was placed (create_order), its items reserved.\n\n"
        "Published again when create_order is called again with the order_id of an order still unpaid: "
        "consumers must be idempotent per order_id."))
    return service


service = build()
